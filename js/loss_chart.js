// Pure helpers for the live loss chart: no ComfyUI, no DOM, so they can be unit-tested with node.

export function smooth(values, weight = 0.9) {
  // TensorBoard-style EMA, debiased so the first points are not pulled towards zero.
  const out = [];
  let average = 0;
  values.forEach((value, i) => {
    average = weight * average + (1 - weight) * value;
    out.push(average / (1 - Math.pow(weight, i + 1)));
  });
  return out;
}

export function chartScale(values, width, height, pad = 6, alsoShown = []) {
  // Maps (index, value) to canvas pixels; a flat series gets a unit band so it is still drawn.
  // `alsoShown`: more values the vertical range must hold (the validation losses).
  const finite = [...values, ...alsoShown].filter(Number.isFinite);
  let low = finite.length ? Math.min(...finite) : 0;
  let high = finite.length ? Math.max(...finite) : 1;
  if (high - low < 1e-12) { low -= 0.5; high += 0.5; }
  const span = Math.max(1, values.length - 1);
  return {
    low, high,
    x: (i) => pad + (width - 2 * pad) * (i / span),
    y: (v) => height - pad - (height - 2 * pad) * ((v - low) / (high - low)),
  };
}

export function formatSeconds(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(r).padStart(2, "0")}s` : `${r}s`;
}

export function resolveNode(rootGraph, executionId) {
  // Execution ids of nodes inside subgraphs are paths "outer:inner:…": walk them graph by graph,
  // so a Train node inside a subgraph is found and a root node with the same last id is not.
  if (executionId == null || !rootGraph) return null;
  const path = String(executionId).split(":");
  let graph = rootGraph;
  for (let i = 0; i < path.length; i++) {
    // LiteGraph ids are numbers; newer graphs may key them as strings.
    const node = graph?.getNodeById?.(+path[i]) ?? graph?.getNodeById?.(path[i]);
    if (!node) return null;
    if (i === path.length - 1) return node;
    graph = node.subgraph;
  }
  return null;
}

export function appendPoint(curve, point, keep = 2000) {
  // A new run (or a resumed one) starts at a step not after the last one seen: start a new curve.
  const fresh = !curve.length || point.step <= (curve.lastStep ?? 0);
  const next = fresh ? [] : curve.slice(curve.length >= keep ? 1 : 0);
  next.push(point.loss);
  next.lastStep = point.step;
  return next;
}

export function statusLine(point) {
  if (!point) return "waiting for the first step…";
  const eta = formatSeconds(point.eta_seconds);
  return `step ${point.step}/${point.total} · loss ${point.loss.toFixed(4)} · ` +
         `${point.seconds_per_step.toFixed(2)} s/step · ETA ${eta} · lr ${point.lr.toExponential(2)}`;
}

// --- drawing the chart: training loss, and the validation loss of each epoch -----------------------------
export const CHART_COLOURS = {
  raw: "rgba(120,160,220,0.45)", smoothed: "#5fa8ff", validation: "#ffa040", text: "#888",
};

export function lossSteps(losses, steps) {
  // The [first, last] step the losses span, evenly: as the server says (`loss_steps`), else 1 to their count.
  return Array.isArray(steps) && steps.length === 2 ? steps : [1, losses.length];
}

export function validationPoints(validation, losses, steps) {
  // [[epoch, loss, step], ...] -> {epoch, loss, step, index}: where each sits on the loss curve (index may be
  // fractional), at the step its epoch ended. Points outside the curve (a resumed run's earlier epochs) and
  // missing values are left out.
  const [first, last] = lossSteps(losses, steps);
  const span = Math.max(1, last - first);
  return (validation ?? [])
    .filter((entry) => Array.isArray(entry) && Number.isFinite(entry[1]) && entry[2] >= first && entry[2] <= last)
    .map(([epoch, loss, step]) => ({ epoch, loss, step, index: ((step - first) / span) * Math.max(0, losses.length - 1) }));
}

export function appendValidation(validation, point, curve) {
  // Live: a new curve (a new or resumed run) starts a new list; a step that ended an epoch brings its
  // [epoch, loss, step] (the progress event's `validation_loss`).
  const kept = curve.length <= 1 ? [] : [...(validation ?? [])];
  if (Array.isArray(point?.validation_loss)) kept.push(point.validation_loss);
  return kept;
}

export function curveSteps(curve) {
  // The steps a live curve (appendPoint's) spans.
  return curve.lastStep ? [curve.lastStep - curve.length + 1, curve.lastStep] : null;
}

export function drawLossChart(ctx, width, height, losses, { validation = [], steps = null } = {}) {
  // Draws on a cleared 2D context: the raw and smoothed training loss, the validation points joined by a
  // line, the value range, and a legend when there is validation. Returns the points drawn.
  if (!losses.length) return [];
  const points = validationPoints(validation, losses, steps);
  const scale = chartScale(losses, width, height, 6, points.map((p) => p.loss));
  const line = (coordinates, colour, lineWidth) => {
    ctx.strokeStyle = colour;
    ctx.lineWidth = lineWidth;
    ctx.beginPath();
    coordinates.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.stroke();
  };
  const curve = (values) => values.map((v, i) => [scale.x(i), scale.y(v)]).filter(([, y]) => Number.isFinite(y));
  line(curve(losses), CHART_COLOURS.raw, 1);
  line(curve(smooth(losses)), CHART_COLOURS.smoothed, 2);
  if (points.length) {
    const at = points.map((p) => [scale.x(p.index), scale.y(p.loss)]);
    if (at.length > 1) line(at, CHART_COLOURS.validation, 1);
    ctx.fillStyle = CHART_COLOURS.validation;
    for (const [x, y] of at) {
      ctx.beginPath();
      ctx.arc(x, y, 3, 0, 2 * Math.PI);
      ctx.fill();
    }
  }
  ctx.font = "10px monospace";
  ctx.fillStyle = CHART_COLOURS.text;
  ctx.fillText(scale.high.toPrecision(3), 4, 12);
  ctx.fillText(scale.low.toPrecision(3), 4, height - 4);
  if (points.length) {         // the legend, top right: which colour is which, and the epoch to pick
    const best = points.reduce((a, b) => (b.loss < a.loss ? b : a));
    ctx.textAlign = "right";
    ctx.fillStyle = CHART_COLOURS.smoothed;
    ctx.fillText("— training loss", width - 4, 12);
    ctx.fillStyle = CHART_COLOURS.validation;
    ctx.fillText(`● validation, lowest: epoch ${best.epoch}`, width - 4, 24);
    ctx.textAlign = "left";
  }
  return points;
}

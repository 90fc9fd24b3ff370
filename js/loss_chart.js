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

export function chartScale(values, width, height, pad = 6) {
  // Maps (index, value) to canvas pixels; a flat series gets a unit band so it is still drawn.
  const finite = values.filter(Number.isFinite);
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

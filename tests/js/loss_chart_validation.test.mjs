// The loss chart's validation points: where they sit, how live events add them, and what is drawn.
import test from "node:test";
import assert from "node:assert/strict";
import { appendPoint, appendValidation, CHART_COLOURS, curveSteps, drawLossChart, validationPoints } from "../../js/loss_chart.js";

function recordingContext() {
  // A 2D context that records what is drawn: strokes (with their points and colour), dots and texts.
  const calls = { strokes: [], dots: [], texts: [] };
  let path = [];
  const ctx = {
    calls, strokeStyle: "", fillStyle: "", lineWidth: 1, font: "", textAlign: "left",
    beginPath() { path = []; },
    moveTo(x, y) { path.push([x, y]); },
    lineTo(x, y) { path.push([x, y]); },
    arc(x, y) { path.push([x, y]); },
    stroke() { calls.strokes.push({ colour: this.strokeStyle, points: path }); },
    fill() { calls.dots.push({ colour: this.fillStyle, at: path[0] }); },
    fillText(text, x, y) { calls.texts.push({ text, colour: this.fillStyle, x, y }); },
  };
  return ctx;
}

test("validation points sit at the step their epoch ended, on the curve's steps", () => {
  const losses = [4, 3, 2, 1, 1, 1];                      // steps 1..6
  const points = validationPoints([[1, 2.5, 3], [2, 1.5, 6]], losses);
  assert.deepEqual(points.map((p) => [p.epoch, p.index]), [[1, 2], [2, 5]]);
  // a resumed run's curve spans steps 11..16: an earlier run's epoch (step 9) is left out
  const resumed = validationPoints([[3, 2, 9], [4, 1.2, 12], [5, null, 15]], losses, [11, 16]);
  assert.deepEqual(resumed.map((p) => [p.epoch, p.index]), [[4, 1]]);
  // a thinned-out history (fewer points than steps) places points in proportion
  assert.equal(validationPoints([[1, 1, 51]], [3, 2, 1], [1, 101])[0].index, 1);
});

test("live events add each epoch's validation loss; a new curve starts a new list", () => {
  let curve = [];
  let validation = [];
  for (const point of [{ step: 1, loss: 1 }, { step: 2, loss: 0.9, validation_loss: [1, 0.8, 2] }, { step: 3, loss: 0.7 }]) {
    curve = appendPoint(curve, point);
    validation = appendValidation(validation, point, curve);
  }
  assert.deepEqual(validation, [[1, 0.8, 2]]);
  assert.deepEqual(curveSteps(curve), [1, 3]);
  curve = appendPoint(curve, { step: 1, loss: 1 });        // queued again
  assert.deepEqual(appendValidation(validation, { step: 1, loss: 1 }, curve), []);
});

test("the chart draws the validation loss in its own colour, on the same scale, with a legend", () => {
  const ctx = recordingContext();
  const drawn = drawLossChart(ctx, 200, 100, [4, 3, 2, 1], { validation: [[1, 5, 2], [2, 2.5, 4]] });
  assert.equal(drawn.length, 2);
  const validationLine = ctx.calls.strokes.find((s) => s.colour === CHART_COLOURS.validation);
  assert.ok(validationLine, "no validation line");
  assert.equal(validationLine.points.length, 2);
  const dots = ctx.calls.dots.filter((d) => d.colour === CHART_COLOURS.validation);
  assert.equal(dots.length, 2);
  // the highest value (5, a validation loss) is at the top of the chart, the range label says so
  assert.equal(Math.min(...dots.map((d) => d.at[1])), 6);
  assert.ok(ctx.calls.texts.some((t) => t.text === (5).toPrecision(3)));
  // the second point is at the last step, the right edge
  assert.equal(dots[1].at[0], 194);
  assert.ok(ctx.calls.texts.some((t) => t.colour === CHART_COLOURS.validation && /lowest: epoch 2/.test(t.text)));
  const plain = recordingContext();
  drawLossChart(plain, 200, 100, [4, 3, 2, 1]);
  assert.ok(!plain.calls.strokes.some((s) => s.colour === CHART_COLOURS.validation));
  assert.ok(!plain.calls.texts.some((t) => /validation/.test(t.text)), "a legend without validation");
  assert.deepEqual(drawLossChart(recordingContext(), 200, 100, []), []);
});

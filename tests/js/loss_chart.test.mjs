// Unit tests of the chart's pure logic, run with `node --test` (tests/comfy/test_js.py runs them).
import test from "node:test";
import assert from "node:assert/strict";
import { appendPoint, chartScale, formatSeconds, resolveNode, smooth, statusLine } from "../../js/loss_chart.js";

test("smoothing is debiased: a constant series stays constant", () => {
  assert.deepEqual(smooth([2, 2, 2]).map((v) => +v.toFixed(9)), [2, 2, 2]);
});

test("smoothing follows a falling series from above", () => {
  const s = smooth([4, 3, 2, 1]);
  assert.ok(s[3] > 1 && s[3] < 4 && s[0] === 4);
});

test("scale maps the extremes to the padded edges, highest at the top", () => {
  const sc = chartScale([1, 3, 2], 100, 50, 5);
  assert.equal(sc.x(0), 5);
  assert.equal(sc.x(2), 95);
  assert.equal(sc.y(3), 5);
  assert.equal(sc.y(1), 45);
});

test("a flat series still gets a drawable band", () => {
  const sc = chartScale([0.5, 0.5], 100, 50);
  assert.ok(sc.high > sc.low && Number.isFinite(sc.y(0.5)));
});

test("seconds read like an ETA", () => {
  assert.equal(formatSeconds(42), "42s");
  assert.equal(formatSeconds(125), "2m05s");
  assert.equal(formatSeconds(3 * 3600 + 60), "3h01m");
  assert.equal(formatSeconds(NaN), "–");
});

function graph(nodes) {
  return { getNodeById: (id) => nodes.find((n) => n.id === id) ?? null };
}

test("execution ids resolve through subgraphs, never to a root node with the same last id", () => {
  const inner = { id: 7, name: "inner" };
  const root7 = { id: 7, name: "root" };
  const wrapper = { id: 12, subgraph: graph([inner]) };
  const root = graph([root7, wrapper]);
  assert.equal(resolveNode(root, "7"), root7);
  assert.equal(resolveNode(root, "12:7"), inner);
  assert.equal(resolveNode(root, "13:7"), null);
  assert.equal(resolveNode(root, null), null);
});

test("a run that starts again, or resumes, starts a new curve", () => {
  let curve = [];
  curve = appendPoint(curve, { step: 1, loss: 0.5 });
  curve = appendPoint(curve, { step: 2, loss: 0.4 });
  assert.deepEqual(Array.from(curve), [0.5, 0.4]);
  curve = appendPoint(curve, { step: 1, loss: 0.9 });
  assert.deepEqual(Array.from(curve), [0.9]);
  curve = appendPoint(curve, { step: 2, loss: 0.8 });
  const resumed = appendPoint(curve, { step: 2, loss: 0.7 });
  assert.deepEqual(Array.from(resumed), [0.7]);
});

test("status line names step, loss, speed and ETA", () => {
  const line = statusLine({ step: 3, total: 10, loss: 0.1234, seconds_per_step: 1.5, eta_seconds: 10.5, lr: 1e-4 });
  assert.match(line, /step 3\/10/);
  assert.match(line, /loss 0\.1234/);
  assert.match(line, /ETA 11s|ETA 10s/);
});

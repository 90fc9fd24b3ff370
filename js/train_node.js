// Train LoRA in the graph: the live loss chart with its status line, the sample previews (preview_strip.js)
// and the report, each a fixed-height area that is there from the start, so a run never grows the node.
// The server's events are named in events.js (the same names as nodes/events.py).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { TRAIN_PREVIEW, TRAIN_PROGRESS, TRAIN_STATUS, TRAIN_STOPPED } from "./events.js";
import { appendPoint, appendValidation, curveSteps, drawLossChart, resolveNode, statusLine } from "./loss_chart.js";
import { darkBox, domArea, fitNodeToWidgets } from "./dom_widgets.js";
import { addPreview, previewStrip, setPreviews } from "./preview_strip.js";
import { reportWidget, showReport } from "./reports.js";

export const TRAIN_NODE = "LoraLabTrainLora";
const CHART_HEIGHT = 150;

function lossChartWidget(node) {
  let widget = node.widgets?.find((w) => w.name === "loralab_loss_chart");
  if (widget) return widget;
  const canvas = document.createElement("canvas");
  canvas.style.cssText = "flex:1;min-height:0;width:100%;background:#1b1b1b;border-radius:3px;";
  // The status line wraps (up to three lines) so a failure upstream can say what to fix.
  const status = document.createElement("div");
  status.className = "loralab-train-status";
  status.style.cssText = "flex:none;max-height:4.2em;overflow:hidden;white-space:normal;overflow-wrap:anywhere;";
  const root = document.createElement("div");
  root.className = "loralab-loss-chart";
  root.style.cssText = darkBox("display:flex;flex-direction:column;gap:2px;padding:2px;");
  root.append(canvas, status);
  widget = domArea(node, "loralab_loss_chart", root, CHART_HEIGHT);
  widget.draw_chart = () => drawChart(canvas, status, node);
  return widget;
}

function drawChart(canvas, status, node) {
  const problem = node.loralab_problem?.text;
  status.textContent = problem ?? statusLine(node.loralab_last);
  status.style.color = problem ? "#f88" : "#bbb";
  const losses = node.properties?.loralab_loss ?? [];
  const width = (canvas.width = canvas.clientWidth || 300);
  const height = (canvas.height = canvas.clientHeight || 100);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  // Kept in the node's properties beside the losses, so the chart survives save and reload.
  drawLossChart(ctx, width, height, losses, {
    validation: node.properties?.loralab_validation ?? [], steps: node.properties?.loralab_loss_steps ?? null,
  });
}

export function showProblem(node, text, promptId = null) {
  // A node this one waits on failed: say so where the progress would show, and in full in the report.
  // Problems of one prompt add up (a missing checkpoint at validation, then Caption failing at run time).
  const earlier = node.loralab_problem;
  if (earlier && promptId != null && earlier.promptId === promptId) {
    text = [...new Set([...earlier.text.split("\n"), ...text.split("\n")])].join("\n");
  }
  node.loralab_problem = { text, promptId };
  lossChartWidget(node).draw_chart();
  showReport(node, text, true);
}

export function clearProblem(node, promptId) {
  // A new prompt started: an older prompt's problem no longer applies (this prompt's own stays).
  if (!node.loralab_problem || node.loralab_problem.promptId === promptId) return;
  node.loralab_problem = null;
  lossChartWidget(node).draw_chart();
}

export function trainNodes() {
  return (app.graph?._nodes ?? []).filter((node) => node.comfyClass === TRAIN_NODE);
}

function trainNodeOf(detail) {
  const node = resolveNode(app.graph, detail.node);
  return node && node.comfyClass === TRAIN_NODE ? node : null;
}

app.registerExtension({
  name: "LoRALab.trainNode",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== TRAIN_NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.properties = this.properties || {};
      this.properties.loralab_loss = this.properties.loralab_loss || [];
      lossChartWidget(this);         // in this order under the node's own widgets
      previewStrip(this);
      reportWidget(this);
      fitNodeToWidgets(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      // The last run's curve is kept in the node's properties, so it survives save and reload.
      requestAnimationFrame(() => lossChartWidget(this).draw_chart());
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      if (Array.isArray(message?.loss) && message.loss.length) {
        this.properties.loralab_loss = message.loss;   // the finished run's whole curve is authoritative
        this.properties.loralab_loss_steps = message.loss_steps ?? null;
        this.properties.loralab_validation = message.validation_loss ?? [];
        lossChartWidget(this).draw_chart();
      }
      // The finished run's previews; none (previews off, a reused run) clears an earlier run's.
      setPreviews(this, Array.isArray(message?.previews) ? message.previews : []);
      return result;
    };
  },
  async setup() {
    api.addEventListener(TRAIN_PROGRESS, ({ detail }) => {
      const node = trainNodeOf(detail);
      if (!node) return;
      node.properties = node.properties || {};
      node.loralab_curve = appendPoint(node.loralab_curve ?? [], detail);
      if (node.loralab_curve.length === 1) setPreviews(node, []);     // a new run: the last one's are gone
      node.properties.loralab_loss = Array.from(node.loralab_curve);
      node.properties.loralab_loss_steps = curveSteps(node.loralab_curve);
      node.properties.loralab_validation = appendValidation(node.properties.loralab_validation, detail, node.loralab_curve);
      node.loralab_last = detail;
      node.loralab_problem = null;                       // it runs, so nothing upstream failed
      lossChartWidget(node).draw_chart();
    });
    api.addEventListener(TRAIN_PREVIEW, ({ detail }) => {
      const node = trainNodeOf(detail);
      if (node) addPreview(node, detail);
    });
    api.addEventListener(TRAIN_STATUS, ({ detail }) => {      // e.g. the command for the other machines
      const node = trainNodeOf(detail);
      if (node) showReport(node, detail.text);
    });
    api.addEventListener(TRAIN_STOPPED, ({ detail }) => {
      const node = trainNodeOf(detail);
      if (node) showReport(node, `Training ${detail.reason} at step ${detail.step}.\nSaved: ${detail.saved}`);
    });
  },
});

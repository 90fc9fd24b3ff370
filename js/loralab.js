// LoRA Lab front end: reports shown on the nodes that make them, and Train LoRA's live loss chart.
// DOM widgets only (canvas-drawn widgets break in ComfyUI's newer renderer).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { TRAIN_PREVIEW, TRAIN_PROGRESS, TRAIN_STOPPED } from "./events.js";
import { appendPoint, chartScale, resolveNode, smooth, statusLine } from "./loss_chart.js";

const REPORT_NODES = new Set(["LoraLabDatasetFromFolder", "LoraLabCaption", "LoraLabTrainLora"]);
// Both front ends give an INT named "seed" a control widget that defaults to "randomize": a re-queued,
// unchanged graph would then retrain (or re-render the grid) every time. These start "fixed".
const FIXED_SEED_NODES = new Set(["LoraLabTrainLora", "LoraLabLoraCompareGrid"]);
const TRAIN_NODE = "LoraLabTrainLora";

function displayWidget(node, name, element, options = {}) {
  // A display-only DOM widget: never saved (the options flag is read by the newer front end, the
  // property by the legacy one), so the saved values of the node's real widgets keep their positions.
  const widget = node.addDOMWidget(name, name, element, {
    getValue: () => undefined, setValue: () => {}, serialize: false, ...options,
  });
  widget.serialize = false;
  return widget;
}

function reportWidget(node) {
  // A read-only text box at the end of the widgets, so saved widget values keep their positions.
  let widget = node.widgets?.find((w) => w.name === "loralab_report");
  if (widget) return widget;
  const box = document.createElement("textarea");
  box.readOnly = true;
  box.style.cssText = "width:100%;height:100%;font:11px monospace;resize:none;opacity:0.85;";
  widget = displayWidget(node, "loralab_report", box, {
    getValue: () => box.value, setValue: (v) => { box.value = v ?? ""; },
  });
  widget.computeSize = (width) => [width, 120];
  return widget;
}

function lossChartWidget(node) {
  let widget = node.widgets?.find((w) => w.name === "loralab_loss_chart");
  if (widget) return widget;
  const root = document.createElement("div");
  root.style.cssText = "display:flex;flex-direction:column;gap:2px;width:100%;height:100%;";
  const canvas = document.createElement("canvas");
  canvas.style.cssText = "flex:1;width:100%;min-height:80px;background:#1b1b1b;border-radius:4px;";
  const status = document.createElement("div");
  status.style.cssText = "font:11px monospace;color:#bbb;white-space:nowrap;overflow:hidden;";
  root.append(canvas, status);
  widget = displayWidget(node, "loralab_loss_chart", root);
  widget.computeSize = (width) => [width, 150];
  widget.draw_chart = () => drawChart(canvas, status, node.properties?.loralab_loss ?? [], node.loralab_last);
  return widget;
}

function previewWidget(node) {
  // The latest sample previews, as they arrive: one small picture per preview prompt, with its step.
  let widget = node.widgets?.find((w) => w.name === "loralab_previews");
  if (widget) return widget;
  const root = document.createElement("div");
  root.style.cssText = "display:flex;flex-direction:column;gap:2px;width:100%;height:100%;overflow:hidden;";
  const label = document.createElement("div");
  label.style.cssText = "font:11px monospace;color:#bbb;";
  const strip = document.createElement("div");
  strip.style.cssText = "display:flex;gap:4px;flex:1;min-height:0;";
  root.append(label, strip);
  // Height through the options both front ends read for DOM widgets (the 2024 one ignores computeSize here).
  widget = displayWidget(node, "loralab_previews", root, {
    getMinHeight: () => 140, getHeight: () => 140, getMaxHeight: () => 400,
  });
  widget.show_previews = (detail) => {
    label.textContent = `previews at step ${detail.step}`;
    strip.replaceChildren(...detail.images.map((image, index) => {
      const img = document.createElement("img");
      const query = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder, type: image.type });
      img.src = api.apiURL(`/view?${query}`);
      img.title = detail.prompts?.[index] ?? "";
      img.style.cssText = "height:100%;max-width:50%;object-fit:contain;border-radius:3px;";
      return img;
    }));
  };
  return widget;
}

function drawChart(canvas, status, losses, lastPoint) {
  const width = (canvas.width = canvas.clientWidth || 300);
  const height = (canvas.height = canvas.clientHeight || 100);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  status.textContent = statusLine(lastPoint);
  if (!losses.length) return;
  const scale = chartScale(losses, width, height);
  const line = (values, colour, lineWidth) => {
    ctx.strokeStyle = colour;
    ctx.lineWidth = lineWidth;
    ctx.beginPath();
    values.forEach((v, i) => (i ? ctx.lineTo(scale.x(i), scale.y(v)) : ctx.moveTo(scale.x(i), scale.y(v))));
    ctx.stroke();
  };
  line(losses, "rgba(120,160,220,0.45)", 1);
  line(smooth(losses), "#5fa8ff", 2);
  ctx.fillStyle = "#888";
  ctx.font = "10px monospace";
  ctx.fillText(scale.high.toPrecision(3), 4, 12);
  ctx.fillText(scale.low.toPrecision(3), 4, height - 4);
}

function startSeedFixed(nodeType) {
  // onNodeCreated runs before a saved workflow's values are applied, so saved choices still win.
  const onNodeCreated = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function () {
    const result = onNodeCreated?.apply(this, arguments);
    const control = this.widgets?.find((w) => w.name === "control_after_generate");
    if (control) control.value = "fixed";
    return result;
  };
}

app.registerExtension({
  name: "LoRALab.nodes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (FIXED_SEED_NODES.has(nodeData.name)) startSeedFixed(nodeType);
    if (!REPORT_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (nodeData.name === TRAIN_NODE) {
        this.properties = this.properties || {};
        this.properties.loralab_loss = this.properties.loralab_loss || [];
        lossChartWidget(this);
      }
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      // The last run's curve is kept in the node's properties, so it survives save and reload.
      if (nodeData.name === TRAIN_NODE) requestAnimationFrame(() => lossChartWidget(this).draw_chart());
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text?.length) reportWidget(this).value = Array.isArray(text) ? text.join("\n") : String(text);
      if (nodeData.name === TRAIN_NODE && Array.isArray(message?.loss) && message.loss.length) {
        this.properties.loralab_loss = message.loss;   // the finished run's whole curve is authoritative
        lossChartWidget(this).draw_chart();
      }
      this.setDirtyCanvas?.(true, true);
      return result;
    };
  },
  async setup() {
    api.addEventListener(TRAIN_PROGRESS, ({ detail }) => {
      const node = resolveNode(app.graph, detail.node);
      if (!node || node.comfyClass !== TRAIN_NODE) return;
      node.properties = node.properties || {};
      node.loralab_curve = appendPoint(node.loralab_curve ?? [], detail);
      node.properties.loralab_loss = Array.from(node.loralab_curve);
      node.loralab_last = detail;
      lossChartWidget(node).draw_chart();
    });
    api.addEventListener(TRAIN_PREVIEW, ({ detail }) => {
      const node = resolveNode(app.graph, detail.node);
      if (!node || node.comfyClass !== TRAIN_NODE) return;
      previewWidget(node).show_previews(detail);
      node.setSize?.([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
      node.setDirtyCanvas?.(true, true);
    });
    api.addEventListener(TRAIN_STOPPED, ({ detail }) => {
      const node = resolveNode(app.graph, detail.node);
      if (!node || node.comfyClass !== TRAIN_NODE) return;
      reportWidget(node).value = `Training ${detail.reason} at step ${detail.step}.\nSaved: ${detail.saved}`;
      node.setDirtyCanvas?.(true, true);
    });
  },
});

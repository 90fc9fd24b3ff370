// Train LoRA in the graph: the live loss chart, the sample previews as they arrive, and the stop notice.
// The server's events are named in events.js (the same names as nodes/events.py).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { TRAIN_PREVIEW, TRAIN_PROGRESS, TRAIN_STOPPED } from "./events.js";
import { appendPoint, chartScale, resolveNode, smooth, statusLine } from "./loss_chart.js";
import { displayWidget, reportWidget } from "./reports.js";

const TRAIN_NODE = "LoraLabTrainLora";

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
      lossChartWidget(this);
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
        lossChartWidget(this).draw_chart();
      }
      return result;
    };
  },
  async setup() {
    api.addEventListener(TRAIN_PROGRESS, ({ detail }) => {
      const node = trainNodeOf(detail);
      if (!node) return;
      node.properties = node.properties || {};
      node.loralab_curve = appendPoint(node.loralab_curve ?? [], detail);
      node.properties.loralab_loss = Array.from(node.loralab_curve);
      node.loralab_last = detail;
      lossChartWidget(node).draw_chart();
    });
    api.addEventListener(TRAIN_PREVIEW, ({ detail }) => {
      const node = trainNodeOf(detail);
      if (!node) return;
      previewWidget(node).show_previews(detail);
      node.setSize?.([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
      node.setDirtyCanvas?.(true, true);
    });
    api.addEventListener(TRAIN_STOPPED, ({ detail }) => {
      const node = trainNodeOf(detail);
      if (!node) return;
      reportWidget(node).value = `Training ${detail.reason} at step ${detail.step}.\nSaved: ${detail.saved}`;
      node.setDirtyCanvas?.(true, true);
    });
  },
});

// Reports shown on the nodes that make them (Dataset from Folder, Caption, Train LoRA): the text the node
// returns as ui.text, in a read-only box under its widgets. The box is there from the start, at a fixed
// height, so a run fills it instead of growing the node over its neighbours.
import { app } from "../../scripts/app.js";
import { darkBox, domArea, fitNodeToWidgets } from "./dom_widgets.js";

const REPORT_NODES = new Set(["LoraLabDatasetFromFolder", "LoraLabCaption", "LoraLabTrainLora", "LoraLabTagImages",
                              "LoraLabTagReport", "LoraLabEpochGrid"]);
const LAID_OUT_ELSEWHERE = "LoraLabTrainLora";      // train_node.js puts its report under the chart and previews
const REPORT_HEIGHT = 110;      // about eight lines; the rest scrolls

export function reportWidget(node) {
  // Last of the node's widgets, so saved widget values keep their positions.
  let widget = node.widgets?.find((w) => w.name === "loralab_report");
  if (widget) return widget;
  const box = document.createElement("textarea");
  box.readOnly = true;
  box.className = "loralab-report";
  box.placeholder = "The report of the last run shows here.";
  box.style.cssText = darkBox("resize:none;padding:3px 5px;white-space:pre-wrap;overflow-y:auto;");
  // Display only: its value reads as undefined, so a workflow saves null in its place (as for the other
  // areas), never the report's text, which a widget added to the node later would otherwise load.
  widget = domArea(node, "loralab_report", box, REPORT_HEIGHT, {
    getValue: () => undefined, setValue: (v) => { box.value = v ?? ""; },
  });
  return widget;
}

export function showReport(node, text, problem = false) {
  const box = reportWidget(node).element.querySelector("textarea");
  box.value = text;
  box.style.color = problem ? "#f88" : "#ccc";
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "LoRALab.reports",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!REPORT_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (nodeData.name !== LAID_OUT_ELSEWHERE) {
        reportWidget(this);
        fitNodeToWidgets(this);
      }
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text?.length) showReport(this, Array.isArray(text) ? text.join("\n") : String(text));
      return result;
    };
  },
});

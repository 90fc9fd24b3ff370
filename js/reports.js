// Reports shown on the nodes that make them (Dataset from Folder, Caption, Train LoRA): the text the node
// returns as ui.text, in a read-only box under its widgets. DOM widgets only (canvas-drawn widgets break in
// ComfyUI's newer renderer).
import { app } from "../../scripts/app.js";

const REPORT_NODES = new Set(["LoraLabDatasetFromFolder", "LoraLabCaption", "LoraLabTrainLora"]);

export function displayWidget(node, name, element, options = {}) {
  // A display-only DOM widget: never saved (the options flag is read by the newer front end, the
  // property by the legacy one), so the saved values of the node's real widgets keep their positions.
  const widget = node.addDOMWidget(name, name, element, {
    getValue: () => undefined, setValue: () => {}, serialize: false, ...options,
  });
  widget.serialize = false;
  return widget;
}

export function reportWidget(node) {
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

app.registerExtension({
  name: "LoRALab.reports",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!REPORT_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text?.length) reportWidget(this).value = Array.isArray(text) ? text.join("\n") : String(text);
      this.setDirtyCanvas?.(true, true);
      return result;
    };
  },
});

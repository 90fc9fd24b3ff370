// The deprecated all-in-one Training Options node gets a button that replaces it with the small option
// nodes, carrying its widget values over: one node per group whose values differ from the defaults, chained
// in the old node's place and wired to where its output went. The workflow trains the same afterwards
// (tests/comfy/test_train_lora.py checks the chain equals the all-in-one node).
import { app } from "../../scripts/app.js";

const OLD_NODE = "LoraLabTrainingOptions";
const GROUP_NODES = ["LoraLabOptimizerOptions", "LoraLabNetworkOptions", "LoraLabNoiseOptions",
  "LoraLabCaptionOptions", "LoraLabSaveOptions", "LoraLabPreviewOptions", "LoraLabMemoryOptions"];
const BUTTON = "Split into the new option nodes";

function widgetValues(node) {
  return Object.fromEntries((node.widgets ?? []).filter((w) => w.name && w.type !== "button")
    .map((w) => [w.name, w.value]));
}

export function groupsToCreate(oldValues, defaultsByType) {
  // [type, values] for each group node whose values differ from a fresh node's: the rest stay as they were.
  const plan = [];
  for (const type of GROUP_NODES) {
    const defaults = defaultsByType[type] ?? {};
    const values = Object.fromEntries(Object.keys(defaults).filter((name) => name in oldValues)
      .map((name) => [name, oldValues[name]]));
    if (Object.entries(values).some(([name, value]) => value !== defaults[name])) plan.push([type, values]);
  }
  return plan;
}

function split(oldNode) {
  const graph = oldNode.graph ?? app.graph;
  const defaultsByType = {};
  const made = [];
  for (const type of GROUP_NODES) {
    const probe = LiteGraph.createNode(type);
    if (!probe) throw new Error(`LoRA Lab: the option node ${type} is not registered (restart ComfyUI)`);
    defaultsByType[type] = widgetValues(probe);
  }
  let [x, y] = oldNode.pos;
  let previous = null;
  for (const [type, values] of groupsToCreate(widgetValues(oldNode), defaultsByType)) {
    const node = LiteGraph.createNode(type);
    graph.add(node);
    for (const [name, value] of Object.entries(values)) {
      const widget = node.widgets.find((w) => w.name === name);
      if (widget) widget.value = value;
    }
    node.pos = [x, y];
    y += node.size[1] + 40;
    if (previous) previous.connect(0, node, node.findInputSlot("options"));
    previous = node;
    made.push(node);
  }
  const targets = (oldNode.outputs?.[0]?.links ?? []).map((id) => graph.links[id] ?? graph.links.get?.(id))
    .filter(Boolean).map((link) => [graph.getNodeById(link.target_id), link.target_slot]);
  graph.remove(oldNode);
  if (previous) for (const [target, slot] of targets) previous.connect(0, target, slot);
  graph.setDirtyCanvas(true, true);
  return made;
}

app.registerExtension({
  name: "LoRALab.optionsMigration",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== OLD_NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      // A button widget is not saved with the workflow, so the old node's saved values keep their positions.
      const button = this.addWidget("button", BUTTON, null, () => split(this), { serialize: false });
      button.serialize = false;
      return result;
    };
  },
});

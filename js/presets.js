// Train LoRA's preset (base family x goal x GPU memory): picking one writes the preset's values into the
// node's own widgets, where they show and can be changed, and lists in the report box what else it sets
// (optimizer, precision, memory savers: the option groups no option node sets). The table and its sources
// live on the server (trainer/training/presets.py, served at /loralab/presets).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { showReport } from "./reports.js";
import { remountVueNode } from "./vue_nodes_host.js";

const TRAIN_NODE = "LoraLabTrainLora";
const CHOICE_WIDGETS = ["preset", "goal", "gpu_memory"];
let table = null;

async function presets() {
  if (!table) {
    const response = await api.fetchApi("/loralab/presets");
    if (!response.ok) throw new Error(`/loralab/presets answered ${response.status}`);
    table = await response.json();
  }
  return table;
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function shown(value) {
  if (typeof value === "boolean") return value ? "on" : "off";
  return String(value);
}

export function presetSummary(preset) {
  // What the report box says before a run: the widget values written, and what else the preset sets.
  const options = Object.entries(preset.options).map(([name, value]) => `${name} ${shown(value)}`);
  return [`Preset ${preset.label}: the values above are the preset's; change any of them.`,
          `It also sets (unless an option node does): ${options.join(", ") || "nothing else"}.`,
          ...preset.notes.map((note) => `Note: ${note}`)].join("\n");
}

export async function applyPreset(node) {
  const family = widget(node, "preset")?.value;
  if (!family || family === "none") return null;
  const preset = (await presets())[family]?.[widget(node, "goal")?.value]?.[widget(node, "gpu_memory")?.value];
  if (!preset) return null;
  // epochs 0: the preset counts in steps, rounded to whole epochs by the run.
  for (const [name, value] of Object.entries({ ...preset.widgets, epochs: 0 })) {
    const target = widget(node, name);
    if (!target) continue;
    target.value = value;
    // As typing it would: the widget's own callback (rounding; the Vue renderer's copy of the node).
    target.callback?.call(target, value, app.canvas, node);
  }
  remountVueNode(node);
  showReport(node, presetSummary(preset));
  node.setDirtyCanvas?.(true, true);
  return preset;
}

app.registerExtension({
  name: "LoRALab.presets",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== TRAIN_NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      for (const name of CHOICE_WIDGETS) {
        const choice = widget(this, name);
        if (!choice) continue;
        // Only a user's pick applies a preset: loading a saved workflow restores its own values untouched.
        const callback = choice.callback;
        choice.callback = (...args) => {
          const answer = callback?.apply(choice, args);
          applyPreset(this).catch((error) => console.warn("[LoRA Lab] preset:", error));
          return answer;
        };
      }
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      resetUnknownChoices(this);
      return result;
    };
  },
});

export function resetUnknownChoices(node) {
  // A workflow saved before these inputs existed fills them by position with what stood there then (null
  // for the chart, or an old report's text): back to their defaults, so the workflow queues as it did.
  for (const name of CHOICE_WIDGETS) {
    const choice = widget(node, name);
    const values = choice?.options?.values;
    if (Array.isArray(values) && values.length && !values.includes(choice.value)) choice.value = values[0];
  }
}

// Labels that say what a special value means, right beside it on the node ("epochs (0 = use steps)"),
// and names on the text boxes that show none. Only the label changes: the widget's name (what saved
// workflows and the API use) stays. Every renderer draws `widget.label` in place of the name when set.
import { app } from "../../scripts/app.js";
import { onVueNode } from "./vue_nodes_host.js";

export const LABELS = {
  LoraLabTrainLora: {
    resolution: "resolution (0 = the model's own)",
    epochs: "epochs (0 = count steps)",
    preset: "preset (for this base model)",
  },
  LoraLabDatasetPreview: { resolution: "bucket resolution (0 = no buckets)" },
  LoraLabLoraCompareGrid: {
    prompts: "prompts (one per row)",
    negative_prompt: "negative prompt",
    sweep_index: "sweep pedal # (-1 = no sweep)",
    sweep_strengths: "sweep strengths",
  },
  LoraLabNetworkOptions: { text_encoder_2_lr: "text_encoder_2_lr (SDXL only)" },
  LoraLabNoiseOptions: { scale_v_pred_loss: "scale_v_pred_loss (v-prediction models)" },
  LoraLabPedalboard: {
    trained_strength_model: "trained LoRA: model strength",
    trained_strength_clip: "trained LoRA: clip strength",
  },
};

export function labelWidgets(node, labels) {
  for (const widget of node.widgets ?? []) {
    const label = labels[widget.name];
    if (!label) continue;
    widget.label = label;
    // Text boxes show their name only while empty (as a placeholder): keep the label as its tooltip too.
    const element = widget.inputEl ?? widget.element;
    if (element && "placeholder" in element) {
      element.placeholder = label;
      element.title = label;
    }
  }
}

// A new node is sized from its widgets' names, so a longer label would run into its value on the canvas
// ("scale_v_pred_loss (v-prediction models)" over "false"): widen it to hold the longest label and a value.
// Saved workflows keep the size they were saved with.
const VALUE_ROOM = 120;       // px: the value, the arrows and the widget's margins
let measuring = null;

function widthForLabels(labels) {
  measuring ??= document.createElement("canvas").getContext("2d");
  measuring.font = "12px Arial";
  return Math.ceil(Math.max(0, ...Object.values(labels).map((label) => measuring.measureText(label).width))) + VALUE_ROOM;
}

function widenForLabels(node, labels) {
  const width = widthForLabels(labels);
  if (node.size?.[0] < width) node.setSize([width, node.size[1]]);
}

function labelVueRows(element, labels) {
  // Front end 1.27's Vue renderer writes each row's label from the widget's name and ignores widget.label:
  // the row's text is changed in place (Vue keeps it, as the name it renders from never changes).
  for (const text of element.querySelectorAll(".lg-node-widgets .lg-widget-container p")) {
    const label = labels[text.textContent.trim()];
    if (label) Object.assign(text, { textContent: label, title: label });
  }
}

for (const [comfyClass, labels] of Object.entries(LABELS)) {
  onVueNode(comfyClass, (node, element) => labelVueRows(element, labels));
}

app.registerExtension({
  name: "LoRALab.widgetLabels",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const labels = LABELS[nodeData.name];
    if (!labels) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      labelWidgets(this, labels);
      widenForLabels(this, labels);
      return result;
    };
  },
});

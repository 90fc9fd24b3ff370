// A LoRA Pedal that is switched off looks it: dimmed like a bypassed node, and "(off)" in its title exactly
// while `enabled` is off (a workflow's "Pedal 2 … (off)" loses it when you switch the pedal on).
import { app } from "../../scripts/app.js";
import { pedalTitle } from "./pedal_rows.js";
import { onVueNode, schedulePass } from "./vue_nodes_host.js";

const PEDAL = "LoraLabLoraStack";
const SWITCH = "enabled";
const DIM = "rgba(16,16,16,0.55)";

function isOn(node) {
  return node.widgets?.find((w) => w.name === SWITCH)?.value !== false;
}

function showState(node) {
  const title = pedalTitle(node.title, isOn(node));
  if (title !== node.title) node.title = title;
  node.setDirtyCanvas?.(true, true);
  schedulePass();
}

app.registerExtension({
  name: "LoRALab.pedalLook",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== PEDAL) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const toggle = this.widgets?.find((w) => w.name === SWITCH);
      if (toggle) {
        const callback = toggle.callback;
        const node = this;
        toggle.callback = function () {
          const answer = callback?.apply(this, arguments);
          showState(node);
          return answer;
        };
      }
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      showState(this);             // a loaded workflow's title follows its saved switch
      return result;
    };
    nodeType.prototype.loralab_dimmed = function () {
      return !isOn(this);
    };
  },
});

function veilDimmedNodes() {
  // Canvas renderers: a veil over the whole node once it is drawn (title and widgets too), as ComfyUI dims
  // muted nodes. After drawNode, not in onDrawForeground: both canvases draw the widgets after that hook.
  const canvasClass = globalThis.LGraphCanvas;
  const drawNode = canvasClass?.prototype?.drawNode;
  if (!drawNode || drawNode.loralab_veils) return;
  const veiled = function (node, ctx) {
    const result = drawNode.apply(this, arguments);
    if (node?.loralab_dimmed?.() && !node.flags?.collapsed) {
      const title = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
      ctx.save();
      ctx.fillStyle = DIM;
      ctx.beginPath();
      if (ctx.roundRect) ctx.roundRect(0, -title, node.size[0], node.size[1] + title, globalThis.LiteGraph?.ROUND_RADIUS ?? 8);
      else ctx.rect(0, -title, node.size[0], node.size[1] + title);
      ctx.fill();
      ctx.restore();
    }
    return result;
  };
  veiled.loralab_veils = true;
  canvasClass.prototype.drawNode = veiled;
}

veilDimmedNodes();

onVueNode(PEDAL, (node, element) => {
  const opacity = isOn(node) ? "" : "0.5";
  if (element.style.opacity !== opacity) element.style.opacity = opacity;
});

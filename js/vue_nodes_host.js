// LoRA Lab's DOM areas inside the new front end's "Vue nodes" renderer (Comfy.VueNodes.Enabled).
//
// Front end 1.27 draws a Vue node's widgets only from its own registry of widget types (numbers, combos,
// text…); a DOM widget made with addDOMWidget is left out, and the overlay that places DOM widgets over the
// canvas is switched off in that mode. So here each LoRA Lab area (loss chart, previews, reports,
// pedalboard) is moved into its Vue node's body, under the node's widgets, at the same fixed height as on
// the canvas. Vue drops a node's body when it zooms far out or collapses, so a MutationObserver puts the
// areas back whenever the nodes' DOM changes. Back on the canvas renderer, its DOM widget overlay takes the
// elements back by itself.
import { app } from "../../scripts/app.js";
import { LORALAB_AREA } from "./dom_widgets.js";

const VUE_NODES_SETTING = "Comfy.VueNodes.Enabled";
const HOST_CLASS = "loralab-vue-areas";
const nodeLooks = new Map();        // comfyClass -> [(node, element) => void], run on every pass

export function vueNodesOn() {
  try {
    return app.extensionManager?.setting?.get?.(VUE_NODES_SETTING) === true;
  } catch {
    return false;                     // the 2024 front end has no such setting (nor Vue nodes)
  }
}

export function onVueNode(comfyClass, look) {
  // A node kind's look in the Vue renderer (the canvas one draws it in onDrawForeground).
  nodeLooks.set(comfyClass, [...(nodeLooks.get(comfyClass) ?? []), look]);
}

export function remountVueNode(node) {
  // Front end 1.27's Vue widgets read their value once, when mounted (its useWidgetValue watches a copy of
  // it), so a value set by code shows only once the node's body is mounted again: collapsing and expanding
  // the node does that. Set the value through the widget's callback first (the renderer wraps it to update
  // its own copy of the node), then call this.
  if (!vueNodesOn() || node.flags?.collapsed || typeof node.collapse !== "function") return;
  node.collapse(true);
  requestAnimationFrame(() => requestAnimationFrame(() => {
    if (node.flags?.collapsed) node.collapse(true);
  }));
}

function stopDragging(host) {
  // The Vue node starts a drag (and captures the pointer) on any pointerdown inside it; the front end's own
  // widgets stop those events around their controls, and so do we, or a <select> or button could not be used.
  for (const type of ["pointerdown", "pointermove", "pointerup"]) host.addEventListener(type, (e) => e.stopPropagation());
}

function hostAreas(node, element, areas) {
  const body = element.querySelector(`[data-testid="node-body-${CSS.escape(String(node.id))}"]`);
  if (!body) return;                  // collapsed, or zoomed out to titles only
  let host = body.querySelector(`:scope > .${HOST_CLASS}`);
  if (!host) {
    host = document.createElement("div");
    host.className = HOST_CLASS;
    host.style.cssText = "display:flex;flex-direction:column;gap:8px;padding:0 16px;cursor:default;";
    stopDragging(host);
    body.append(host);
  }
  for (const widget of areas) {
    // A later front end that shows DOM widgets in Vue nodes itself keeps them: no tug of war.
    if (element.contains(widget.element) && !host.contains(widget.element)) continue;
    let slot = host.querySelector(`:scope > [data-area="${widget.name}"]`);
    if (!slot) {
      slot = document.createElement("div");
      slot.dataset.area = widget.name;
      host.append(slot);
    }
    const height = `${widget[LORALAB_AREA].height()}px`;
    if (slot.style.height !== height) slot.style.height = height;
    if (widget.element.parentElement !== slot) slot.append(widget.element);
  }
}

const WIDEST_NODE = 720;

function widenForLabels(element) {
  // The Vue renderer gives widget labels what is left beside 300 px controls and cuts the rest; our nodes
  // grow until their longest label fits (up to a limit, so a label that never fits cannot widen forever).
  // Measured with a Range: a label cut by a fraction of a pixel already shows an ellipsis.
  const scale = element.getBoundingClientRect().width / element.offsetWidth || 1;
  const range = document.createRange();
  let missing = 0;
  for (const label of element.querySelectorAll(".lg-node-widgets .lg-widget-container p")) {
    range.selectNodeContents(label);
    const overflow = (range.getBoundingClientRect().width - label.getBoundingClientRect().width) / scale;
    if (overflow > 0) missing = Math.max(missing, Math.ceil(overflow) + 4);
  }
  const width = Math.min(WIDEST_NODE, element.offsetWidth + missing);
  if (missing > 0 && width > (parseFloat(element.style.minWidth) || 0)) element.style.minWidth = `${width}px`;
}

function forget(element) {
  // Vue keeps a node's element by node id and reuses it for the next node with that id (another workflow
  // loaded, the graph cleared): what we put on it belongs to the node it was for.
  element.querySelectorAll(`.${HOST_CLASS}`).forEach((host) => host.remove());
  element.style.minWidth = "";
  element.style.opacity = "";
}

function nodeById(graph, id) {
  return graph?.getNodeById?.(Number(id)) ?? graph?.getNodeById?.(id) ?? null;
}

function pass() {
  if (!vueNodesOn()) return;
  const graph = app.canvas?.graph ?? app.graph;
  for (const element of document.querySelectorAll(".lg-node[data-node-id]")) {
    const node = nodeById(graph, element.dataset.nodeId);
    if (element.loralab_node !== node) {
      forget(element);
      element.loralab_node = node;
    }
    if (!node || !String(node.comfyClass ?? node.type ?? "").startsWith("LoraLab")) continue;
    for (const look of nodeLooks.get(node.comfyClass) ?? []) look(node, element);
    const areas = (node.widgets ?? []).filter((w) => w[LORALAB_AREA] && w.element);
    if (areas.length) hostAreas(node, element, areas);
    widenForLabels(element);
  }
}

let scheduled = false;
export function schedulePass() {
  // Also for changes Vue makes without adding or removing elements (a switch flipped).
  if (scheduled) return;
  scheduled = true;
  requestAnimationFrame(() => {
    scheduled = false;
    pass();
  });
}

app.registerExtension({
  name: "LoRALab.vueNodesHost",
  async setup() {
    new MutationObserver(schedulePass).observe(document.body, { childList: true, subtree: true });
    schedulePass();
  },
});

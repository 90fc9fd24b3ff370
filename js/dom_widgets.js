// LoRA Lab's DOM areas on nodes (loss chart, previews, reports, pedalboard): fixed-height DOM widgets that
// the three renderers place the same way, so a node is as tall before a run as after it.
//
// Why heights go through getMinHeight/getHeight/getMaxHeight and never computeSize: the 2024 front end
// gives a DOM widget that has a computeSize a 30 px element whatever it returns (its element height is
// computedHeight - 2 × margin, and computedHeight is only set for widgets without computeSize), and the
// 2025 front end treats min = max as a fixed height. Both put a 10 px margin around the element.
export const DOM_MARGIN = 10;
export const LORALAB_AREA = "loralab_area";      // marks our DOM widgets, for the Vue node host

export function domArea(node, name, content, height, options = {}) {
  // height: the content's own height in px (a number, or a function for areas that change: the pedalboard).
  // The content goes inside a plain box: the 2024 front end sets the element's style.display on every draw
  // (clearing a display:flex of the content's own), and the new one sizes the element it is given.
  const outer = () => (typeof height === "function" ? height() : height) + 2 * DOM_MARGIN;
  const element = document.createElement("div");
  element.className = "loralab-area";
  element.style.cssText = "box-sizing:border-box;width:100%;height:100%;";
  element.append(content);
  const widget = node.addDOMWidget(name, name, element, {
    getValue: () => undefined, setValue: () => {},
    getMinHeight: outer, getHeight: outer, getMaxHeight: outer,
    serialize: false,        // read by the newer front end; the property below by the legacy one
    ...options,
  });
  widget.serialize = false;  // display only: the saved values of the node's real widgets keep their positions
  widget[LORALAB_AREA] = { height: () => outer() - 2 * DOM_MARGIN };
  return widget;
}

export function fitNodeToWidgets(node) {
  // Make the node tall enough for its widgets now, not at its first draw: the 2024 front end's computeSize
  // counts a DOM widget as one 20 px row (it grows the node only when drawing it), the newer one counts it
  // right. Never shrinks what the user sized.
  if (!node.size || !node.computeSize) return;
  const rowHeight = globalThis.LiteGraph?.NODE_WIDGET_HEIGHT ?? 20;
  let missing = 0;
  for (const widget of node.widgets ?? []) {
    if (widget[LORALAB_AREA] && !widget.computeLayoutSize) missing += widget.options.getMinHeight() - rowHeight;
  }
  const needed = node.computeSize()[1] + missing;
  if (node.size[1] < needed) node.setSize([node.size[0], needed]);
}

export function darkBox(extra = "") {
  // Both front ends' DOM widgets start unstyled (a textarea is white in the 2024 one): our own colours.
  return "box-sizing:border-box;width:100%;height:100%;background:#1b1b1b;color:#ccc;border:1px solid #444;" +
         "border-radius:4px;font:11px/1.35 monospace;" + extra;
}

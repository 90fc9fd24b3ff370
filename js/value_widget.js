// A node's editor (pedalboard rows, caption review) keeps its state in one of the node's own STRING widgets:
// hidden, written by the editor on every edit, and watched, so that whatever else sets it (loading a workflow,
// an API prompt, undo, paste) re-renders the editor. Saving, reloading and API export then carry the state
// with no help from the editor.

export function hideWidget(widget) {
  // New front ends (litegraph class widgets, Vue nodes) honour `hidden` / `options.hidden`; the 2024
  // front end draws by type, so there the widget becomes an undrawn, zero-height "hidden" one.
  widget.hidden = true;
  widget.options ??= {};
  widget.options.hidden = true;
  if (typeof LGraphNode !== "undefined" && typeof LGraphNode.prototype.isWidgetVisible !== "function") {
    widget.type = "hidden";
  }
  widget.computeSize = () => [0, -4];
}

export function watchValue(widget, onExternalChange) {
  // Re-render when anything but the editor sets the value. The widget's own accessor (if any) keeps
  // doing the storing; this only wraps it.
  let descriptor = null;
  for (let o = widget; o && !descriptor; o = Object.getPrototypeOf(o)) {
    descriptor = Object.getOwnPropertyDescriptor(o, "value");
  }
  let stored = widget.value;
  try {
    Object.defineProperty(widget, "value", {
      configurable: true,
      enumerable: true,
      get() { return descriptor?.get ? descriptor.get.call(this) : stored; },
      set(v) {
        if (descriptor?.set) descriptor.set.call(this, v);
        else stored = v;
        onExternalChange(v);
      },
    });
  } catch (error) {
    console.warn("LoRA Lab: cannot watch a widget's value; reload re-renders the editor", error);
  }
}

export function element(tag, attributes = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "style") el.style.cssText = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el[key] = value;
  }
  el.append(...children);
  return el;
}


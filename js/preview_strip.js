// Train LoRA's sample previews: the one place they show. A strip of the latest step's pictures, one per
// preview prompt, at a fixed height under the loss chart; a click opens them large, with every earlier step
// a ← → away. (ComfyUI's own node images would show them a second time, squeezed, and without steps.)
import { api } from "../../scripts/api.js";
import { darkBox, domArea } from "./dom_widgets.js";
import { showLightbox } from "./lightbox.js";

const STRIP_HEIGHT = 170;
const KEEP_STEPS = 100;          // earlier steps stay reachable in the large view
const EMPTY_TEXT = "Sample previews show here while training (when preview_every_n_steps is set).";

function pictureURL(image) {
  const query = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder ?? "", type: image.type ?? "temp" });
  return api.apiURL(`/view?${query}`);
}

function allPictures(node) {
  // Every preview the node has seen, oldest first: what the large view steps through.
  return (node.loralab_previews ?? []).flatMap((shot) => shot.images.map((image, index) => ({
    src: pictureURL(image),
    caption: `step ${shot.step} · ${shot.prompts?.[index] ?? `prompt ${index + 1}`}`,
  })));
}

export function previewStrip(node) {
  let widget = node.widgets?.find((w) => w.name === "loralab_previews");
  if (widget) return widget;
  const label = document.createElement("div");
  label.className = "loralab-previews-label";
  label.style.cssText = "color:#999;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;flex:none;";
  label.textContent = EMPTY_TEXT;
  const strip = document.createElement("div");
  strip.className = "loralab-previews-strip";
  strip.style.cssText = "display:flex;gap:4px;flex:1;min-height:0;justify-content:center;";
  const root = document.createElement("div");
  root.className = "loralab-previews";
  root.style.cssText = darkBox("display:flex;flex-direction:column;gap:3px;padding:3px;overflow:hidden;");
  root.append(label, strip);
  strip.addEventListener("click", (event) => {
    const index = Number(event.target?.dataset?.picture);
    if (Number.isInteger(index)) showLightbox(allPictures(node), index);
  });
  widget = domArea(node, "loralab_previews", root, STRIP_HEIGHT);
  widget.render = () => {
    const shots = node.loralab_previews ?? [];
    const latest = shots[shots.length - 1];
    if (!latest) {
      label.textContent = EMPTY_TEXT;
      strip.replaceChildren();
      return;
    }
    const before = shots.slice(0, -1).reduce((count, shot) => count + shot.images.length, 0);
    label.textContent = `previews at step ${latest.step} · click to enlarge` +
                        (shots.length > 1 ? ` (${shots.length} steps)` : "");
    strip.replaceChildren(...latest.images.map((image, index) => {
      const img = document.createElement("img");
      img.src = pictureURL(image);
      img.title = latest.prompts?.[index] ?? "";
      img.dataset.picture = String(before + index);
      img.style.cssText = `height:100%;max-width:${Math.floor(100 / latest.images.length)}%;object-fit:contain;` +
                          "border-radius:3px;cursor:zoom-in;background:#111;";
      return img;
    }));
  };
  return widget;
}

export function addPreview(node, shot) {
  // shot: {step, prompts, images} as the server's preview event carries it. A step not after the last one
  // seen starts a new run's previews.
  const shots = node.loralab_previews ?? [];
  const fresh = !shots.length || shot.step <= shots[shots.length - 1].step;
  node.loralab_previews = [...(fresh ? [] : shots.slice(-(KEEP_STEPS - 1))), shot];
  previewStrip(node).render();
}

export function setPreviews(node, shots) {
  // The finished run's previews (ui.previews), when this page missed the live events.
  node.loralab_previews = shots.slice(-KEEP_STEPS);
  previewStrip(node).render();
}

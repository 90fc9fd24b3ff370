// A larger view of a picture over the whole page, for the small pictures on nodes (the sample previews).
// One at a time; Escape, a click or ✕ closes it, ← → step through the pictures it was opened with.

let open = null;         // {root, pictures, index, onKey}

export function showLightbox(pictures, index = 0) {
  // pictures: [{src, caption}]
  closeLightbox();
  if (!pictures.length) return;
  const image = document.createElement("img");
  image.className = "loralab-lightbox-image";
  // As tall as the page allows, small pictures too (a preview is half the training resolution).
  image.style.cssText = "height:84vh;width:auto;max-width:92vw;object-fit:contain;" +
                        "box-shadow:0 4px 30px #000;background:#111;";
  const caption = document.createElement("div");
  caption.className = "loralab-lightbox-caption";
  caption.style.cssText = "color:#ddd;font:13px sans-serif;margin-top:8px;max-width:92vw;text-align:center;";
  const close = document.createElement("button");
  close.textContent = "✕";
  close.title = "Close (Esc)";
  close.style.cssText = "position:absolute;top:12px;right:16px;font:20px sans-serif;color:#ddd;" +
                        "background:none;border:none;cursor:pointer;";
  const root = document.createElement("div");
  root.className = "loralab-lightbox";
  root.style.cssText = "position:fixed;inset:0;z-index:10000;background:rgba(0,0,0,0.82);display:flex;" +
                       "flex-direction:column;align-items:center;justify-content:center;cursor:zoom-out;";
  root.append(close, image, caption);
  root.addEventListener("click", closeLightbox);
  const onKey = (event) => {
    const moves = { ArrowLeft: -1, ArrowRight: 1 };
    if (event.key === "Escape") closeLightbox();
    else if (event.key in moves) show(open.index + moves[event.key]);
    else return;
    event.preventDefault();
    event.stopPropagation();            // not for the canvas's own shortcuts
  };
  document.addEventListener("keydown", onKey, true);
  document.body.append(root);
  open = { root, pictures, index, onKey };

  function show(next) {
    open.index = (next + pictures.length) % pictures.length;
    const picture = pictures[open.index];
    image.src = picture.src;
    const position = pictures.length > 1 ? `  (${open.index + 1}/${pictures.length}, ← →)` : "";
    caption.textContent = (picture.caption ?? "") + position;
  }
  show(index);
}

export function closeLightbox() {
  if (!open) return;
  document.removeEventListener("keydown", open.onKey, true);
  open.root.remove();
  open = null;
}

"""Build the bundled example workflows (workflows/*.json + same-named .jpg thumbnails).

The graphs are described below in a few lines each; the front end itself builds them in headless
Chromium (LiteGraph.createNode, connect, widget values) and saves them with ``app.graph.serialize()``,
so every file is exactly what ComfyUI's own "Save" writes, laid out with room for each node in all
three renderers after a run. Thumbnails are square screenshots of each workflow's main nodes. Run after changing a node's inputs (tests/comfy/test_workflows.py says when):

    .venv/bin/python tools/build_workflows.py            # against ComfyUI 2024-03 (legacy front end)

Files written by the legacy front end load in the newer one as well (the browser tests load them in both).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))  # the test harness: a real ComfyUI, random models

import comfyui_home  # noqa: E402
from comfy_browser import ComfyPage  # noqa: E402
from comfyui_server import ComfyServer  # noqa: E402

from bundled_workflows import CHECKPOINT, WORKFLOWS  # noqa: E402


# Where the bundled workflows' model files come from: the new front end's missing-models dialog names the
# file and its folder and offers the download (node properties.models, matched to the node's widget values;
# it accepts huggingface.co and civitai.com .safetensors links). runwayml/stable-diffusion-v1-5 is gone from
# the hub; stable-diffusion-v1-5/stable-diffusion-v1-5 is the maintained copy of the same file.
DOWNLOADS = {
    CHECKPOINT: {"url": "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"
                        "v1-5-pruned-emaonly.safetensors", "directory": "checkpoints"},
}

# The nodes each thumbnail shows, at a readable zoom (the Templates browser shows a 256 px square).
THUMBNAIL_NODES = {
    "1_caption_dataset": ["caption", "preview"],
    "2_caption_train_sample": ["train"],
    "3_pedals_and_grid": ["pedal1", "apply"],
    "4_resume_training": ["options", "train"],
    "5_tag_review_train": ["review"],
}

BUILD_GRAPH_JS = """
([spec, downloads]) => {
  app.graph.clear();
  const made = {};
  for (const item of spec) {
    const created = LiteGraph.createNode(item.type);
    if (!created) throw new Error(`unknown node type ${item.type}`);
    if (item.title) created.title = item.title;
    app.graph.add(created);
    made[item.key] = created;
    for (const [name, value] of Object.entries(item.widgets)) {
      // A Note's one widget is named "" in the legacy front end and "text" in the newer one.
      const widget = created.widgets?.find((w) => w.name === name) ||
                     (item.type === "Note" ? created.widgets?.[0] : undefined);
      if (!widget) throw new Error(`${item.type} has no widget ${name}`);
      widget.value = value;           // no callbacks: a preset pick would rewrite the other values
      if (downloads[value]) {
        created.properties.models = [...(created.properties.models ?? []), { name: value, ...downloads[value] }];
      }
    }
  }
  for (const item of spec) {
    for (const [name, [fromKey, slot]] of Object.entries(item.inputs)) {
      const target = made[item.key];
      const targetSlot = target.findInputSlot(name);
      if (targetSlot < 0) throw new Error(`${item.type} has no input ${name}`);
      made[fromKey].connect(slot, target, targetSlot);
    }
  }
  return app.graph._nodes.length;
}
"""

# Every node gets the room it takes in each of the three renderers, after a run: the canvas renderers
# (2024's and the new front end's) draw it at its LiteGraph size; the new front end's Vue renderer sizes a
# node by its content and ignores that size (1.27), so its box is estimated from the same widgets with the
# renderer's measured metrics. Picture nodes get room for their pictures now, so a run does not grow them
# over their neighbours. The browser tests check every renderer for overlaps after a run.
LAYOUT_JS = """
([spec]) => {
  const GAP_X = 60, GAP_Y = 50, TITLE = LiteGraph.NODE_TITLE_HEIGHT;
  const PICTURE_NODES = {SaveImage: 300, PreviewImage: 300, LoraLabDatasetPreview: 300};   // px for pictures
  const NOTE_HEIGHT = 360;
  // The Vue renderer (front end 1.27.10), measured: header + separator 73 px; slot rows 24 px then 28 each;
  // widget rows 30 px (multi-line text 60), 8 px apart; blocks (slots, widgets, LoRA Lab areas, pictures)
  // 16 px apart plus 16 below; controls 300 px wide beside their labels; pictures 352 px tall.
  const font = document.createElement("canvas").getContext("2d");
  font.font = "14px Inter, Arial, sans-serif";
  const textWidth = (text) => font.measureText(String(text ?? "")).width * 1.1;
  const vueBox = (node) => {
    const widgets = (node.widgets ?? []).filter((w) => !w.hidden && !w.options?.hidden &&
                                                       !["hidden", "converted-widget"].includes(w.type));
    const rows = widgets.filter((w) => !w.loralab_area);
    const areas = widgets.filter((w) => w.loralab_area);
    const slotRows = Math.max((node.inputs ?? []).filter((i) => !i.widget).length, node.outputs?.length ?? 0);
    const blocks = [];
    if (slotRows) blocks.push(24 + 28 * (slotRows - 1));
    if (rows.length) blocks.push(rows.reduce((h, w) => h + (w.type === "customtext" ? 60 : 30), 0) + 8 * (rows.length - 1));
    if (areas.length) blocks.push(areas.reduce((h, w) => h + w.loralab_area.height(), 0) + 8 * (areas.length - 1));
    if (node.type in PICTURE_NODES) blocks.push(8 + 352 + 24);
    const height = 73 + blocks.reduce((h, b) => h + b, 0) + 16 * blocks.length;
    const labels = Math.max(0, ...rows.map((w) => textWidth(w.label ?? w.name)));
    const width = Math.max(rows.length ? 350 + Math.max(80, labels) : 0, textWidth(node.title) + 90,
                           node.type in PICTURE_NODES ? 352 + 40 : 0);
    return [Math.min(width, 720), height];
  };
  const canvasBox = (node) => {
    const size = node.computeSize();
    let height = Math.max(node.size[1], size[1]);
    if (node.type === "Note") height = Math.max(height, NOTE_HEIGHT);
    if (node.type in PICTURE_NODES) height = Math.max(height, size[1] + PICTURE_NODES[node.type]);
    return [Math.max(node.size[0], size[0]), height];
  };
  const byKey = {};
  app.graph._nodes.forEach((node, index) => { byKey[spec[index].key] = node; });
  const columns = [];
  for (const item of spec) (columns[item.column] ||= []).push(item);
  let x = 40;
  for (const column of columns) {
    if (!column) continue;
    // One width per column: the widest node in any renderer (canvas nodes are drawn that wide too).
    const boxes = column.map((item) => {
      const node = byKey[item.key];
      const canvas = canvasBox(node);
      return { node, canvas, vue: vueBox(node), width: Math.max(item.width || 0, canvas[0]) };
    });
    const width = Math.max(...boxes.map((b) => Math.max(b.width, b.vue[0])));
    let y = 40 + TITLE;
    for (const box of boxes) {
      box.node.pos = [x, y];
      box.node.setSize([width, box.canvas[1]]);
      y += Math.max(box.canvas[1] + TITLE, box.vue[1]) + GAP_Y;
    }
    x += width + GAP_X;
  }
  app.graph.setDirtyCanvas(true, true);
}
"""


def build(page: ComfyPage, name: str, spec: list[dict], out_dir: Path) -> Path:
    page.page.evaluate(BUILD_GRAPH_JS, [spec, DOWNLOADS])
    page.page.evaluate(LAYOUT_JS, [spec])
    workflow = page.serialize_graph()
    workflow.setdefault("extra", {})["ds"] = opening_view(workflow["nodes"])
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(workflow, indent=2) + "\n")
    write_thumbnail(page, [node["key"] for node in spec], THUMBNAIL_NODES.get(name), out_dir / f"{name}.jpg")
    return path


# The view a workflow opens at in the new front end (extra.ds; the 2024 one opens every workflow at 100 %).
# Without it, that front end fits the whole graph into the window: about 37 % for workflow 2 on a 1920x1080
# screen, below the zoom where it draws nodes as grey boxes (its "level of detail" font size, 8 px of the
# 14 px node text: 57 %). So: the start of the flow (the readme, the loaders), readable, at 80 %.
OPENING_ZOOM = 0.8


def opening_view(nodes: list[dict]) -> dict:
    """extra.ds: the top-left node corner 20 px from the window's corner, below the node titles."""
    x0 = min(node["pos"][0] for node in nodes)
    y0 = min(node["pos"][1] for node in nodes)
    return {"scale": OPENING_ZOOM, "offset": [round(20 / OPENING_ZOOM - x0, 1), round(60 / OPENING_ZOOM - y0, 1)]}


# A square from the top left of the given nodes, at most THUMBNAIL_SIDE graph px (so the 512 px picture
# keeps their text readable) and at 100 % (smaller when the page is smaller): its side in page pixels.
THUMBNAIL_SIDE = 800
SHOW_NODES_JS = """
([keys, shown, page, most]) => {
  const nodes = app.graph._nodes.filter((node, index) => !shown || shown.includes(keys[index]));
  const title = LiteGraph.NODE_TITLE_HEIGHT, margin = 20;
  const x0 = Math.min(...nodes.map((n) => n.pos[0])) - margin;
  const y0 = Math.min(...nodes.map((n) => n.pos[1] - title)) - margin;
  const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + margin;
  const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + margin;
  const side = Math.min(most, Math.max(x1 - x0, y1 - y0));   // a square: the card is one
  const scale = Math.min(1, page / side);
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [-x0, -y0];
  app.canvas.show_info = false;                              // the canvas's frame statistics
  app.canvas.deselectAllNodes?.();
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  return Math.floor(side * scale);
}
"""


def write_thumbnail(page: ComfyPage, keys: list[str], shown: list[str] | None, path: Path) -> None:
    """A square picture of the workflow's main nodes, readable on the Templates browser's card."""
    from PIL import Image
    import time
    # The legacy front end's floating queue panel sits over the canvas: not part of the picture.
    page.page.add_style_tag(content=".comfy-menu, .comfy-menu-btns, .litegraph .graph-toolbar { display: none !important; }")
    box = page.page.locator("canvas").first.bounding_box()
    side = page.page.evaluate(SHOW_NODES_JS, [keys, shown, int(min(box["width"], box["height"])), THUMBNAIL_SIDE])
    time.sleep(1.0)   # DOM widgets follow the canvas transform on the next frame
    png = page.page.screenshot(clip={"x": box["x"], "y": box["y"], "width": side, "height": side})
    image = Image.open(io.BytesIO(png)).convert("RGB").resize((512, 512), Image.LANCZOS)
    image.save(path, "JPEG", quality=88)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "workflows")
    parser.add_argument("--only", nargs="*", help="names of workflows to build (default: all)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    overlay = comfyui_home.build_overlay(Path(tempfile.mkdtemp()) / "root", comfyui_home.find_comfyui_root())
    server = ComfyServer(overlay).start()
    try:
        with ComfyPage(server.url, viewport=(1800, 1000)) as page:
            page.open()
            for name, spec in WORKFLOWS.items():
                if args.only and name not in args.only:
                    continue
                print("wrote", build(page, name, spec, args.out))
    finally:
        server.stop()


if __name__ == "__main__":
    main()

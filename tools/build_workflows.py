"""Build the bundled example workflows (workflows/*.json + same-named .jpg thumbnails).

The graphs are described below in a few lines each; the front end itself builds them in headless
Chromium (LiteGraph.createNode, connect, widget values) and saves them with ``app.graph.serialize()``,
so every file is exactly what ComfyUI's own "Save" writes. Thumbnails are screenshots of the
loaded graph. Run after changing a node's inputs (tests/comfy/test_workflows.py says when):

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

from bundled_workflows import WORKFLOWS  # noqa: E402


BUILD_GRAPH_JS = """
(spec) => {
  const REPORT_NODES = ["LoraLabDatasetFromFolder", "LoraLabCaption", "LoraLabTrainLora"];
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
      widget.value = value;
    }
    const size = created.computeSize();
    created.size = [Math.max(item.width || 0, size[0], created.size[0]),
                    Math.max(size[1], created.size[1], item.type === "Note" ? 360 : 0)];
  }
  for (const item of spec) {
    for (const [name, [fromKey, slot]] of Object.entries(item.inputs)) {
      const target = made[item.key];
      const targetSlot = target.findInputSlot(name);
      if (targetSlot < 0) throw new Error(`${item.type} has no input ${name}`);
      made[fromKey].connect(slot, target, targetSlot);
    }
  }
  // Columns left to right, nodes top to bottom.
  const columns = [];
  for (const item of spec) (columns[item.column] ||= []).push(made[item.key]);
  let x = 40;
  for (const column of columns) {
    if (!column) continue;
    let y = 60;
    // Nodes that show a report after a run grow by about 130 px: leave the room now.
    for (const n of column) { n.pos = [x, y]; y += n.size[1] + 70 + (REPORT_NODES.includes(n.type) ? 130 : 0); }
    x += Math.max(...column.map((n) => n.size[0])) + 50;
  }
  app.graph.setDirtyCanvas(true, true);
  return app.graph._nodes.length;
}
"""

def build(page: ComfyPage, name: str, spec: list[dict], out_dir: Path) -> Path:
    page.page.evaluate(BUILD_GRAPH_JS, spec)
    workflow = page.serialize_graph()
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(workflow, indent=2) + "\n")
    write_thumbnail(page, out_dir / f"{name}.jpg")
    return path


def write_thumbnail(page: ComfyPage, path: Path) -> None:
    from PIL import Image
    import time
    width, height = page.fit_view()
    time.sleep(1.0)   # DOM widgets follow the canvas transform on the next frame
    box = page.page.locator("canvas").first.bounding_box()
    png = page.page.screenshot(clip={"x": box["x"], "y": box["y"], "width": min(width, box["width"]),
                                     "height": min(height, box["height"])})
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.thumbnail((768, 768))
    image.save(path, "JPEG", quality=85)


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

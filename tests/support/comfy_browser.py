"""Drive a real ComfyUI front end in Debian's headless Chromium with Playwright.

Used by the browser tests and by ``tools/build_workflows.py``. Works with the legacy front end of
ComfyUI 2024-03 and the Vue front end that ComfyUI 2025-10 installs from PyPI: both expose
``window.app`` (graph, ``graphToPrompt``, ``loadGraphData``), the ``/scripts/api.js`` shim and the
hidden ``#comfy-file-input`` their "Load"/"Open" commands use. The newer one draws nodes on its canvas,
or as DOM elements with its "Vue nodes" renderer (the setting ``Comfy.VueNodes.Enabled``): the three
renderers are named "legacy", "new-canvas" and "new-vue" here.
"""
from __future__ import annotations

import io
import json
import shutil
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


# The whole graph in view: the legacy front end only draws (and loads the images of) visible nodes.
FIT_VIEW_JS = """
() => {
  const nodes = app.graph._nodes;
  const x0 = Math.min(...nodes.map((n) => n.pos[0])) - 20, y0 = Math.min(...nodes.map((n) => n.pos[1])) - 50;
  const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 20;
  const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 20;
  const canvas = app.canvas.canvas;
  const scale = Math.min(canvas.width / (x1 - x0), canvas.height / (y1 - y0));
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [-x0, -y0];
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  return [Math.ceil((x1 - x0) * scale), Math.ceil((y1 - y0) * scale)];
}
"""


VUE_NODES_SETTING = "Comfy.VueNodes.Enabled"
RENDERERS_OF = {"legacy": ["legacy"], "new": ["new-canvas", "new-vue"]}


def front_end_of(comfyui_root: Path) -> str:
    """"legacy" when ComfyUI serves its own web/ folder (2024-03), else "new" (comfyui-frontend-package)."""
    return "legacy" if (Path(comfyui_root) / "web" / "scripts" / "app.js").is_file() else "new"


def choose_renderer(server_url: str, renderer: str) -> None:
    """Switch the new front end's Vue node renderer on or off for the pages opened next (a user setting,
    stored by the server, read when the page loads)."""
    if renderer == "legacy":
        return
    request = urllib.request.Request(f"{server_url}/settings/{VUE_NODES_SETTING}", method="POST",
                                     data=json.dumps(renderer == "new-vue").encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def overlapping(boxes: list[dict], tolerance: float = 1.0) -> list[tuple[str, str]]:
    """Pairs of node boxes ({title, x, y, width, height}) that overlap by more than ``tolerance`` px."""
    pairs = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            dx = min(a["x"] + a["width"], b["x"] + b["width"]) - max(a["x"], b["x"])
            dy = min(a["y"] + a["height"], b["y"] + b["height"]) - max(a["y"], b["y"])
            if dx > tolerance and dy > tolerance:
                pairs.append((f"{a['title']} #{a['id']}", f"{b['title']} #{b['id']}"))
    return pairs


# The part of the page where the graph shows whatever the front end: left of and above it sit the new
# front end's side bar and menus, at its bottom right the minimap and zoom buttons.
CLEAR_AREA = {"x": 70, "y": 80, "right": 20, "bottom": 260}

# Every node's box in graph units, title bar included: the Vue renderer's elements where shown (it sizes
# nodes by their content), else LiteGraph's pos and size (what the canvas renderers draw).
NODE_BOXES_JS = """
(onPaper) => {
  const title = LiteGraph.NODE_TITLE_HEIGHT, ds = app.canvas.ds;
  const canvas = app.canvas.canvas.getBoundingClientRect();
  return app.graph._nodes.map((node) => {
    const element = !onPaper && document.querySelector(`.lg-node[data-node-id="${node.id}"]`);
    const box = {id: node.id, type: node.type, title: node.title, vue: !!element};
    if (element) {
      const r = element.getBoundingClientRect();
      if (!r.width) return {...box, shown: false};
      return {...box, shown: true, x: (r.x - canvas.x) / ds.scale - ds.offset[0],
              y: (r.y - canvas.y) / ds.scale - ds.offset[1], width: r.width / ds.scale, height: r.height / ds.scale};
    }
    return {...box, shown: true, x: node.pos[0], y: node.pos[1] - title, width: node.size[0], height: node.size[1] + title};
  });
}
"""


class ComfyPage:
    """One browser tab on one ComfyUI server. Use as a context manager."""

    def __init__(self, url: str, viewport=(1600, 1000)):
        self.url = url
        self.viewport = {"width": viewport[0], "height": viewport[1]}
        self.console: list[str] = []

    def __enter__(self) -> "ComfyPage":
        from playwright.sync_api import sync_playwright
        executable = chromium_path()
        if executable is None:
            raise RuntimeError("Chromium is not installed: apt-get install -y chromium")
        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        self.page = self._browser.new_page(viewport=self.viewport)
        self.page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        self.page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))
        return self

    def __exit__(self, *exc):
        self._browser.close()
        self._playwright.stop()

    # --- opening --------------------------------------------------------------------------------
    def open(self, timeout: float = 120) -> "ComfyPage":
        self.page.goto(self.url, wait_until="domcontentloaded", timeout=timeout * 1000)
        self.page.wait_for_function(
            "() => window.app && window.app.graph && window.LiteGraph"
            " && LiteGraph.registered_node_types['LoraLabTrainLora']",
            timeout=timeout * 1000)
        self.dismiss_dialogs()
        return self

    @property
    def frontend(self) -> str:
        """"legacy" (ComfyUI's own web/ folder, 2024-03) or "vue" (comfyui-frontend-package)."""
        return "vue" if self.page.evaluate("() => !!window.__COMFYUI_FRONTEND_VERSION__") else "legacy"

    @property
    def renderer(self) -> str:
        """"legacy", "new-canvas" or "new-vue"."""
        if self.frontend == "legacy":
            return "legacy"
        vue = self.page.evaluate(f"() => app.extensionManager.setting.get('{VUE_NODES_SETTING}') === true")
        return "new-vue" if vue else "new-canvas"

    def dismiss_dialogs(self) -> None:
        # The newer front end opens a templates dialog on first start, and a missing-models dialog (a moment
        # after the graph shows) for a workflow whose model files are not here; Escape closes them, as for a user.
        for attempt in range(8):
            self.page.keyboard.press("Escape")
            time.sleep(0.3)
            if attempt >= 2 and not self.page.evaluate(
                    "() => [...document.querySelectorAll('.p-dialog')].some((d) => d.offsetParent !== null)"):
                return

    # --- workflows ------------------------------------------------------------------------------
    def load_workflow_file(self, path: Path, dismiss: bool = True) -> None:
        """Load a workflow file through the front end's own file input (its Load / Open command);
        ``dismiss=False`` leaves the dialogs it opens (the new front end's missing models) for the caller."""
        before = self.page.evaluate("() => app.graph._version ?? 0")
        self.page.set_input_files("#comfy-file-input", str(path))
        self.page.wait_for_function(
            "([n, before]) => app.graph._nodes.length === n", arg=[_node_count(path), before], timeout=30_000)
        time.sleep(0.5)
        refused = self.page.evaluate("() => document.body.innerText.match(/Invalid workflow[^\\n]*/)?.[0]")
        if refused:
            raise AssertionError(f"the front end flagged {Path(path).name}: {refused}")
        if dismiss:
            self.dismiss_dialogs()

    def graph_to_prompt(self) -> dict:
        """The API-format prompt the front end itself would queue (``app.graphToPrompt``)."""
        return self.page.evaluate("async () => (await app.graphToPrompt()).output")

    def serialize_graph(self) -> dict:
        """The workflow as the front end's Save writes it (JSON.stringify drops undefined fields,
        which Playwright would hand over as nulls the newer front end's schema check rejects)."""
        return json.loads(self.page.evaluate("async () => JSON.stringify((await app.graphToPrompt()).workflow)"))

    def nodes(self) -> list[dict]:
        return self.page.evaluate(
            "() => app.graph._nodes.map(n => ({id: n.id, type: n.type,"
            " widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value}))}))")

    def set_widget(self, node_id: int, name: str, value) -> None:
        """Set a widget the way typing into it would (value + its callback), then mark the graph dirty."""
        ok = self.page.evaluate(
            """([id, name, value]) => {
                 const node = app.graph.getNodeById(id);
                 const widget = node?.widgets?.find((w) => w.name === name);
                 if (!widget) return false;
                 widget.value = value;
                 widget.callback?.(value, app.canvas, node);
                 app.graph.setDirtyCanvas(true, true);
                 return true;
               }""", [node_id, name, value])
        if not ok:
            raise KeyError(f"node {node_id} has no widget {name!r}")

    def set_values(self, values: dict) -> None:
        """Set {(node type, widget name): value} on every node of that type that has the widget."""
        for node in self.nodes():
            names = {w["name"] for w in node["widgets"]}
            for (kind, name), value in values.items():
                if node["type"] == kind and name in names:
                    self.set_widget(node["id"], name, value)

    def node_id(self, node_type: str) -> int:
        return next(n["id"] for n in self.nodes() if n["type"] == node_type)

    # --- running --------------------------------------------------------------------------------
    def watch_events(self, names: list[str]) -> None:
        """Record the server's websocket events in the page (window.__loralab_events)."""
        self.page.evaluate(
            """async (names) => {
                 const { api } = await import('/scripts/api.js');
                 window.__loralab_events = [];
                 for (const name of names)
                   api.addEventListener(name, (e) => window.__loralab_events.push({type: name, data: e.detail}));
               }""", names)

    def events(self) -> list[dict]:
        return self.page.evaluate("() => window.__loralab_events || []")

    def queue_with_keyboard(self) -> None:
        """Ctrl+Enter on the canvas: the 'Queue Prompt' shortcut of both front ends."""
        box = self.page.locator("canvas").first.bounding_box()
        self.page.mouse.click(box["x"] + 5, box["y"] + box["height"] - 5)
        self.page.keyboard.press("Control+Enter")

    def wait_idle(self, timeout: float) -> None:
        """Wait until the queue has run dry after at least one prompt executed."""
        self.page.wait_for_function(
            "() => (window.__loralab_events || []).some((e) => e.type === 'execution_start')", timeout=60_000)
        self.page.wait_for_function(
            """() => (window.__loralab_events || []).some((e) =>
                 (e.type === 'executing' && e.data === null) ||
                 (e.type === 'executing' && e.data && e.data.node === null) ||
                 e.type === 'execution_success' || e.type === 'execution_error')""",
            timeout=timeout * 1000)

    # --- looking -------------------------------------------------------------------------------
    def show(self, x: float, y: float, scale: float = 1.0) -> dict:
        """Put graph point (x, y) at the top left of the clear area at ``scale``; returns that area (page px)."""
        area = self.clear_area()
        self.page.evaluate(
            """([x, y, scale, left, top]) => {
                 const canvas = app.canvas.canvas.getBoundingClientRect();
                 app.canvas.ds.scale = scale;
                 app.canvas.ds.offset = [(left - canvas.x) / scale - x, (top - canvas.y) / scale - y];
                 app.canvas.setDirty(true, true);
                 app.canvas.draw(true, true);
               }""", [x, y, scale, area["x"], area["y"]])
        time.sleep(0.6)     # DOM widgets and Vue nodes follow the canvas on the next frames
        return area

    def clear_area(self) -> dict:
        return {"x": CLEAR_AREA["x"], "y": CLEAR_AREA["y"],
                "width": self.viewport["width"] - CLEAR_AREA["x"] - CLEAR_AREA["right"],
                "height": self.viewport["height"] - CLEAR_AREA["y"] - CLEAR_AREA["bottom"]}

    def hide_floating_panels(self) -> None:
        """The legacy front end's queue panel floats over the graph: out of the way of pictures and clicks."""
        self.page.add_style_tag(content=".comfy-menu { display: none !important; }")

    def node_boxes(self, on_paper: bool = False) -> list[dict]:
        """Each node's box as drawn (``on_paper``: as LiteGraph places it, whatever the renderer)."""
        return self.page.evaluate(NODE_BOXES_JS, on_paper)

    def graph_picture(self, path: Path, margin: int = 40) -> list[dict]:
        """The whole graph at 100 %, pictured tile by tile through the clear area and stitched into one PNG
        (fit-to-view would shrink the text out of reading). Returns every node's box, measured while it was
        on screen (the Vue renderer hides the elements of nodes out of view)."""
        from PIL import Image
        self.hide_floating_panels()
        boxes = {box["id"]: box for box in self.node_boxes(on_paper=True)}
        seen: dict = {}
        x0, y0, x1, y1 = self._graph_bounds(boxes.values(), margin)
        area = self.clear_area()
        picture = Image.new("RGB", (int(x1 - x0), int(y1 - y0)), (32, 32, 32))
        y = y0
        while y < y1:
            x = x0
            while x < x1:
                self.show(x, y)
                for box in self.node_boxes():
                    if box.get("shown") and box["id"] not in seen or box.get("shown") and box["height"] > seen[box["id"]]["height"]:
                        seen[box["id"]] = box
                # Nodes found bigger on screen than on paper widen the picture on the next rows/columns.
                x0, y0, x1, y1 = self._graph_bounds([*boxes.values(), *seen.values()], margin, (x0, y0))
                if picture.size != (int(x1 - x0), int(y1 - y0)):
                    bigger = Image.new("RGB", (int(x1 - x0), int(y1 - y0)), (32, 32, 32))
                    bigger.paste(picture, (0, 0))
                    picture = bigger
                png = self.page.screenshot(clip=area)
                picture.paste(Image.open(io.BytesIO(png)).convert("RGB"), (int(x - x0), int(y - y0)))
                x += area["width"]
            y += area["height"]
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
        return [seen.get(id_, {**box, "shown": False}) for id_, box in boxes.items()]

    @staticmethod
    def _graph_bounds(boxes, margin, origin=None):
        shown = [b for b in boxes if b.get("shown", True) and "x" in b]
        x0 = min(b["x"] for b in shown) - margin if origin is None else origin[0]
        y0 = min(b["y"] for b in shown) - margin if origin is None else origin[1]
        return (x0, y0, max(b["x"] + b["width"] for b in shown) + margin,
                max(b["y"] + b["height"] for b in shown) + margin)

    def fit_view(self) -> tuple[int, int]:
        """Zoom so the whole graph fits the canvas; returns the graph's size on screen in pixels."""
        return tuple(self.page.evaluate(FIT_VIEW_JS))

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=full_page)
        return path


def _node_count(path: Path) -> int:
    return len(json.loads(Path(path).read_text())["nodes"])

"""Drive a real ComfyUI front end in Debian's headless Chromium with Playwright.

Used by the browser tests and by ``tools/build_workflows.py``. Works with the legacy front end of
ComfyUI 2024-03 and the Vue front end that ComfyUI 2025-10 installs from PyPI: both expose
``window.app`` (graph, ``graphToPrompt``, ``loadGraphData``), the ``/scripts/api.js`` shim and the
hidden ``#comfy-file-input`` their "Load"/"Open" commands use.
"""
from __future__ import annotations

import json
import shutil
import time
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

    def dismiss_dialogs(self) -> None:
        # The newer front end opens a templates dialog on first start; Escape closes it, as for a user.
        for _ in range(3):
            self.page.keyboard.press("Escape")
            time.sleep(0.3)

    # --- workflows ------------------------------------------------------------------------------
    def load_workflow_file(self, path: Path) -> None:
        """Load a workflow file through the front end's own file input (its Load / Open command)."""
        before = self.page.evaluate("() => app.graph._version ?? 0")
        self.page.set_input_files("#comfy-file-input", str(path))
        self.page.wait_for_function(
            "([n, before]) => app.graph._nodes.length === n", arg=[_node_count(path), before], timeout=30_000)
        time.sleep(0.5)
        refused = self.page.evaluate("() => document.body.innerText.match(/Invalid workflow[^\\n]*/)?.[0]")
        if refused:
            raise AssertionError(f"the front end flagged {Path(path).name}: {refused}")
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

    def fit_view(self) -> tuple[int, int]:
        """Zoom so the whole graph fits the canvas; returns the graph's size on screen in pixels."""
        return tuple(self.page.evaluate(FIT_VIEW_JS))

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=full_page)
        return path


def _node_count(path: Path) -> int:
    return len(json.loads(Path(path).read_text())["nodes"])

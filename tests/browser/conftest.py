"""The browser tests' renderers: "legacy" on ComfyUI 2024-03; "new-canvas" and "new-vue" (the new front end's
Vue node renderer) on ComfyUI with the new front end. A test that takes ``renderer_page`` runs once in each
renderer of the front end under test."""
from __future__ import annotations

from pathlib import Path

import pytest

import comfyui_home
from comfy_browser import RENDERERS_OF, front_end_of

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def pytest_generate_tests(metafunc):
    if "renderer" in metafunc.fixturenames:
        try:
            renderers = RENDERERS_OF[front_end_of(comfyui_home.find_comfyui_root())]
        except comfyui_home.ComfyUINotFound:
            renderers = ["legacy"]          # the server fixture reports the missing ComfyUI
        metafunc.parametrize("renderer", renderers)


@pytest.fixture
def renderer_page(browser_ready, server, renderer, request):
    """A fresh tab in ``renderer``; its picture and console are kept as artifacts. The renderer is a user
    setting kept by the server, so it is switched back off afterwards for the tests that use ``page``."""
    from comfy_browser import ComfyPage, choose_renderer
    choose_renderer(server.url, renderer)
    try:
        with ComfyPage(server.url) as tab:
            tab.open()
            assert tab.renderer == renderer, f"asked for {renderer}, the page shows {tab.renderer}"
            yield tab
            name = request.node.name.replace("/", "_").replace("[", "_").replace("]", "")
            folder = ARTIFACTS / "browser"
            folder.mkdir(parents=True, exist_ok=True)
            tab.screenshot(folder / f"{name}.png")
            (folder / f"{name}.console.txt").write_text("\n".join(tab.console))
    finally:
        if renderer != "legacy":
            choose_renderer(server.url, "new-canvas")

"""The front end as a user meets it: load a bundled workflow, queue it, watch it train, see the picture.

Runs against whichever ComfyUI the suite runs on: 2024-03's legacy front end, or with COMFYUI_ROOT
set to ComfyUI 2025-10, the front end it installs from PyPI.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import demo_data
import random_models
import workflow_api
from bundled_workflows import DATASET, TRIGGER, WORKFLOWS

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[2]
TINY_BLIP = "tiny-test-blip"
PROGRESS_EVENTS = ["loralab.train.progress", "loralab.train.stopped", "loralab.train.preview", "progress", "executing", "executed",
                   "execution_start", "execution_success", "execution_error", "execution_cached"]


@pytest.fixture(scope="module")
def ready_server(server):
    dataset = server.overlay / "input" / DATASET
    if not dataset.exists():
        demo_data.write_demo_dataset(dataset, count=3, repeats=2, size=64, concept=TRIGGER)
    blip = server.overlay / "models" / "blip" / TINY_BLIP
    if not blip.exists():
        random_models.tiny_blip(blip)
    return server


def quick_values() -> dict:
    values = dict(workflow_api.QUICK_RUN_VALUES)
    values[("CheckpointLoaderSimple", "ckpt_name")] = random_models.CHECKPOINT_NAME
    values[("LoraLabBlipLoader", "model")] = TINY_BLIP
    values[("LoraLabTrainLora", "preset")] = "none"          # a preset's 512 px would be slow here
    return values


def set_quick_values(page, values: dict) -> None:
    """What a user would type: a few steps, small pictures, the models this machine has."""
    for node in page.nodes():
        names = {w["name"] for w in node["widgets"]}
        for (kind, name), value in values.items():
            if node["type"] == kind and name in names:
                page.set_widget(node["id"], name, value)


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_loads_and_converts_like_the_front_end(page, server, name):
    """Loaded through the front end's file input, each workflow gives the prompt our converter gives."""
    page.load_workflow_file(REPO / "workflows" / f"{name}.json")
    from_front_end = page.graph_to_prompt()
    ours = workflow_api.ui_to_api(json.loads((REPO / "workflows" / f"{name}.json").read_text()),
                                  server.get_json("/object_info"))
    assert {k: v["class_type"] for k, v in from_front_end.items()} == {k: v["class_type"] for k, v in ours.items()}
    for key, node in ours.items():
        # The legacy front end sends an unlinked socket-only input as null; the server treats both alike.
        sent = {k: v for k, v in from_front_end[key]["inputs"].items() if v is not None}
        assert sent == node["inputs"], (name, node["class_type"])
    errors = [line for line in page.console if line.startswith("pageerror") and "loralab" in line.lower()]
    assert not errors, errors


def test_queue_the_main_workflow_and_watch_it_learn(page, ready_server):
    page.load_workflow_file(REPO / "workflows" / "2_caption_train_sample.json")
    set_quick_values(page, quick_values())
    page.set_widget(train_node(page), "output_name", "browser_lora")
    # Every node runs (another test's cached outputs would send no reports), whatever ran before in this server.
    ready_server.post_json("/free", {"free_memory": True})
    page.watch_events(PROGRESS_EVENTS)
    page.queue_with_keyboard()
    page.wait_idle(timeout=1800)
    events = page.events()
    assert not [e for e in events if e["type"] == "execution_error"], [e for e in events if e["type"] == "execution_error"]

    train = train_node(page)
    progress = [e["data"] for e in events if e["type"] == "loralab.train.progress"]
    assert [p["step"] for p in progress] == [1, 2] and all(str(p["node"]) == str(train) for p in progress)
    assert any(e["type"] == "progress" and str(e["data"].get("node")) == str(train) for e in events)

    state = page.page.evaluate(
        """(id) => { const n = app.graph.getNodeById(id);
             const chart = n.widgets.find((w) => w.name === 'loralab_loss_chart');
             const report = n.widgets.find((w) => w.name === 'loralab_report');
             return {curve: n.properties.loralab_loss, status: chart.element.textContent,
                     drawn: chart.element.querySelector('canvas').toDataURL().length,
                     report: report?.element.querySelector('textarea').value}; }""", train)
    assert len(state["curve"]) == 2 and all(v > 0 for v in state["curve"])
    assert "2/2" in state["status"]
    assert "browser_lora.safetensors" in state["report"]
    assert state["drawn"] > 3000, "the loss chart canvas is empty"
    previews = [e["data"] for e in events if e["type"] == "loralab.train.preview"]
    assert [p["step"] for p in previews] == [1, 2] and all(len(p["images"]) == 2 for p in previews)
    page.page.wait_for_function(
        """(id) => [...(app.graph.getNodeById(id).widgets.find((w) => w.name === 'loralab_previews')
                   ?.element.querySelectorAll('img') ?? [])].filter((img) => img.complete && img.naturalWidth > 0)
                   .length === 2""", arg=train, timeout=30_000)

    page.fit_view()
    save = next(n["id"] for n in page.nodes() if n["type"] == "SaveImage")
    images = page.page.evaluate(
        "(id) => (app.nodeOutputs?.[String(id)] ?? app.nodeOutputs?.[id])?.images ?? []", save)
    assert images and images[0]["filename"].endswith(".png")
    page.page.wait_for_function(
        "(id) => (app.graph.getNodeById(id).imgs || []).some((img) => img.complete && img.naturalWidth === 64)",
        arg=save, timeout=30_000)

    dataset = next(n["id"] for n in page.nodes() if n["type"] == "LoraLabDatasetFromFolder")
    dataset_report = page.page.evaluate(
        "(id) => app.graph.getNodeById(id).widgets.find((w) => w.name === 'loralab_report')"
        "?.element.querySelector('textarea').value", dataset)
    assert dataset_report and DATASET in dataset_report


def test_loss_curve_survives_save_and_reload(page, ready_server):
    page.load_workflow_file(REPO / "workflows" / "2_caption_train_sample.json")
    train = train_node(page)
    page.page.evaluate("(id) => { app.graph.getNodeById(id).properties.loralab_loss = [0.5, 0.4, 0.3]; }", train)
    saved = page.serialize_graph()
    path = Path(ready_server.overlay) / "temp" / "reloaded_workflow.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved))
    page.page.reload(wait_until="domcontentloaded")
    page.open()
    page.load_workflow_file(path)
    curve = page.page.evaluate("(id) => app.graph.getNodeById(id).properties.loralab_loss", train)
    assert curve == [0.5, 0.4, 0.3]
    page.page.wait_for_function(
        """(id) => app.graph.getNodeById(id).widgets.find((w) => w.name === 'loralab_loss_chart')
                 .element.querySelector('canvas').toDataURL().length > 3000""", arg=train, timeout=10_000)


def test_a_new_train_node_keeps_its_seed(page):
    """A re-queued unchanged graph must not retrain, so the trainer's seed starts 'fixed', not 'randomize'."""
    controls = page.page.evaluate(
        """() => ['LoraLabTrainLora', 'LoraLabLoraCompareGrid'].map((type) => {
             const n = LiteGraph.createNode(type); app.graph.add(n);
             return n.widgets.find((w) => w.name === 'control_after_generate')?.value; })""")
    assert controls == ["fixed", "fixed"]


def train_node(page) -> int:
    return next(n["id"] for n in page.nodes() if n["type"] == "LoraLabTrainLora")

"""Train LoRA's preset choice and the deprecated Training Options node's "split" button, driven in each
renderer as a user would: pick a preset and see its values on the node; press the button on an old
workflow's node and get the small option nodes, wired where the old one was, with its values."""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

pytestmark = pytest.mark.server

ADD_NODE_JS = """([type, x, y]) => {
  const node = LiteGraph.createNode(type);
  app.graph.add(node);
  node.pos = [x, y];
  return node.id;
}"""


# The value a Vue node's row shows for a widget (its number or text box).
VUE_ROW_JS = """(([id, name]) => {
  const node = document.querySelector(`.lg-node[data-node-id="${id}"]`);
  for (const row of node?.querySelectorAll('.lg-widget-container') ?? []) {
    const label = row.querySelector('p')?.textContent.trim() ?? '';
    if (label === name || label.startsWith(name + ' (')) return row.querySelector('input')?.value ?? null;
  }
  return null;
})"""


def widget_values(page, node_id: int) -> dict:
    return page.page.evaluate(
        "(id) => Object.fromEntries(app.graph.getNodeById(id).widgets.map((w) => [w.name, w.value]))", node_id)


def test_picking_a_preset_writes_its_values_on_the_node(renderer_page, server):
    page = renderer_page
    page.page.evaluate("() => app.graph.clear()")
    train = page.page.evaluate(ADD_NODE_JS, ["LoraLabTrainLora", 100, 100])
    with urllib.request.urlopen(f"{server.url}/loralab/presets", timeout=30) as answer:
        table = json.load(answer)
    goal, memory = "style", "12 GB"
    page.set_widget(train, "goal", goal)
    page.set_widget(train, "gpu_memory", memory)
    before = widget_values(page, train)
    assert before["preset"] == "none"
    assert before["resolution"] == 0, "choosing a goal or memory without a preset must change nothing"

    page.set_widget(train, "preset", "SDXL")
    expected = table["SDXL"][goal][memory]
    page.page.wait_for_function("([id, want]) => app.graph.getNodeById(id).widgets"
                                ".find((w) => w.name === 'resolution').value === want",
                                arg=[train, expected["widgets"]["resolution"]], timeout=10_000)
    shown = widget_values(page, train)
    for name, value in expected["widgets"].items():
        assert shown[name] == pytest.approx(value), (name, shown[name], value)
    assert shown["epochs"] == 0, "the preset counts in steps"
    if page.renderer == "new-vue":          # what the Vue node shows, not only the widget's value
        page.page.wait_for_function("(arg) => " + VUE_ROW_JS + "(arg) === String(arg[2])", arg=[train, "rank",
                                    expected["widgets"]["rank"]], timeout=10_000)
        for name, value in expected["widgets"].items():
            text = page.page.evaluate(VUE_ROW_JS, [train, name])
            assert float(text.replace(",", "")) == pytest.approx(value), (name, text, value)
    report = page.page.evaluate(
        "(id) => app.graph.getNodeById(id).widgets.find((w) => w.name === 'loralab_report')"
        ".element.querySelector('textarea').value", train)
    assert report.startswith(f"Preset {expected['label']}") and "optimizer" in report, report

    # A value the user changes afterwards stays theirs until they pick a preset again.
    page.set_widget(train, "rank", 4)
    assert widget_values(page, train)["rank"] == 4
    page.set_widget(train, "preset", "none")
    assert widget_values(page, train)["rank"] == 4, "switching the preset off must not touch the values"


def test_the_old_training_options_node_splits_into_the_option_nodes(renderer_page):
    page = renderer_page
    page.page.evaluate("() => app.graph.clear()")
    old = page.page.evaluate(ADD_NODE_JS, ["LoraLabTrainingOptions", 60, 60])
    train = page.page.evaluate(ADD_NODE_JS, ["LoraLabTrainLora", 700, 60])
    page.page.evaluate("""([old, train]) => { const t = app.graph.getNodeById(train);
                          app.graph.getNodeById(old).connect(0, t, t.findInputSlot('options')); }""", [old, train])
    changed = {"lr_schedule": "cosine", "noise_offset": 0.05, "save_every_n_steps": 100, "shuffle_tags": True}
    for name, value in changed.items():
        page.set_widget(old, name, value)

    page.page.evaluate("""(id) => { const node = app.graph.getNodeById(id);
                          node.widgets.find((w) => w.type === 'button').callback(); }""", old)

    nodes = {n["type"]: n for n in page.nodes()}
    assert "LoraLabTrainingOptions" not in nodes
    made = {kind for kind in nodes if kind.startswith("LoraLab") and kind != "LoraLabTrainLora"}
    assert made == {"LoraLabOptimizerOptions", "LoraLabNoiseOptions", "LoraLabSaveOptions",
                    "LoraLabCaptionOptions"}, "one node per group that differs from its defaults"
    for name, value in changed.items():
        holders = [n for n in nodes.values() if any(w["name"] == name for w in n["widgets"])
                   and n["type"] != "LoraLabTrainLora"]
        assert len(holders) == 1, name
        assert next(w["value"] for w in holders[0]["widgets"] if w["name"] == name) == pytest.approx(value), name

    # Chained one into the next, the last into Train LoRA's options: the queued prompt carries them all.
    prompt = page.graph_to_prompt()
    link = prompt[str(train)]["inputs"]["options"]
    chain = []
    while link:
        node = prompt[str(link[0])]
        chain.append(node["class_type"])
        link = node["inputs"].get("options")
    assert sorted(chain) == sorted(made), chain


def test_a_workflow_saved_before_the_presets_loads_with_valid_choices(renderer_page):
    """Saved by the last release (tests/fixtures/workflows_2026_11): its Train LoRA had a display box where
    preset now is. Loaded, the three choices show their defaults and the prompt queues them."""
    page = renderer_page
    page.load_workflow_file(FIXTURES / "workflows_2026_11" / "4_resume_training.json")
    train = page.node_id("LoraLabTrainLora")
    shown = widget_values(page, train)
    assert (shown["preset"], shown["goal"], shown["gpu_memory"]) == ("none", "character", "8 GB"), shown
    assert shown["output_name"] == "my_first_lora_resumed" and shown["rank"] == 16, "the old values stay put"
    inputs = page.graph_to_prompt()[str(train)]["inputs"]
    assert (inputs["preset"], inputs["goal"], inputs["gpu_memory"]) == ("none", "character", "8 GB"), inputs

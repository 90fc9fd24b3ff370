"""Each bundled workflow in each renderer, before and after a run, as a user sees it: pictures of the whole
graph at 100 % (test-artifacts/screenshots/<renderer>/<workflow>_{before,after}.png), no node drawn over
another, and every LoRA Lab area (loss chart, previews, reports) in its node, visible and filled in."""
from __future__ import annotations

import time
import zlib
from pathlib import Path

import pytest

import comfyui_home
import demo_data
import random_models
import tagger_models
import workflow_api
from bundled_workflows import CHECKPOINT, DATASET, TRAINED, TRIGGER, WORKFLOWS
from comfy_browser import overlapping
from lora_files import full_size_lora

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
TINY_BLIP = "tiny-test-blip"
TINY_TAGGER = "tiny-test-tagger"
PACK_NAME = comfyui_home.PACK_LINK_NAME        # the Templates browser's category: the pack's folder name
EVENTS = ["loralab.train.progress", "loralab.train.preview", "executing", "executed", "execution_start",
          "execution_success", "execution_error", "execution_cached"]
# The DOM areas each LoRA Lab node shows, from the moment it is made.
AREAS = {
    "LoraLabDatasetFromFolder": ["loralab_report"],
    "LoraLabCaption": ["loralab_report"],
    "LoraLabTrainLora": ["loralab_loss_chart", "loralab_previews", "loralab_report"],
    "LoraLabPedalboard": ["loralab_pedalboard"],
    "LoraLabTagImages": ["loralab_report"],
    "LoraLabReviewCaptions": ["loralab_review"],
}

AREA_STATE_JS = """
([id, name]) => {
  const w = app.graph.getNodeById(id).widgets.find((w) => w.name === name);
  const el = w.element, r = el.getBoundingClientRect(), style = getComputedStyle(el);
  const hit = document.elementFromPoint(r.x + r.width / 2, r.y + Math.min(r.height / 2, 24));
  const canvas = el.querySelector('canvas');
  return {
    name, connected: el.isConnected, x: r.x, y: r.y, width: r.width, height: r.height,
    visible: !el.hidden && style.display !== 'none' && style.visibility !== 'hidden' && r.width > 40 && r.height > 40,
    on_top: !!hit && el.contains(hit),
    vue_node: el.closest('.lg-node')?.dataset.nodeId ?? null,
    text: [el.querySelector('textarea')?.value, el.querySelector('textarea')?.placeholder, el.innerText]
          .filter(Boolean).join(' ').trim(),
    pictures: [...el.querySelectorAll('img')].filter((i) => i.complete && i.naturalWidth > 0).length,
    drawn: canvas ? canvas.toDataURL().length : 0,
  };
}
"""


@pytest.fixture(scope="module")
def ready_server(server, tiny_unet, sd15_clip):
    """A dataset, a tiny BLIP and the LoRAs workflow 3 names, as a user would have after workflow 2."""
    dataset = server.overlay / "input" / DATASET
    if not dataset.exists():
        demo_data.write_demo_dataset(dataset, count=3, repeats=2, size=64, concept=TRIGGER)
    blip = server.overlay / "models" / "blip" / TINY_BLIP
    if not blip.exists():
        random_models.tiny_blip(blip)
    tagger = server.overlay / "models" / "wd14_tagger" / TINY_TAGGER
    if not tagger.exists():
        tagger_models.build_tagger(tagger, size=64)
    # The trained one carries its trigger word, which workflow 3's prompts ask for.
    for seed, (name, metadata) in enumerate([(f"{TRAINED}.safetensors", {"loralab_trigger_word": TRIGGER}),
                                             ("style.safetensors", {}), ("detail.safetensors", {})]):
        if not (server.overlay / "models" / "loras" / name).exists():
            full_size_lora(server.overlay, name, tiny_unet, sd15_clip, 60 + seed, slice(6 * seed, 6 * seed + 6),
                           {"ss_base_model_version": "sd_v1", **metadata})
    return server


def quick_values(run_name: str) -> dict:
    """What a user would set to try a workflow quickly on this machine; a seed of its own makes Train LoRA
    train (not reuse an earlier run), so the run's progress and previews show."""
    values = dict(workflow_api.QUICK_RUN_VALUES)
    values[("CheckpointLoaderSimple", "ckpt_name")] = random_models.CHECKPOINT_NAME
    values[("LoraLabBlipLoader", "model")] = TINY_BLIP
    values[("LoraLabWd14Loader", "model")] = TINY_TAGGER
    values[("LoraLabReviewCaptions", "ready_to_train")] = True    # workflow 5 holds training for the review
    values[("LoraLabTrainLora", "output_name")] = run_name
    values[("LoraLabTrainLora", "seed")] = zlib.crc32(run_name.encode()) % 100_000
    values[("LoraLabTrainLora", "preset")] = "none"              # the preset's 512 px would be slow here
    values[("LoraLabSaveOptions", "resume_from")] = "none"      # workflow 4's save comes from workflow 2
    values[("LoraLabTrainingOptions", "resume_from")] = "none"
    # Not resumed, workflow 4's run has no save to take its trigger word from, and the test folder is half
    # captioned by hand (no shared first tag): typed, as a user starting that workflow fresh would.
    values[("LoraLabTrainLora", "trigger_word")] = TRIGGER if run_name.endswith("4_resume_training") else ""
    return values


def area_in_view(page, node: int, name: str) -> dict:
    """The state of one LoRA Lab area of the node, brought into the clear part of the page first."""
    x, y = page.page.evaluate("(id) => app.graph.getNodeById(id).pos", node)
    area = page.show(x - 20, y - 60)
    state = page.page.evaluate(AREA_STATE_JS, [node, name])
    # A tall node's lower areas start below the clear part: move the view up to them (at 100 %).
    if state["y"] + min(state["height"], 200) > area["y"] + area["height"]:
        page.show(x - 20, y - 60 + state["y"] - area["y"] - 20)
        state = page.page.evaluate(AREA_STATE_JS, [node, name])
    return state


def areas(page, node_type: str) -> list[dict]:
    """The state of each LoRA Lab area of the node, each brought into view in turn."""
    node = page.node_id(node_type)
    names = page.page.evaluate("(id) => app.graph.getNodeById(id).widgets.filter((w) => w.loralab_area)"
                               ".map((w) => w.name)", node)
    return [area_in_view(page, node, name) for name in names]


def check_areas(page, after_run: bool) -> dict:
    found = {}
    types = {n["type"] for n in page.nodes()}
    for node_type, expected in AREAS.items():
        if node_type not in types:
            continue
        state = {area["name"]: area for area in areas(page, node_type)}
        assert sorted(state) == sorted(expected), (node_type, sorted(state))
        for name, area in state.items():
            where = f"{node_type}.{name} in {page.renderer}"
            assert area["connected"] and area["visible"], (where, area)
            assert area["on_top"], f"{where} is covered by something else: {area}"
            if page.renderer == "new-vue":
                assert area["vue_node"] == str(page.node_id(node_type)), f"{where} is not inside its Vue node"
            assert area["text"] or area["pictures"] or area["drawn"] > 3000, f"{where} is empty: {area}"
            if after_run and name == "loralab_review":      # every picture listed, thumbnails drawn
                assert area["pictures"] >= 3 and "edited" in area["text"], (where, area)
            if after_run and name == "loralab_report":
                assert "report of the last run shows here" not in area["text"] or len(area["text"]) > 60, (where, area)
        found[node_type] = state
    return found


def run_to_the_end(page, server) -> list[dict]:
    # A fresh start for every node (ComfyUI would otherwise reuse a previous test's outputs and send no reports).
    server.post_json("/free", {"free_memory": True})
    page.watch_events(EVENTS)
    page.queue_with_keyboard()
    page.wait_idle(timeout=1800)
    events = page.events()
    errors = [e["data"] for e in events if e["type"] == "execution_error"]
    assert not errors, errors
    return events


@pytest.mark.parametrize("workflow", sorted(WORKFLOWS))
def test_bundled_workflow_before_and_after_a_run(renderer_page, ready_server, renderer, workflow):
    page = renderer_page
    page.load_workflow_file(REPO / "workflows" / f"{workflow}.json")
    folder = SCREENSHOTS / renderer
    boxes = page.graph_picture(folder / f"{workflow}_before.png")
    assert not overlapping(boxes), f"{workflow} in {renderer}, as loaded: {overlapping(boxes)}"
    check_areas(page, after_run=False)

    page.set_values(quick_values(f"browser_{renderer}_{workflow}".replace("-", "_")))
    events = run_to_the_end(page, ready_server)
    if any(n["type"] == "LoraLabTrainLora" for n in page.nodes()):
        assert [e for e in events if e["type"] == "loralab.train.progress"], "Train LoRA did not train"

    boxes = page.graph_picture(folder / f"{workflow}_after.png")
    assert all(box["shown"] for box in boxes), [box for box in boxes if not box["shown"]]
    assert not overlapping(boxes), f"{workflow} in {renderer}, after a run: {overlapping(boxes)}"
    state = check_areas(page, after_run=True)
    train = state.get("LoraLabTrainLora")
    if train:
        assert train["loralab_loss_chart"]["drawn"] > 3000 and "2/2" in train["loralab_loss_chart"]["text"], train
        previews = [e for e in events if e["type"] == "loralab.train.preview"]
        assert train["loralab_previews"]["pictures"] == (len(previews[-1]["data"]["images"]) if previews else 0), train


def test_a_preview_opens_large_and_closes(renderer_page, ready_server, renderer):
    """The previews' one place is Train LoRA's strip: a click shows the picture large, Escape closes it."""
    page = renderer_page
    page.load_workflow_file(REPO / "workflows" / "2_caption_train_sample.json")
    page.set_values(quick_values(f"browser_lightbox_{renderer}".replace("-", "_")))
    run_to_the_end(page, ready_server)
    train = page.node_id("LoraLabTrainLora")
    ui_images = page.page.evaluate(
        "(id) => (app.nodeOutputs?.[String(id)] ?? app.nodeOutputs?.[id])?.images?.length ?? 0", train)
    assert ui_images == 0, "Train LoRA's previews also show as ComfyUI's node images (nodes/train.py ui['images'])"
    strip = area_in_view(page, train, "loralab_previews")
    assert strip["on_top"] and strip["pictures"] == 2, strip
    picture = page.page.locator(".loralab-previews-strip img").first
    picture.click()
    large = page.page.locator(".loralab-lightbox-image")
    large.wait_for(state="visible", timeout=10_000)
    page.page.wait_for_function("() => document.querySelector('.loralab-lightbox-image').naturalWidth > 0")
    box = large.bounding_box()
    assert box["height"] > 300, box              # large, not the strip's size
    assert "step" in page.page.locator(".loralab-lightbox-caption").inner_text()
    page.screenshot(SCREENSHOTS / renderer / "preview_large.png")
    page.page.keyboard.press("Escape")
    large.wait_for(state="detached", timeout=5_000)


def test_a_missing_checkpoint_is_named_on_train_lora(renderer_page, ready_server, renderer):
    """With the workflow's checkpoint absent, ComfyUI runs what it can (Caption) and never runs Train LoRA:
    Train LoRA's status names the node, the input, the file, its folder and the fix."""
    page = renderer_page
    page.load_workflow_file(REPO / "workflows" / "2_caption_train_sample.json")
    values = quick_values(f"browser_missing_{renderer}".replace("-", "_"))
    del values[("CheckpointLoaderSimple", "ckpt_name")]
    page.set_values(values)
    page.watch_events(EVENTS)
    page.queue_with_keyboard()
    train = page.node_id("LoraLabTrainLora")
    expected = (f"Load Checkpoint: ckpt_name '{CHECKPOINT}' is not in models/checkpoints"
                " — put the file there or pick another")
    page.page.wait_for_function(
        """([id, expected]) => app.graph.getNodeById(id).widgets.find((w) => w.name === 'loralab_loss_chart')
             .element.innerText.includes(expected)""", arg=[train, expected], timeout=60_000)
    report = page.page.evaluate(
        "(id) => app.graph.getNodeById(id).widgets.find((w) => w.name === 'loralab_report')"
        ".element.querySelector('textarea').value", train)
    assert expected in report
    page.dismiss_dialogs()
    areas(page, "LoraLabTrainLora")
    page.screenshot(SCREENSHOTS / renderer / "missing_checkpoint.png")
    if any(e["type"] == "execution_start" for e in page.events()):
        page.wait_idle(timeout=600)                 # Caption, which could run, before the next test


def test_a_pedal_looks_off_exactly_while_it_is_off(renderer_page, renderer):
    page = renderer_page
    page.load_workflow_file(REPO / "workflows" / "3_pedals_and_grid.json")
    pedals = [n for n in page.nodes() if n["type"] == "LoraLabLoraStack"]
    state = page.page.evaluate(
        """(ids) => ids.map((id) => { const n = app.graph.getNodeById(id);
             return [n.title, n.widgets.find((w) => w.name === 'enabled').value]; })""", [n["id"] for n in pedals])
    assert all(title.endswith("(off)") != on for title, on in state), state

    off = next(n["id"] for n, (_, on) in zip(pedals, state) if not on)
    look = """(id) => { const n = app.graph.getNodeById(id);
                 const el = document.querySelector(`.lg-node[data-node-id="${id}"]`);
                 return [n.title, el ? getComputedStyle(el).opacity : null]; }"""
    x, y = page.page.evaluate("(id) => app.graph.getNodeById(id).pos", off)
    page.show(x - 20, y - 60)
    title, opacity = page.page.evaluate(look, off)
    assert title.endswith("(off)")
    if renderer == "new-vue":
        assert float(opacity) < 0.8
    page.screenshot(SCREENSHOTS / renderer / "pedal_off.png")

    page.set_widget(off, "enabled", True)
    page.page.wait_for_function("(id) => !app.graph.getNodeById(id).title.endsWith('(off)')", arg=off, timeout=5_000)
    time.sleep(0.3)
    title, opacity = page.page.evaluate(look, off)
    if renderer == "new-vue":
        assert float(opacity) == 1.0
    page.set_widget(off, "enabled", False)
    assert page.page.evaluate(look, off)[0] == title + " (off)"


def test_the_missing_models_dialog_names_the_checkpoint(renderer_page, renderer):
    if renderer == "legacy":
        pytest.skip("the 2024 front end has no missing-models dialog")
    page = renderer_page
    page.load_workflow_file(REPO / "workflows" / "2_caption_train_sample.json", dismiss=False)
    page.page.get_by_text(f"checkpoints / {CHECKPOINT}").first.wait_for(state="visible", timeout=15_000)
    page.screenshot(SCREENSHOTS / renderer / "missing_models.png")
    page.dismiss_dialogs()


def test_the_templates_browser_shows_the_workflows_in_order_with_titles(renderer_page, renderer):
    if renderer != "new-canvas":
        pytest.skip("the Templates browser is the new front end's; one renderer is enough")
    page = renderer_page
    page.page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.page.get_by_text(PACK_NAME, exact=True).first.click()
    cards = page.page.locator("[data-testid^='template-workflow-']")
    cards.first.wait_for(state="visible", timeout=15_000)
    page.page.wait_for_function(
        """(n) => [...document.querySelectorAll("[data-testid^='template-workflow-'] img")]
                  .filter((i) => i.complete && i.naturalWidth === 512).length === n""", arg=len(WORKFLOWS),
        timeout=20_000)
    shown = page.page.evaluate(
        """() => [...document.querySelectorAll("[data-testid^='template-workflow-']")].map((c) => [
             c.dataset.testid.replace('template-workflow-', ''), c.querySelector('h3').innerText.trim(),
             c.querySelector('p').innerText.trim()])""")
    assert [name for name, _, _ in shown] == sorted(WORKFLOWS)
    for name, title, description in shown:
        assert title[0].isdigit() and "_" not in title, (name, title)
        assert len(description) > 40 and description.lower() != name.replace("_", " "), (name, description)
    page.screenshot(SCREENSHOTS / renderer / "templates.png")


def test_numbers_and_labels_show_whole_in_vue_nodes(renderer_page, renderer):
    """The Vue renderer showed learning_rate 1e-4 as "0" and cut labels to about ten letters."""
    if renderer != "new-vue":
        pytest.skip("the canvas renderers format numbers by their precision and size labels themselves")
    page = renderer_page
    page.load_workflow_file(REPO / "workflows" / "2_caption_train_sample.json")
    train = page.node_id("LoraLabTrainLora")
    page.set_widget(train, "learning_rate", 0.0001)
    x, y = page.page.evaluate("(id) => app.graph.getNodeById(id).pos", train)
    page.show(x - 20, y - 60)
    shown = page.page.evaluate(
        """() => [...document.querySelectorAll('.lg-node .lg-widget-container')].map((row) => {
             const label = row.querySelector('p');
             return [row.closest('.lg-node').dataset.nodeId, label?.textContent.trim(),
                     row.querySelector('input')?.value ?? null,
                     label ? label.scrollWidth > label.clientWidth : false]; })""")
    ours = {int(n["id"]) for n in page.nodes() if n["type"].startswith("LoraLab")}
    rate = [value for node, label, value, _ in shown if int(node) == train and label == "learning_rate"]
    assert rate and float(rate[0]) == 0.0001, rate
    labels = {label for node, label, _, _ in shown if int(node) == train}
    assert {"epochs (0 = count steps)", "resolution (0 = the model's own)"} <= labels, labels
    cut = [(node, label) for node, label, _, cut in shown if cut and int(node) in ours]
    assert not cut, cut


@pytest.mark.parametrize("workflow", sorted(WORKFLOWS))
def test_a_bundled_workflow_opens_readable(renderer_page, renderer, workflow):
    """The new front end fits a workflow without a saved view into the window, where workflow 2 came out at
    37 %, drawn as grey boxes (its level of detail): each opens at its saved view, with text drawn."""
    page = renderer_page
    page.load_workflow_file(REPO / "workflows" / f"{workflow}.json")
    time.sleep(0.5)                 # the new front end's fit-to-view (when there is no saved view) is a frame later
    view = page.page.evaluate("() => ({scale: app.canvas.ds.scale, low: app.canvas.low_quality ?? false})")
    if renderer == "legacy":
        assert view["scale"] == 1, view           # the 2024 front end opens every workflow at 100 %
    else:
        assert view["scale"] == pytest.approx(0.8) and not view["low"], view


OPTION_INPUTS = {   # nodes/training_options.py GROUPS; tests/comfy check the same order from the server's side
    "LoraLabMemoryOptions": ["precision", "gradient_checkpointing", "latent_disk_cache", "fp8_base", "blocks_to_swap"],
    "LoraLabNoiseOptions": ["noise_offset", "min_timestep", "max_timestep", "min_snr_gamma", "scale_v_pred_loss",
                            "loss_type", "huber_schedule", "huber_c", "huber_scale", "timestep_sampling", "logit_mean",
                            "logit_std", "flow_shift", "flux_guidance", "masked_loss", "unmasked_weight",
                            "prior_loss_weight"],
    "LoraLabNetworkOptions": ["network_preset", "conv_rank", "conv_alpha", "dropout", "train_text_encoder",
                              "text_encoder_lr", "text_encoder_2_lr", "network_type", "lokr_factor"],
}


def placed_fresh(page, placements: list[tuple[str, list[int]]]) -> dict[str, dict]:
    """On a cleared graph, each (node type, [x, y]) placed as from the node list; {type: its inputs and widgets}."""
    page.hide_floating_panels()
    # A frame between clearing and adding: the Vue renderer otherwise gives a new node the place and slots of the
    # cleared node that had its id (the default graph's KSampler is #3).
    made = page.page.evaluate(
        """async (placements) => { app.graph.clear(); await new Promise((done) => requestAnimationFrame(done));
           return placements.map(([type, pos]) => {
             const node = LiteGraph.createNode(type);
             node.pos = pos;
             app.graph.add(node);
             return [type, (node.inputs || []).map((i) => i.name), node.widgets.map((w) => w.name)]; }); }""",
        [list(placement) for placement in placements])
    return {node_type: {"inputs": inputs, "widgets": widgets} for node_type, inputs, widgets in made}


def assert_shown_readable(page, renderer, picture: str) -> None:
    """At 100 %, pictured: no node drawn over another, and (Vue nodes) no widget label cut."""
    page.show(20, 20)
    boxes = [b for b in page.node_boxes() if b.get("shown")]
    page.screenshot(SCREENSHOTS / renderer / picture)
    assert not overlapping(boxes), [(b["title"], b["x"], b["y"], b["width"], b["height"]) for b in boxes]
    if renderer == "new-vue":
        cut = page.page.evaluate(
            """() => [...document.querySelectorAll('.lg-node .lg-widget-container p')]
                 .filter((label) => label.scrollWidth > label.clientWidth).map((label) => label.textContent)""")
        assert not cut, cut


def test_the_option_nodes_that_grew_show_every_input_readable(renderer_page, renderer):
    """Memory & Speed, Noise & Loss and Network grew inputs (block swap; loss type, timesteps, Flux guidance;
    network type): placed fresh from the node list, each shows one widget per input, in order, none drawn over
    another node, no label cut."""
    # Memory & Speed (short) above Network on the left, Noise & Loss (tall) on the right: apart enough for the Vue
    # renderer's wider nodes, all within the 1600 x 1000 page at 100 %.
    made = placed_fresh(renderer_page, list(zip(OPTION_INPUTS, [[40, 40], [820, 40], [40, 400]])))
    for node_type, expected in OPTION_INPUTS.items():
        assert made[node_type]["widgets"] == expected, (node_type, made[node_type]["widgets"])
    assert_shown_readable(renderer_page, renderer, "grown_option_nodes.png")


def test_the_class_images_node_and_the_new_inputs_show_readable(renderer_page, renderer):
    """Class Images (new), Dataset from Images (its masks input) and Train LoRA (its regularization input), placed
    fresh from the node list: every input and widget there, none drawn over another node, no label cut."""
    page = renderer_page
    slots = placed_fresh(page, [("LoraLabClassImages", [40, 40]), ("LoraLabDatasetFromImages", [40, 640]),
                                ("LoraLabTrainLora", [620, 40])])
    assert {"model", "clip", "vae"} <= set(slots["LoraLabClassImages"]["inputs"])
    # (the front ends add their control_after_generate widget after a seed)
    assert [name for name in slots["LoraLabClassImages"]["widgets"] if name != "control_after_generate"] == [
        "class_prompt", "count", "resolution", "steps", "cfg", "seed", "negative_prompt"]
    fixed = page.page.evaluate("""() => app.graph._nodes.find((n) => n.type === 'LoraLabClassImages')
        .widgets.find((w) => w.name === 'control_after_generate').value""")
    assert fixed == "fixed", "a randomized seed would sample a new set of class pictures at every queue"
    assert "masks" in slots["LoraLabDatasetFromImages"]["inputs"]
    assert "regularization" in slots["LoraLabTrainLora"]["inputs"]
    assert_shown_readable(page, renderer, "class_images_and_new_inputs.png")


def test_the_distributed_training_node_and_the_block_weights_show_readable(renderer_page, renderer):
    """Distributed Training (new), Train LoRA (its distributed input) and the LoRA Pedal (its block_weights),
    placed fresh from the node list: every input and widget there, none drawn over another node, no label cut."""
    page = renderer_page
    slots = placed_fresh(page, [("LoraLabDistributedTraining", [40, 40]), ("LoraLabLoraStack", [40, 420]),
                                ("LoraLabTrainLora", [620, 40])])
    assert slots["LoraLabDistributedTraining"]["widgets"] == ["where", "gpus", "machines", "address", "port",
                                                              "timeout_seconds"]
    assert "distributed" in slots["LoraLabTrainLora"]["inputs"]
    assert slots["LoraLabLoraStack"]["widgets"][-1] == "block_weights"
    assert_shown_readable(page, renderer, "distributed_and_block_weights.png")

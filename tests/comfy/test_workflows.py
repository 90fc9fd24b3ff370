"""The bundled workflows: well-formed, current with the nodes, and each one runs in a real server.

Each workflow is converted to API format from the server's /object_info (tests/support/workflow_api.py; the
browser tests check that conversion against the front end's own graphToPrompt), given the random
checkpoint and tiny BLIP, shrunk to a few steps at 64 px, and executed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

import demo_data
import random_models
import tagger_models
import workflow_api
from bundled_workflows import CHECKPOINT, DATASET, PLACEHOLDER, TRAINED, TRIGGER, WORKFLOWS

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[2]
FOLDER = REPO / "workflows"
TINY_BLIP = "tiny-test-blip"
TINY_TAGGER = "tiny-test-tagger"


def bundled() -> list[Path]:
    return sorted(FOLDER.glob("*.json"))


def load(name: str) -> dict:
    return json.loads((FOLDER / f"{name}.json").read_text())


def test_five_workflows_each_with_a_thumbnail():
    assert [p.stem for p in bundled()] == sorted(WORKFLOWS)
    for path in bundled():
        thumbnail = path.with_suffix(".jpg")
        assert thumbnail.is_file(), f"{path.name} has no thumbnail"
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG" and min(image.size) >= 100


def test_notes_say_what_to_set():
    for path in bundled():
        notes = [n for n in load(path.stem)["nodes"] if n["type"] == "Note"]
        assert notes, f"{path.name} has no Note"
        text = " ".join(str(v) for n in notes for v in n["widgets_values"]).lower()
        kinds = {n["type"] for n in load(path.stem)["nodes"]}
        if "LoraLabDatasetFromFolder" in kinds:
            assert DATASET in text and "folder" in text
        if "CheckpointLoaderSimple" in kinds and "LoraLabTrainLora" in kinds:
            assert "checkpoint" in text
        if "LoraLabCaption" in kinds:
            assert "trigger word" in text
        if "LoraLabReviewCaptions" in kinds:   # shipped holding training: say how to release it
            assert "ready_to_train" in text and "save caption files" in text
        if "LoraLabWd14Loader" in kinds:
            assert "onnxruntime" in text and "models/wd14_tagger/" in text
        if "LoraLabDistributedTraining" in kinds:    # shipped unconnected: say what to connect
            assert "distributed" in text and "gpus" in text and "batch_size" in text
        if "LoraLabLoraStack" in kinds:       # pedals shipped switched off: say how to use them
            assert "switched off" in text and "pick" in text and "enabled" in text


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get_json("/object_info")


def test_only_core_nodes_and_ours(object_info):
    # The test server has no custom nodes but this pack: whatever else it knows is core ComfyUI.
    for path in bundled():
        for node in load(path.stem)["nodes"]:
            assert node["type"] in object_info or node["type"] in workflow_api.FRONTEND_ONLY, (path.name, node["type"])


def test_saved_widget_values_match_the_nodes_inputs(object_info):
    """A node that gained or lost a widget makes the saved values shift: rebuild the workflows then."""
    for path in bundled():
        for node in load(path.stem)["nodes"]:
            if node["type"] in workflow_api.FRONTEND_ONLY:
                continue
            expected = workflow_api.count_widget_values(object_info[node["type"]], node)
            saved = [v for v in node.get("widgets_values", [])]
            # The front end also saves values of display-only DOM widgets (null) after the inputs.
            assert len(saved) >= expected and all(v is None for v in saved[expected:]), (
                f"{path.name}: {node['type']} saved {len(saved)} widget values, the node has {expected} — "
                "run tools/build_workflows.py")


def test_each_workflow_opens_at_its_start_at_a_readable_zoom():
    """Saved view (extra.ds): the new front end would otherwise fit the whole graph, below the zoom where it
    draws text (8 px of 14 px node text: 57 %); at 0.8 the top-left node sits just inside the window."""
    for path in bundled():
        workflow = load(path.stem)
        view = workflow["extra"]["ds"]
        assert 0.6 <= view["scale"] <= 1, (path.name, view)
        x0 = min(node["pos"][0] for node in workflow["nodes"])
        y0 = min(node["pos"][1] for node in workflow["nodes"])
        corner = [(x0 + view["offset"][0]) * view["scale"], (y0 + view["offset"][1]) * view["scale"]]
        assert 0 < corner[0] < 100 and 30 < corner[1] < 150, (path.name, corner)


def test_the_first_run_is_the_sd15_8gb_preset_and_needs_only_a_folder_and_a_trigger_word(pack, object_info):
    """Workflow 2 trains with the SD1.5 · character · 8 GB preset's values as picking it writes them, and the
    trigger word is typed once (the Caption node): the sample prompt takes it from Train LoRA's output."""
    from lora_lab.trainer.training.presets import preset_for
    prompt = workflow_api.ui_to_api(load("2_caption_train_sample"), object_info)
    [train_id] = [key for key, n in prompt.items() if n["class_type"] == "LoraLabTrainLora"]
    train = prompt[train_id]["inputs"]
    assert (train["preset"], train["goal"], train["gpu_memory"]) == ("SD1.5", "character", "8 GB")
    preset = preset_for("SD1.5", "character", "8 GB")
    assert {name: train[name] for name in preset.widget_values()} == preset.widget_values()
    assert train["epochs"] == 0 and train["trigger_word"] == ""      # the first tag the captions share
    [checkpoint] = [n["inputs"] for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple"]
    assert checkpoint["ckpt_name"] == CHECKPOINT
    [sample] = [n["inputs"] for n in prompt.values() if n["class_type"] == "LoraLabPromptWithTrigger"]
    assert sample["text"].startswith(PLACEHOLDER) and sample["trigger_word"] == [train_id, 5]
    typed = [(n["class_type"], name) for n in prompt.values() for name, value in n["inputs"].items()
             if isinstance(value, str) and (TRIGGER in value or value == DATASET)]
    assert sorted(typed) == [("LoraLabCaption", "trigger_word"), ("LoraLabDatasetFromFolder", "folder")], typed


def widgets_of(object_info, workflow: str, class_type: str) -> list[dict]:
    return [workflow_api.widget_values_by_name(node, object_info[class_type])
            for node in sorted(load(workflow)["nodes"], key=lambda n: n["id"]) if node["type"] == class_type]


def test_prompts_say_trigger_instead_of_a_hard_coded_word(object_info):
    """{trigger} becomes the run's trigger word (previews) or the grid's/stack's trigger words."""
    for workflow, class_type, name in (("2_caption_train_sample", "LoraLabPreviewOptions", "preview_prompts"),
                                       ("3_pedals_and_grid", "LoraLabLoraCompareGrid", "prompts")):
        [widgets] = widgets_of(object_info, workflow, class_type)
        lines = widgets[name].splitlines()
        assert lines and all(line.startswith(f"{PLACEHOLDER}, ") for line in lines), (workflow, lines)
        assert TRIGGER not in widgets[name], workflow
    [grid] = widgets_of(object_info, "3_pedals_and_grid", "LoraLabLoraCompareGrid")
    assert grid["trigger_word"] == ""          # the trigger words stored in the stacked LoRAs


def test_workflow_3_switches_on_only_the_users_own_lora(object_info):
    """A new user has no style/detail LoRA: a pedal switched on with a name they lack fails validation."""
    pedals = widgets_of(object_info, "3_pedals_and_grid", "LoraLabLoraStack")
    assert [(p["lora_name"], p["enabled"]) for p in pedals] == [
        (f"{TRAINED}.safetensors", True), ("style.safetensors", False), ("detail.safetensors", False)]


# --- running them ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workflow_server(server):
    """The shared server, with the dataset folder the workflows name and the tiny BLIP in place."""
    dataset = server.overlay / "input" / DATASET
    if dataset.exists():
        shutil.rmtree(dataset)
    demo_data.write_demo_dataset(dataset, count=3, repeats=2, size=64, concept=TRIGGER)
    for caption in sorted(dataset.rglob("*.txt"))[1:]:
        caption.unlink()            # two pictures for BLIP to caption
    blip = server.overlay / "models" / "blip" / TINY_BLIP
    if not blip.exists():
        random_models.tiny_blip(blip)
    tagger = server.overlay / "models" / "wd14_tagger" / TINY_TAGGER
    if not tagger.exists():
        tagger_models.build_tagger(tagger, size=64)
    for name in (TRAINED, f"{TRAINED}_resumed", "style", "detail"):
        (server.overlay / "models" / "loras" / f"{name}.safetensors").unlink(missing_ok=True)
    return server


def run_bundled(server, object_info, name: str, values: dict | None = None) -> tuple[dict, dict]:
    prompt = workflow_api.ui_to_api(load(name), object_info)
    quick = dict(workflow_api.QUICK_RUN_VALUES)
    quick[("CheckpointLoaderSimple", "ckpt_name")] = random_models.CHECKPOINT_NAME
    quick[("LoraLabBlipLoader", "model")] = TINY_BLIP
    quick[("LoraLabWd14Loader", "model")] = TINY_TAGGER
    quick.update(values or {})
    prompt = workflow_api.with_values(prompt, quick)
    return prompt, server.run(prompt, timeout=1800)


def node_id(prompt: dict, class_type: str) -> str:
    [found] = [key for key, node in prompt.items() if node["class_type"] == class_type]
    return found


def saved_image(server, history: dict, node: str) -> Image.Image:
    """The node's first picture, fetched the way the front end shows it (/view)."""
    import io
    import urllib.parse
    import urllib.request
    info = history["outputs"][node]["images"][0]
    query = urllib.parse.urlencode({k: info.get(k, "") for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as response:
        return Image.open(io.BytesIO(response.read()))


def test_workflow_1_captions_the_folder(workflow_server, object_info):
    prompt, history = run_bundled(workflow_server, object_info, "1_caption_dataset")
    captions = sorted((workflow_server.overlay / "input" / DATASET).rglob("*.txt"))
    assert len(captions) == 3
    assert sum(c.read_text(encoding="utf-8").startswith(f"{TRIGGER}, ") for c in captions) >= 2
    assert "images" in history["outputs"][node_id(prompt, "LoraLabDatasetPreview")]


@pytest.fixture(scope="module")
def trained(workflow_server, object_info):
    return run_bundled(workflow_server, object_info, "2_caption_train_sample")


def test_workflow_2_trains_and_samples(workflow_server, trained):
    prompt, history = trained
    lora = workflow_server.overlay / "models" / "loras" / f"{TRAINED}.safetensors"
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["ss_output_name"] == TRAINED and f.metadata()["ss_steps"] == "2"
    assert saved_image(workflow_server, history, node_id(prompt, "SaveImage")).size == (64, 64)
    assert history["outputs"][node_id(prompt, "LoraLabTrainLora")]["loss"]
    shots = history["outputs"][node_id(prompt, "LoraLabTrainLora")]["previews"]
    assert [len(shot["images"]) for shot in shots] == [2, 2]              # 2 steps x 2 prompts
    assert saved_image(workflow_server, history, node_id(prompt, "PreviewImage")).size[0] > 64  # the loss curve


def grid_picture(server, prompt: dict, history: dict) -> Image.Image:
    grid_save = [key for key, node in prompt.items() if node["class_type"] == "SaveImage"
                 and node["inputs"]["images"][0] == node_id(prompt, "LoraLabLoraCompareGrid")]
    return saved_image(server, history, grid_save[0])


def test_workflow_3_stacks_pedals_and_draws_a_grid(workflow_server, object_info, trained):
    from lora_lab.trainer.image_grid import grid_geometry
    loras = workflow_server.overlay / "models" / "loras"
    # As shipped: a new user has only the LoRA workflow 2 trained; pedals 2 and 3 are off.
    assert not (loras / "style.safetensors").exists() and not (loras / "detail.safetensors").exists()
    prompt, history = run_bundled(workflow_server, object_info, "3_pedals_and_grid")
    applied = history["outputs"][node_id(prompt, "LoraLabApplyLoraStack")]["text"][0]
    assert TRAINED in applied and "style" not in applied and "detail" not in applied
    assert f"trigger words: {TRIGGER}" in applied           # what the grid's {trigger} becomes
    geometry = grid_geometry(2, 2, 64, 64)                  # 2 prompts x (base, the trained LoRA)
    assert grid_picture(workflow_server, prompt, history).size == (geometry.width, geometry.height)

    # Pedals switched on with LoRAs the user has: the whole stack.
    for other in ("style", "detail"):      # the two "other" LoRAs the workflow names
        shutil.copy(loras / f"{TRAINED}.safetensors", loras / f"{other}.safetensors")
    prompt, history = run_bundled(workflow_server, object_info, "3_pedals_and_grid",
                                  {("LoraLabLoraStack", "enabled"): True})
    applied = history["outputs"][node_id(prompt, "LoraLabApplyLoraStack")]["text"][0]
    assert all(name in applied for name in (TRAINED, "style", "detail"))
    geometry = grid_geometry(2, 5, 64, 64)                  # base + 3 pedals alone + whole stack
    assert grid_picture(workflow_server, prompt, history).size == (geometry.width, geometry.height)
    assert "lora key not loaded" not in workflow_server.log_text().lower()


def test_workflow_4_resumes_the_trained_lora(workflow_server, object_info, trained):
    prompt, history = run_bundled(workflow_server, object_info, "4_resume_training",
                                  {("LoraLabTrainLora", "steps"): 4})
    lora = workflow_server.overlay / "models" / "loras" / f"{TRAINED}_resumed.safetensors"
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["ss_steps"] == "4"
    report = history["outputs"][node_id(prompt, "LoraLabTrainLora")]["text"][0]
    assert "resum" in report.lower()


def test_workflow_5_holds_training_for_review_then_trains_on_the_reviewed_captions(workflow_server, object_info):
    """As shipped, the first queue tags and lists the pictures and Train LoRA waits (ready_to_train off); with the
    review's edits in the node and ready_to_train on, the LoRA's tag counts are the reviewed captions'."""
    pytest.importorskip("onnxruntime")
    from comfyui_server import ComfyExecutionError
    with pytest.raises(ComfyExecutionError) as held:
        run_bundled(workflow_server, object_info, "5_tag_review_train")
    assert "waiting for your review" in str(held.value) + json.dumps(held.value.details)
    keys = sorted(p.relative_to(workflow_server.overlay / "input" / DATASET).as_posix()
                  for p in (workflow_server.overlay / "input" / DATASET).rglob("*.png"))
    reviewed = json.dumps({"version": 1, "captions": {key: f"{TRIGGER}, reviewed picture {i}"
                                                      for i, key in enumerate(keys)}})
    prompt, history = run_bundled(workflow_server, object_info, "5_tag_review_train",
                                  {("LoraLabReviewCaptions", "ready_to_train"): True,
                                   ("LoraLabReviewCaptions", "reviewed"): reviewed,
                                   ("LoraLabTrainLora", "output_name"): "workflow_5_lora"})
    assert saved_image(workflow_server, history, node_id(prompt, "SaveImage")).size == (64, 64)
    with safe_open(str(workflow_server.overlay / "models" / "loras" / "workflow_5_lora.safetensors"), "pt") as f:
        frequency = json.loads(f.metadata()["ss_tag_frequency"])
    counts = {tag: count for folder in frequency.values() for tag, count in folder.items()}
    assert counts == {TRIGGER: len(keys), **{f"reviewed picture {i}": 1 for i in range(len(keys))}}


def test_resume_from_accepts_old_empty_values_and_names_a_missing_save(workflow_server, object_info):
    """resume_from is a list now. ComfyUI's prompt validation must still accept the "" that workflows saved
    while it was a text box; a name not on the list fails with the Saves & Resume node's message -- at validation on
    ComfyUI versions that validate nodes behind optional inputs (2025-10), when the node runs on 2024-03."""
    from comfyui_server import ComfyExecutionError
    choices = object_info["LoraLabSaveOptions"]["input"]["required"]["resume_from"][0]
    assert choices[0] == "none"
    prompt = workflow_api.ui_to_api(load("4_resume_training"), object_info)
    options = node_id(prompt, "LoraLabSaveOptions")
    # A missing checkpoint fails validation wherever the prompt is checked, so nothing runs; the options node's
    # own verdict is in node_errors (absent when valid).
    for value in ("", "none"):
        broken = workflow_api.with_values(prompt, {("LoraLabSaveOptions", "resume_from"): value,
                                                   ("CheckpointLoaderSimple", "ckpt_name"): "missing.safetensors"})
        with pytest.raises(ComfyExecutionError) as refused:
            workflow_server.queue(broken)
        node_errors = refused.value.details.get("node_errors") or {}
        assert "resume_from" not in json.dumps(node_errors.get(options, {})), (value, node_errors)
    with pytest.raises(ComfyExecutionError) as refused:
        run_bundled(workflow_server, object_info, "4_resume_training",
                    {("LoraLabSaveOptions", "resume_from"): "deleted_since.safetensors"})
    text = str(refused.value) + json.dumps(refused.value.details, ensure_ascii=False)
    assert "Saves & Resume › resume_from" in text and "not in any loras folder" in text, text
    assert "Fix: pick a save from the list" in text, text


def test_templates_browser_lists_them(workflow_server):
    """ComfyUI 2025-10 serves a pack's workflows/ to its templates browser (2024-03 has no such route)."""
    import urllib.error
    try:
        listed = workflow_server.get_json("/api/workflow_templates")
    except urllib.error.HTTPError as missing:
        assert missing.code == 404
        pytest.skip("this ComfyUI has no templates browser (2024-03)")
    assert sorted(listed["comfyui-lora-lab"]) == sorted(WORKFLOWS)
    served = workflow_server.get_json("/api/workflow_templates/comfyui-lora-lab/2_caption_train_sample.json")
    assert served == load("2_caption_train_sample")

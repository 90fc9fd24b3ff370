"""The WD14 Tagger Loader, Tag Images and Tag Report nodes inside a real ComfyUI, on a small real ONNX tagger
(exported from torch with SmilingWolf's signature) under models/wd14_tagger/.

Datasets are real picture files under ComfyUI's input folder, read by the pack's own folder node.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import comfyui_home
import tagger_models

LOADER, TAG, REPORT, FOLDER = "LoraLabWd14Loader", "LoraLabTagImages", "LoraLabTagReport", "LoraLabDatasetFromFolder"
MODEL_NAME = "tiny-test-tagger"
DEFAULTS = dict(merge="BLIP sentence, then tags", general_threshold=0.35, character_threshold=0.85, mcut="off",
                rating_tags=False, replace_underscores=True, escape_parentheses=True, exclude_tags="", first_tags="",
                batch_size=4, write_sidecars=False, sidecar_mode="fill-missing")
COLOURS = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255), "d": (255, 255, 0), "e": (255, 255, 255)}
HAND_WRITTEN = "hand-written, Watermark, my dog"


@pytest.fixture(scope="module")
def folder_paths(comfy):
    import folder_paths
    return folder_paths


@pytest.fixture(scope="module")
def errors(pack):
    return importlib.import_module(pack.__name__ + ".messages")


@pytest.fixture(scope="module")
def tagger_dir(pack, folder_paths):
    folder = Path(folder_paths.get_folder_paths("wd14_tagger")[0]) / MODEL_NAME
    if not folder.exists():
        tagger_models.build_tagger(folder, size=64)
    return folder


@pytest.fixture(scope="module")
def tagger(pack, tagger_dir):
    with torch.inference_mode():
        (loaded,) = pack.NODE_CLASS_MAPPINGS[LOADER]().load(MODEL_NAME, "auto")
    return loaded


@pytest.fixture
def dataset_dir(folder_paths):
    """Five flat colours and a noise picture under input/<name>/; ``a`` has a hand-written caption."""
    name = f"tag_{uuid.uuid4().hex[:8]}"
    path = Path(folder_paths.get_input_directory()) / name
    path.mkdir()
    for stem, colour in COLOURS.items():
        Image.new("RGB", (48, 40), colour).save(path / f"{stem}.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path / "f.png")
    (path / "a.txt").write_text(HAND_WRITTEN, encoding="utf-8")
    yield name, path
    shutil.rmtree(path, ignore_errors=True)


def load_dataset(pack, name):
    with torch.inference_mode():
        return pack.NODE_CLASS_MAPPINGS[FOLDER]().load(name, ".txt", 1, 1, 0)["result"][0]


def run_tag(pack, dataset, tagger, **overrides):
    """Run Tag Images the way ComfyUI does: inference mode, keyword inputs. -> (dataset, captions, report)"""
    with torch.inference_mode():
        output = pack.NODE_CLASS_MAPPINGS[TAG]().tag(dataset=dataset, tagger=tagger, **dict(DEFAULTS, **overrides))
    tagged, report = output["result"]
    assert output["ui"]["text"] == [report]
    return tagged, [item.caption for item in tagged.items], report


def direct_tags(tagger, dataset, **options):
    """What the tagger says for each picture, asked directly, one at a time, in the caption's written form."""
    from lora_lab.trainer.captions.wd14_select import TagOptions, select_tags
    chosen = TagOptions(**options)
    rows = tagger.probabilities([dataset.load_image(i) for i in range(len(dataset.items))], batch_size=1)
    return [select_tags(row, tagger.tags, chosen).caption_tags(chosen) for row in rows]


def files_in(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


# --- declarations and folders ------------------------------------------------------------------------
def test_nodes_are_declared_for_comfyui(pack, tagger_dir):
    loader, tag, report = (pack.NODE_CLASS_MAPPINGS[name] for name in (LOADER, TAG, REPORT))
    assert loader.CATEGORY == tag.CATEGORY == report.CATEGORY == "LoRA Lab/Caption"
    assert loader.RETURN_TYPES == ("LORALAB_TAGGER",)
    assert tag.RETURN_TYPES == ("LORALAB_DATASET", "STRING") and tag.OUTPUT_NODE
    assert report.RETURN_TYPES == ("IMAGE", "STRING") and report.OUTPUT_NODE
    for cls in (loader, tag, report):
        for name, (kind, options) in cls.INPUT_TYPES()["required"].items():
            assert options.get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[next(k for k, v in pack.NODE_CLASS_MAPPINGS.items() if v is cls)]
    assert set(tag.INPUT_TYPES()["required"]) == {"dataset", "tagger", *DEFAULTS}
    assert tag.INPUT_TYPES()["required"]["merge"][0] == ["BLIP sentence, then tags", "tags only", "BLIP only"]
    models = loader.INPUT_TYPES()["required"]["model"][0]
    assert models[:5] == ["wd-swinv2-tagger-v3", "wd-vit-tagger-v3", "wd-convnext-tagger-v3",
                          "wd-eva02-large-tagger-v3", "wd-v1-4-moat-tagger-v2"]
    assert MODEL_NAME in models


def test_tagger_folder_kind_is_registered_under_models(pack, folder_paths):
    assert os.path.join(folder_paths.models_dir, "wd14_tagger") in folder_paths.get_folder_paths("wd14_tagger")


def test_a_folder_from_extra_model_paths_is_listed_and_loads(pack, folder_paths, tagger_dir, tmp_path):
    """extra_model_paths.yaml `wd14_tagger: <path>` ends in add_model_folder_path, as done here."""
    extra = tmp_path / "extra_taggers"
    shutil.copytree(tagger_dir, extra / "my-tagger")
    # ComfyUI-WD14-Tagger's flat layout: <name>.onnx + <name>.csv side by side.
    shutil.copy(tagger_dir / "model.onnx", extra / "flat-tagger.onnx")
    shutil.copy(tagger_dir / "selected_tags.csv", extra / "flat-tagger.csv")
    folder_paths.add_model_folder_path("wd14_tagger", str(extra))
    try:
        models = pack.NODE_CLASS_MAPPINGS[LOADER].INPUT_TYPES()["required"]["model"][0]
        assert "my-tagger" in models and "flat-tagger" in models
        for name in ("my-tagger", "flat-tagger"):
            with torch.inference_mode():
                (loaded,) = pack.NODE_CLASS_MAPPINGS[LOADER]().load(name, "cpu")
            assert loaded.name == name and str(extra) in loaded.files.model
    finally:
        folder_paths.folder_names_and_paths["wd14_tagger"][0].remove(str(extra))


def test_loader_runs_on_the_cpu_here(tagger):
    assert tagger.device == "cpu" and tagger.providers == ("CPUExecutionProvider",)
    assert tagger.name == MODEL_NAME and tagger.input_size == 64


# --- loader messages ---------------------------------------------------------------------------------
def test_offline_missing_model_names_the_folder_and_the_files(pack, folder_paths, errors):
    # conftest sets HF_HUB_OFFLINE=1, so the loader must not try the hub and must say what to do by hand.
    folder = os.path.join(folder_paths.get_folder_paths("wd14_tagger")[0], "wd-vit-tagger-v3")
    with pytest.raises(errors.LoraLabError) as raised:
        pack.NODE_CLASS_MAPPINGS[LOADER]().load("wd-vit-tagger-v3", "auto")
    message = str(raised.value)
    assert f"{folder} (missing: model.onnx, selected_tags.csv)" in message and "HF_HUB_OFFLINE" in message
    assert f"Download model.onnx and selected_tags.csv from https://huggingface.co/SmilingWolf/wd-vit-tagger-v3" \
           f"/tree/main and put them directly in {folder}{os.sep}" in message
    assert not os.path.exists(folder), "an offline loader must not leave an empty folder behind"


def test_online_but_unreachable_hub_ends_in_the_same_manual_instructions(pack, folder_paths, errors, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)   # read from the environment at import
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    folder = os.path.join(folder_paths.get_folder_paths("wd14_tagger")[0], "wd-convnext-tagger-v3")
    with pytest.raises(errors.LoraLabError) as raised:
        pack.NODE_CLASS_MAPPINGS[LOADER]().load("wd-convnext-tagger-v3", "auto")
    message = str(raised.value)
    assert "download failed" in message and folder in message
    assert "https://huggingface.co/SmilingWolf/wd-convnext-tagger-v3" in message
    assert not os.path.exists(folder)


def test_incomplete_custom_folder_lists_what_is_missing(pack, folder_paths, errors):
    folder = Path(folder_paths.get_folder_paths("wd14_tagger")[0]) / "half-copied"
    folder.mkdir(exist_ok=True)
    (folder / "model.onnx").write_bytes(b"")
    try:
        with pytest.raises(errors.LoraLabError, match=r"half-copied is not a complete WD14 tagger folder "
                                                      r"\(missing: selected_tags.csv\)"):
            pack.NODE_CLASS_MAPPINGS[LOADER]().load("half-copied", "cpu")
    finally:
        shutil.rmtree(folder)


def test_broken_files_are_a_user_error_naming_the_file(pack, folder_paths, errors, tagger_dir):
    folder = Path(folder_paths.get_folder_paths("wd14_tagger")[0]) / "broken"
    folder.mkdir(exist_ok=True)
    (folder / "model.onnx").write_bytes(b"not an onnx file")
    shutil.copy(tagger_dir / "selected_tags.csv", folder)
    try:
        with pytest.raises(errors.LoraLabError, match="could not load .*broken.*model.onnx"):
            pack.NODE_CLASS_MAPPINGS[LOADER]().load("broken", "cpu")
    finally:
        shutil.rmtree(folder)


def test_missing_onnxruntime_says_how_to_install_it_before_any_download(pack, errors, monkeypatch, folder_paths):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)        # `import onnxruntime` raises ImportError
    monkeypatch.setattr(pack.tagger, "locate_model", lambda *_: pytest.fail("looked for the model files"))
    with pytest.raises(errors.LoraLabError) as raised:
        pack.NODE_CLASS_MAPPINGS[LOADER]().load("wd-swinv2-tagger-v3", "auto")
    message = str(raised.value)
    assert message.startswith("[LoRA Lab · WD14 Tagger Loader]")
    assert "`pip install onnxruntime`" in message and "`pip install onnxruntime-gpu`" in message


def test_cuda_without_the_cuda_provider_is_a_user_error(pack, errors, tagger_dir):
    with pytest.raises(errors.LoraLabError, match="has no CUDA provider.*onnxruntime-gpu"):
        pack.NODE_CLASS_MAPPINGS[LOADER]().load(MODEL_NAME, "cuda")


def test_model_names_cannot_leave_the_tagger_folders(pack, errors, tagger_dir):
    for name in ("..", f"../wd14_tagger/{MODEL_NAME}", str(tagger_dir)):
        with pytest.raises(errors.LoraLabError, match="not a tagger name"):
            pack.NODE_CLASS_MAPPINGS[LOADER]().load(name, "cpu")


# --- Tag Images: merges and options --------------------------------------------------------------------
def test_tags_go_after_the_existing_caption(pack, tagger, dataset_dir):
    dataset = load_dataset(pack, dataset_dir[0])
    tagged, captions, report = run_tag(pack, dataset, tagger, first_tags="ohwx")
    expected = direct_tags(tagger, dataset)
    assert captions[0] == ", ".join(["ohwx", HAND_WRITTEN] + expected[0])
    assert captions[1:] == [", ".join(["ohwx"] + tags) for tags in expected[1:]]
    assert "red theme" in captions[0] and "hatsune miku" in captions[1] and r"saber \(fate\)" in captions[2]
    assert "^_^" in captions[3] and "white background" in captions[4]
    assert [item.caption for item in dataset.items][0] == HAND_WRITTEN          # input untouched
    assert "WD14 tagged 6 picture(s) with tiny-test-tagger on cpu (CPUExecutionProvider)" in report
    assert f"  {tagged.items[1].key}: {', '.join(expected[1])}" in report


def test_tags_only_and_blip_only(pack, tagger, dataset_dir):
    dataset = load_dataset(pack, dataset_dir[0])
    expected = direct_tags(tagger, dataset)
    _, captions, _ = run_tag(pack, dataset, tagger, merge="tags only")
    assert captions == [", ".join(tags) for tags in expected]
    _, captions, report = run_tag(pack, dataset, tagger, merge="BLIP only")
    assert captions == [HAND_WRITTEN] + [""] * 5
    assert "Tags per picture (captions unchanged):" in report and ", ".join(expected[2]) in report


def test_options_reach_the_tags(pack, tagger, dataset_dir):
    dataset = load_dataset(pack, dataset_dir[0])
    options = dict(general_threshold=0.2, character_threshold=0.5, mcut="both", rating_tags=True,
                   replace_underscores=False, escape_parentheses=False)
    _, captions, report = run_tag(pack, dataset, tagger, merge="tags only", exclude_tags="star (symbol), smile",
                                  **options)
    expected = direct_tags(tagger, dataset, general_threshold=0.2, character_threshold=0.5, mcut="both", rating=True,
                           replace_underscores=False, escape_parentheses=False, exclude="star (symbol), smile")
    assert captions == [", ".join(tags) for tags in expected]
    assert "saber_(fate)" in captions[2] and all(caption.endswith(", general") for caption in captions)
    assert not any("star" in caption or "smile" in caption for caption in captions)
    assert "general > 0.2, character > 0.5, MCut for both" in report


def test_batched_tags_equal_one_at_a_time(pack, tagger, dataset_dir):
    dataset = load_dataset(pack, dataset_dir[0])
    _, batched, _ = run_tag(pack, dataset, tagger, batch_size=4)
    _, single, _ = run_tag(pack, dataset, tagger, batch_size=1)
    assert batched == single and len(set(batched)) == 6


def test_in_memory_dataset_is_tagged_too(pack, tagger):
    from lora_lab.trainer.data.dataset import dataset_from_pixels
    pixels = torch.zeros(2, 32, 32, 3)
    pixels[0, ..., 0] = 1.0                          # red
    pixels[1, ..., 2] = 1.0                          # blue
    _, captions, report = run_tag(pack, dataset_from_pixels(pixels, []), tagger, write_sidecars=True)
    assert "red theme" in captions[0] and r"saber \(fate\)" in captions[1]
    assert "IMAGE batch" in report


# --- sidecars --------------------------------------------------------------------------------------
def test_fill_missing_writes_new_sidecars_and_never_touches_existing_ones(pack, tagger, dataset_dir):
    name, path = dataset_dir
    before = (path / "a.txt").stat()
    _, captions, report = run_tag(pack, load_dataset(pack, name), tagger, write_sidecars=True)
    assert (path / "a.txt").read_text(encoding="utf-8") == HAND_WRITTEN
    assert (path / "a.txt").stat().st_mtime_ns == before.st_mtime_ns
    for stem, caption in zip("bcdef", captions[1:]):
        assert (path / f"{stem}.txt").read_bytes() == caption.encode("utf-8")
    assert files_in(path) == sorted([f"{s}.png" for s in "abcdef"] + [f"{s}.txt" for s in "abcdef"])
    assert "5 written, 0 replaced" in report and "Kept 1 existing caption file" in report
    assert [item.caption for item in load_dataset(pack, name).items][1:] == captions[1:]


def test_overwrite_replaces_sidecars_and_backs_them_up(pack, tagger, dataset_dir):
    name, path = dataset_dir
    _, captions, report = run_tag(pack, load_dataset(pack, name), tagger, write_sidecars=True,
                                  sidecar_mode="overwrite")
    assert [(path / f"{s}.txt").read_text(encoding="utf-8") for s in "abcdef"] == captions
    [backup] = (path / ".loralab_caption_backup").glob("*/a.txt")
    assert backup.read_text(encoding="utf-8") == HAND_WRITTEN
    assert "1 replaced" in report and f"a.txt -> {os.path.relpath(backup, path)}" in report
    # Tagging the re-read dataset again adds nothing: every tag is already in its caption.
    _, again, second = run_tag(pack, load_dataset(pack, name), tagger, write_sidecars=True, sidecar_mode="overwrite")
    assert again == captions and "0 written, 0 replaced, 6 already up to date" in second


def test_a_failed_write_names_this_node_and_the_file(pack, tagger, dataset_dir, errors, monkeypatch):
    name, path = dataset_dir

    def disk_full(paths, *_, **__):
        raise OSError(28, "No space left on device", str(path / "b.txt"))
    monkeypatch.setattr(pack.caption.caption_edits, "write_sidecars", disk_full)
    with pytest.raises(errors.LoraLabError) as raised:
        run_tag(pack, load_dataset(pack, name), tagger, write_sidecars=True)
    message = str(raised.value)
    assert message.startswith("[LoRA Lab · Tag Images (WD14) › write_sidecars]")
    assert str(path / "b.txt") in message and "No space left on device" in message


def test_wrong_inputs_are_user_errors(pack, tagger, errors):
    with pytest.raises(errors.LoraLabError, match="Expected a LoRA Lab dataset"):
        run_tag(pack, "not a dataset", tagger)
    from lora_lab.trainer.data.dataset import dataset_from_pixels
    with pytest.raises(errors.LoraLabError, match="Expected a WD14 tagger"):
        run_tag(pack, dataset_from_pixels(torch.zeros(1, 8, 8, 3), []), object())


# --- progress and Cancel ------------------------------------------------------------------------------
@pytest.fixture
def progress_hook(comfy):
    import comfy.utils
    previous = comfy.utils.PROGRESS_BAR_HOOK
    calls = []

    def install(on_update=None):
        def hook(value, total, preview=None, **_):
            calls.append((value, total))
            if on_update:
                on_update(value, total)
        comfy.utils.set_progress_bar_global_hook(hook)
        return calls

    yield install
    comfy.utils.set_progress_bar_global_hook(previous)
    comfy.model_management.interrupt_current_processing(False)


def test_progress_bar_moves_per_batch(pack, tagger, dataset_dir, progress_hook):
    dataset = load_dataset(pack, dataset_dir[0])
    calls = progress_hook()
    run_tag(pack, dataset, tagger, batch_size=4)
    assert calls == [(4, 6), (6, 6)]


def test_cancel_between_batches_stops_and_writes_nothing(pack, tagger, dataset_dir, progress_hook, comfy):
    name, path = dataset_dir
    dataset = load_dataset(pack, name)
    calls = progress_hook(lambda value, total: comfy.model_management.interrupt_current_processing(True))
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_tag(pack, dataset, tagger, batch_size=2, write_sidecars=True)
    assert calls == [(2, 6)]
    assert files_in(path) == sorted([f"{s}.png" for s in "abcdef"] + ["a.txt"])


# --- Tag Report --------------------------------------------------------------------------------------
def test_tag_report_charts_the_counts_and_marks_common_tags(pack, tagger, dataset_dir, folder_paths):
    dataset = load_dataset(pack, dataset_dir[0])
    tagged, captions, _ = run_tag(pack, dataset, tagger, first_tags="ohwx")
    with torch.inference_mode():
        output = pack.NODE_CLASS_MAPPINGS[REPORT]().report(tagged, 0.9, "ohwx", 40)
    chart, text = output["result"]
    assert chart.dtype == torch.float32 and chart.shape[0] == 1 and chart.shape[3] == 3
    [shown] = output["ui"]["images"]
    saved = Path(folder_paths.get_temp_directory(), shown["subfolder"], shown["filename"])
    assert shown["type"] == "temp" and saved.is_file()
    assert Image.open(saved).size == (chart.shape[2], chart.shape[1])
    everywhere = [tag for tag in captions[1].split(", ")[1:] if all(tag in c.split(", ") for c in captions)]
    assert everywhere, "the test tagger puts star (symbol) on every picture"
    assert f"On 90% or more of the pictures ({len(everywhere)}): {', '.join(everywhere)}." in text
    assert "ohwx: 6 (100%)" in text and "6 picture(s)" in text


# --- onnxruntime stays optional for the whole pack ----------------------------------------------------
LOAD_WITHOUT_ONNXRUNTIME = """
import asyncio, importlib.abc, inspect, sys
from pathlib import Path
sys.path.insert(0, {support!r})
import comfyui_home

class NoOnnxRuntime(importlib.abc.MetaPathFinder):
    asked = []
    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            self.asked.append(name)
            raise ImportError("onnxruntime is not installed (simulated)")
        return None

overlay = comfyui_home.build_overlay(Path({folder!r}), link_pack=True)
comfyui_home.prepare_in_process(overlay)
import nodes
import torch._dynamo  # probes installed packages (onnxruntime too) once, with importlib.util.find_spec
print("BEFORE", "onnxruntime" in sys.modules)
sys.meta_path.insert(0, NoOnnxRuntime())    # from here on onnxruntime is absent, and every attempt is noted
loaded = nodes.load_custom_node(str(overlay / "custom_nodes" / comfyui_home.PACK_LINK_NAME))
if inspect.iscoroutine(loaded):
    loaded = asyncio.run(loaded)
ours = sorted(name for name in nodes.NODE_CLASS_MAPPINGS if name.startswith("LoraLab"))
tagger_nodes = {{"LoraLabWd14Loader", "LoraLabTagImages", "LoraLabTagReport"}}
print("LOADED", loaded, "TAGGER" if tagger_nodes <= set(ours) else "", "TRAIN" if "LoraLabTrainLora" in ours else "",
      "ASKED", NoOnnxRuntime.asked)
try:
    nodes.NODE_CLASS_MAPPINGS["LoraLabWd14Loader"]().load("wd-swinv2-tagger-v3", "auto")
except Exception as error:
    print("MESSAGE", str(error).replace("\\n", " "))
"""


def test_the_pack_loads_without_onnxruntime_and_the_loader_says_how_to_get_it(tmp_path):
    """A fresh process, as ComfyUI starts, where onnxruntime cannot be imported: the pack loads and registers
    every node, nothing even tries to import onnxruntime until the loader runs, and the loader explains."""
    code = LOAD_WITHOUT_ONNXRUNTIME.format(support=str(comfyui_home.REPO / "tests" / "support"),
                                           folder=str(tmp_path / "comfy"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = {line.split(" ", 1)[0]: line for line in out.stdout.splitlines()}
    assert lines.get("BEFORE") == "BEFORE False", out.stdout + out.stderr[-3000:]
    assert lines.get("LOADED") == "LOADED True TAGGER TRAIN ASKED []", out.stdout + out.stderr[-3000:]
    message = lines.get("MESSAGE", "")
    assert "WD14 Tagger Loader" in message and "`pip install onnxruntime`" in message, out.stdout

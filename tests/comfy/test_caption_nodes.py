"""The BLIP loader and Caption nodes inside a real ComfyUI, on a tiny real BLIP under models/blip/.

Datasets are real picture files under ComfyUI's input folder, read by the pack's own folder node.
"""
from __future__ import annotations

import importlib
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import random_models

LOADER, CAPTION, FOLDER = "LoraLabBlipLoader", "LoraLabCaption", "LoraLabDatasetFromFolder"
MODEL_NAME = "tiny-test-blip"
# Greedy, short: fast, and deterministic so batched and one-at-a-time runs can be compared.
DEFAULTS = dict(mode="fill-missing", trigger_word="", prompt="", min_length=2, max_length=6, num_beams=1,
                batch_size=4, find="", replace="", remove_tags="", write_sidecars=False)


@pytest.fixture(scope="module")
def folder_paths(comfy):
    import folder_paths
    return folder_paths


@pytest.fixture(scope="module")
def errors(pack):
    return importlib.import_module(pack.__name__ + ".messages")


@pytest.fixture(scope="module")
def blip_dir(pack, folder_paths):
    folder = Path(folder_paths.get_folder_paths("blip")[0]) / MODEL_NAME
    if not folder.exists():
        random_models.tiny_blip(folder)
    return folder


@pytest.fixture(scope="module")
def blip(pack, blip_dir):
    with torch.inference_mode():
        (captioner,) = pack.NODE_CLASS_MAPPINGS[LOADER]().load(MODEL_NAME, "auto", "auto")
    return captioner


@pytest.fixture
def dataset_dir(folder_paths):
    """Four noise pictures under input/<name>/; ``a`` has a hand-written caption. Yields (name, path)."""
    name = f"cap_{uuid.uuid4().hex[:8]}"
    path = Path(folder_paths.get_input_directory()) / name
    path.mkdir()
    rng = np.random.default_rng(0)
    for stem in "abcd":
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path / f"{stem}.png")
    (path / "a.txt").write_text("hand-written, Watermark, my dog", encoding="utf-8")
    yield name, path
    shutil.rmtree(path, ignore_errors=True)


def load_dataset(pack, name):
    with torch.inference_mode():
        return pack.NODE_CLASS_MAPPINGS[FOLDER]().load(name, ".txt", 1, 1, 0)["result"][0]


def run_caption(pack, dataset, blip, **overrides):
    """Run the Caption node the way ComfyUI does: inference mode, keyword inputs. -> (dataset, captions, report)"""
    inputs = dict(DEFAULTS, **overrides)
    with torch.inference_mode():
        output = pack.NODE_CLASS_MAPPINGS[CAPTION]().caption(dataset=dataset, blip=blip, **inputs)
    captioned, captions = output["result"]
    [report] = output["ui"]["text"]
    return captioned, captions, report


def direct(blip, dataset, indices, batch_size=1):
    """What BLIP says for these pictures, asked directly (one at a time unless told)."""
    return blip.caption([dataset.load_image(i) for i in indices], min_length=DEFAULTS["min_length"],
                        max_length=DEFAULTS["max_length"], num_beams=1, batch_size=batch_size)


def files_in(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


# --- node declarations ------------------------------------------------------------------------------
def test_nodes_are_declared_for_comfyui(pack, blip_dir):
    loader, caption = pack.NODE_CLASS_MAPPINGS[LOADER], pack.NODE_CLASS_MAPPINGS[CAPTION]
    assert loader.CATEGORY == caption.CATEGORY == "LoRA Lab/Caption"
    assert loader.RETURN_TYPES == ("LORALAB_BLIP",)
    assert caption.RETURN_TYPES == ("LORALAB_DATASET", "STRING") and caption.OUTPUT_IS_LIST == (False, True)
    for cls in (loader, caption):
        for name, (kind, options) in cls.INPUT_TYPES()["required"].items():
            assert options.get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
    assert set(caption.INPUT_TYPES()["required"]) == {"dataset", "blip", *DEFAULTS}
    models = loader.INPUT_TYPES()["required"]["model"][0]
    assert models[:2] == ["blip-base", "blip-large"] and MODEL_NAME in models


def test_blip_folder_kind_is_registered_under_models(pack, folder_paths):
    expected = os.path.join(folder_paths.models_dir, "blip")
    assert expected in folder_paths.get_folder_paths("blip")


def test_loader_runs_on_comfys_device_in_fp32_on_cpu(blip, comfy):
    assert blip.device == comfy.model_management.get_torch_device() == torch.device("cpu")
    assert blip.dtype == torch.float32 and blip.name == MODEL_NAME


def test_offline_missing_model_names_the_folder_and_the_files(pack, folder_paths, errors):
    # conftest sets HF_HUB_OFFLINE=1, so the loader must not try the hub and must say what to do by hand.
    folder = os.path.join(folder_paths.get_folder_paths("blip")[0], "blip-base")
    with pytest.raises(errors.LoraLabError) as raised:
        pack.NODE_CLASS_MAPPINGS[LOADER]().load("blip-base", "auto", "auto")
    message = str(raised.value)
    assert folder in message and "HF_HUB_OFFLINE" in message
    assert "https://huggingface.co/Salesforce/blip-image-captioning-base" in message
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
                 "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        assert name in message
    assert not os.path.exists(folder), "an offline loader must not leave an empty folder behind"


def test_incomplete_custom_folder_lists_what_is_missing(pack, folder_paths, errors):
    folder = Path(folder_paths.get_folder_paths("blip")[0]) / "half-copied"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}")
    try:
        with pytest.raises(errors.LoraLabError) as raised:
            pack.NODE_CLASS_MAPPINGS[LOADER]().load("half-copied", "cpu", "fp32")
        message = str(raised.value)
        assert str(folder) in message
        missing = message.split("(missing: ", 1)[1].split(")", 1)[0]
        assert missing == "model.safetensors, preprocessor_config.json, tokenizer_config.json, tokenizer.json"
    finally:
        shutil.rmtree(folder)


# --- modes and edits --------------------------------------------------------------------------------
def test_fill_missing_captions_only_uncaptioned_pictures(pack, blip, dataset_dir):
    dataset = load_dataset(pack, dataset_dir[0])
    captioned, captions, report = run_caption(pack, dataset, blip, trigger_word="ohwx")
    assert captions == [item.caption for item in captioned.items]
    assert captions[0] == "ohwx, hand-written, Watermark, my dog"
    assert captions[1:] == ["ohwx, " + text if text else "ohwx" for text in direct(blip, dataset, [1, 2, 3])]
    assert len(set(captions[1:])) > 1, "the tiny BLIP must look at the pictures for this test to mean much"
    assert "captioned 3 of 4" in report and "1 picture(s) kept their caption" in report
    assert [item.caption for item in dataset.items][0] == "hand-written, Watermark, my dog"   # input untouched


def test_overwrite_replaces_every_caption(pack, blip, dataset_dir):
    dataset = load_dataset(pack, dataset_dir[0])
    _, captions, report = run_caption(pack, dataset, blip, mode="overwrite")
    assert captions == direct(blip, dataset, range(4))
    assert "captioned 4 of 4" in report


def test_append_adds_blip_text_after_the_existing_caption(pack, blip, dataset_dir):
    dataset = load_dataset(pack, dataset_dir[0])
    _, captions, _ = run_caption(pack, dataset, blip, mode="append", trigger_word="ohwx")
    first = direct(blip, dataset, [0])[0]
    assert captions[0] == "ohwx, hand-written, Watermark, my dog" + (f", {first}" if first else "")
    assert all(caption.split(", ")[0] == "ohwx" for caption in captions)


def test_find_replace_and_remove_tags_apply_to_every_caption(pack, blip, dataset_dir):
    dataset = load_dataset(pack, dataset_dir[0])
    generated = direct(blip, dataset, [1, 2, 3])
    word = next(w for text in generated for w in text.split())
    _, captions, _ = run_caption(pack, dataset, blip, find=word, replace="ZEBRA", remove_tags="watermark, HAND-WRITTEN",
                                 trigger_word="ohwx")
    assert captions[0] == "ohwx, my dog"
    assert any("ZEBRA" in caption for caption in captions[1:])
    assert not any(f" {word} " in f" {caption} " for caption in captions)


def test_batched_captions_equal_one_at_a_time(pack, blip, dataset_dir):
    dataset = load_dataset(pack, dataset_dir[0])
    _, batched, _ = run_caption(pack, dataset, blip, mode="overwrite", batch_size=4)
    _, single, _ = run_caption(pack, dataset, blip, mode="overwrite", batch_size=1)
    assert batched == single and len(set(batched)) > 1


def test_min_length_above_max_length_is_a_user_error(pack, blip, dataset_dir, errors):
    dataset = load_dataset(pack, dataset_dir[0])
    with pytest.raises(errors.LoraLabError, match="min_length"):
        run_caption(pack, dataset, blip, min_length=10, max_length=3)


# --- sidecar files ------------------------------------------------------------------------------------
def test_fill_missing_writes_new_sidecars_and_never_touches_existing_ones(pack, blip, dataset_dir):
    name, path = dataset_dir
    before = (path / "a.txt").stat()
    _, captions, report = run_caption(pack, load_dataset(pack, name), blip, trigger_word="ohwx", write_sidecars=True)
    assert (path / "a.txt").read_text(encoding="utf-8") == "hand-written, Watermark, my dog"
    assert (path / "a.txt").stat().st_mtime_ns == before.st_mtime_ns
    for stem, caption in zip("bcd", captions[1:]):
        assert (path / f"{stem}.txt").read_bytes() == caption.encode("utf-8")
    assert files_in(path) == ["a.png", "a.txt", "b.png", "b.txt", "c.png", "c.txt", "d.png", "d.txt"]  # no temp files
    assert "3 written, 0 replaced" in report and "Kept 1 existing caption file" in report
    # What was written is what the dataset node reads back next time.
    assert [item.caption for item in load_dataset(pack, name).items][1:] == captions[1:]


def test_overwrite_replaces_sidecars_backs_them_up_and_names_them(pack, blip, dataset_dir):
    name, path = dataset_dir
    (path / "b.txt").write_text("old b", encoding="utf-8")
    _, captions, report = run_caption(pack, load_dataset(pack, name), blip, mode="overwrite", write_sidecars=True)
    assert [(path / f"{s}.txt").read_text(encoding="utf-8") for s in "abcd"] == captions
    backups = sorted((path / ".loralab_caption_backup").glob("*/*.txt"))
    assert [b.name for b in backups] == ["a.txt", "b.txt"]
    assert [b.read_text(encoding="utf-8") for b in backups] == ["hand-written, Watermark, my dog", "old b"]
    assert "2 replaced" in report
    for backup in backups:
        assert f"{backup.name} -> {os.path.relpath(backup, path)}" in report

    # Running again changes nothing on disk and makes no new backup.
    _, _, again = run_caption(pack, load_dataset(pack, name), blip, mode="overwrite", write_sidecars=True)
    assert "0 written, 0 replaced, 4 already up to date" in again
    assert len(list((path / ".loralab_caption_backup").iterdir())) == 1


def test_in_memory_dataset_with_write_sidecars_warns_instead_of_failing(pack, blip):
    from lora_lab.trainer.data.dataset import dataset_from_pixels
    dataset = dataset_from_pixels(torch.rand(2, 40, 40, 3, generator=torch.Generator().manual_seed(0)), [])
    _, captions, report = run_caption(pack, dataset, blip, trigger_word="ohwx", write_sidecars=True)
    assert len(captions) == 2 and all(c.startswith("ohwx") for c in captions)
    assert "IMAGE batch" in report and "no picture files" in report


# --- progress and Cancel ------------------------------------------------------------------------------
@pytest.fixture
def progress_hook(comfy):
    """Install a ComfyUI progress-bar hook (what the server does); restore it and the Cancel flag after."""
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


def test_progress_bar_moves_per_batch(pack, blip, dataset_dir, progress_hook):
    dataset = load_dataset(pack, dataset_dir[0])    # before the hook: the dataset node has its own progress bar
    calls = progress_hook()
    run_caption(pack, dataset, blip, mode="overwrite", batch_size=3)
    assert calls == [(3, 4), (4, 4)]


def test_cancel_between_batches_stops_and_writes_nothing(pack, blip, dataset_dir, progress_hook, comfy):
    name, path = dataset_dir
    dataset = load_dataset(pack, name)
    calls = progress_hook(lambda value, total: comfy.model_management.interrupt_current_processing(True))
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_caption(pack, dataset, blip, mode="overwrite", batch_size=1, write_sidecars=True)
    assert calls == [(1, 4)]             # the second batch never started
    assert files_in(path) == ["a.png", "a.txt", "b.png", "c.png", "d.png"]
    assert (path / "a.txt").read_text(encoding="utf-8") == "hand-written, Watermark, my dog"


def test_cancel_before_the_first_batch(pack, blip, dataset_dir, progress_hook, comfy):
    dataset = load_dataset(pack, dataset_dir[0])
    calls = progress_hook()
    comfy.model_management.interrupt_current_processing(True)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_caption(pack, dataset, blip, mode="overwrite")
    assert calls == []


def test_online_but_unreachable_hub_ends_in_the_same_manual_instructions(pack, folder_paths, errors, monkeypatch):
    # Online as far as the environment says, but the hub endpoint is a closed loopback port.
    import huggingface_hub.constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)   # read from the environment at import
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    folder = os.path.join(folder_paths.get_folder_paths("blip")[0], "blip-large")
    with pytest.raises(errors.LoraLabError) as raised:
        pack.NODE_CLASS_MAPPINGS[LOADER]().load("blip-large", "auto", "auto")
    message = str(raised.value)
    assert "download failed" in message and folder in message
    assert "https://huggingface.co/Salesforce/blip-image-captioning-large" in message
    assert not os.path.exists(folder)


def test_model_names_cannot_leave_the_blip_folders(pack, errors, blip_dir):
    for name in ("..", f"../blip/{MODEL_NAME}", str(blip_dir)):
        with pytest.raises(errors.LoraLabError, match="not a model folder name"):
            pack.NODE_CLASS_MAPPINGS[LOADER]().load(name, "cpu", "fp32")

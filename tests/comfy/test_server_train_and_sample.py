"""End to end through a real ComfyUI server: checkpoint -> dataset -> Train LoRA -> KSampler -> SaveImage."""
from __future__ import annotations

import hashlib
import shutil

import pytest
from PIL import Image
from safetensors import safe_open

import demo_data
import random_models

pytestmark = pytest.mark.server


def train_and_sample_prompt(folder: str, name: str, steps: int = 2) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_models.CHECKPOINT_NAME}},
        "2": {"class_type": "LoraLabDatasetFromFolder", "inputs": {
            "folder": folder, "caption_extension": ".txt", "default_repeats": 1, "batch_size": 1,
            "target_steps": steps}},
        # kohya's --clip_skip 1, said the ComfyUI way: the metadata must say so (ss_clip_skip)
        "10": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["1", 1], "stop_at_clip_layer": -1}},
        "3": {"class_type": "LoraLabTrainLora", "inputs": {
            "model": ["1", 0], "clip": ["10", 0], "vae": ["1", 2], "dataset": ["2", 0], "output_name": name,
            "resolution": 64, "steps": steps, "epochs": 0, "batch_size": 1, "learning_rate": 1e-4,
            "rank": 4, "alpha": 4.0, "seed": 1, "trigger_word": ""}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": f"{demo_data.TRIGGER}, a red circle",
                                                          "clip": ["3", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["3", 1]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
            "seed": 3, "steps": 1, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "e2e_trained"}},
    }


@pytest.fixture(scope="module")
def dataset_folder(server):
    demo_data.fresh_demo_dataset(server.overlay / "input" / "e2e_dataset", count=3, repeats=2, size=64)
    return "e2e_dataset"


def test_train_then_sample_on_the_next_node(server, dataset_folder):
    events = []
    history = server.run(train_and_sample_prompt(dataset_folder, "e2e_lora"), timeout=1200,
                         on_event=events.append)

    lora = server.overlay / "models" / "loras" / "e2e_lora.safetensors"
    assert lora.is_file()
    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert meta["ss_output_name"] == "e2e_lora" and meta["ss_num_train_images"] == "6"
    assert meta["loralab_trigger_word"] == demo_data.TRIGGER
    # The checkpoint named by the graph, with kohya's two hashes of it (computed here independently)
    with open(server.overlay / "models" / "checkpoints" / random_models.CHECKPOINT_NAME, "rb") as checkpoint:
        whole = hashlib.file_digest(checkpoint, "sha256").hexdigest()
        checkpoint.seek(0x100000)
        legacy = hashlib.sha256(checkpoint.read(0x10000)).hexdigest()[:8]
    assert meta["ss_sd_model_name"] == random_models.CHECKPOINT_NAME
    assert (meta["ss_sd_model_hash"], meta["ss_new_sd_model_hash"]) == (legacy, whole)
    assert meta["ss_clip_skip"] == meta["modelspec.encoder_layer"] == "1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.title"] == "e2e_lora"
    assert "lora key not loaded" not in server.log_text().lower()

    train_outputs = history["outputs"]["3"]
    assert "e2e_lora.safetensors" in train_outputs["text"][0]
    image_info = history["outputs"]["9"]["images"][0]
    image = Image.open(server.overlay / "output" / image_info["subfolder"] / image_info["filename"])
    assert image.size == (64, 64)

    progress = [e["data"] for e in events if e.get("type") == "loralab.train.progress"]
    assert [p["step"] for p in progress] == [1, 2]
    assert all(p["node"] == "3" and p["total"] == 2 and p["loss"] > 0 for p in progress)
    assert any(e.get("type") == "progress" and e["data"].get("node") == "3" for e in events), \
        "the node's progress bar never moved"

    # Queue the very same graph again: ComfyUI's cache answers, nothing is retrained or re-saved.
    events.clear()
    server.run(train_and_sample_prompt(dataset_folder, "e2e_lora"), timeout=600, on_event=events.append)
    assert not [e for e in events if e.get("type") == "loralab.train.progress"]
    assert not (server.overlay / "models" / "loras" / "e2e_lora_2.safetensors").exists()

    # The Caption node's write_sidecars rewrites the caption files: same text, new times. The dataset's
    # signature changes, so ComfyUI runs Train LoRA again; it finds its finished run and reuses it.
    for sidecar in (server.overlay / "input" / dataset_folder).rglob("*.txt"):
        sidecar.write_text(sidecar.read_text(encoding="utf-8"), encoding="utf-8")
    events.clear()
    history = server.run(train_and_sample_prompt(dataset_folder, "e2e_lora"), timeout=600, on_event=events.append)
    assert not [e for e in events if e.get("type") == "loralab.train.progress"]
    assert any(e.get("type") == "executing" and e["data"].get("node") == "3" for e in events), \
        "Train LoRA did not run again: the test no longer checks reuse"
    assert "Reused e2e_lora.safetensors" in history["outputs"]["3"]["text"][0]
    assert not (server.overlay / "models" / "loras" / "e2e_lora_2.safetensors").exists()
    assert history["outputs"]["9"]["images"], "the sampler after a reused LoRA made no picture"


def test_bad_dataset_folder_is_reported_by_node_and_input(server):
    from comfyui_server import ComfyExecutionError
    with pytest.raises(ComfyExecutionError) as error:
        server.run(train_and_sample_prompt("../../etc", "never"), timeout=120)
    assert "folder" in str(error.value) and "Fix" in str(error.value)


def test_caption_a_folder_through_the_api_and_write_sidecars(server):
    root = server.overlay / "input" / "caption_me"
    if root.exists():
        shutil.rmtree(root)
    demo_data.write_demo_dataset(root, count=4, repeats=3, size=64)
    captions = sorted(root.rglob("*.txt"))
    kept = captions[0]
    for missing in captions[1:]:
        missing.unlink()
    blip = server.overlay / "models" / "blip" / "tiny-test-blip"
    if not blip.exists():
        random_models.tiny_blip(blip)
    prompt = {
        "1": {"class_type": "LoraLabDatasetFromFolder", "inputs": {
            "folder": "caption_me", "caption_extension": ".txt", "default_repeats": 1, "batch_size": 1,
            "target_steps": 100}},
        "2": {"class_type": "LoraLabBlipLoader", "inputs": {"model": "tiny-test-blip", "device": "auto",
                                                            "precision": "auto"}},
        "3": {"class_type": "LoraLabCaption", "inputs": {
            "dataset": ["1", 0], "blip": ["2", 0], "mode": "fill-missing", "trigger_word": "sksdemo",
            "prompt": "", "min_length": 2, "max_length": 8, "num_beams": 1, "batch_size": 2, "find": "",
            "replace": "", "remove_tags": "", "write_sidecars": True}},
    }
    before = kept.read_text(encoding="utf-8")
    history = server.run(prompt, timeout=300)
    written = sorted(root.rglob("*.txt"))
    assert len(written) == 4
    assert kept.read_text(encoding="utf-8") == before, "fill-missing must never replace an existing caption"
    for path in written:
        if path != kept:
            assert path.read_text(encoding="utf-8").startswith("sksdemo, ")
    report = history["outputs"]["3"]["text"][0]
    assert "3" in report
    dataset_report = history["outputs"]["1"]["text"][0]
    assert "4" in dataset_report and "3_demo" in dataset_report

"""Faults: saves that fail half-way, Cancel and exceptions at random steps, two trainings queued back to
back on a real server, and the memory a 500-picture scan needs.

Guarantees checked after each: the previous file is intact, the trained weights are kept (and the
message says where), the partial LoRA loads in ComfyUI, the shared base model is bitwise unchanged.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

AREA_SAVE = "Faults — saving the LoRA"
AREA_STOP = "Faults — Cancel and errors during training"
AREA_SERVER = "Faults — a real ComfyUI server"
AREA_MEMORY = "Faults — memory"

SEED = int(os.environ.get("HARDENING_SEED", "8"))       # the "random" steps, reproducible and in the report
PICK = random.Random(SEED)
CANCEL_STEPS = sorted(PICK.sample(range(1, 5), 2))       # of a 5-step run
ERROR_CALLS = [PICK.randint(2, 4)]                       # the loss call that raises (call 1 is step 1)


@pytest.fixture
def loras(comfy) -> Path:
    import folder_paths
    return Path(folder_paths.get_folder_paths("loras")[0])


@pytest.fixture
def fresh_unet(comfy):
    import random_models
    return random_models.sd15_model_patcher(model_channels=32, seed=5)


@pytest.fixture
def dataset(pack):
    from lora_lab.trainer.data.dataset import dataset_from_pixels
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return dataset_from_pixels(pixels, ["sks, a noisy picture"])


def train(model, clip, vae, dataset, name, steps, **options):
    from lora_lab.nodes.train import LoraLabTrainLora
    from lora_lab.nodes.training_options import TrainingOptions
    options.setdefault("latent_disk_cache", False)
    with torch.inference_mode():
        return LoraLabTrainLora().train_lora(
            model=model, clip=clip, vae=vae, dataset=dataset, output_name=name, resolution=64, steps=steps, epochs=0,
            batch_size=1, learning_rate=1e-3, rank=2, alpha=2.0, seed=0, options=TrainingOptions(**options),
            unique_id="h")


def snapshot(patcher):
    return ({k: v.detach().clone() for k, v in patcher.model.state_dict().items()},
            [p.requires_grad for p in patcher.model.parameters()])


def assert_bitwise_unchanged(patcher, before):
    weights, flags = before
    after = patcher.model.state_dict()
    assert weights.keys() == after.keys()
    for key, value in weights.items():
        assert torch.equal(value, after[key]), f"{key} changed"
    assert [p.requires_grad for p in patcher.model.parameters()] == flags
    assert not any(type(m).__name__.startswith("Lora") for m in patcher.model.modules()), "an adapter was left behind"


def assert_loads_in_comfyui(model, clip, path: Path, caplog) -> dict:
    """ComfyUI's own LoraLoader reads the file and every key lands on a weight; returns its metadata."""
    import folder_paths
    import nodes as comfy_nodes
    loras_root = Path(folder_paths.get_folder_paths("loras")[0])
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        caplog.clear()
        patched, _ = comfy_nodes.LoraLoader().load_lora(model, clip, str(path.relative_to(loras_root)), 1.0, 1.0)
    assert "not loaded" not in caplog.text.lower(), caplog.text
    assert patched.patches, "the LoRA patches nothing"
    with safe_open(str(path), "pt") as opened:
        return opened.metadata()


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp-" in p.name)


# --- saves that fail ---------------------------------------------------------------------------------------
def test_final_save_failing_half_way_keeps_the_old_file_and_rescues_the_weights(
        fresh_unet, sd15_clip, small_vae, dataset, loras, monkeypatch, caplog, hardening, roots):
    from lora_lab.trainer.lora import files as lora_file
    victim = loras / "hardening_victim.safetensors"
    victim.write_bytes(b"the user's previous LoRA")
    before = snapshot(fresh_unet)
    real_write, attempts = lora_file._write_file, []

    def disk_full_in_loras(tensors, path, metadata):
        """Write half of the file, then fail the way a full disk does -- only inside models/loras."""
        if os.path.realpath(path).startswith(os.path.realpath(loras) + os.sep):
            attempts.append(Path(path).name)
            import safetensors.torch
            data = safetensors.torch.save(tensors, metadata=metadata)
            with open(path, "wb") as partial:
                partial.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(tensors, path, metadata)

    monkeypatch.setattr(lora_file, "_write_file", disk_full_in_loras)
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError) as raised:
        train(fresh_unet, sd15_clip, small_vae, dataset, "hardening_victim", steps=3, overwrite_existing=True,
              save_every_n_steps=1)
    message = str(raised.value)
    monkeypatch.setattr(lora_file, "_write_file", real_write)

    assert "[LoRA Lab · Train LoRA › output_name]" in message and "Fix:" in message, message
    assert "No space left on device" in message and str(victim) in message
    assert victim.read_bytes() == b"the user's previous LoRA", "the previous file was touched"
    assert not leftovers(loras), f"half-written files left behind: {leftovers(loras)}"
    assert len(attempts) == 3, attempts        # two periodic saves and the final one were tried; training went on
    assert "the save at step 1 failed" in caplog.text and "training goes on" in caplog.text
    rescued = Path(re.search(r"are safe in (\S+\.safetensors)", message).group(1))
    assert rescued.is_file() and str(rescued).startswith(roots["user"]), rescued
    from lora_lab.trainer.lora.files import load_lora_file
    tensors, metadata = load_lora_file(rescued)
    assert metadata["ss_steps"] == "3" and any(k.endswith("lora_up.weight") for k in tensors)
    assert_bitwise_unchanged(fresh_unet, before)
    hardening.row(AREA_SAVE, "disk full half-way through every write into models/loras (periodic saves at steps 1, 2 "
                  "and the final save; overwrite on, an older file of that name exists)",
                  "periodic failures logged, training went on; the older file is byte-identical, no temporary file "
                  "left; the weights of step 3 were written to user/loralab/rescued/ and the error says so: "
                  + message.split("] ", 1)[1])


def test_a_real_write_failure_file_size_limit(fresh_unet, sd15_clip, small_vae, dataset, loras, hardening):
    """RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG): a real failure half-way, everywhere."""
    victim = loras / "hardening_rlimit.safetensors"
    victim.write_bytes(b"an older LoRA")
    before = snapshot(fresh_unet)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))   # the LoRA is larger: its write fails part-way
    try:
        with pytest.raises(ValueError) as raised:
            train(fresh_unet, sd15_clip, small_vae, dataset, "hardening_rlimit", steps=1, overwrite_existing=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    message = str(raised.value)
    assert "[LoRA Lab · Train LoRA › output_name]" in message and "Fix:" in message, message
    assert "failed too" in message and "could not be kept" in message, message
    assert "File too large" in message or "serializ" in message, "the failure was not the write itself"
    assert victim.read_bytes() == b"an older LoRA"
    assert not leftovers(loras)
    assert_bitwise_unchanged(fresh_unet, before)
    hardening.row(AREA_SAVE, "a real kernel failure: RLIMIT_FSIZE 16 KB makes every write of the LoRA fail half-way "
                  "(models/loras and the rescue folder alike)",
                  "the older file is intact, no temporary file left, base model unchanged; the message says honestly "
                  "that nothing could be kept: " + message.split("] ", 1)[1])


# --- Cancel and errors at random steps ---------------------------------------------------------------------------
@pytest.mark.parametrize("cancel_at", CANCEL_STEPS)
def test_cancel_at_a_random_step(fresh_unet, sd15_clip, small_vae, dataset, loras, cancel_at, caplog, hardening):
    import comfy.model_management
    import comfy.utils
    before = snapshot(fresh_unet)
    name = f"hardening_cancel{cancel_at}"

    def press_cancel(value, total, *_, **__):
        if total == 5 and value == cancel_at:       # the training bar (the encoding bar counts 1 picture)
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(press_cancel)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(fresh_unet, sd15_clip, small_vae, dataset, name, steps=5)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    partial = loras / f"{name}_step{cancel_at}.safetensors"
    assert partial.is_file(), sorted(p.name for p in loras.glob(f"{name}*"))
    assert not (loras / f"{name}.safetensors").exists()
    assert_bitwise_unchanged(fresh_unet, before)
    metadata = assert_loads_in_comfyui(fresh_unet, sd15_clip, partial, caplog)
    assert metadata["ss_steps"] == str(cancel_at)
    hardening.row(AREA_STOP, f"Cancel at step {cancel_at} of 5 (step drawn with seed {SEED})",
                  f"{partial.name} saved, ss_steps={cancel_at}, loads through ComfyUI's LoraLoader with every key "
                  "applied; base model bitwise unchanged, no adapter left")


@pytest.mark.parametrize("failing_call", ERROR_CALLS)
def test_exception_at_a_random_step(fresh_unet, sd15_clip, small_vae, dataset, loras, failing_call,
                                    loss_fails_at_call, caplog, hardening):
    before = snapshot(fresh_unet)
    name = f"hardening_crash{failing_call}"
    with loss_fails_at_call(failing_call, "simulated CUDA error: an illegal memory access was encountered"), \
            caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="simulated CUDA error"):
        train(fresh_unet, sd15_clip, small_vae, dataset, name, steps=5)
    done = failing_call - 1
    partial = loras / f"{name}_step{done}.safetensors"
    assert partial.is_file()
    assert str(partial) in caplog.text, "the log must say where the partial LoRA is"
    assert_bitwise_unchanged(fresh_unet, before)
    metadata = assert_loads_in_comfyui(fresh_unet, sd15_clip, partial, caplog)
    assert metadata["ss_steps"] == str(done)
    hardening.row(AREA_STOP, f"RuntimeError inside step {failing_call} of 5 (drawn with seed {SEED})",
                  f"the error reaches ComfyUI unchanged; {partial.name} (ss_steps={done}) saved, logged with its path "
                  "and loads in ComfyUI; base model bitwise unchanged")


def test_cancel_before_the_first_step_saves_nothing_and_restores(fresh_unet, sd15_clip, small_vae, dataset, loras,
                                                                  hardening):
    import comfy.model_management
    before = snapshot(fresh_unet)
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(fresh_unet, sd15_clip, small_vae, dataset, "hardening_early", steps=3)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not list(loras.glob("hardening_early*"))
    assert_bitwise_unchanged(fresh_unet, before)
    hardening.row(AREA_STOP, "Cancel pressed before training starts (while encoding)",
                  "stops at once; no file written; base model bitwise unchanged")


# --- two trainings back to back on a real server ------------------------------------------------------------------
def train_prompt(folder: str, name: str, seed: int) -> dict:
    import random_models
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_models.CHECKPOINT_NAME}},
        "2": {"class_type": "LoraLabDatasetFromFolder", "inputs": {
            "folder": folder, "caption_extension": ".txt", "default_repeats": 1, "batch_size": 1, "target_steps": 1}},
        "3": {"class_type": "LoraLabTrainLora", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "output_name": name,
            "resolution": 64, "steps": 1, "epochs": 0, "batch_size": 1, "learning_rate": 1e-4, "rank": 2,
            "alpha": 2.0, "seed": seed, "trigger_word": ""}},
    }


@pytest.mark.server
def test_two_trainings_queued_back_to_back_do_not_cross_talk(server, hardening):
    from PIL import Image
    runs = {"alpha": ("hardening_alpha", 11, 1, "alphatrigger"), "beta": ("hardening_beta", 22, 2, "betatrigger")}
    for key, (folder, _, count, trigger) in runs.items():
        root = server.overlay / "input" / folder
        root.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.new("RGB", (64, 64), (40 * index + (0 if key == "alpha" else 120), 80, 160)).save(root / f"{index}.png")
            (root / f"{index}.txt").write_text(f"{trigger}, picture {index}", encoding="utf-8")
    first = server.queue(train_prompt("hardening_alpha", "h_alpha", 11))
    history_beta = server.run(train_prompt("hardening_beta", "h_beta", 22), timeout=900)
    history_alpha = server.get_json(f"/history/{first}")[first]
    assert (history_alpha.get("status") or {}).get("status_str") == "success", history_alpha.get("status")
    loras = server.overlay / "models" / "loras"
    seen = {}
    for key, history in (("alpha", history_alpha), ("beta", history_beta)):
        folder, seed, count, trigger = runs[key]
        assert f"h_{key}.safetensors" in history["outputs"]["3"]["text"][0]
        with safe_open(str(loras / f"h_{key}.safetensors"), "pt") as opened:
            metadata = opened.metadata()
            seen[key] = {name: opened.get_tensor(name) for name in list(opened.keys())[:4]}
        assert metadata["ss_output_name"] == f"h_{key}" and metadata["ss_seed"] == str(seed)
        assert metadata["ss_num_train_images"] == str(count) and metadata["loralab_trigger_word"] == trigger
        tags = json.dumps(json.loads(metadata["ss_tag_frequency"]))
        other = runs["beta" if key == "alpha" else "alpha"][3]
        assert trigger in tags and other not in tags, tags
    assert not list(loras.glob("h_alpha_*")) and not list(loras.glob("h_beta_*"))
    assert any(not torch.equal(seen["alpha"][k], seen["beta"][k]) for k in seen["alpha"])
    hardening.row(AREA_SERVER, "two Train LoRA prompts (different datasets, names, seeds) queued back to back on a "
                  "real `main.py --cpu` server",
                  "both completed; h_alpha / h_beta each hold their own run's name, seed, picture count, trigger word "
                  "and tags, different weights; no numbered or step files")


# --- memory ---------------------------------------------------------------------------------------------------------
PICTURE_SIZE = (1024, 768)
COUNT = 500


def write_pictures(folder: Path) -> None:
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(COUNT):
        target = folder / f"{index:04}.jpg"
        if target.is_file():
            continue
        image = Image.new("RGB", PICTURE_SIZE, tuple(int(c) for c in rng.integers(0, 256, 3)))
        image.paste(Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)), (100, 100))
        partial = folder / f"{index:04}.jpg.part"
        image.save(partial, format="JPEG", quality=85)
        partial.rename(target)
        if index % 4 == 0:
            (folder / f"{index:04}.txt").write_text(f"sks, picture {index}", encoding="utf-8")


def test_a_500_picture_scan_keeps_memory_bounded(hardening):
    import comfyui_home
    folder = comfyui_home.cache_dir() / f"hardening-{COUNT}-{PICTURE_SIZE[0]}x{PICTURE_SIZE[1]}"
    write_pictures(folder)
    tool = Path(__file__).resolve().parents[2] / "tools" / "bench_dataset_scan.py"
    child = subprocess.run([sys.executable, str(tool), "--measure", "--folder", str(folder)],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["pictures"] == COUNT and result["skipped"] == 0
    grown = result["rss_peak_after_scan_mb"] - result["rss_after_import_mb"]
    everything = COUNT * PICTURE_SIZE[0] * PICTURE_SIZE[1] * 3 / 2 ** 20
    bound = 100
    assert grown < bound, f"the scan grew peak RSS by {grown:.0f} MB"
    assert bound < everything / 10
    hardening.row(AREA_MEMORY, f"scan {COUNT} JPEGs of {PICTURE_SIZE[0]}x{PICTURE_SIZE[1]} in a fresh process "
                  "(tools/bench_dataset_scan.py --measure)",
                  f"peak RSS grew by under {10 * (int(grown) // 10 + 1)} MB (bound {bound} MB; holding every decoded "
                  f"picture would take {everything:.0f} MB): pictures are checked at 1/8 scale, a few at a time")

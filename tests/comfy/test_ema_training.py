"""Saves & Resume's moving average (ema_decay, ema_weights) in Train LoRA inside a real ComfyUI on ComfyUI's SD1.5
classes: "beside" writes <name>_ema next to the raw LoRA, "replace" writes the average itself; each file loads
with ComfyUI's own LoraLoader with no key left over, and the raw weights are the same as without the average.
The average's arithmetic and its exact resume are tested in tests/unit/training/test_ema.py."""
from __future__ import annotations

import logging

import pytest
import torch

import random_models
from training import assert_base_untouched, options, run_train, saved_tensors, weights_snapshot

pytestmark = pytest.mark.usefixtures("leave_models_unpatched", "one_thread")


def test_the_average_is_saved_beside_or_instead_and_loads_in_comfyui(request, make_dataset, loras_dir, caplog):
    from lora_lab.trainer.lora.files import load_lora_file
    unet = random_models.sd15_model_patcher(model_channels=32, seed=61)
    clip, vae = request.getfixturevalue("sd15_clip"), request.getfixturevalue("small_vae")
    dataset = make_dataset(2)
    before, flags = weights_snapshot(unet), [p.requires_grad for p in unet.model.parameters()]
    runs = {}
    for name, values in (("plain", {}), ("beside", dict(ema_decay=0.9, ema_weights="beside")),
                         ("replace", dict(ema_decay=0.9, ema_weights="replace"))):
        result = run_train(unet, clip, vae, dataset, f"ema_{name}", steps=4, learning_rate=1e-2,
                           options=options(precision="fp32", save_precision="fp32", **values))
        assert_base_untouched(unet, before, flags)
        runs[name] = result
    plain = saved_tensors(loras_dir, runs["plain"]["result"][2])
    beside = saved_tensors(loras_dir, runs["beside"]["result"][2])
    averaged = saved_tensors(loras_dir, "ema_beside_ema.safetensors")
    replaced = saved_tensors(loras_dir, runs["replace"]["result"][2])
    # The average never feeds back: the raw weights are the plain run's (the same ops on the same values).
    assert all(torch.equal(plain[k], beside[k]) for k in plain)
    # "replace" saves what "beside" saves as <name>_ema: the same average of the same weights.
    assert averaged.keys() == plain.keys() and all(torch.equal(averaged[k], replaced[k]) for k in plain)
    assert any(not torch.allclose(averaged[k], plain[k]) for k in plain), "the average is the raw weights"
    assert load_lora_file(loras_dir / "ema_beside_ema.safetensors")[1]["loralab_ema_decay"] == "0.9"
    assert "ema_beside_ema" in runs["beside"]["ui"]["text"][0]

    import nodes as comfy_nodes
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        for name in ("ema_beside_ema.safetensors", runs["replace"]["result"][2]):
            comfy_nodes.LoraLoader().load_lora(unet, clip, name, 1.0, 1.0)
    assert "not loaded" not in caplog.text.lower(), caplog.text

"""Block swap (Memory & Speed's blocks_to_swap) in Train LoRA inside a real ComfyUI, on ComfyUI's own SD1.5 and
Flux classes at small sizes.

On this CPU-only machine the option does nothing and the report says so. The swap itself is rehearsed here on
the CPU (trainer/training/block_swap.py: an evicted block's weights are empty tensors, so a ComfyUI block that
computed without being fetched would fail): the LoRA equals the one trained without swap, the file is the same,
and the shared model comes back bitwise. Flux needs ComfyUI 2025-10 (2024-03 has none): that case skips there.
"""
from __future__ import annotations

import functools

import pytest
import torch

from training import assert_base_untouched, options, run_train, saved_tensors, weights_snapshot
from training import small_family_models as family_models

pytestmark = pytest.mark.usefixtures("leave_models_unpatched", "one_thread")




@pytest.fixture
def rehearsed_swap(monkeypatch, pack):
    from lora_lab.nodes import train
    from lora_lab.trainer.training.block_swap import blocks_swapped
    monkeypatch.setattr(train, "blocks_swapped", functools.partial(blocks_swapped, rehearsal=True))


def test_blocks_to_swap_is_the_memory_nodes_last_input_off_by_default(pack):
    from lora_lab.nodes.option_nodes import LoraLabMemoryOptions
    required = LoraLabMemoryOptions.INPUT_TYPES()["required"]
    assert list(required)[-2:] == ["fp8_base", "blocks_to_swap"]    # saved workflows keep their widget values
    assert required["blocks_to_swap"][1]["default"] == 0


def test_on_the_cpu_the_option_is_accepted_does_nothing_and_says_so(request, make_dataset):
    unet, clip, vae = family_models("sd15", request)
    result = run_train(unet, clip, vae, make_dataset(2), "swap_on_cpu", steps=2,
                       options=options(precision="fp32", blocks_to_swap=4))
    report = result["ui"]["text"][0]
    assert "block swap: 4 requested, none swapped: training runs on the CPU" in report, report


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_swapped_blocks_train_the_same_lora_and_give_the_model_back(family, request, make_dataset, loras_dir,
                                                                    rehearsed_swap):
    unet, clip, vae = family_models(family, request)
    dataset = make_dataset(2)
    before = weights_snapshot(unet)
    flags = [p.requires_grad for p in unet.model.parameters()]
    from lora_lab.nodes import comfy_bridge
    blocks = len(comfy_bridge.blocks_of(unet.model.diffusion_model))
    runs = {}
    # Checkpointing on in both: a swapped block recomputes in backward as a checkpointed one does, so the two runs
    # take the same ops in the same order and the LoRAs agree to float rounding.
    for name, swap in (("kept", 0), ("swapped", blocks // 2), ("all", blocks)):
        result = run_train(unet, clip, vae, dataset, f"swap_{family}_{name}", steps=3, learning_rate=1e-2,
                           options=options(precision="fp32", gradient_checkpointing=True, blocks_to_swap=swap,
                                           save_precision="fp32"))
        assert_base_untouched(unet, before, flags)
        runs[name] = (result["ui"]["text"][0], saved_tensors(loras_dir, result["result"][2]))
    assert f"block swap: {blocks // 2} of {blocks} blocks wait in CPU memory" in runs["swapped"][0], runs["swapped"][0]
    kept = runs["kept"][1]
    for name in ("swapped", "all"):
        got = runs[name][1]
        assert got.keys() == kept.keys()
        for key in kept:
            # The LoRA's weights are of order 0.01-1 after 3 steps at lr 1e-2 (AdamW moves each by about the lr a
            # step); 1e-6 absolute is float32 rounding of sums of that size, 10^4 below one step's change.
            torch.testing.assert_close(got[key], kept[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")
    # The LoRA learned something (its up weights start at zero), so agreeing means agreeing on what it learned.
    assert max(v.abs().max().item() for k, v in kept.items() if k.endswith("lora_up.weight")) > 1e-3

"""A model ComfyUI loads only in part (a card smaller than the model): Train LoRA trains with the layers ComfyUI
left in CPU memory, which ComfyUI's op copies to the GPU as each computes, with the graph's LoRA patches applied
on the way (its low-VRAM mode, the same that lets it sample such a model).

A CPU never loads partially, so `small_card` has ComfyUI's own low-VRAM load (LoadedModel.model_load with a
budget, what load_models_gpu calls on a small card) stand in for Train LoRA's load: the marks, the patches
applied per layer and the bookkeeping are ComfyUI's. What a CPU cannot show is the copy itself; ComfyUI makes it.
"""
from __future__ import annotations

import pytest
import torch

from training import options, run_train, saved_tensors, weights_snapshot
from training import small_family_models as family_models

pytestmark = pytest.mark.usefixtures("leave_models_unpatched", "one_thread")

LOADED_FRACTION = 0.5


@pytest.fixture
def small_card(monkeypatch, pack, comfy):
    """Train LoRA's loads go through ComfyUI's low-VRAM load with room for half the model."""
    from lora_lab.nodes import comfy_bridge

    def load_in_part(patchers):
        main, *others = patchers
        loaded = comfy.model_management.LoadedModel(main)
        loaded.model_load(int(main.model_size() * LOADED_FRACTION))
        comfy.model_management.current_loaded_models.insert(0, loaded)
        if others:
            comfy.model_management.load_models_gpu(others)

    monkeypatch.setattr(comfy_bridge, "load_models", load_in_part)


def graph_lora_streams(comfy) -> bool:
    """Whether this ComfyUI's op patches a copy of a streamed weight (2024-08+, model_management.cast_to). 2024-03's
    patches the tensor its ``weight.to(the GPU)`` returns in place: on a GPU a copy, but on this CPU the weight
    itself, which a CPU standing in for a GPU would see patched again at every step."""
    return hasattr(comfy.model_management, "cast_to")


def with_graph_lora(unet, comfy):
    """A clone carrying a LoRA-like patch on every Linear and conv weight of the blocks, as Load LoRA leaves it:
    where ComfyUI streams a layer, the patch is applied as it computes instead of once at load. (On 2024-03 the
    clone alone: see graph_lora_streams.)"""
    patched = unet.clone()
    if not graph_lora_streams(comfy):
        return patched
    generator = torch.Generator().manual_seed(5)
    diffs = {key: (torch.randn(value.shape, generator=generator) * 0.02,)
             for key, value in unet.model.state_dict().items()
             if key.startswith("diffusion_model.") and key.endswith(".weight") and value.dim() >= 2}
    assert patched.add_patches(diffs, 1.0)
    return patched


def train(unet, clip, vae, dataset, name, **values):
    settings = dict(precision="fp32", gradient_checkpointing=True, save_precision="fp32")
    settings.update(values)
    return run_train(unet, clip, vae, dataset, name, steps=3, learning_rate=1e-2, options=options(**settings))


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_a_model_loaded_in_part_trains_the_lora_a_whole_one_does(family, request, make_dataset, loras_dir, comfy):
    unet, clip, vae = family_models(family, request)
    patched = with_graph_lora(unet, comfy)
    before = weights_snapshot(unet)
    dataset = make_dataset(2)
    whole = train(patched, clip, vae, dataset, f"whole_{family}")
    request.getfixturevalue("small_card")
    part = train(patched, clip, vae, dataset, f"part_{family}")
    from lora_lab.nodes import comfy_bridge
    streamed = comfy_bridge.streamed_layers(patched.model.diffusion_model)   # ComfyUI's state, as it left it
    assert streamed, "some layers must have stayed in CPU memory for this test to mean anything"
    assert any(getattr(layer, "weight_function", None) for layer in streamed) or not graph_lora_streams(comfy)
    report = part["ui"]["text"][0]
    assert f"ComfyUI's partial load: {len(streamed)} layers" in report, report
    assert "partial load" not in whole["ui"]["text"][0]
    expected, got = saved_tensors(loras_dir, whole["result"][2]), saved_tensors(loras_dir, part["result"][2])
    assert got.keys() == expected.keys()
    for key in expected:
        # The streamed layers compute the same patched weight (ComfyUI's calculate_weight in float32 either way)
        # through the same F.linear / conv, so the runs agree to float rounding: weights of order 0.01-1 after 3
        # AdamW steps of 1e-2, where 1e-6 is far below one step's change.
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    assert max(v.abs().max().item() for k, v in expected.items() if k.endswith("lora_up.weight")) > 1e-3
    # Once ComfyUI lets the model go, every weight is the base's again, bitwise.
    comfy.model_management.unload_all_models()
    after = weights_snapshot(unet)
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_block_swap_and_fp8_leave_comfyuis_streamed_layers_to_it(request, make_dataset, loras_dir, comfy, small_card,
                                                                  monkeypatch):
    import functools
    from lora_lab.nodes import train as train_node
    from lora_lab.trainer.training.block_swap import blocks_swapped
    monkeypatch.setattr(train_node, "blocks_swapped", functools.partial(blocks_swapped, rehearsal=True))
    unet, clip, vae = family_models("sd15", request)
    patched = with_graph_lora(unet, comfy)
    before = weights_snapshot(unet)
    result = train(patched, clip, vae, make_dataset(2), "part_swap_fp8", blocks_to_swap=4, fp8_base=True)
    report = result["ui"]["text"][0]
    from lora_lab.nodes import comfy_bridge
    streamed = comfy_bridge.streamed_layers(patched.model.diffusion_model)
    linears = sum(isinstance(layer, torch.nn.Linear) for layer in streamed)
    assert linears, "the test needs streamed Linear layers"
    kept = int(report.split(" layer(s) kept their own precision")[0].rsplit("; ", 1)[1])
    assert kept >= linears, report
    assert "block swap: 4 of" in report and "ComfyUI's partial load" in report, report
    assert all(torch.isfinite(t).all() for t in saved_tensors(loras_dir, result["result"][2]).values())
    comfy.model_management.unload_all_models()
    after = weights_snapshot(unet)
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_without_gradient_checkpointing_a_model_loaded_in_part_is_refused_with_the_fix(request, make_dataset,
                                                                                       small_card):
    from lora_lab.trainer.messages import LoraLabError
    unet, clip, vae = family_models("sd15", request)
    with pytest.raises(LoraLabError) as refused:
        train(unet, clip, vae, make_dataset(2), "part_no_checkpointing", gradient_checkpointing=False)
    text = str(refused.value)
    assert "Train LoRA" in text and "could fit only part of" in text and "turn on gradient_checkpointing" in text


def test_dora_on_a_model_loaded_in_part_is_refused_with_the_fix(request, make_dataset, small_card):
    from lora_lab.nodes import comfy_bridge
    from lora_lab.trainer.messages import LoraLabError
    if not comfy_bridge.loader_applies_dora():
        pytest.skip("this ComfyUI (2024-03) refuses DoRA training whatever the load (its Load LoRA skips dora_scale)")
    unet, clip, vae = family_models("sd15", request)
    with pytest.raises(LoraLabError) as refused:
        train(unet, clip, vae, make_dataset(2), "part_dora", network_type="DoRA")
    text = str(refused.value)
    assert "DoRA" in text and "layers stayed in CPU memory" in text and "use network_type LoRA" in text

"""Block weights on the LoRA Pedal and the pedalboard rows, in a real ComfyUI, on a small SD1.5 UNet and CLIP:
ALL at strength s is the plain pedal at s (bitwise), a 0 entry is the same file without that block's keys
(bitwise), a ratio scales only its block's patches, a block the LoRA lacks shifts nothing, and what cannot
be used is named. Flux and SD3: test_flow_models.py."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lora_files import clip_shapes, denoised, encoded, kohya_tensors, native_chain, unet_shapes, write_lora

pytestmark = pytest.mark.usefixtures("leave_models_unpatched")     # (tests/conftest.py)
ONES = [1.0] * 17
SD17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07",
        "OUT08", "OUT09", "OUT10", "OUT11")


def vector(**blocks) -> str:
    """A 17-entry SD1.5 vector: 1 everywhere but the named blocks."""
    return ",".join(f"{blocks.get(label, 1.0):g}" for label in SD17)


def modules_by_block(tiny_unet) -> dict[str, str]:
    """kohya module name -> the block (IN04, M01, OUT03, BASE) of the weight ComfyUI patches with it."""
    import comfy.lora
    from lora_lab.trainer.lora.block_weights import position
    key_map = comfy.lora.model_lora_keys_unet(tiny_unet.model, {})
    return {name: position(key) for name, key in key_map.items() if name.startswith("lora_unet_")}


def without(tensors: dict, drop) -> dict:
    return {key: value for key, value in tensors.items() if not drop(key.split(".", 1)[0])}


@pytest.fixture(scope="module")
def files(loras_dir, tiny_unet, sd15_clip):
    """whole: every UNet target (IN01-OUT11) and two CLIP layers; then the same file with blocks cut out,
    written by hand, as what a 0 entry must equal."""
    blocks = modules_by_block(tiny_unet)
    tensors = kohya_tensors({**unet_shapes(tiny_unet), **clip_shapes(sd15_clip)}, seed=41)
    assert {blocks[m] for m in {k.split(".", 1)[0] for k in tensors} if m in blocks} >= {"IN04", "M01", "OUT03"}
    named = {
        "whole": tensors,
        "no_in04": without(tensors, lambda module: blocks.get(module) == "IN04"),
        "no_base": without(tensors, lambda module: module.startswith("lora_te")),
        # a LoRA with only IN05 and OUT04: it lacks IN01, IN02 and IN04, which come before IN05
        "sparse": without(tensors, lambda module: blocks.get(module) not in ("IN05", "OUT04")),
        "sparse_out04": without(tensors, lambda module: blocks.get(module) != "OUT04"),
        # a Linear in IN10 (a ResBlock's time embedding): a block the 17-entry layout does not name
        "with_in10": {**tensors, **kohya_tensors({"lora_unet_input_blocks_10_0_emb_layers_1": tuple(
            tiny_unet.model.diffusion_model.input_blocks[10][0].emb_layers[1].weight.shape)}, seed=42)},
    }
    return {key: os.path.relpath(write_lora(loras_dir, f"blocks_{key}.safetensors", value), loras_dir)
            for key, value in named.items()}


@pytest.fixture
def nodes(pack):
    from lora_lab.nodes import pedalboard, pedals
    pedals.LORA_FILES.clear()
    return pedals, pedalboard


def pedal(nodes, name, strength=1.0, blocks="", clip_strength=None):
    pedals, _ = nodes
    with torch.inference_mode():
        return pedals.LoraLabLoraStack().stack(name, strength, strength if clip_strength is None else clip_strength,
                                               True, block_weights=blocks)[0]


def apply(nodes, model, clip, stack, ui=None):
    pedals, _ = nodes
    with torch.inference_mode():
        output = pedals.LoraLabApplyLoraStack().apply(model, stack, clip)
    if ui is not None:
        ui.extend(output["ui"]["text"])
    return output["result"]


def outputs(model, clip):
    return denoised(model), encoded(clip)


def assert_same(first, second):
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# --- ALL is the plain pedal --------------------------------------------------------------------------------
@pytest.mark.parametrize("blocks", ["ALL", "SD-ALL", ",".join(["1"] * 17), "LyC-ALL", ",".join(["1"] * 27)])
def test_all_at_strength_s_equals_the_plain_pedal_bitwise(nodes, files, tiny_unet, sd15_clip, blocks):
    base = outputs(tiny_unet, sd15_clip)
    plain = outputs(*apply(nodes, tiny_unet, sd15_clip, pedal(nodes, files["whole"], 0.7))[:2])
    weighted = outputs(*apply(nodes, tiny_unet, sd15_clip, pedal(nodes, files["whole"], 0.7, blocks))[:2])
    assert_same(weighted, plain)
    assert not torch.equal(plain[0], base[0]) and not torch.equal(plain[1], base[1])    # the LoRA does change both


def test_a_pedalboard_row_with_all_equals_the_plain_row(nodes, files, tiny_unet, sd15_clip):
    _, pedalboard = nodes

    def play(row):
        with torch.inference_mode():
            return pedalboard.LoraLabPedalboard().play(json.dumps([row]), model=tiny_unet, clip=sd15_clip)["result"]

    row = {"lora": files["whole"], "strength_model": 0.6, "strength_clip": 0.9}
    assert_same(outputs(*play({**row, "blocks": "ALL"})[1:3]), outputs(*play(row)[1:3]))


# --- a 0 entry mutes its block, a ratio scales it ----------------------------------------------------------
def test_a_zero_entry_equals_the_file_without_that_block(nodes, files, tiny_unet, sd15_clip):
    muted = outputs(*apply(nodes, tiny_unet, sd15_clip, pedal(nodes, files["whole"], 0.8, vector(IN04=0)))[:2])
    cut = outputs(*apply(nodes, tiny_unet, sd15_clip, pedal(nodes, files["no_in04"], 0.8))[:2])
    assert_same(muted, cut)
    whole = outputs(*apply(nodes, tiny_unet, sd15_clip, pedal(nodes, files["whole"], 0.8))[:2])
    assert not torch.equal(muted[0], whole[0])         # IN04's patches did matter


def test_base_weighs_the_text_encoder(nodes, files, tiny_unet, sd15_clip):
    muted = outputs(*apply(nodes, tiny_unet, sd15_clip, pedal(nodes, files["whole"], 1.0, vector(BASE=0)))[:2])
    assert_same(muted, outputs(*apply(nodes, tiny_unet, sd15_clip, pedal(nodes, files["no_base"], 1.0))[:2]))
    assert torch.equal(muted[1], encoded(sd15_clip))


def test_a_ratio_scales_only_its_block_s_patches(nodes, files, tiny_unet, sd15_clip):
    from lora_lab.trainer.lora.block_weights import position
    model, clip, _ = apply(nodes, tiny_unet, sd15_clip,
                           pedal(nodes, files["whole"], 0.8, vector(OUT03=0.25, BASE=0.5), clip_strength=0.6))
    strengths = {key: patches[-1][0] for key, patches in model.patches.items() if patches}
    assert {position(key) for key in strengths} >= {"IN04", "M01", "OUT03"}
    for key, strength in strengths.items():
        assert strength == (0.8 * 0.25 if position(key) == "OUT03" else 0.8), key
    clip_strengths = {patches[-1][0] for patches in clip.patcher.patches.values() if patches}
    assert clip_strengths == {0.6 * 0.5}


def test_a_block_the_lora_lacks_shifts_nothing(nodes, files, tiny_unet, sd15_clip):
    """The file has IN05 and OUT04 only. Entry IN05 = 0 mutes IN05 (Inspire would give IN05 the first block
    entry after BASE, IN01's, as IN01 is the first block the file has)."""
    muted = outputs(*apply(nodes, tiny_unet, sd15_clip, pedal(nodes, files["sparse"], 1.0, vector(IN05=0)))[:2])
    assert_same(muted, outputs(*apply(nodes, tiny_unet, sd15_clip, pedal(nodes, files["sparse_out04"], 1.0))[:2]))
    shifted = outputs(*apply(nodes, tiny_unet, sd15_clip, pedal(nodes, files["sparse"], 1.0, vector(IN01=0)))[:2])
    assert_same(shifted, outputs(*apply(nodes, tiny_unet, sd15_clip, pedal(nodes, files["sparse"], 1.0))[:2]))


def test_blocks_outside_the_layout_keep_strength_one_and_the_report_says_so(nodes, files, tiny_unet, sd15_clip):
    ui = []
    model, _, _ = apply(nodes, tiny_unet, sd15_clip, pedal(nodes, files["with_in10"], 0.5, "MIDD"), ui)
    in10 = [patches[-1][0] for key, patches in model.patches.items() if ".input_blocks.10." in key]
    assert in10 == [0.5]
    assert f"{files['with_in10']}  0.5 blocks MIDD" in ui[0]
    assert "blocks_with_in10: IN10 not in the block weights' layout, kept at strength 1" in ui[0]
    # NONE reaches blocks no layout names too
    model, _, _ = apply(nodes, tiny_unet, sd15_clip, pedal(nodes, files["with_in10"], 0.5, "NONE"))
    assert not any(model.patches.values())


# --- interop and messages ----------------------------------------------------------------------------------
def test_other_packs_loaders_see_a_plain_entry_and_apply_the_whole_lora(nodes, files, tiny_unet, sd15_clip):
    stack = pedal(nodes, files["whole"], 0.7, "MIDD")
    assert [tuple(entry) for entry in stack] == [(files["whole"], 0.7, 0.7)]
    assert_same(outputs(*native_chain(tiny_unet, sd15_clip, stack)),         # unpacks three, as Comfyroll's does
                outputs(*apply(nodes, tiny_unet, sd15_clip, pedal(nodes, files["whole"], 0.7))[:2]))


def test_bad_block_weights_are_named_before_and_during_the_run(nodes, files, tiny_unet, sd15_clip):
    pedals, pedalboard = nodes
    message = pedals.LoraLabLoraStack.VALIDATE_INPUTS(1.0, 1.0, files["whole"], True, "", "1,0,0")
    assert "LoRA Pedal" in message and "block_weights" in message and "3 entries" in message and "Fix:" in message
    assert pedals.LoraLabLoraStack.VALIDATE_INPUTS(1.0, 1.0, files["whole"], True, "", "OUTD") is True
    with pytest.raises(Exception) as raised:
        pedal(nodes, files["whole"], 1.0, "MIDDLE")
    assert "block_weights" in str(raised.value) and "not a block-weight preset" in str(raised.value)
    # a family's preset on another family's model: known only when the model is, so at apply time
    with pytest.raises(Exception) as raised:
        apply(nodes, tiny_unet, sd15_clip, pedal(nodes, files["whole"], 1.0, "SDXL-OUTALL"))
    assert "Apply LoRA Stack" in str(raised.value) and "lora_stack" in str(raised.value)
    assert "SDXL preset, but the model is SD1.5/SD2" in str(raised.value)
    row = json.dumps([{"lora": files["whole"], "blocks": "1,0"}])
    board_message = pedalboard.LoraLabPedalboard.VALIDATE_INPUTS(pedals=row)
    assert 'Row 1 of pedals has "blocks"' in board_message and "2 entries" in board_message

"""Block weights without ComfyUI: a patched weight's block, the layouts by length and family, presets,
the stack entry that carries them, and the messages for what cannot be used."""
from __future__ import annotations

import copy
import pickle

import pytest

from lora_lab.trainer.lora import block_weights as bw
from lora_lab.trainer.lora.block_weights import BlockWeightsError, parse, position, unnamed_blocks
from lora_lab.trainer.lora.stack import (StackEntry, comparison_columns, entry_blocks, normalize_stack,
                                         strength_text, with_strengths)

MIDD = "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"


def unet(block: str, index: int, rest: str = "1.transformer_blocks.0.attn1.to_q.weight") -> str:
    return f"diffusion_model.{block}.{index}.{rest}"


# --- where a weight lies ----------------------------------------------------------------------------------
@pytest.mark.parametrize("key, label", [
    (unet("input_blocks", 4), "IN04"),
    (unet("input_blocks", 11, "0.in_layers.2.weight"), "IN11"),
    ("diffusion_model.middle_block.1.proj_in.weight", "M01"),
    (unet("output_blocks", 3), "OUT03"),
    ("diffusion_model.double_blocks.7.img_attn.qkv.weight", "D07"),
    (("diffusion_model.double_blocks.18.img_attn.qkv.weight", (0, 0, 64)), "D18"),    # a (key, offset) patch
    ("diffusion_model.single_blocks.0.linear1.weight", "S00"),
    ("diffusion_model.time_embed.0.weight", "BASE"),
    ("diffusion_model.out.2.weight", "BASE"),
    ("diffusion_model.img_in.weight", "BASE"),
    # a text encoder's numbered layers are not the diffusion model's blocks
    ("clip_l.transformer.text_model.encoder.layers.4.self_attn.q_proj.weight", "BASE"),
    ("t5xxl.transformer.encoder.block.3.layer.0.SelfAttention.q.weight", "BASE"),
])
def test_a_patched_weight_is_named_by_its_block(key, label):
    assert position(key) == label


def test_the_layouts_name_the_blocks_inspire_and_hako_mikan_list():
    layouts = {(layout.family, len(layout)): layout.labels for layout in bw.LAYOUTS}
    assert layouts[("SD", 17)] == ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M",
                                   "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
    assert layouts[("SDXL", 12)] == ("BASE", "IN04", "IN05", "IN07", "IN08", "M",
                                     "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")
    assert layouts[("SD", 27)][11:16] == ("IN11", "M00", "M01", "M02", "OUT00")
    assert layouts[("SD", 26)][:2] == ("BASE", "IN00") and layouts[("SD", 26)][13] == "M"
    assert layouts[("SDXL", 21)][8:13] == ("IN08", "M00", "M01", "M02", "OUT00")
    assert layouts[("FLUX", 58)][19:21] == ("D18", "S00") and layouts[("FLUX", 58)][-1] == "S37"
    assert sorted(layouts) == sorted({("SD", 17), ("SD", 26), ("SD", 27), ("SDXL", 12), ("SDXL", 20),
                                      ("SDXL", 21), ("FLUX", 20), ("FLUX", 58)})
    for labels in layouts.values():
        assert len(set(labels)) == len(labels)


def test_every_preset_fits_a_layout_of_its_family():
    for family, presets in bw.PRESETS.items():
        lengths = {len(layout) for layout in bw.LAYOUTS if layout.family == family}
        for name, vector in presets.items():
            assert len(vector) in lengths, (family, name)
            assert parse(name).for_family(family)      # resolves without a message


# --- numbers: named positions, never shifted ---------------------------------------------------------------
def test_each_entry_weighs_its_own_block_whichever_blocks_the_lora_has():
    ratios = parse("0.1, 0.2,0.3 0.4;0.5,0.6,0.7,0.8,0.9,1,1.1,1.2,1.3,1.4,1.5,1.6,1.7").for_family(bw.SD)
    # a LoRA that lacks IN01 and IN02: IN04 still takes the 4th entry (Inspire would hand it the 2nd)
    assert ratios.of_key(unet("input_blocks", 4)) == 0.4
    assert ratios.of_key(unet("input_blocks", 8)) == 0.7
    assert ratios.of_key("diffusion_model.middle_block.0.in_layers.2.weight") == 0.8    # M: the whole middle
    assert ratios.of_key("diffusion_model.middle_block.1.proj_in.weight") == 0.8
    assert ratios.of_key(unet("output_blocks", 11)) == 1.7
    assert ratios.of_key("clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight") == 0.1   # BASE
    assert ratios.of_key("diffusion_model.time_embed.0.weight") == 0.1
    # blocks the 17-entry layout does not name keep the LoRA's strength
    assert ratios.of_key(unet("input_blocks", 3, "0.op.weight")) == 1.0


def test_the_lycoris_layout_weighs_each_middle_part():
    values = [1.0] * 27
    values[13] = 0.25            # M01
    ratios = parse(",".join(map(str, values))).for_family(bw.SD)
    assert ratios.of_key("diffusion_model.middle_block.1.proj_in.weight") == 0.25
    assert ratios.of_key("diffusion_model.middle_block.0.in_layers.2.weight") == 1.0


def test_a_vector_s_length_is_read_in_the_model_s_family():
    twenty = ",".join(["1"] + ["0.5"] * 18 + ["0"])
    sdxl = parse(twenty).for_family(bw.SDXL)          # hako-mikan's SDXL LyCORIS: BASE IN00-IN08 M OUT00-OUT08
    assert sdxl.of_key(unet("input_blocks", 0, "0.weight")) == 0.5
    assert sdxl.of_key(unet("output_blocks", 8)) == 0
    flux = parse(twenty).for_family(bw.FLUX)          # Inspire's FLUX-DBL: the single blocks take the last entry
    assert flux.of_key("diffusion_model.double_blocks.0.img_mlp.0.weight") == 0.5
    assert flux.of_key("diffusion_model.double_blocks.18.img_mlp.0.weight") == 0
    assert flux.of_key("diffusion_model.single_blocks.30.linear1.weight") == 0
    assert parse("DBL-ALL").for_family(bw.FLUX).of_key("diffusion_model.single_blocks.3.linear2.weight") == 1


def test_blocks_the_layout_does_not_name_are_listed_for_the_report():
    ratios = parse(MIDD).for_family(bw.SD)
    keys = [unet("input_blocks", 1), unet("input_blocks", 3, "0.op.weight"), unet("output_blocks", 2, "1.conv.weight"),
            "diffusion_model.middle_block.2.in_layers.2.weight", unet("input_blocks", 11, "0.in_layers.2.weight")]
    assert unnamed_blocks(keys, ratios) == ["IN03", "IN11", "OUT02"]
    assert unnamed_blocks(keys, parse("ALL").for_family(bw.SD)) == []           # ALL names every block
    assert unnamed_blocks(keys, parse(",".join(["1"] * 26)).for_family(bw.SD)) == []


# --- presets -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["MIDD", "midd", "SD-MIDD", "sd-midd", " MIDD ", f"SD-MIDD:{MIDD}", MIDD])
def test_a_preset_is_its_vector_with_or_without_prefix_or_as_inspire_s_line(text):
    ratios = parse(text).for_family(bw.SD)
    expected = dict(zip(bw.LAYOUTS[0].labels, map(float, MIDD.split(","))))
    assert ratios.by_block == expected


def test_uniform_presets_reach_every_block_in_every_family():
    for family in (bw.SD, bw.SDXL, bw.FLUX):
        none = parse("NONE").for_family(family)
        half = parse("ALL0.5").for_family(family)
        for key in (unet("input_blocks", 3, "0.op.weight"), "diffusion_model.single_blocks.37.linear1.weight",
                    "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"):
            assert none.of_key(key) == 0 and half.of_key(key) == 0.5
    assert parse("SDXL-LyC-NONE").for_family(bw.SDXL).of_key(unet("output_blocks", 8)) == 0


def test_a_family_s_preset_on_another_family_names_both():
    with pytest.raises(BlockWeightsError) as raised:
        parse("MIDD").for_family(bw.FLUX)
    assert "SD1.5/SD2's" in raised.value.problem and "Flux" in raised.value.problem
    assert "DBL-ALL" in raised.value.fix
    with pytest.raises(BlockWeightsError, match="SDXL preset, but the model is SD1.5/SD2"):
        parse("SDXL-INALL").for_family(bw.SD)
    # the same name in two families is each family's own vector
    assert parse("INALL").for_family(bw.SDXL).by_block["IN08"] == 1
    assert parse("INALL").for_family(bw.SD).by_block["M"] == 0


# --- what is refused, and how ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, words", [
    ("1,0,0", ["3 entries", "12, 17, 20, 21, 26, 27, 58"]),
    ("1,0,0,0,1,R,1,1,1,1,1,1,0,0,0,0,0", ["'R'", "not a number"]),
    (",".join(["1"] * 16 + ["11"]), ["11 is outside -10..10"]),
    (",".join(["1"] * 16 + ["nan"]), ["'nan'", "not a number"]),
    ("MIDDLE", ["'MIDDLE' is not a block-weight preset", "MIDD"]),
    ("FLUX-MIDD", ["'FLUX-MIDD' is not a block-weight preset"]),
])
def test_a_vector_that_fits_no_layout_is_refused_with_the_layouts(text, words):
    with pytest.raises(BlockWeightsError) as raised:
        parse(text)
    message = str(raised.value)
    assert all(word in message for word in words), message
    assert raised.value.fix


def test_a_length_of_another_family_names_this_family_s_lengths():
    with pytest.raises(BlockWeightsError) as raised:
        parse(MIDD).for_family(bw.FLUX)
    assert "17 entries" in raised.value.problem and "20 or 58" in raised.value.problem


def test_empty_means_the_whole_lora_and_non_text_is_refused():
    assert parse("") is None and parse("   ") is None and parse(None) is None
    with pytest.raises(BlockWeightsError, match="not text"):
        parse(17)


# --- the stack entry that carries them ---------------------------------------------------------------------
def test_a_block_weighted_entry_is_a_plain_three_tuple_to_other_packs():
    entry = StackEntry("style.safetensors", 0.8, 1.0, "MIDD")
    name, strength_model, strength_clip = entry          # Comfyroll's and Efficiency's loaders unpack three
    assert (name, strength_model, strength_clip) == ("style.safetensors", 0.8, 1.0)
    assert len(entry) == 3 and entry == ("style.safetensors", 0.8, 1.0) and isinstance(entry, tuple)
    for copied in (copy.copy(entry), copy.deepcopy(entry), pickle.loads(pickle.dumps(entry))):
        assert copied == entry and entry_blocks(copied) == "MIDD"
    assert entry_blocks(("style.safetensors", 1, 1)) == "" and entry_blocks(["a", 1, 1]) == ""


def test_block_weights_survive_normalizing_sweeping_and_the_labels():
    stack = [StackEntry("a.safetensors", 1.0, 1.0, "MIDD"), ["b.safetensors", 0.5, 0]]
    entries = normalize_stack(stack)
    assert entry_blocks(entries[0]) == "MIDD" and type(entries[1]) is tuple
    assert entry_blocks(with_strengths(entries[0], 0.3, 0.3)) == "MIDD"
    assert strength_text(entries[0]) == "1 blocks MIDD" and strength_text(entries[1]) == "0.5/0"
    columns = comparison_columns(entries, sweep_index=0, sweep=[0.0, 0.5])
    swept = [column.entries[0] for column in columns if column.label.startswith("a @")]
    assert [(entry[1], entry_blocks(entry)) for entry in swept] == [(0.0, "MIDD"), (0.5, "MIDD")]
    assert "a 1 blocks MIDD" in [column.label for column in columns]

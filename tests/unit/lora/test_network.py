"""Network presets, per-part rank/alpha and their metadata; LoraSet over two models (plain torch)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lora_lab.trainer.lora.adapters import InjectedLora, LoraSet
from lora_lab.trainer.lora.network import ATTENTION_ONLY, KOHYA_DEFAULT, LOCON, Network
from lora_lab.trainer.training.kohya_metadata import kohya_metadata, network_metadata


def test_presets_pick_kohyas_layers():
    default, attention, locon = Network(preset=KOHYA_DEFAULT), Network(preset=ATTENTION_ONLY), Network(preset=LOCON)
    for shape in (default, attention, locon):
        assert shape.part_of("SpatialTransformer", "transformer_blocks.0.attn1.to_q", "Linear") == "linear"
        assert shape.part_of("SpatialTransformer", "transformer_blocks.0.attn2.to_out.0", "Linear") == "linear"
    assert default.part_of("SpatialTransformer", "transformer_blocks.0.ff.net.2", "Linear") == "linear"
    assert default.part_of("SpatialTransformer", "proj_in", "Conv2d", (1, 1)) == "linear"
    assert attention.part_of("SpatialTransformer", "transformer_blocks.0.ff.net.2", "Linear") is None
    assert attention.part_of("SpatialTransformer", "proj_in", "Linear") is None
    assert default.part_of("ResBlock", "in_layers.2", "Conv2d", (3, 3)) is None
    assert locon.part_of("ResBlock", "in_layers.2", "Conv2d", (3, 3)) == "conv"
    assert locon.part_of("ResBlock", "skip_connection", "Conv2d", (1, 1)) == "linear"
    assert locon.part_of("ResBlock", "emb_layers.1", "Linear") == "linear"
    assert locon.part_of("Downsample", "op", "Conv2d", (3, 3)) == "conv"



def test_presets_on_sd3_and_flux_blocks():
    """kohya's lora_flux / lora_sd3: every Linear of the DiT blocks; attention only = their qkv and output
    projections, with Flux's single blocks trained whole (linear1/linear2 hold the fused attention)."""
    default, attention, locon = Network(preset=KOHYA_DEFAULT), Network(preset=ATTENTION_ONLY), Network(preset=LOCON)
    double = ["img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
              "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2"]
    single = ["linear1", "linear2", "modulation.lin"]
    joint = [f"{side}_block.{m}" for side in ("context", "x")
             for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")] + ["x_block.attn2.qkv"]
    layers = ([("DoubleStreamBlock", p) for p in double] + [("SingleStreamBlock", p) for p in single]
              + [("JointBlock", p) for p in joint])
    for block, path in layers:
        assert default.part_of(block, path, "Linear") == "linear", (block, path)
        assert locon.part_of(block, path, "Linear") == "linear", (block, path)    # no convs: same as default
    picked = {(block, path) for block, path in layers if attention.part_of(block, path, "Linear")}
    assert picked == {("DoubleStreamBlock", f"{s}_attn.{p}") for s in ("img", "txt") for p in ("qkv", "proj")} | {
        ("SingleStreamBlock", "linear1"), ("SingleStreamBlock", "linear2")} | {
        ("JointBlock", f"{side}_block.attn.{p}") for side in ("context", "x") for p in ("qkv", "proj")} | {
        ("JointBlock", "x_block.attn2.qkv")}
    for shape in (default, attention, locon):
        assert shape.part_of("DoubleStreamBlock", "img_attn.norm.query_norm", "RMSNorm") is None
        assert shape.part_of("JointBlock", "x_block.attn.qkv", "Conv2d", (1, 1)) is None

def test_conv_rank_alpha_default_to_the_main_ones_and_go_into_metadata():
    locon = Network(rank=8, alpha=4.0, preset=LOCON, dropout=0.1, conv_rank=2, conv_alpha=1.0)
    assert locon.rank_alpha("conv") == (2, 1.0) and locon.rank_alpha("linear") == (8, 4.0)
    assert Network(rank=8, alpha=4.0, preset=LOCON).rank_alpha("conv") == (8, 4.0)
    meta = network_metadata(locon)
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert meta["ss_network_dropout"] == "0.1"
    assert "ss_network_args" not in network_metadata(Network(rank=8, alpha=4.0))
    layers = {"a": ("lora_a", "linear"), "b": ("lora_b", "conv")}
    targets, ranks, alphas = locon.adapter_arguments(layers)
    assert targets == {"a": "lora_a", "b": "lora_b"} and ranks == {"b": 2} and alphas == {"b": 1.0}
    for bad in (dict(preset="everything"), dict(dropout=1.0), dict(conv_rank=-1)):
        with pytest.raises(ValueError):
            Network(**bad)


def test_v_parameterization_metadata():
    common = dict(output_name="x", network_dim=4, network_alpha=4, resolution=(512, 512), num_train_images=1,
                  tag_frequency={}, steps=1, learning_rate=1e-4, started_at=0.0, finished_at=1.0)
    v = kohya_metadata(base_model_version="sd_v2_v", v_parameterization=True, **common)
    assert v["ss_v2"] == "True" and v["ss_v_parameterization"] == "True"
    assert kohya_metadata(base_model_version="sd_v1", **common)["ss_v_parameterization"] == "False"


def test_lora_set_exports_loads_and_removes_both_parts_checking_everything_first():
    unet, text = nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(3, 3))
    both = LoraSet({"unet": InjectedLora(unet, {"0": "lora_unet_0"}, 2, 2.0, seed=0),
                    "text_encoder": InjectedLora(text, {"0": "lora_te_0"}, 2, 2.0, seed=0)})
    assert len(both.parameters()) == 4
    state = {k: v + 1 if v.dim() else v for k, v in both.kohya_state_dict().items()}
    assert {k.split(".")[0] for k in state} == {"lora_unet_0", "lora_te_0"}
    before = both.kohya_state_dict()
    broken = dict(state)
    broken["lora_te_0.lora_up.weight"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match="shape mismatch"):
        both.load_kohya_state_dict(broken)
    assert all(torch.equal(before[k], v) for k, v in both.kohya_state_dict().items()), "half-loaded"
    with pytest.raises(ValueError, match="unexpected keys"):
        both.load_kohya_state_dict({**state, "lora_te_9.alpha": torch.tensor(1.0)})
    both.load_kohya_state_dict(state)
    assert all(torch.equal(state[k], v) for k, v in both.kohya_state_dict().items())
    both.remove()
    assert isinstance(unet[0], nn.Linear) and type(text[0]) is nn.Linear

"""Network presets (attention only / kohya default / LoCon), per-part rank and alpha, dropout, and resuming
with another network shape, in a real in-process ComfyUI with a small random SD1.5-architecture UNet.
(keep-last-K saves are tested in test_train_lora.py.)"""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open

from training import assert_loader_matches_adapter, options, run_train, weights_snapshot, assert_base_untouched


def modules_and_meta(path):
    with safe_open(str(path), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        meta = f.metadata()
    modules = {key.split(".", 1)[0] for key in tensors}
    return tensors, modules, meta


def comfy_output(patcher, x, sigma, cond):
    import comfy.model_management
    comfy.model_management.load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=cond).clone()


def test_attention_only_trains_exactly_the_attention_projections(fresh_unet, sd15_clip, small_vae, make_dataset,
                                                                 loras_dir):
    result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "attn_only", steps=2,
                       options=options(network_preset="attention only"))
    _, modules, meta = modules_and_meta(loras_dir / result["result"][2])
    _, default_modules, _ = modules_and_meta(loras_dir / run_train(
        fresh_unet, sd15_clip, small_vae, make_dataset(2), "default_shape", steps=1)["result"][2])
    assert modules and all(m.rsplit("_", 2)[-2:] in (["to", "q"], ["to", "k"], ["to", "v"], ["out", "0"])
                           for m in modules), sorted(modules)[:8]
    assert all("_attn1_" in m or "_attn2_" in m for m in modules)
    # kohya default = attention + feed-forward + proj_in/out; attention only is a strict subset of it
    assert modules < default_modules
    assert any(m.endswith("proj_in") for m in default_modules) and any("_ff_" in m for m in default_modules)
    assert meta["loralab_network_preset"] == "attention only" and "ss_network_args" not in meta


def test_locon_trains_the_convs_at_their_own_rank_and_loads_in_comfyui_with_every_key(
        fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir, caplog):
    import comfy.lora
    import nodes as comfy_nodes
    from lora_lab.nodes import comfy_bridge
    from lora_lab.trainer.lora.adapters import InjectedLora
    from lora_lab.trainer.lora.network import Network

    before = weights_snapshot(fresh_unet)
    flags = [p.requires_grad for p in fresh_unet.model.parameters()]
    shape = dict(network_preset="LoCon (+conv)", conv_rank=2, conv_alpha=1.0, dropout=0.1, save_precision="fp32")
    result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "locon", steps=3,
                       options=options(**shape), learning_rate=1e-2, rank=4, alpha=4.0)
    assert_base_untouched(fresh_unet, before, flags)
    lora_name = result["result"][2]
    tensors, modules, meta = modules_and_meta(loras_dir / lora_name)

    # kohya's LoCon names (diffusers-style) for ResBlock convs, the skip conv, time embedding, down/upsamplers
    for expected in ("lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_resnets_0_conv2",
                     "lora_unet_down_blocks_1_resnets_0_conv_shortcut", "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
                     "lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_up_blocks_0_upsamplers_0_conv",
                     "lora_unet_mid_block_resnets_0_conv1", "lora_unet_down_blocks_0_attentions_0_proj_in"):
        assert expected in modules, expected
    conv_down = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    conv_up = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
    assert conv_down.dim() == 4 and conv_down.shape[0] == 2 and conv_down.shape[2:] == (3, 3)
    assert conv_up.shape[1:] == (2, 1, 1)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 1.0
    # 1x1 convs and Linears keep the main rank/alpha, as in kohya
    assert tensors["lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight"].shape[:1] == (4,)
    assert tensors["lora_unet_down_blocks_1_resnets_0_conv_shortcut.alpha"].item() == 4.0
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 4
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert meta["ss_network_dropout"] == "0.1" and meta["ss_network_dim"] == "4"

    key_map = comfy.lora.model_lora_keys_unet(fresh_unet.model, {})
    assert all(m in key_map for m in modules), sorted(m for m in modules if m not in key_map)
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        loaded, _ = comfy_nodes.LoraLoader().load_lora(fresh_unet, sd15_clip, lora_name, 1.0, 1.0)
    assert "not loaded" not in caplog.text.lower()

    g = torch.Generator().manual_seed(0)
    x, sigma, cond = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([2.0]), torch.randn(1, 77, 768, generator=g)
    via_loader = comfy_output(loaded, x, sigma, cond)
    plain = comfy_output(fresh_unet, x, sigma, cond)
    locon = Network(rank=4, alpha=4.0, preset="LoCon (+conv)", conv_rank=2, conv_alpha=1.0)
    targets, ranks, alphas = locon.adapter_arguments(comfy_bridge.unet_lora_layers(fresh_unet, locon))
    with torch.no_grad(), comfy_bridge.trainable_unet(fresh_unet, checkpointing=False) as network:
        with InjectedLora(network, targets, rank=4, alpha=4.0, ranks=ranks, alphas=alphas) as lora:
            lora.load_kohya_state_dict(tensors)
            via_adapter = fresh_unet.model.apply_model(x, sigma, c_crossattn=cond).clone()
    assert_loader_matches_adapter(via_loader, via_adapter, plain)


def test_resuming_with_another_network_shape_is_refused_clearly(fresh_unet, sd15_clip, small_vae, make_dataset):
    first = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "shape_a", steps=1)
    with pytest.raises(ValueError) as error:
        run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "shape_b", steps=2,
                  options=options(resume_from=first["result"][2], network_preset="LoCon (+conv)"))
    # The fix always lists network_preset, so check the problem: it must say what does not fit.
    problem = str(error.value).split(" Fix: ", 1)[0]
    assert problem.startswith("[LoRA Lab · Train LoRA › options]"), problem
    assert "does not fit this run's network" in problem and "missing keys" in problem, problem


@pytest.mark.parametrize("node", ["LoraLabNetworkOptions", "LoraLabTrainingOptions"])
def test_bad_network_settings_are_refused_by_the_options_node(pack, node):
    from lora_lab.nodes import option_nodes
    from lora_lab.nodes.training_options import GROUPS, TrainingOptions
    make = option_nodes.NODE_CLASS_MAPPINGS[node]
    names = [name for kind in make.INPUT_TYPES().values() for name in kind if name != "options"]
    defaults = {name: getattr(TrainingOptions(), name) for name in names}
    with pytest.raises(ValueError, match="network preset") as refused:
        make().build(**dict(defaults, network_preset="everything"))
    assert make.TITLE in str(refused.value)
    (built,) = make().build(**dict(defaults, network_preset="LoCon (+conv)", conv_rank=8))
    assert built.network(16, 8.0).rank_alpha("conv") == (8, 8.0)
    assert built.network(16, 8.0).rank_alpha("linear") == (16, 8.0)
    assert built.groups_set == ({"network"} if node == "LoraLabNetworkOptions" else set(GROUPS))

"""Network types (Network options › network_type): DoRA, LoHa and LoKr train in a real in-process ComfyUI on a
small random SD1.5-architecture UNet, write LyCORIS' keys, and load with ComfyUI's own LoraLoader with every
key used and the same output as the adapters that trained (plain LoRA: test_network_shapes.py)."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from training import assert_base_untouched, assert_loader_matches_adapter, options, run_train, weights_snapshot

# LoCon puts the types on Linears, 1x1 and 3x3 convolutions alike.
SHAPE = dict(network_preset="LoCon (+conv)", conv_rank=2, conv_alpha=1.0, save_precision="fp32",
             train_text_encoder=True)
# LoKr at rank 2 factors its second matrix in two (lokr_w2_a/b, scaled alpha / rank) when it is square-ish
# (lokr_factor -1); with a factor of 8 most second matrices are small enough to stay whole (scale 1): both of
# ComfyUI's LoKr paths are used.
CASES = {
    "DoRA": ("DoRA", -1, {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"}),
    "LoHa": ("LoHa", -1, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
    "LoKr": ("LoKr", -1, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    "LoKr whole": ("LoKr", 8, {"lokr_w1", "lokr_w2", "alpha"}),
}


def comfy_output(patcher, x, sigma, cond):
    """The model's output as a sampler gets it: loaded (patched) and run under inference mode, as ComfyUI runs
    nodes (ComfyUI 2025's DoRA patch needs it: the base weights require grad here, as a training test left them)."""
    import comfy.model_management
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patcher])
        return patcher.model.apply_model(x, sigma, c_crossattn=cond).clone()


@pytest.mark.parametrize("case", list(CASES))
def test_each_network_type_trains_and_loads_in_comfyui_with_every_key_and_the_same_output(
        case, fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir, caplog):
    import comfy.lora
    import nodes as comfy_nodes
    from lora_lab.nodes import comfy_bridge
    from lora_lab.trainer.lora.adapters import InjectedLora
    from lora_lab.trainer.lora.files import load_lora_file
    from lora_lab.trainer.lora.network import Network

    network_type, lokr_factor, suffixes = CASES[case]
    before = weights_snapshot(fresh_unet)
    flags = [p.requires_grad for p in fresh_unet.model.parameters()]
    if network_type == "DoRA" and not comfy_bridge.loader_applies_dora():
        # ComfyUI 2024-03 skips dora_scale: refused before anything is trained, the base untouched.
        with pytest.raises(ValueError) as refused:
            run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "dora_old", steps=2,
                      options=options(network_type="DoRA", **SHAPE))
        message = str(refused.value)
        assert message.startswith("[LoRA Lab · Train LoRA › options]") and "dora_scale" in message, message
        assert "Fix: update ComfyUI, or choose network_type LoRA, LoHa or LoKr" in message, message
        assert_base_untouched(fresh_unet, before, flags)
        assert not list(loras_dir.glob("dora_old*"))
        return

    result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), case.replace(" ", "_"), steps=3,
                       options=options(network_type=network_type, lokr_factor=lokr_factor, **SHAPE),
                       learning_rate=1e-2, rank=2, alpha=4.0)
    assert_base_untouched(fresh_unet, before, flags)
    lora_name = result["result"][2]
    tensors, meta = load_lora_file(loras_dir / lora_name)
    found = {key.split(".", 1)[1] for key in tensors}
    assert suffixes <= found <= suffixes | {"lokr_w2", "lokr_w2_a", "lokr_w2_b"}, found
    assert any(key.startswith("lora_te_") for key in tensors) and any(key.startswith("lora_unet_") for key in tensors)
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["loralab_network_type"] == network_type
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == {"DoRA": "lora", "LoHa": "loha", "LoKr": "lokr"}[network_type]
    assert args["conv_dim"] == "2"
    if network_type == "DoRA":
        assert args["dora_wd"] == "True" and args["wd_on_out"] == "False"
        # The magnitude per input channel: (1, in) for a Linear, (1, in, 1, 1) for a conv, as ComfyUI reads it.
        for key, scale in tensors.items():
            if key.endswith(".dora_scale"):
                down = tensors[key.replace(".dora_scale", ".lora_down.weight")]
                assert scale.shape == (1, down.shape[1], *[1] * (down.dim() - 2)), key
        assert {scale.dim() for key, scale in tensors.items() if key.endswith(".dora_scale")} == {2, 4}

    # Every key is one ComfyUI's LoraLoader uses, for the UNet and the text encoder alike.
    key_map = comfy.lora.model_lora_keys_clip(sd15_clip.cond_stage_model,
                                              comfy.lora.model_lora_keys_unet(fresh_unet.model, {}))
    patches = comfy_bridge.quiet_load_lora(tensors, key_map)
    assert len(patches) == len({key.split(".", 1)[0] for key in tensors})
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        loaded, loaded_clip = comfy_nodes.LoraLoader().load_lora(fresh_unet, sd15_clip, lora_name, 1.0, 1.0)
    assert "not loaded" not in caplog.text.lower() and "error" not in caplog.text.lower(), caplog.text

    # The loader's merged weights compute what the adapters computed while training.
    g = torch.Generator().manual_seed(0)
    x, sigma, cond = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([2.0]), torch.randn(1, 77, 768, generator=g)
    via_loader = comfy_output(loaded, x, sigma, cond)
    plain = comfy_output(fresh_unet, x, sigma, cond)
    network = Network(rank=2, alpha=4.0, preset="LoCon (+conv)", conv_rank=2, conv_alpha=1.0,
                      network_type=network_type, lokr_factor=lokr_factor)
    targets, ranks, alphas = network.adapter_arguments(comfy_bridge.unet_lora_layers(fresh_unet, network))
    unet_tensors = {key: value for key, value in tensors.items() if key.startswith("lora_unet_")}
    with torch.no_grad(), comfy_bridge.trainable_unet(fresh_unet, checkpointing=False) as unet:
        with InjectedLora(unet, targets, rank=2, alpha=4.0, ranks=ranks, alphas=alphas,
                          network_type=network_type, lokr_factor=lokr_factor) as lora:
            lora.load_kohya_state_dict(unet_tensors)
            via_adapter = fresh_unet.model.apply_model(x, sigma, c_crossattn=cond).clone()
    assert_loader_matches_adapter(via_loader, via_adapter, plain)
    if network_type == "DoRA":
        # The negative control: without its magnitudes the same file is a plain LoRA, and samples otherwise.
        without = {key: value for key, value in tensors.items() if not key.endswith(".dora_scale")}
        with torch.inference_mode():
            plain_lora, _ = comfy_bridge.apply_lora(fresh_unet, sd15_clip, without)
        differs = (comfy_output(plain_lora, x, sigma, cond) - via_adapter).abs().max().item()
        assert differs > 100 * (via_loader - via_adapter).abs().max().item(), differs


def test_resuming_with_another_network_type_is_refused_clearly(fresh_unet, sd15_clip, small_vae, make_dataset):
    first = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "type_a", steps=1,
                      options=options(network_type="LoHa"))
    with pytest.raises(ValueError) as error:
        run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "type_b", steps=2,
                  options=options(resume_from=first["result"][2], network_type="LoKr"))
    problem, fix = str(error.value).split(" Fix: ", 1)
    assert "does not fit this run's network" in problem and "missing keys" in problem, problem
    assert "network_type" in fix


@pytest.mark.parametrize("values, words", [
    (dict(network_type="LoHa", dropout=0.1), "has no input dropout"),
    (dict(network_type="LoKr", lokr_factor=0), "lokr_factor must be -1"),
    (dict(network_type="BOFT"), "network type 'BOFT'"),
])
def test_bad_network_type_settings_are_refused_by_the_options_node(pack, values, words):
    from lora_lab.nodes import option_nodes
    from lora_lab.nodes.training_options import GROUPS, TrainingOptions
    make = option_nodes.NODE_CLASS_MAPPINGS["LoraLabNetworkOptions"]
    defaults = {name: getattr(TrainingOptions(), name) for name in GROUPS["network"]}
    with pytest.raises(ValueError, match=words) as refused:
        make().build(**dict(defaults, **values))
    assert make.TITLE in str(refused.value)


def test_a_pedal_says_when_this_comfyui_cannot_apply_a_dora_s_magnitudes(tiny_unet, sd15_clip, loras_dir, pack):
    """ComfyUI 2024-03 skips dora_scale (its own Load LoRA too): the pedal's report says the picture is the
    plain LoRA part; a ComfyUI that applies it says nothing of the kind."""
    from lora_files import kohya_tensors, unet_shapes, write_lora
    from lora_lab.nodes import comfy_bridge, pedals
    tensors = kohya_tensors(unet_shapes(tiny_unet, every=7), seed=71)
    for key in [key for key in tensors if key.endswith(".lora_down.weight")]:
        down = tensors[key]
        magnitude = torch.rand(1, down.shape[1], *[1] * (down.dim() - 2)) + 0.5     # per input channel
        tensors[key.replace(".lora_down.weight", ".dora_scale")] = magnitude
    write_lora(loras_dir, "a_dora.safetensors", tensors)
    pedals.LORA_FILES.clear()
    with torch.inference_mode():
        report = pedals.LoraLabApplyLoraStack().apply(tiny_unet, [("a_dora.safetensors", 1.0, 1.0)],
                                                      sd15_clip)["ui"]["text"][0]
    said = "a DoRA, whose magnitudes (dora_scale) this ComfyUI cannot apply" in report
    assert said == (not comfy_bridge.loader_applies_dora()), report
    assert report.startswith("a_dora.safetensors  1")

"""Train LoRA on an fp8 base (Memory & Speed's fp8_base) inside a real ComfyUI, on ComfyUI's own SD1.5, SDXL and
Flux classes at small sizes: the loss falls, the file has the same keys and loads in ComfyUI with none left over,
the LoRA is close to the one trained on a bf16 base from the same seed, and the shared model is bitwise as before.

Flux needs ComfyUI 2025-10 (2024-03 has none): that case skips there.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

import random_models
from training import (assert_base_untouched, encoded_training_set, options, run_train, saved_tensors, training_loss,
                      weights_snapshot)

pytestmark = pytest.mark.usefixtures("leave_models_unpatched", "one_thread")




@pytest.fixture(scope="module")
def models(comfy, comfyui_root, request):
    """(unet, clip, vae) per family, built once."""
    built = {}

    def get(family):
        if family not in built:
            if family == "sd15":
                built[family] = (random_models.sd15_model_patcher(model_channels=32, seed=31),
                                 request.getfixturevalue("sd15_clip"), request.getfixturevalue("small_vae"))
            elif family == "sdxl":
                built[family] = (random_models.sdxl_model_patcher(model_channels=32, seed=32),
                                 random_models.sdxl_clip(seed=33), request.getfixturevalue("small_vae"))
            else:
                import comfy.supported_models
                if not hasattr(comfy.supported_models, "Flux"):
                    pytest.skip("this ComfyUI has no Flux (2024-03)")
                import random_flow_models
                built[family] = (random_flow_models.flux_model_patcher(
                    seed=34, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, context_dim=32,
                    pooled_dim=768), random_flow_models.flux_clip(seed=35), random_flow_models.small_flow_vae(seed=36))
        return built[family]
    return get


def test_fp8_base_follows_the_memory_nodes_first_inputs_off_by_default(pack):
    from lora_lab.nodes.option_nodes import LoraLabMemoryOptions
    required = LoraLabMemoryOptions.INPUT_TYPES()["required"]
    # Saved workflows keep their widget values: inputs added later come after the first release's.
    assert list(required)[:4] == ["precision", "gradient_checkpointing", "latent_disk_cache", "fp8_base"]
    assert required["fp8_base"][1]["default"] is False and "fp8" in required["fp8_base"][1]["tooltip"]


def lora_updates(tensors: dict) -> dict[str, torch.Tensor]:
    """Each module's weight change, (alpha / rank) * up @ down, flattened to a matrix: what the LoRA does."""
    updates = {}
    for key in tensors:
        if key.endswith(".lora_up.weight"):
            name = key[: -len(".lora_up.weight")]
            up, down = tensors[key].float().flatten(1), tensors[f"{name}.lora_down.weight"].float().flatten(1)
            updates[name] = (tensors[f"{name}.alpha"].float() / down.shape[0]) * (up @ down)
    return updates


def distance(a: dict, b: dict) -> float:
    """How far LoRA a's updates are from LoRA b's, relative to b's size (Frobenius norms over all modules)."""
    return math.sqrt(sum((a[k] - b[k]).pow(2).sum().item() for k in b)) / math.sqrt(sum(v.pow(2).sum().item()
                                                                                       for v in b.values()))


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_an_fp8_base_trains_the_lora_a_bf16_base_does_and_gives_the_model_back(family, models, make_dataset,
                                                                                loras_dir, caplog):
    unet, clip, vae = models(family)
    dataset = make_dataset(2)
    before = weights_snapshot(unet)
    flags = [p.requires_grad for p in unet.model.parameters()]
    runs = {}
    for name, seed, precision, fp8 in (("bf16", 0, "bf16", False), ("fp8", 0, "bf16", True),
                                       ("fp32", 0, "fp32", False), ("bf16_seed1", 1, "bf16", False)):
        result = run_train(unet, clip, vae, dataset, f"fp8_{family}_{name}", steps=6, learning_rate=1e-3, seed=seed,
                           options=options(precision=precision, fp8_base=fp8, save_precision="fp32"))
        assert_base_untouched(unet, before, flags)             # bitwise, flags and forwards too, after each run
        assert all(math.isfinite(v) for v in result["ui"]["loss"])
        runs[name] = (result, saved_tensors(loras_dir, result["result"][2]))
    report = runs["fp8"][0]["ui"]["text"][0]
    assert "fp8 base: " in report and "Linear weights in fp8" in report and "fp8 base" not in runs["bf16"][0]["ui"]["text"][0]
    assert runs["fp8"][1].keys() == runs["bf16"][1].keys()      # the same file format
    from lora_lab.trainer.lora.files import load_lora_file
    assert load_lora_file(loras_dir / runs["fp8"][0]["result"][2])[1]["ss_fp8_base"] == "True"
    assert load_lora_file(loras_dir / runs["bf16"][0]["result"][2])[1]["ss_fp8_base"] == "False"

    # Close to the bf16 base's LoRA, measured against two yardsticks from the same test. fp8 rounds each weight
    # by up to 2^-4 of itself (bf16: 2^-9), and AdamW's first steps move each LoRA weight by about the learning
    # rate whatever its gradient's size, so gradient components near zero that flip sign under either rounding
    # make most of the distance; how much depends on the architecture. Measured (6 steps, lr 1e-3):
    #                 fp8 vs bf16   fp32 vs bf16   another seed vs bf16
    #     SD1.5          0.23          0.14            1.42
    #     SDXL           0.32          0.12            1.41
    #     Flux           0.15          0.03            1.38
    # The fp8 LoRA must lie far inside the distance to another seed's LoRA (the negative control, which a
    # broken fp8 path -- a lost scale, a layer computing garbage -- reaches): below 0.35 of it, where 0.11-0.23
    # was measured; the fp32-vs-bf16 distance is printed beside it for reading.
    reference, fp8, fp32, other = (lora_updates(runs[name][1]) for name in ("bf16", "fp8", "fp32", "bf16_seed1"))
    near, precision_gap, control = distance(fp8, reference), distance(fp32, reference), distance(other, reference)
    assert control > 0.5, f"the negative control is too close to tell anything ({control:.3f})"
    assert near < 0.35 * control, \
        f"fp8 base LoRA {near:.3f} from the bf16 one; fp32 base {precision_gap:.3f}; another seed {control:.3f}"

    # ComfyUI's own LoraLoader takes every key of the fp8-trained file.
    import nodes as comfy_nodes
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        comfy_nodes.LoraLoader().load_lora(unet, clip, runs["fp8"][0]["result"][2], 1.0, 1.0)
    assert "not loaded" not in caplog.text.lower(), caplog.text


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_the_loss_falls_on_an_fp8_base(family, models, make_dataset):
    unet, clip, vae = models(family)
    dataset = make_dataset(4)
    data = encoded_training_set(unet, clip, vae, dataset)
    base_loss = training_loss(unet, data)
    # As test_sdxl.py and test_flow_models.py train them to learn: this narrow SDXL needs its convolutions too
    # (LoCon) for a clear drop in a few dozen steps; convolutions stay in the training precision, Linears in fp8.
    preset = "LoCon (+conv)" if family == "sdxl" else "kohya default"
    result = run_train(unet, clip, vae, dataset, f"fp8_{family}_learns", steps=40, learning_rate=2e-3 if family == "sdxl"
                       else 5e-3, rank=8, alpha=8.0, options=options(precision="fp32", fp8_base=True,
                                                                    network_preset=preset))
    trained_loss = training_loss(result["result"][0], data)   # fixed noise and timesteps: any drop is learning
    # Their bf16/fp32 runs drop to below 0.8 (SDXL) and 0.85 (Flux) of the base loss.
    assert trained_loss < 0.85 * base_loss, f"no learning on an fp8 base: {base_loss:.4f} -> {trained_loss:.4f}"


def test_a_model_loaded_in_fp8_trains_without_an_upcast_copy_and_comes_back_as_loaded(models, make_dataset, loras_dir,
                                                                                     caplog):
    """Load Diffusion Model with weight_dtype fp8_e4m3fn: the Linear weights arrive in fp8 with ComfyUI's
    manual-cast ops. fp8_base off or on, they compute through the fp8 layer (autograd keeps the fp8 weight, not an
    upcast copy: tests/unit/training/test_fp8_base.py), nothing is converted or parked, and the model comes back
    exactly as loaded."""
    models("flux")                                           # skips where there is no Flux
    import random_flow_models
    unet = random_flow_models.flux_model_patcher(seed=34, weight_dtype=torch.float8_e4m3fn, hidden_size=64,
                                                 num_heads=2, depth=2, depth_single_blocks=2, context_dim=32,
                                                 pooled_dim=768)
    _, clip, vae = models("flux")
    linears = [m for m in unet.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and {m.weight.dtype for m in linears} == {torch.float8_e4m3fn}
    before = weights_snapshot(unet)
    flags = [p.requires_grad for p in unet.model.parameters()]
    for fp8_base in (False, True):
        result = run_train(unet, clip, vae, make_dataset(2), f"fp8_loaded_{fp8_base}", steps=3, learning_rate=1e-2,
                           options=options(precision="fp32", fp8_base=fp8_base, save_precision="fp32"))
        assert_base_untouched(unet, before, flags)
        assert all(math.isfinite(v) for v in result["ui"]["loss"])
        report = result["ui"]["text"][0]
        assert f"fp8 base: {len(linears)} Linear weights in fp8" in report and "less" not in report, report
    import nodes as comfy_nodes
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        comfy_nodes.LoraLoader().load_lora(unet, clip, result["result"][2], 1.0, 1.0)
    assert "not loaded" not in caplog.text.lower(), caplog.text

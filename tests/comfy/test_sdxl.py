"""SDXL: a small SDXL-shaped UNet (ComfyUI's own SDXL class: label embedding of pooled text + sizes)
and ComfyUI's SDXL text encoder (real CLIP-L beside a narrow OpenCLIP-bigG-style tower), random weights.

What must hold: the model's ``y`` input is the pooled text with kohya's size conditioning (original
size, crop, target size, each as a 256-wide timestep embedding written out here), the trained file
carries ``lora_unet_`` / ``lora_te1_`` / ``lora_te2_`` keys that ComfyUI's LoraLoader loads with none
left over, each text encoder learns at its own rate, and the shared models come back unchanged.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

import random_models

from training import (
    SIZE, assert_base_untouched, assert_loader_matches_adapter, cancel_at_step, encoded_training_set, options,
    pattern_pixels, run_train, training_loss, weights_snapshot)

# Module-scoped models: whatever a test loads with a LoRA patched in is unpatched before the next one.
pytestmark = pytest.mark.usefixtures("leave_models_unpatched")
TE_MODULES = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


@pytest.fixture(scope="module")
def sdxl_unet(comfy):
    return random_models.sdxl_model_patcher(model_channels=32, seed=11)


@pytest.fixture(scope="module")
def sdxl_clip(comfy):
    return random_models.sdxl_clip(seed=12)


def size_embedding(value: float, dim: int = 256) -> torch.Tensor:
    """The sinusoidal embedding SDXL's label input uses for each size number (cos half, then sin half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = value * freqs
    return torch.cat([torch.cos(args), torch.sin(args)])


def test_the_model_is_sdxl_and_y_is_pooled_text_plus_kohyas_size_conditioning(sdxl_unet, sdxl_clip, small_vae,
                                                                                make_dataset):
    from lora_lab.nodes import comfy_bridge
    from lora_lab.trainer.data.dataset import dataset_from_pixels
    assert comfy_bridge.model_family(sdxl_unet) == "sdxl_base_v1-0"
    assert comfy_bridge.unsupported_family(sdxl_unet) is None
    assert comfy_bridge.default_resolution(sdxl_unet) == 1024

    # A portrait 50x90 picture at resolution 64: it lands in a bucket it must be cropped into.
    with torch.inference_mode():
        dataset = dataset_from_pixels(pattern_pixels(1, height=90, width=50), ["sks, tall picture"])
    data = encoded_training_set(sdxl_unet, sdxl_clip, small_vae, dataset)
    example = data.examples[0]
    bucket_w, bucket_h = example.bucket
    scale = max(bucket_w / 50, bucket_h / 90)
    crop = (round((50 * scale - bucket_w) / 2), round((90 * scale - bucket_h) / 2))
    assert example.size.original == (50, 90) and example.size.target == (bucket_w, bucket_h)
    assert example.size.crop == crop and crop != (0, 0), "the test needs a picture that is cropped"

    latents, texts, sizes = data.collate([0], torch.device("cpu"))
    text = texts[0]
    assert text.cross_attn.shape == (1, 77, 768 + 256) and text.pooled.shape == (1, 256)
    with torch.no_grad():
        cond = comfy_bridge.ComfyDenoiser(sdxl_unet).conditioning(texts, sizes, torch.device("cpu"))
    assert set(cond) == {"c_crossattn", "y"}
    assert torch.equal(cond["c_crossattn"], text.cross_attn)
    # kohya / SGM order: original (h, w), crop (top, left), target (h, w)
    numbers = [90, 50, crop[1], crop[0], bucket_h, bucket_w]
    expected = torch.cat([text.pooled[0]] + [size_embedding(n) for n in numbers])
    assert cond["y"].shape == (1, 256 + 6 * 256)
    assert torch.allclose(cond["y"][0], expected, atol=1e-5), (cond["y"][0] - expected).abs().max()


def test_sdxl_lora_learns_and_previews_render(sdxl_unet, sdxl_clip, small_vae, make_dataset, loras_dir):
    dataset = make_dataset(4)
    data = encoded_training_set(sdxl_unet, sdxl_clip, small_vae, dataset)
    unet_before = weights_snapshot(sdxl_unet)
    unet_flags = [p.requires_grad for p in sdxl_unet.model.parameters()]
    base_loss = training_loss(sdxl_unet, data)

    # LoCon: this narrow SDXL has attention only at 4x4 and 2x2 latents for 64-pixel pictures, too little
    # for a clear drop in 40 steps (measured: 1.09 -> 1.08 with attention layers, -> 0.63 with convs too).
    result = run_train(sdxl_unet, sdxl_clip, small_vae, dataset, "sdxl_learns", steps=40, learning_rate=2e-3,
                       rank=8, alpha=8.0, options=options(save_precision="fp32", network_preset="LoCon (+conv)",
                                                          preview_every_n_steps=20, preview_steps=2))
    assert_base_untouched(sdxl_unet, unet_before, unet_flags)
    model_out, _, lora_name, _, previews, _ = result["result"]
    trained_loss = training_loss(model_out, data)      # through ComfyUI's own LoRA patching
    assert trained_loss < 0.8 * base_loss, f"no learning: {base_loss:.4f} -> {trained_loss:.4f}"
    assert previews.shape == (4, SIZE, SIZE, 3), "two prompts at steps 20 and 40, with SDXL's conditioning"
    assert "previews stopped" not in result["ui"]["text"][0]
    with safe_open(str(loras_dir / lora_name), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_train_unet_only"] == "True"


def test_sdxl_te1_te2_keys_own_rates_and_comfyuis_loader(sdxl_unet, sdxl_clip, small_vae, make_dataset, loras_dir,
                                                         caplog):
    import comfy.lora
    import comfy.model_management
    import nodes as comfy_nodes
    from lora_lab.nodes import comfy_bridge
    from lora_lab.trainer.lora.adapters import InjectedLora
    dataset = make_dataset(3)
    unet_before, clip_before = weights_snapshot(sdxl_unet), weights_snapshot(sdxl_clip.patcher)
    unet_flags = [p.requires_grad for p in sdxl_unet.model.parameters()]
    clip_flags = [p.requires_grad for p in sdxl_clip.patcher.model.parameters()]

    # The second encoder at a rate too small to move it: each encoder has its own param group.
    settings = options(train_text_encoder=True, text_encoder_lr=5e-3, text_encoder_2_lr=1e-9, save_precision="fp32")
    result = run_train(sdxl_unet, sdxl_clip, small_vae, dataset, "sdxl_te", steps=4, batch_size=3,
                       options=settings, learning_rate=1e-2)
    assert_base_untouched(sdxl_unet, unet_before, unet_flags)
    assert_base_untouched(sdxl_clip.patcher, clip_before, clip_flags)
    lora_name = result["result"][2]

    with safe_open(str(loras_dir / lora_name), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        meta = f.metadata()
    modules = {key.split(".", 1)[0] for key in tensors}
    te1 = {m for m in modules if m.startswith("lora_te1_")}
    te2 = {m for m in modules if m.startswith("lora_te2_")}
    assert te1 == {f"lora_te1_text_model_encoder_layers_{n}_{m}" for n in range(12) for m in TE_MODULES}
    assert te2 == {f"lora_te2_text_model_encoder_layers_{n}_{m}" for n in range(4) for m in TE_MODULES}
    unet = modules - te1 - te2
    assert unet and all(m.startswith("lora_unet_") for m in unet)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in unet, "kohya's SDXL (LDM) names"
    assert not any(m.startswith("lora_te_") for m in modules), "SDXL files use lora_te1_/lora_te2_"

    def moved(names):
        return max(tensors[f"{m}.lora_up.weight"].abs().max().item() for m in names)
    assert moved(te1) > 1e-3 and moved(te2) < 1e-6, (moved(te1), moved(te2))
    assert meta["ss_text_encoder_lr"] == str([0.005, 1e-9]) and meta["ss_network_train_unet_only"] == "False"

    key_map = comfy.lora.model_lora_keys_unet(sdxl_unet.model, {})
    key_map = comfy.lora.model_lora_keys_clip(sdxl_clip.cond_stage_model, key_map)
    assert modules <= set(key_map), sorted(modules - set(key_map))[:5]
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        loader_model, _ = comfy_nodes.LoraLoader().load_lora(sdxl_unet, sdxl_clip, lora_name, 1.0, 1.0)
    assert "not loaded" not in caplog.text.lower()

    # The UNet with the file through ComfyUI equals the adapter fed the same file, with y conditioning.
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([2.0, 0.5])
    cond = {"c_crossattn": torch.randn(2, 77, 1024, generator=g), "y": torch.randn(2, 1792, generator=g)}
    with torch.no_grad():
        comfy.model_management.load_models_gpu([loader_model])
        via_loader = loader_model.model.apply_model(x, sigma, **cond).clone()
        comfy.model_management.load_models_gpu([sdxl_unet])
        plain = sdxl_unet.model.apply_model(x, sigma, **cond).clone()
        with comfy_bridge.trainable_unet(sdxl_unet, checkpointing=False) as network:
            with InjectedLora(network, comfy_bridge.unet_lora_targets(sdxl_unet), rank=4, alpha=4.0) as lora:
                lora.load_kohya_state_dict({k: v for k, v in tensors.items() if k.startswith("lora_unet_")})
                via_adapter = sdxl_unet.model.apply_model(x, sigma, **cond).clone()
    assert_loader_matches_adapter(via_loader, via_adapter, plain)
    # After ComfyUI's own load and unload the weights are back (2025-10 leaves requires_grad off, its choice).
    comfy.model_management.unload_all_models()
    after = sdxl_unet.model.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in unet_before.items())


def test_sdxl_resume_equals_an_uninterrupted_run(sdxl_unet, sdxl_clip, small_vae, make_dataset, loras_dir,
                                                one_arithmetic_path):
    """Mixed buckets and sizes, then a save at step 2 resumed to 5 == 5 steps straight (bitwise: one
    arithmetic path, tests/conftest.py)."""
    import comfy.model_management
    from lora_lab.trainer.data.dataset import dataset_from_pixels
    with torch.inference_mode():
        wide = dataset_from_pixels(pattern_pixels(2, height=48, width=96), ["sks, wide"])
        tall = dataset_from_pixels(pattern_pixels(2, height=96, width=48, seed=1), ["sks, tall"])
    pictures = [wide.load_image(0), wide.load_image(1), tall.load_image(0), tall.load_image(1)]

    class Mixed(type(wide)):
        def load_image(self, index, max_side=None):
            return pictures[index]
    mixed = Mixed(items=wide.items + tuple(replace(i, key=i.key + "b") for i in tall.items))

    exact = options(save_precision="fp32")
    straight = run_train(sdxl_unet, sdxl_clip, small_vae, mixed, "sdxl_straight", steps=5, options=exact)

    with cancel_at_step(2, 5), pytest.raises(comfy.model_management.InterruptProcessingException):
        run_train(sdxl_unet, sdxl_clip, small_vae, mixed, "sdxl_split", steps=5, options=exact)
    resumed = run_train(sdxl_unet, sdxl_clip, small_vae, mixed, "sdxl_split", steps=5,
                        options=options(resume_from="sdxl_split_step2.safetensors", save_precision="fp32"))
    assert resumed["ui"]["loss"] == straight["ui"]["loss"][2:]
    with safe_open(str(loras_dir / straight["result"][2]), "pt") as a, \
            safe_open(str(loras_dir / resumed["result"][2]), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        worst = max((a.get_tensor(k) - b.get_tensor(k)).abs().max().item() for k in a.keys())
    assert worst == 0, worst


# --- block weights on pedals (SD1.5: test_block_weights.py, Flux: test_flow_models.py) ---------------------
def sdxl_denoised(patcher, stack, clip=None):
    """What the SDXL UNet wearing a pedal stack (via Apply LoRA Stack) predicts for fixed inputs."""
    import comfy.model_management
    from lora_lab.nodes import pedals
    pedals.LORA_FILES.clear()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, 768 + 256, generator=g)
    y = torch.randn(1, 256 + 6 * 256, generator=g)
    with torch.inference_mode():
        model = pedals.LoraLabApplyLoraStack().apply(patcher, stack, clip)["result"][0]
        comfy.model_management.load_models_gpu([model])
        return model.model.apply_model(x, torch.tensor([3.0]), c_crossattn=context, y=y).clone()


def test_sdxl_block_weights_name_their_blocks_in_both_layouts(sdxl_unet, loras_dir, pack):
    """The 12-entry layout (BASE IN04 IN05 IN07 IN08 M OUT00-OUT05) and the 20-entry LyCORIS one (BASE
    IN00-IN08 M OUT00-OUT08): a 0 for IN07 equals the file without input_blocks.7's keys, ALL the plain
    pedal, all bitwise; an SD1.5 vector is refused, naming SDXL's lengths."""
    import comfy.lora
    from lora_files import kohya_tensors, unet_shapes, write_lora
    from lora_lab.trainer.lora.block_weights import position
    from lora_lab.trainer.lora.stack import StackEntry
    key_map = comfy.lora.model_lora_keys_unet(sdxl_unet.model, {})
    block_of = {name: position(key) for name, key in key_map.items() if name.startswith("lora_unet_")}
    tensors = kohya_tensors(unet_shapes(sdxl_unet), seed=61)
    assert {block_of[key.split(".", 1)[0]] for key in tensors} >= {"IN04", "IN07", "M01", "OUT00", "OUT05"}

    def lora(name, keep):
        write_lora(loras_dir, name, {k: v for k, v in tensors.items() if keep(block_of[k.split(".", 1)[0]])})
        return name

    whole = lora("sdxl_blocks_whole.safetensors", lambda block: True)
    no_in07 = lora("sdxl_blocks_no_in07.safetensors", lambda block: block != "IN07")
    plain = sdxl_denoised(sdxl_unet, [(whole, 0.8, 0.8)])
    assert not torch.equal(plain, sdxl_denoised(sdxl_unet, []))
    assert torch.equal(sdxl_denoised(sdxl_unet, [StackEntry(whole, 0.8, 0.8, "ALL")]), plain)
    assert torch.equal(sdxl_denoised(sdxl_unet, [StackEntry(whole, 0.8, 0.8, "SDXL-ALL")]), plain)
    twelve = ["BASE", "IN04", "IN05", "IN07", "IN08", "M", *(f"OUT{n:02d}" for n in range(6))]
    twenty = ["BASE", *(f"IN{n:02d}" for n in range(9)), "M", *(f"OUT{n:02d}" for n in range(9))]
    for layout in (twelve, twenty):
        without_in07 = ",".join("0" if label == "IN07" else "1" for label in layout)
        assert torch.equal(sdxl_denoised(sdxl_unet, [StackEntry(whole, 0.8, 0.8, without_in07)]),
                           sdxl_denoised(sdxl_unet, [(no_in07, 0.8, 0.8)])), len(layout)
    with pytest.raises(Exception) as raised:                      # an SD1.5 vector on SDXL
        sdxl_denoised(sdxl_unet, [StackEntry(whole, 1.0, 1.0, ",".join(["1"] * 17))])
    assert "Apply LoRA Stack" in str(raised.value) and "12, 20 or 21" in str(raised.value)

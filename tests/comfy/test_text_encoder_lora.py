"""Text-encoder LoRA (train_text_encoder / text_encoder_lr) in a real in-process ComfyUI."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open

import random_models

from training import assert_base_untouched, cancel_at_step, run_train, weights_snapshot, options

TE_MODULES = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


@pytest.fixture
def fresh_clip(comfy):
    return random_models.sd15_clip(seed=4)


def encode_with(clip, caption="sks, striped pattern 0"):
    with torch.no_grad():
        return clip.encode_from_tokens(clip.tokenize(caption)).clone()


class Untouched:
    """Snapshot of a shared UNet and CLIP, to check they come back bitwise as they were."""

    def __init__(self, *patchers):
        self.patchers = patchers
        self.weights = [weights_snapshot(p) for p in patchers]
        self.flags = [[q.requires_grad for q in p.model.parameters()] for p in patchers]

    def check(self):
        for patcher, weights, flags in zip(self.patchers, self.weights, self.flags):
            assert_base_untouched(patcher, weights, flags)


def test_text_encoder_lora_trains_per_step_saves_te_keys_and_loads_in_comfyui(
        fresh_unet, fresh_clip, small_vae, make_dataset, loras_dir, caplog):
    import comfy.lora
    import comfy.model_management
    import nodes as comfy_nodes
    from lora_lab.nodes import comfy_bridge
    from lora_lab.trainer.lora.adapters import InjectedLora

    untouched = Untouched(fresh_unet, fresh_clip.patcher)
    plain = encode_with(fresh_clip)
    real_tokenize, tokenized = fresh_clip.tokenize, []
    fresh_clip.tokenize = lambda text, *a, **k: tokenized.append(text) or real_tokenize(text, *a, **k)   # a spy
    try:
        result = run_train(fresh_unet, fresh_clip, small_vae, make_dataset(2), "te_lora", steps=3, batch_size=2,
                           options=options(train_text_encoder=True, text_encoder_lr=5e-3, save_precision="fp32"),
                           learning_rate=1e-2)
    finally:
        del fresh_clip.tokenize
    untouched.check()
    # 2 captions encoded once up front (the frozen path's cache), then 2 per step: no cached embeddings
    assert len(tokenized) == 2 + 3 * 2, tokenized
    _, clip_out, lora_name, _, _, _ = result["result"]

    with safe_open(str(loras_dir / lora_name), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        meta = f.metadata()
    te_modules = {key.split(".", 1)[0] for key in tensors if key.startswith("lora_te_")}
    assert te_modules == {f"lora_te_text_model_encoder_layers_{n}_{m}" for n in range(12) for m in TE_MODULES}
    assert all(tensors[f"{m}.lora_up.weight"].abs().sum() > 0 for m in te_modules), "the text encoder learned nothing"
    assert any(key.startswith("lora_unet_") for key in tensors)
    assert meta["ss_network_train_unet_only"] == "False" and meta["ss_text_encoder_lr"] == "0.005"
    key_map = comfy.lora.model_lora_keys_clip(fresh_clip.cond_stage_model, {})
    assert te_modules <= set(key_map)

    with caplog.at_level(logging.WARNING), torch.inference_mode():
        _, loader_clip = comfy_nodes.LoraLoader().load_lora(fresh_unet, fresh_clip, lora_name, 1.0, 1.0)
    assert "not loaded" not in caplog.text.lower()
    via_loader = encode_with(loader_clip)
    via_node = encode_with(clip_out)
    # The trained adapter itself, injected into the text encoder again and fed the file. The CLIP
    # clones share one text model, whose weights ComfyUI patches in place: unload them first.
    comfy.model_management.unload_all_models()
    with torch.inference_mode(False), torch.no_grad():
        with comfy_bridge.trainable_text_encoder(fresh_clip) as text_model, \
                InjectedLora(text_model, comfy_bridge.clip_lora_targets(fresh_clip), rank=4, alpha=4.0) as lora:
            lora.load_kohya_state_dict({k: v for k, v in tensors.items() if k.startswith("lora_te_")})
            encode = comfy_bridge.loaded_caption_encoder(fresh_clip, with_gradients=False)
            via_adapter = encode("sks, striped pattern 0").cross_attn.clone()
    effect = (via_adapter - plain).abs().max().item()
    mismatch = (via_loader - via_adapter).abs().max().item()
    assert effect > 1e-2, "the text-encoder LoRA changes nothing"
    # Merged weights (ComfyUI) vs an adapter beside the weight (peft) round differently in fp32, and a
    # random 12-layer CLIP amplifies that: tolerance relative to what the LoRA changes.
    assert mismatch < max(1e-4, 0.01 * effect), (mismatch, effect)
    assert torch.equal(via_node, via_loader)
    untouched.check()
    assert torch.equal(encode_with(fresh_clip), plain)


def test_the_text_encoder_learns_at_its_own_rate(fresh_unet, fresh_clip, small_vae, make_dataset, loras_dir):
    result = run_train(fresh_unet, fresh_clip, small_vae, make_dataset(2), "te_slow", steps=2,
                       options=options(train_text_encoder=True, text_encoder_lr=1e-7, save_precision="fp32"),
                       learning_rate=1e-2)
    with safe_open(str(loras_dir / result["result"][2]), "pt") as f:
        ups = {key: f.get_tensor(key).abs().max().item() for key in f.keys() if key.endswith("lora_up.weight")}
    te = max(v for k, v in ups.items() if k.startswith("lora_te_"))
    unet = max(v for k, v in ups.items() if k.startswith("lora_unet_"))
    # AdamW moves each weight by about lr per step from zero: 2 steps -> ~2e-7 vs ~2e-2
    assert 0 < te < 1e-5 and unet > 1e-3, (te, unet)


def test_error_and_cancel_leave_the_shared_clip_bitwise_unchanged(fresh_unet, fresh_clip, small_vae, make_dataset,
                                                                  loras_dir, loss_fails_at_call):
    import comfy.model_management
    untouched = Untouched(fresh_unet, fresh_clip.patcher)
    te = options(train_text_encoder=True)

    with loss_fails_at_call(3):
        with pytest.raises(RuntimeError, match="simulated"):
            run_train(fresh_unet, fresh_clip, small_vae, make_dataset(2), "te_crash", steps=10, options=te)
    untouched.check()
    with safe_open(str(loras_dir / "te_crash_step2.safetensors"), "pt") as f:
        assert any(key.startswith("lora_te_") for key in f.keys()), "the partial save lost the text encoder"
    with cancel_at_step(1, 50), pytest.raises(comfy.model_management.InterruptProcessingException):
        run_train(fresh_unet, fresh_clip, small_vae, make_dataset(2), "te_cancel", steps=50, options=te)
    untouched.check()
    assert (loras_dir / "te_cancel_step1.safetensors").is_file()

"""SD2.x v-prediction: a small SD2-architecture UNet built with ComfyUI's own classes that predicts v.

The loss must be the MSE between the UNet's raw output and v = sqrt(acp) * noise - sqrt(1 - acp) * x0
(Salimans & Ho; diffusers' get_velocity), written here from the SD noise schedule, not from ComfyUI.
"""
from __future__ import annotations


import pytest
import torch
from safetensors import safe_open

import random_models

from training import assert_base_untouched, encoded_training_set, run_train, training_loss, weights_snapshot, options


@pytest.fixture(scope="module")
def sd2_v_unet(comfy):
    return random_models.sd2_v_model_patcher(model_channels=32, seed=3)


@pytest.fixture(scope="module")
def sd2_clip(comfy):
    return random_models.sd2_clip()


def sd_alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    """SD1/SD2's "scaled linear" schedule: betas from 0.00085 to 0.012 on a square-root scale."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def test_the_model_is_v_prediction_and_the_loss_is_the_v_mse(sd2_v_unet):
    import comfy.model_management
    from lora_lab.nodes import comfy_bridge
    from lora_lab.trainer.training.loop import denoising_loss
    comfy.model_management.load_models_gpu([sd2_v_unet])
    denoiser = comfy_bridge.ComfyDenoiser(sd2_v_unet)
    assert denoiser.prediction_type == "v" and comfy_bridge.model_family(sd2_v_unet) == "sd_v2"
    assert comfy_bridge.unsupported_family(sd2_v_unet) is None
    assert comfy_bridge.default_resolution(sd2_v_unet) == 768

    g = torch.Generator().manual_seed(0)
    # Latents larger than the noise, so that the v target (mostly -x0 late in the schedule) and the
    # eps target are far apart.
    x0, noise = 3 * torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    cond = torch.randn(3, 77, 1024, generator=g)
    u = torch.tensor([0.05, 0.5, 0.93])
    with torch.no_grad():
        loss = denoising_loss(denoiser, x0, cond, noise, u).item()

        index = (u * 1000).long()
        acp = sd_alphas_cumprod()[index].float().view(-1, 1, 1, 1)
        sigma = denoiser.training_sigmas(u)
        assert torch.allclose(sigma, ((1 - acp) / acp).sqrt().view(-1), rtol=1e-4)
        noisy = acp.sqrt() * x0 + (1 - acp).sqrt() * noise            # diffusers' add_noise
        raw = sd2_v_unet.model.diffusion_model(noisy, index.float(), context=cond).float()
        v = acp.sqrt() * noise - (1 - acp).sqrt() * x0
        v_loss = (raw - v).pow(2).mean().item()
        eps_loss = (raw - noise).pow(2).mean().item()
    assert loss == pytest.approx(v_loss, rel=1e-3), (loss, v_loss)
    assert abs(loss - eps_loss) > 0.5 * v_loss, "v and eps targets must be told apart by this check"


def test_v_prediction_training_learns_and_the_file_says_v(sd2_v_unet, sd2_clip, small_vae, make_dataset,
                                                          loras_dir, caplog):
    import logging
    import nodes as comfy_nodes
    dataset = make_dataset(4)
    data = encoded_training_set(sd2_v_unet, sd2_clip, small_vae, dataset)
    before = weights_snapshot(sd2_v_unet)
    flags = [p.requires_grad for p in sd2_v_unet.model.parameters()]
    base_loss = training_loss(sd2_v_unet, data)

    result = run_train(sd2_v_unet, sd2_clip, small_vae, dataset, "sd2_v", steps=30,
                       options=options(save_precision="fp32"), learning_rate=2e-3, rank=8, alpha=8.0)
    model_out, _, lora_name, _, _, _ = result["result"]
    assert_base_untouched(sd2_v_unet, before, flags)
    trained_loss = training_loss(model_out, data)
    # fixed noise and timesteps (measure_loss), so any drop is learning; 30 steps give about -18%
    assert trained_loss < 0.9 * base_loss, f"no learning: {base_loss:.4f} -> {trained_loss:.4f}"

    with safe_open(str(loras_dir / lora_name), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["ss_v2"] == "True" and meta["ss_v_parameterization"] == "True"
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        comfy_nodes.LoraLoader().load_lora(sd2_v_unet, sd2_clip, lora_name, 1.0, 1.0)
    assert "not loaded" not in caplog.text.lower()

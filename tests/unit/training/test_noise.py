"""trainer.noise: kohya's noise offset, timestep range, min-SNR-gamma and v-pred loss scaling."""
import math

import pytest
import torch

from lora_lab.trainer.training.noise import (NoiseSettings, draw, loss_weights, min_snr_weights, notes_for, offset_noise,
                                    snr_from_sigma, timestep_range, v_pred_loss_scale, weighted_mean)

from toy_training import sd_schedule


def _draw(generator, shape):
    """The loop's draws before noise options existed: noise, then one u per sample."""
    return torch.randn(shape, generator=generator), torch.rand(shape[0], generator=generator)


def test_default_draws_are_bit_identical_to_plain_draws():
    shape = (3, 4, 8, 8)
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    noise, u = draw(a, shape)
    expected_noise, expected_u = _draw(b, shape)
    assert torch.equal(noise, expected_noise) and torch.equal(u, expected_u)
    assert torch.equal(a.get_state(), b.get_state())   # nothing extra drawn


def test_noise_offset_is_one_value_per_sample_and_channel():
    g = torch.Generator().manual_seed(1)
    settings = NoiseSettings(noise_offset=0.1)
    noise, u = draw(g, (2, 4, 8, 8), settings)
    plain_noise, plain_u = _draw(torch.Generator().manual_seed(1), (2, 4, 8, 8))
    assert torch.equal(u, plain_u)                      # the offset draw comes after noise and u
    shift = noise - plain_noise
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    per_channel = shift[:, :, 0, 0]
    assert per_channel.unique().numel() == 8 and per_channel.abs().max() < 0.1 * 6
    again, _ = draw(torch.Generator().manual_seed(1), (2, 4, 8, 8), settings)
    assert torch.equal(noise, again)


def test_offset_noise_zero_is_a_no_op_and_handles_other_ranks():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 4, 4)
    state = g.get_state()
    assert offset_noise(noise, 0.0, g) is noise and torch.equal(g.get_state(), state)
    video = torch.zeros(2, 3, 5, 4, 4)
    shifted = offset_noise(video, 1.0, g)
    assert shifted.shape == video.shape and torch.equal(shifted[:, :, 0], shifted[:, :, 4])


def test_timestep_range_maps_u_into_min_max():
    u = torch.rand(10_000, generator=torch.Generator().manual_seed(0))
    assert timestep_range(u) is u
    mapped = timestep_range(u, 0.2, 0.7)
    assert mapped.min() >= 0.2 and mapped.max() < 0.7
    indices = (mapped * 1000).long()
    assert indices.min() == 200 and indices.max() == 699    # kohya --min_timestep 200 --max_timestep 700
    top = timestep_range(torch.tensor([1 - 2 ** -24]), 0.0, 0.5)   # the largest float32 below 1
    assert top.item() < 0.5 and int(top.item() * 1000) == 499


def test_draw_restricts_the_timesteps():
    _, u = draw(torch.Generator().manual_seed(3), (64, 4, 2, 2), NoiseSettings.from_kohya_timesteps(500, 1000))
    assert u.min() >= 0.5 and u.max() < 1.0


@pytest.mark.parametrize("kwargs", [dict(noise_offset=-0.1), dict(min_timestep=0.5, max_timestep=0.5),
                                    dict(min_timestep=-0.1), dict(max_timestep=1.5), dict(min_snr_gamma=-1),
                                    dict(noise_offset=math.nan)])
def test_settings_refuse_nonsense(kwargs):
    with pytest.raises(ValueError):
        NoiseSettings(**kwargs)


def test_snr_of_comfyuis_sigma_is_kohyas_all_snr():
    alphas_cumprod, sigmas = sd_schedule()
    kohya_all_snr = alphas_cumprod / (1 - alphas_cumprod)       # custom_train_functions.prepare_scheduler_for_custom_training
    assert torch.allclose(snr_from_sigma(sigmas).double(), kohya_all_snr, rtol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_min_snr_weights_match_kohyas_apply_snr_weight(gamma):
    alphas_cumprod, sigmas = sd_schedule()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    assert torch.allclose(min_snr_weights(sigmas, gamma, "eps").double(), clipped / snr, rtol=1e-5)
    assert torch.allclose(min_snr_weights(sigmas, gamma, "v").double(), clipped / (snr + 1), rtol=1e-5)
    # Low-noise timesteps (SNR > gamma) are damped, high-noise ones keep weight 1 for eps.
    eps = min_snr_weights(sigmas, gamma, "eps")
    assert eps[0] < 1 and eps[-1] == 1


def test_weights_in_output_space_are_min_snr_in_x0_space():
    # The loop measures |x0 error / s|^2 with s = Denoiser.output_error_scale(sigma): s = sigma for eps,
    # sigma / sqrt(sigma^2 + 1) for ComfyUI's V_PREDICTION (sigma_data 1). Both weights reduce to
    # min(SNR, gamma) * |x0 error|^2, the weighting of the min-SNR paper.
    _, sigmas = sd_schedule()
    sigmas = sigmas.float()
    snr = snr_from_sigma(sigmas)
    target = torch.minimum(snr, torch.tensor(5.0))
    eps_scale, v_scale = sigmas, sigmas / (sigmas ** 2 + 1).sqrt()
    assert torch.allclose(min_snr_weights(sigmas, 5.0, "eps") / eps_scale ** 2, target, rtol=1e-4)
    assert torch.allclose(min_snr_weights(sigmas, 5.0, "v") / v_scale ** 2, target, rtol=1e-4)
    # v scaling puts a v model's loss on the eps scale: |x0 err / s_v|^2 * scale == |x0 err / sigma|^2.
    assert torch.allclose(v_pred_loss_scale(sigmas) / v_scale ** 2, 1 / sigmas ** 2, rtol=1e-4)


def test_weights_stay_finite_at_the_extremes():
    sigmas = torch.tensor([0.0, 1e-4, 1.0, 157.4, 4096.0])    # 4096: a zero-terminal-SNR last sigma
    for prediction in ("eps", "v"):
        weights = min_snr_weights(sigmas, 5.0, prediction)
        assert torch.isfinite(weights).all() and (weights >= 0).all() and (weights <= 1).all()
    assert torch.isfinite(v_pred_loss_scale(sigmas)).all()


def test_loss_weights_apply_only_where_they_are_defined():
    sigma = torch.tensor([0.1, 1.0, 10.0])
    assert loss_weights(sigma, "eps", NoiseSettings()) is None
    assert loss_weights(sigma, "eps", NoiseSettings(noise_offset=0.1, min_timestep=0.3)) is None
    assert loss_weights(sigma, "eps", NoiseSettings(scale_v_pred_loss=True)) is None       # v only
    assert loss_weights(sigma, "flow", NoiseSettings(scale_v_pred_loss=True)) is None
    assert torch.equal(loss_weights(sigma, "v", NoiseSettings(scale_v_pred_loss=True)), v_pred_loss_scale(sigma))
    both = loss_weights(sigma, "v", NoiseSettings(min_snr_gamma=5, scale_v_pred_loss=True))
    assert torch.allclose(both, min_snr_weights(sigma, 5, "v") * v_pred_loss_scale(sigma))   # kohya multiplies
    with pytest.raises(ValueError, match="flow"):
        loss_weights(sigma, "flow", NoiseSettings(min_snr_gamma=5))


def test_weighted_mean():
    error = torch.rand(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(weighted_mean(error, None), error.mean())
    assert torch.allclose(weighted_mean(error, torch.ones(3)), error.mean())
    weights = torch.tensor([1.0, 0.0, 0.5])
    expected = (error[0].mean() + 0.5 * error[2].mean()) / 3
    assert torch.allclose(weighted_mean(error, weights), expected)


def test_notes_explain_settings_that_do_not_apply():
    assert notes_for("v", NoiseSettings(min_snr_gamma=5, scale_v_pred_loss=True)) == []
    assert "v-prediction" in notes_for("eps", NoiseSettings(scale_v_pred_loss=True))[0]
    assert any("min_snr_gamma" in n for n in notes_for("flow", NoiseSettings(min_snr_gamma=5)))

"""The loss's shape and the timesteps' spread (trainer/training/loss_shapes.py), against kohya's formulas written
out by hand here (sd-scripts train_util.conditional_loss and get_huber_threshold_if_needed), on plain torch."""
import math

import pytest
import torch

from lora_lab.trainer.training.loop import TrainSettings, denoising_loss, measure_loss, train
from lora_lab.trainer.training.loss_shapes import elementwise_loss, flow_sigmas, huber_threshold, logit_normal
from lora_lab.trainer.training.noise import NoiseSettings, draw, notes_for

from toy_training import TinyEpsDenoiser, params_of, sd_schedule, toy_data


def kohya_threshold(schedule, timesteps, alphas_cumprod, huber_c, huber_scale):
    """get_huber_threshold_if_needed, as sd-scripts writes it (integer timesteps 0..999)."""
    if schedule == "exponential":
        alpha = -math.log(huber_c) / 1000
        return torch.exp(-alpha * timesteps.double()) * huber_scale
    if schedule == "snr":
        a = alphas_cumprod[timesteps]
        sigmas = ((1.0 - a) / a) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    return torch.full(timesteps.shape, huber_c * huber_scale, dtype=torch.float64)


def kohya_loss(pred, target, loss_type, c):
    """conditional_loss(..., reduction="none")."""
    c = c.view(-1, 1, 1, 1)
    if loss_type == "l1":
        return (pred - target).abs()
    if loss_type == "huber":
        return 2 * c * (torch.sqrt((pred - target) ** 2 + c ** 2) - c)
    if loss_type == "smooth_l1":
        return 2 * (torch.sqrt((pred - target) ** 2 + c ** 2) - c)
    return (pred - target) ** 2


@pytest.mark.parametrize("schedule", ["snr", "exponential", "constant"])
def test_the_huber_threshold_is_kohyas(schedule):
    alphas_cumprod, sigmas = sd_schedule()
    timesteps = torch.tensor([0, 1, 250, 500, 998, 999])
    u = (timesteps.double() + 0.5) / 1000                # any u inside timestep T's slot of the schedule
    ours = huber_threshold(u.float(), sigmas[timesteps].float(), "eps", schedule, 0.1, 2.0)
    # float32 arithmetic on values of order 0.1-2: agreement to 1e-6 relative is its rounding.
    torch.testing.assert_close(ours.double(), kohya_threshold(schedule, timesteps, alphas_cumprod, 0.1, 2.0),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
def test_each_loss_type_is_kohyas_element_by_element(loss_type):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 5, generator=g) * 3, torch.randn(3, 4, 5, 5, generator=g)
    c = torch.tensor([0.05, 0.1, 1.0])
    expected = kohya_loss(pred.double(), target.double(), loss_type, c.double())
    torch.testing.assert_close(elementwise_loss(pred - target, loss_type, c).double(), expected, rtol=1e-5, atol=1e-6)


def test_huber_is_l2_near_zero_and_linear_far_out():
    # float64: in float32, sqrt(e**2 + c**2) - c loses e**2's digits to cancellation at e = 1e-3.
    c = torch.tensor([0.1], dtype=torch.float64)
    small, large = torch.full((1, 1), 1e-3, dtype=torch.float64), torch.full((1, 1), 100.0, dtype=torch.float64)
    assert elementwise_loss(small, "huber", c).item() == pytest.approx(1e-6, rel=1e-3)        # ~ error**2
    assert elementwise_loss(large, "huber", c).item() == pytest.approx(2 * 0.1 * 100, rel=2e-3)  # ~ 2c|error|
    assert elementwise_loss(large, "smooth_l1", c).item() == pytest.approx(2 * 100, rel=2e-3)


def test_denoising_loss_equals_kohyas_weighted_huber_by_hand():
    """One eps model, a batch of two at two timesteps, Huber with the snr schedule and min-SNR 5: the loss is the
    mean over the batch of (kohya's Huber of eps_pred vs eps, averaged per sample) x min-SNR weight."""
    alphas_cumprod, sigmas = sd_schedule()
    torch.manual_seed(0)
    model = TinyEpsDenoiser()
    model.sigmas = sigmas.float()
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    cond = torch.randn(2, 7, 16)
    timesteps = torch.tensor([120, 870])
    u = (timesteps.float() + 0.5) / 1000
    settings = NoiseSettings(loss_type="huber", huber_schedule="snr", huber_c=0.1, min_snr_gamma=5.0)
    got = denoising_loss(model, latents, cond, noise, u, settings)

    with torch.no_grad():
        sigma = sigmas[timesteps].float()
        noisy = latents + noise * sigma.view(-1, 1, 1, 1)
        eps_pred = (noisy - model.denoise(noisy, sigma, cond)) / sigma.view(-1, 1, 1, 1)
        c = kohya_threshold("snr", timesteps, alphas_cumprod, 0.1, 1.0)
        per_sample = kohya_loss(eps_pred.double(), noise.double(), "huber", c).mean(dim=(1, 2, 3))
        snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
        weights = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr          # kohya apply_snr_weight, eps
        expected = (per_sample * weights).mean()
    # Values of order 0.01-1 through a float32 model and float32 loss: 1e-5 relative.
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() != pytest.approx(denoising_loss(model, latents, cond, noise, u).item(), rel=1e-2)


def test_snr_schedule_is_refused_for_flow_models():
    with pytest.raises(ValueError, match="exponential"):
        huber_threshold(torch.tensor([0.5]), torch.tensor([0.5]), "flow", "snr", 0.1, 1.0)
    # For flow models the exponential schedule's t is the sigma itself (kohya's Flux timesteps are sigma x 1000).
    assert huber_threshold(torch.tensor([0.2]), torch.tensor([0.5]), "flow", "exponential", 0.1, 1.0).item() \
        == pytest.approx(0.1 ** 0.5, rel=1e-6)


def test_logit_normal_timesteps_replace_u_and_leave_the_defaults_untouched():
    shape = (4096, 4, 2, 2)
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    noise, u = draw(a, shape, NoiseSettings(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8))
    expected_noise = torch.randn(shape, generator=b)
    torch.rand(shape[0], generator=b)                                       # the uniform u it replaces
    assert torch.equal(noise, expected_noise)
    assert torch.equal(u, torch.sigmoid(0.5 + 0.8 * torch.randn(shape[0], generator=b)))
    # The median of sigmoid(N(0.5, 0.8)) is sigmoid(0.5); 4096 draws put the sample median within 0.02 of it.
    assert u.median().item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item(), abs=0.02)
    assert torch.equal(logit_normal(torch.Generator().manual_seed(1), 3, 0.0, 1.0),
                       torch.sigmoid(torch.randn(3, generator=torch.Generator().manual_seed(1))))


def test_the_timestep_range_applies_to_logit_normal_timesteps_too():
    _, u = draw(torch.Generator().manual_seed(0), (2000, 4, 2, 2),
                NoiseSettings(timestep_sampling="logit_normal", min_timestep=0.3, max_timestep=0.6))
    assert u.min() >= 0.3 and u.max() < 0.6


def test_flow_shift_is_sd3s_time_shift_on_comfyuis_grid():
    u = torch.tensor([0.0, 0.4995, 0.9999])
    t = torch.tensor([0.001, 0.5, 1.0])                     # floor(u x 1000) + 1, over 1000: never 0
    torch.testing.assert_close(flow_sigmas(u, 1.0), t)
    torch.testing.assert_close(flow_sigmas(u, 3.0), 3 * t / (1 + 2 * t))
    assert flow_sigmas(u, 3.0)[1].item() == pytest.approx(0.75)


@pytest.mark.parametrize("values", [dict(loss_type="l3"), dict(huber_schedule="cosine"), dict(huber_c=0.0),
                                    dict(huber_c=1.5), dict(huber_scale=0.0), dict(timestep_sampling="beta"),
                                    dict(logit_std=0.0), dict(flow_shift=-1.0)])
def test_settings_refuse_nonsense(values):
    with pytest.raises(ValueError, match=next(iter(values))):
        NoiseSettings(**values)


def test_notes_say_flow_shift_does_nothing_for_eps_models():
    assert any("flow_shift does nothing" in note for note in notes_for("eps", NoiseSettings(flow_shift=3.0)))
    assert not notes_for("flow", NoiseSettings(flow_shift=3.0))


@pytest.mark.parametrize("noise", [NoiseSettings(loss_type="huber", huber_schedule="snr"),
                                   NoiseSettings(loss_type="smooth_l1", huber_schedule="exponential"),
                                   NoiseSettings(loss_type="l1", timestep_sampling="logit_normal")])
def test_the_loop_learns_with_each_shape(noise):
    data = toy_data()
    torch.manual_seed(0)
    model = TinyEpsDenoiser()
    before = measure_loss(model, data, torch.device("cpu"))
    train(model, data, params_of(model), TrainSettings(steps=30, batch_size=2, learning_rate=3e-3, noise=noise),
          torch.device("cpu"))
    # Measured by the plain mean squared error at fixed draws: the same yardstick test_loop's learning test uses.
    assert measure_loss(model, data, torch.device("cpu")) < 0.9 * before

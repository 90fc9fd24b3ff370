"""Noise and loss tricks from kohya's sd-scripts: noise offset, timestep range, min-SNR-gamma, v-pred scaling.

All of it works on ComfyUI's sigma parameterization of the discrete VP models (SD1.x/2.x/SDXL):
``x = x0 + sigma * noise`` with ``sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod)``, hence

    SNR(sigma) = alphas_cumprod / (1 - alphas_cumprod) = 1 / sigma**2.

Which option applies to which prediction type (``prediction`` is "eps", "v", or anything else,
e.g. "flow" for rectified-flow models such as SD3/Flux):

  option               eps   v     other   what it does
  noise_offset         yes   yes   yes     noise + offset * randn(B, C, 1, 1): learns overall brightness
  min/max_timestep     yes   yes   yes     u mapped into [min, max) before u -> sigma
  min_snr_gamma        yes   yes   error   per-sample loss weight, min(SNR, gamma) in x0 terms
  scale_v_pred_loss    no-op yes   no-op   v loss * SNR / (SNR + 1): a v model's loss on the eps scale

Weights act on the loss in the model's own output space (what ``loop.denoising_loss`` measures):
  eps: min(SNR, gamma) / SNR        = min(1, gamma * sigma**2)
  v:   min(SNR, gamma) / (SNR + 1)  = min(1, gamma * sigma**2) / (1 + sigma**2)
  v scaling: SNR / (SNR + 1)        = 1 / (1 + sigma**2)
(kohya ``apply_snr_weight`` and ``scale_v_prediction_loss_like_noise_prediction``; when both are on
they multiply, as in kohya.) The sigma forms are used because they stay finite at sigma -> 0 and at
zero-terminal-SNR sigmas.

Everything random draws from a caller's ``torch.Generator`` (on the CPU), so a seed fixes a run.
With the default settings nothing extra is drawn and no weights are made: the loop's random
stream and loss stay bit-identical to a loop without this module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import loss_shapes

MIN_SNR_PREDICTIONS = ("eps", "v")
# Settings added after runs and validation histories were first saved: at their defaults they train and measure
# as before they existed, so identities and history keys leave them out there (validation.py, nodes/train.py).
ADDED_AFTER_FIRST_RELEASE = ("loss_type", "huber_schedule", "huber_c", "huber_scale", "timestep_sampling",
                             "logit_mean", "logit_std", "flow_shift")


@dataclass(frozen=True)
class NoiseSettings:
    noise_offset: float = 0.0        # kohya --noise_offset; 0.05-0.1 typical, 0 = off
    min_timestep: float = 0.0        # fraction of the schedule: kohya --min_timestep / 1000
    max_timestep: float = 1.0        # fraction of the schedule: kohya --max_timestep / 1000
    min_snr_gamma: float = 0.0       # kohya/diffusers --min_snr_gamma; 5 is the paper's value, 0 = off
    scale_v_pred_loss: bool = False  # kohya --scale_v_pred_loss_like_noise_pred
    # The loss's shape and the timesteps' spread (loss_shapes.py):
    loss_type: str = "l2"            # kohya --loss_type: l2 | l1 | huber | smooth_l1
    huber_schedule: str = "snr"      # kohya --huber_schedule: snr | exponential | constant
    huber_c: float = 0.1             # kohya --huber_c
    huber_scale: float = 1.0         # kohya --huber_scale
    timestep_sampling: str = "uniform"   # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float = 0.0          # SD3 / Flux: sigma = shift t / (1 + (shift - 1) t); 0 = the model's own

    def __post_init__(self):
        if not (math.isfinite(self.noise_offset) and self.noise_offset >= 0):
            raise ValueError(f"noise offset must be >= 0, got {self.noise_offset}")
        if not 0.0 <= self.min_timestep < self.max_timestep <= 1.0:
            raise ValueError(f"timestep range must satisfy 0 <= min < max <= 1 (fractions of the schedule), "
                             f"got [{self.min_timestep}, {self.max_timestep})")
        if not (math.isfinite(self.min_snr_gamma) and self.min_snr_gamma >= 0):
            raise ValueError(f"min-SNR gamma must be >= 0 (0 = off), got {self.min_snr_gamma}")
        loss_shapes.check(self.loss_type, self.huber_schedule, self.huber_c, self.huber_scale,
                          self.timestep_sampling, self.logit_std, self.flow_shift)

    @classmethod
    def from_kohya_timesteps(cls, min_timestep: int = 0, max_timestep: int = 1000, **others) -> "NoiseSettings":
        """kohya's integer timesteps (0..1000) -> fractions."""
        return cls(min_timestep=min_timestep / 1000, max_timestep=max_timestep / 1000, **others)

    @property
    def weights_loss(self) -> bool:
        return self.min_snr_gamma > 0 or self.scale_v_pred_loss


# --- drawing ----------------------------------------------------------------------------------------
def draw(generator: torch.Generator, shape: tuple[int, ...],
         settings: NoiseSettings = NoiseSettings()) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise of ``shape`` (B, C, ...) and uniform u (B,) for one micro-batch, on the CPU.

    Drop-in for ``loop._draw``: the same draws in the same order (noise, then u); the offset's
    (B, C) draw comes after them and only when the offset is on, then logit-normal timesteps' (B,)
    draw, only when they are on (taking u's place). Resume replays by calling this with the same settings.
    """
    noise = torch.randn(shape, generator=generator)
    u = torch.rand(shape[0], generator=generator)
    noise = offset_noise(noise, settings.noise_offset, generator)
    if settings.timestep_sampling == "logit_normal":
        u = loss_shapes.logit_normal(generator, shape[0], settings.logit_mean, settings.logit_std)
    u = timestep_range(u, settings.min_timestep, settings.max_timestep)
    return noise, u


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator) -> torch.Tensor:
    """kohya ``apply_noise_offset``: noise + offset * randn(B, C, 1, 1) (one value per channel).

    Offset 0 returns ``noise`` itself and draws nothing.
    """
    if offset == 0:
        return noise
    per_channel = torch.randn(noise.shape[:2], generator=generator, device=generator.device)
    per_channel = per_channel.view(*noise.shape[:2], *([1] * (noise.ndim - 2)))
    return noise + offset * per_channel.to(device=noise.device, dtype=noise.dtype)


def timestep_range(u: torch.Tensor, min_fraction: float = 0.0, max_fraction: float = 1.0) -> torch.Tensor:
    """Uniform u in [0, 1) -> uniform in [min_fraction, max_fraction), the part of the schedule trained.

    The Denoiser turns u into a timestep index ``floor(u * 1000)``, low u = low noise; so
    [0.2, 1.0) trains timesteps 200..999, like kohya ``--min_timestep 200``. The full range returns
    ``u`` unchanged.
    """
    if min_fraction == 0.0 and max_fraction == 1.0:
        return u
    mapped = min_fraction + u * (max_fraction - min_fraction)
    below_max = torch.nextafter(torch.tensor(max_fraction, dtype=u.dtype), torch.tensor(-math.inf, dtype=u.dtype))
    return mapped.clamp(min=min_fraction, max=below_max.item())


# --- loss weights -----------------------------------------------------------------------------------
def snr_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of ComfyUI's VP sigma: 1 / sigma**2."""
    return 1.0 / sigma.float().pow(2)


def min_snr_weights(sigma: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Per-sample min-SNR-gamma weights (Hang et al. 2023) for a loss measured in eps or v space."""
    if prediction not in MIN_SNR_PREDICTIONS:
        raise ValueError(f"min-SNR weighting is defined for eps- and v-prediction models; this model predicts "
                         f"{prediction!r}. Set min_snr_gamma to 0 for it.")
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
    sigma_sq = sigma.float().pow(2)
    clipped = torch.clamp(gamma * sigma_sq, max=1.0)          # min(SNR, gamma) / SNR
    return clipped if prediction == "eps" else clipped / (1.0 + sigma_sq)


def v_pred_loss_scale(sigma: torch.Tensor) -> torch.Tensor:
    """kohya ``scale_v_prediction_loss_like_noise_prediction``: SNR / (SNR + 1) = 1 / (1 + sigma**2)."""
    return 1.0 / (1.0 + sigma.float().pow(2))


def loss_weights(sigma: torch.Tensor, prediction: str, settings: NoiseSettings) -> torch.Tensor | None:
    """Per-sample loss weights (B,) for this model's prediction type, or None when nothing applies.

    None means: take the plain mean, exactly as without this module. Raises ValueError when
    min-SNR is asked of a model it is not defined for (see the table in the module doc).
    """
    weights = None
    if settings.min_snr_gamma > 0:
        weights = min_snr_weights(sigma, settings.min_snr_gamma, prediction)
    if settings.scale_v_pred_loss and prediction == "v":
        scale = v_pred_loss_scale(sigma)
        weights = scale if weights is None else weights * scale
    return weights


def weighted_mean(squared_error: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The loss: plain mean when ``weights`` is None, else the batch mean of weighted per-sample means."""
    if weights is None:
        return squared_error.mean()
    per_sample = squared_error.mean(dim=tuple(range(1, squared_error.ndim)))
    return (per_sample * weights.to(per_sample.device, per_sample.dtype)).mean()


def notes_for(prediction: str, settings: NoiseSettings) -> list[str]:
    """Plain-language notes for the run report: settings that do nothing for this model, or cannot work."""
    notes = []
    if settings.scale_v_pred_loss and prediction != "v":
        notes.append(f"scale_v_pred_loss does nothing here: it applies to v-prediction models and this one "
                     f"predicts {prediction}.")
    if settings.min_snr_gamma > 0 and prediction not in MIN_SNR_PREDICTIONS:
        notes.append(f"min_snr_gamma cannot be used with a {prediction}-prediction model; set it to 0.")
    if settings.flow_shift and prediction != "flow":
        notes.append(f"flow_shift does nothing here: it shifts the timesteps of flow models (SD3, Flux) and this one "
                     f"predicts {prediction}.")
    return notes

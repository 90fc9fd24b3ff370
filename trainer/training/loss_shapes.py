"""The shape of the loss and where its timesteps fall: kohya's ``--loss_type`` (l2, l1, huber, smooth_l1) with
its Huber schedule, logit-normal timesteps (SD3's recipe, kohya's ``sigmoid`` sampling for Flux) and a flow
shift for SD3 / Flux (kohya's ``--discrete_flow_shift``).

The loss acts on the error of the model's raw output (eps, v or the flow velocity): ``error`` below is what the
loop already divides out (loop.denoising_loss). kohya's forms, element by element, with threshold c per sample:

  l2         error**2                                   (the default; the loop's own expression, untouched)
  l1         |error|
  huber      2 c (sqrt(error**2 + c**2) - c)            (pseudo-Huber: ~error**2 near 0, ~2c|error| far out)
  smooth_l1  2 (sqrt(error**2 + c**2) - c)              (~error**2 / c near 0, ~2|error| far out)

and c by ``huber_schedule`` (kohya's ``get_huber_threshold_if_needed``), t the timestep as a fraction of the
schedule:

  constant     huber_c * huber_scale
  exponential  huber_c ** t * huber_scale               (kohya: exp(-alpha T), alpha = -ln(huber_c) / 1000)
  snr          (1 - huber_c) / (1 + sigma)**2 + huber_c (eps / v models: sigma is ComfyUI's VP sigma, kohya's
                                                         sqrt((1 - alphas_cumprod) / alphas_cumprod))

For flow models (SD3, Flux) t is the sigma itself (kohya passes sigma * 1000 as their timestep); the snr
schedule is for eps / v models only, as in kohya.
"""
from __future__ import annotations

import math

import torch

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
SCHEDULE_STEPS = 1000      # every model here has 1000 training timesteps


def check(loss_type: str, huber_schedule: str, huber_c: float, huber_scale: float, timestep_sampling: str,
          logit_std: float, flow_shift: float) -> None:
    """ValueError naming the setting, for values that cannot train."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if huber_schedule not in HUBER_SCHEDULES:
        raise ValueError(f"huber_schedule must be one of {', '.join(HUBER_SCHEDULES)}, got {huber_schedule!r}")
    if not (math.isfinite(huber_c) and 0 < huber_c <= 1):
        raise ValueError(f"huber_c must be in (0, 1] (kohya's default 0.1), got {huber_c}")
    if not (math.isfinite(huber_scale) and huber_scale > 0):
        raise ValueError(f"huber_scale must be > 0 (kohya's default 1.0), got {huber_scale}")
    if timestep_sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, got {timestep_sampling!r}")
    if not (math.isfinite(logit_std) and logit_std > 0):
        raise ValueError(f"logit_std must be > 0, got {logit_std}")
    if not (math.isfinite(flow_shift) and flow_shift >= 0):
        raise ValueError(f"flow_shift must be >= 0 (0 = the model's own schedule), got {flow_shift}")


# --- timesteps ----------------------------------------------------------------------------------------------
def logit_normal(generator: torch.Generator, count: int, mean: float, std: float) -> torch.Tensor:
    """u = sigmoid(mean + std * n), n standard normal: timesteps bunched around the middle of the schedule (SD3's
    paper, "rf/lognorm(0.00, 1.00)"; kohya's Flux ``sigmoid`` sampling is mean 0, std = its sigmoid_scale)."""
    return torch.sigmoid(mean + std * torch.randn(count, generator=generator))


def flow_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """A flow model's noise level at u with the time shift ``shift`` (SD3's and ComfyUI's ModelSamplingSD3 form,
    kohya's ``--discrete_flow_shift``): t on the 1000-step grid ComfyUI's own schedule uses (never 0, where the
    loss would divide by sigma), then sigma = shift t / (1 + (shift - 1) t)."""
    t = ((u * SCHEDULE_STEPS).floor().clamp(0, SCHEDULE_STEPS - 1) + 1) / SCHEDULE_STEPS
    return shift * t / (1 + (shift - 1) * t)


# --- the loss ---------------------------------------------------------------------------------------------
def timestep_fraction(u: torch.Tensor, sigma: torch.Tensor, prediction: str) -> torch.Tensor:
    """t in [0, 1]: the timestep index / 1000 for eps / v models, the sigma itself for flow models."""
    if prediction == "flow":
        return sigma.float()
    return (u.float() * SCHEDULE_STEPS).floor().clamp(0, SCHEDULE_STEPS - 1) / SCHEDULE_STEPS


def huber_threshold(u: torch.Tensor, sigma: torch.Tensor, prediction: str, schedule: str, huber_c: float,
                    huber_scale: float) -> torch.Tensor:
    """c per sample (B,)."""
    if schedule == "constant":
        return torch.full(u.shape, huber_c * huber_scale, dtype=torch.float32, device=u.device)
    if schedule == "exponential":
        return torch.pow(huber_c, timestep_fraction(u, sigma, prediction)) * huber_scale
    if prediction == "flow":
        raise ValueError("huber_schedule 'snr' is defined for eps- and v-prediction models (kohya refuses it for "
                         "SD3 and Flux too); use 'exponential' or 'constant'")
    return (1 - huber_c) / (1 + sigma.float()).pow(2) + huber_c


def elementwise_loss(error: torch.Tensor, loss_type: str, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of each element of ``error`` (B, ...); ``threshold`` (B,) for huber and smooth_l1."""
    if loss_type == "l2":
        return error.pow(2)
    if loss_type == "l1":
        return error.abs()
    c = threshold.to(error.device, error.dtype).view(-1, *([1] * (error.ndim - 1)))
    distance = torch.sqrt(error.pow(2) + c * c) - c
    return 2 * c * distance if loss_type == "huber" else 2 * distance

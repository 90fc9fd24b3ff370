"""The training loop, over any model that speaks the Denoiser protocol.

No ComfyUI in here: the bridge in nodes/ adapts a ComfyUI MODEL to ``Denoiser``; tests use tiny
torch modules. One step, top to bottom: pick a batch from one bucket, draw noise and a uniform
timestep, noise the latents, ask the model for its clean-image estimate, measure the error in the
model's own output parameterization, step AdamW, report.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch

from .examples import EncodedDataset
from .schedules import make_scheduler


class Denoiser(Protocol):
    """What the loop needs from a diffusion model."""

    def training_sigmas(self, u: torch.Tensor) -> torch.Tensor:
        """Uniform u in [0, 1) -> the noise level of a uniformly drawn training timestep."""

    def noisy_latents(self, latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The forward process: clean latents and noise at ``sigma`` -> model input."""

    def denoise(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The model's estimate of the clean latents (differentiable through the adapters)."""

    def output_error_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """s such that (error of the clean estimate) / s = error of the model's raw output.

        The model's output is affine in its clean estimate, so dividing by s puts the loss in the
        model's own parameterization: eps for eps models (s = sigma), v for v models, and so on.
        """


@dataclass
class TrainSettings:
    steps: int
    batch_size: int = 1
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "fp32"      # fp32 | bf16 | fp16 (fp16 uses loss scaling)
    seed: int = 0
    weight_decay: float = 1e-2


@dataclass
class StepReport:
    step: int            # optimizer steps done so far (1-based)
    total: int
    loss: float
    lr: float
    seconds: float       # wall time of this step
    snapshot: Callable[[], "LoopState"] | None = None   # resumable state after this step, built on demand


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, value: float):
        super().__init__(f"the loss became {value} at step {step}")
        self.step = step


@dataclass
class LoopState:
    """Everything needed to resume: optimizer, scheduler and how far we got."""
    step: int
    optimizer: dict | None = None     # None: weights resumed from a plain LoRA file, optimizer starts fresh
    scheduler: dict | None = None


def autocast_for(device: torch.device, mixed_precision: str):
    if mixed_precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def denoising_loss(denoiser: Denoiser, latents: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor,
                   u: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the model's output at the timesteps ``u`` (also used to measure learning)."""
    sigma = denoiser.training_sigmas(u)
    noisy = denoiser.noisy_latents(latents, noise, sigma)
    denoised = denoiser.denoise(noisy, sigma, cond)
    scale = denoiser.output_error_scale(sigma).view(-1, *([1] * (latents.ndim - 1)))
    return ((denoised.float() - latents.float()) / scale.float()).pow(2).mean()


def train(denoiser: Denoiser, data: EncodedDataset, parameters: Iterable[torch.nn.Parameter],
          settings: TrainSettings, device: torch.device,
          on_step: Callable[[StepReport], None] | None = None,
          resume: LoopState | None = None) -> LoopState:
    """Run ``settings.steps`` optimizer steps (counting any resumed ones) and return the loop state.

    ``on_step`` runs after every optimizer step; raising from it (Cancel) stops within one step —
    the caller still holds the adapters and saves what was trained. A NaN/inf loss raises
    NonFiniteLoss before the bad gradients reach the weights.
    """
    parameters = [p for p in parameters if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = make_scheduler(optimizer, settings.lr_schedule, settings.steps, settings.warmup_steps)
    start = 0
    if resume is not None:
        start = resume.step
        if resume.optimizer is not None:
            optimizer.load_state_dict(resume.optimizer)
        if resume.scheduler is not None:
            scheduler.load_state_dict(resume.scheduler)
        else:
            for _ in range(start):
                scheduler.step()
    use_scaler = settings.mixed_precision == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler) if use_scaler else None

    # A private generator for noise, timesteps and batch order: same seed, same run.
    generator = torch.Generator().manual_seed(settings.seed)
    batches = data.batch_plan(settings.batch_size, settings.seed)
    for _ in range(start * settings.gradient_accumulation):  # resume: replay the data order and draws
        indices = next(batches)
        _draw(generator, (len(indices), *data.examples[indices[0]].latent.shape))

    for step in range(start, settings.steps):
        began = time.perf_counter()
        step_loss = 0.0
        for _ in range(settings.gradient_accumulation):
            latents, cond = data.collate(next(batches), device)
            noise, u = _draw(generator, tuple(latents.shape))
            with autocast_for(device, settings.mixed_precision):
                loss = denoising_loss(denoiser, latents, cond, noise.to(device), u.to(device))
            if not math.isfinite(loss.item()):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLoss(step + 1, loss.item())
            scaled = loss / settings.gradient_accumulation
            (scaler.scale(scaled) if scaler else scaled).backward()
            step_loss += loss.item() / settings.gradient_accumulation

        if scaler:
            scaler.unscale_(optimizer)
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if on_step:
            done = step + 1
            on_step(StepReport(done, settings.steps, step_loss, lr, time.perf_counter() - began,
                               snapshot=lambda: LoopState(done, optimizer.state_dict(), scheduler.state_dict())))
    return LoopState(settings.steps, optimizer.state_dict(), scheduler.state_dict())


def _draw(generator: torch.Generator, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    noise = torch.randn(shape, generator=generator)
    u = torch.rand(shape[0], generator=generator)
    return noise, u


@torch.no_grad()
def measure_loss(denoiser: Denoiser, data: EncodedDataset, device: torch.device, seed: int = 1234,
                 draws: int = 4) -> float:
    """Loss over the whole training set at fixed noise and timesteps: the learning proof's yardstick."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for index in range(len(data.examples)):
        for _ in range(draws):
            latents, cond = data.collate([index], device)
            noise, u = _draw(generator, tuple(latents.shape))
            total += denoising_loss(denoiser, latents, cond, noise.to(device), u.to(device)).item()
            count += 1
    return total / max(1, count)

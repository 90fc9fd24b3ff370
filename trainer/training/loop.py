"""The training loop, over any model that speaks the Denoiser protocol.

No ComfyUI in here: the bridge in nodes/ adapts a ComfyUI MODEL to ``Denoiser``; tests use tiny
torch modules. One step, top to bottom: pick a batch from one bucket, draw noise and a uniform
timestep, noise the latents, ask the model for its clean-image estimate, measure the error in the
model's own output parameterization, step AdamW; at an epoch's end, measure the held-out pictures; report.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Protocol

import torch

from ..captions.augment import CaptionAugment, TextEncodingMemo, augment_batch, varies
from ..data.encoded_dataset import EncodedDataset, PictureSize, TextEncoding, as_text_encoding, concat_conds
from ..lora.network import Network
from ..distributed.data_parallel import DataParallel, RunStopped, SingleProcess
from .ema import AdapterEma
from .loss_shapes import elementwise_loss, flow_sigmas, huber_threshold
from .noise import NoiseSettings, draw, loss_weights, weighted_mean
from .optimizers import make_optimizer, param_groups, trainable_parameters
from .schedules import make_scheduler
from .validation import HeldOutLoss

log = logging.getLogger("LoRA Lab")


class Denoiser(Protocol):
    """What the loop needs from a diffusion model."""

    prediction_type: str   # "eps" | "v" | "flow" | ...: which loss weights apply (noise.py); "eps" if absent

    def training_sigmas(self, u: torch.Tensor) -> torch.Tensor:
        """Uniform u in [0, 1) -> the noise level of a uniformly drawn training timestep."""

    def noisy_latents(self, latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The forward process: clean latents and noise at ``sigma`` -> model input."""

    def denoise(self, noisy: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        """The model's estimate of the clean latents (differentiable through the adapters). ``cond`` is
        what ``conditioning`` made, or the concatenated cross-attention states if it has none."""

    def output_error_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """s such that (error of the clean estimate) / s = error of the model's raw output.

        The model's output is affine in its clean estimate, so dividing by s puts the loss in the
        model's own parameterization: eps for eps models (s = sigma), v for v models, and so on.
        """

    # Optional: def conditioning(self, texts: list[TextEncoding], sizes: list[PictureSize], device) -> cond
    # builds the model's conditioning for a batch (pooled output, SDXL's size conditioning).
    # Optional: def grouped_conditioning(self, texts, sizes, device) -> [(positions, cond)], when some
    #           conditionings cannot share a batch


@dataclass
class TrainSettings:
    """Everything a run is trained with: every learning rate and the network reach the optimizer from here."""
    steps: int
    batch_size: int = 1
    learning_rate: float = 1e-4        # the denoiser's (UNet/DiT) adapters
    text_encoder_lr: float | None = None      # None: learning_rate
    text_encoder_2_lr: float | None = None    # SDXL's second text encoder; None: text_encoder_lr
    network: Network = field(default_factory=Network)
    train_text_encoder: bool = False
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "fp32"      # fp32 | bf16 | fp16 (fp16 uses loss scaling)
    loss_scaling: bool = False         # also scale when the model itself computes in fp16
    seed: int = 0
    weight_decay: float = 1e-2
    optimizer: str = "AdamW"
    optimizer_args: dict = field(default_factory=dict)
    lr_cycles: int = 1
    noise: NoiseSettings = field(default_factory=NoiseSettings)
    captions: CaptionAugment = field(default_factory=CaptionAugment)
    validation_pictures: int = 0       # pictures the caller held out (validation.hold_out): measured every epoch

    def text_encoder_rates(self) -> tuple[float, float]:
        """The learning rates of the first and second text encoder."""
        first = float(self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr)
        return first, float(first if self.text_encoder_2_lr is None else self.text_encoder_2_lr)


@dataclass
class StepReport:
    step: int            # optimizer steps done so far (1-based)
    total: int
    loss: float
    lr: float
    seconds: float       # wall time of this step
    snapshot: Callable[[], "LoopState"] | None = None   # resumable state after this step, built on demand
    epoch: int = 0       # whole epochs shown after this step
    validation_loss: float | None = None   # the held-out pictures' loss, when an epoch ended in this step


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, value: float, what: str = "loss"):
        super().__init__(f"the {what} became {value} at step {step}")
        self.step = step


@dataclass
class LoopState:
    """Everything needed to resume: optimizer, scheduler and how far we got."""
    step: int
    optimizer: dict | None = None     # None: weights resumed from a plain LoRA file, optimizer starts fresh
    scheduler: dict | None = None
    scaler: dict | None = None        # fp16 loss scaling
    rng: dict | None = None           # global torch RNG (adapter dropout)
    ema: dict | None = None           # the adapters' moving average (ema.py), when the run keeps one


def autocast_for(device: torch.device, mixed_precision: str):
    if mixed_precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_conditioning(denoiser: Denoiser, texts: list[TextEncoding], sizes: list[PictureSize],
                       device: torch.device):
    """The conditioning of one batch, made by the denoiser when it knows its model's inputs."""
    build = getattr(denoiser, "conditioning", None)
    if build is not None:
        return build(texts, sizes, device)
    return concat_conds([text.cross_attn for text in texts]).to(device)


def conditioning_groups(denoiser: Denoiser, texts: list[TextEncoding], sizes: list[PictureSize],
                        device: torch.device) -> list[tuple[list[int], object]]:
    """The batch's conditioning as (positions, conditioning) groups that each go through the model in
    one pass: one group, unless the denoiser says some conditionings cannot share a batch (SD3/Flux T5
    states of different token lengths)."""
    grouped = getattr(denoiser, "grouped_conditioning", None)
    if grouped is not None and len(texts) > 1:
        return grouped(texts, sizes, device)
    return [(list(range(len(texts))), model_conditioning(denoiser, texts, sizes, device))]


def batch_loss(denoiser: Denoiser, latents: torch.Tensor, texts: list[TextEncoding], sizes: list[PictureSize],
               noise: torch.Tensor, u: torch.Tensor, device: torch.device, settings: "TrainSettings",
               pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's loss. Conditionings that cannot share a batch go through the model in sub-batches,
    each weighted by its share of the batch: the same mean as one pass. ``pixel_weights``: (B,1,h,w) masked-loss
    weights (EncodedDataset.loss_weights), or None."""
    groups = conditioning_groups(denoiser, [text.to(device) for text in texts], sizes, device)
    if len(groups) == 1:                      # the usual case: the batch as it is, in one pass
        with autocast_for(device, settings.mixed_precision):
            return denoising_loss(denoiser, latents, groups[0][1], noise, u, settings.noise, pixel_weights)
    total = torch.zeros((), device=device)
    for group, cond in groups:
        weights = pixel_weights[group] if pixel_weights is not None else None
        with autocast_for(device, settings.mixed_precision):
            part = denoising_loss(denoiser, latents[group], cond, noise[group], u[group], settings.noise, weights)
        total = total + part * (len(group) / len(texts))
    return total


def denoising_loss(denoiser: Denoiser, latents: torch.Tensor, cond, noise: torch.Tensor,
                   u: torch.Tensor, noise_settings: NoiseSettings | None = None,
                   pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The error of the model's output at the timesteps ``u``, mean squared unless ``noise_settings`` shape it
    otherwise (loss_shapes.py; also used to measure learning). ``pixel_weights`` (B,1,h,w) weigh each latent
    pixel's error before the mean (masked loss: the mean stays over all pixels, as kohya's)."""
    settings = noise_settings or NoiseSettings()
    prediction = getattr(denoiser, "prediction_type", "eps")
    shifted = settings.flow_shift > 0 and prediction == "flow"
    sigma = flow_sigmas(u, settings.flow_shift).to(u.device) if shifted else denoiser.training_sigmas(u)
    noisy = denoiser.noisy_latents(latents, noise, sigma)
    denoised = denoiser.denoise(noisy, sigma, cond)
    scale = denoiser.output_error_scale(sigma).view(-1, *([1] * (latents.ndim - 1)))
    error = (denoised.float() - latents.float()) / scale.float()
    threshold = (huber_threshold(u, sigma, prediction, settings.huber_schedule, settings.huber_c, settings.huber_scale)
                 if settings.loss_type in ("huber", "smooth_l1") else None)
    weights = loss_weights(sigma, prediction, settings) if settings.weights_loss else None
    elementwise = elementwise_loss(error, settings.loss_type, threshold)
    if pixel_weights is not None:
        elementwise = elementwise * pixel_weights.to(elementwise.dtype)
    return weighted_mean(elementwise, weights)


def train(denoiser: Denoiser, data: EncodedDataset,
          adapters: Mapping[str, Iterable[torch.nn.Parameter]] | Iterable[torch.nn.Parameter],
          settings: TrainSettings, device: torch.device,
          on_step: Callable[[StepReport], None] | None = None,
          resume: LoopState | None = None,
          encode_caption: Callable[[str], torch.Tensor] | None = None,
          text_encoder_trains: bool = False,
          held_out: EncodedDataset | None = None,
          adapter_dropout: Callable[[bool], object] | None = None,
          ema: AdapterEma | None = None,
          parallel: DataParallel | SingleProcess | None = None) -> LoopState:
    """Run ``settings.steps`` optimizer steps (counting any resumed ones) and return the loop state.

    ``on_step`` runs after every optimizer step; raising from it (Cancel) stops within one step —
    the caller still holds the adapters and saves what was trained. ``adapters``: the trainable weights
    by part ("unet", "text_encoder", "text_encoder_2"), or the UNet's alone; each part learns at its
    rate in ``settings`` (``learning_rate_groups``). With
    ``text_encoder_trains`` every step encodes its captions through ``encode_caption`` with gradients
    (the encoder carries adapters); nothing encoded up front is used. A NaN/inf loss or gradient
    raises NonFiniteLoss before it reaches the weights (with loss scaling, the scaler skips such
    steps itself, as fp16 training expects). ``held_out``: the ``settings.validation_pictures`` pictures
    the caller kept out of ``data`` (validation.hold_out); in every step that ends an epoch their loss is
    measured (``validation_loss``) and reported. ``adapter_dropout(on)`` switches the adapters' dropout,
    which is off while measuring. ``ema``: a moving average of the adapters, updated after every optimizer
    step and carried in the resume state. ``parallel``: this process's part of a run on several
    (distributed.DataParallel: a share of every global batch, DDP over the adapters, one exchange per step);
    None is one process. Held-out pictures are then measured by rank 0 only.
    """
    optimizer = make_optimizer(settings.optimizer, learning_rate_groups(adapters, settings), settings.learning_rate,
                               **{"weight_decay": settings.weight_decay, **settings.optimizer_args})
    parameters = trainable_parameters(optimizer.param_groups)
    parallel = parallel or SingleProcess()
    parallel.attach(parameters)
    scheduler = make_scheduler(optimizer, settings.lr_schedule, settings.steps, settings.warmup_steps,
                               settings.lr_cycles)
    captions_vary = varies(settings.captions)
    if (captions_vary or text_encoder_trains) and encode_caption is None:
        raise ValueError("caption dropout/shuffle and text-encoder training need encode_caption: "
                         "captions are encoded per step")
    # Frozen text encoder: "" and recurring captions are encoded once. (A trained one: call it directly.)
    text_for = TextEncodingMemo(lambda caption: as_text_encoding(encode_caption(caption)).stored())
    scaler = _grad_scaler(device) if settings.mixed_precision == "fp16" or settings.loss_scaling else None
    validation = _held_out_loss(held_out, settings)
    epochs = data.epochs(settings.batch_size, settings.gradient_accumulation)
    start = resume.step if resume is not None else 0
    if resume is not None:
        _restore(resume, optimizer, scheduler, scaler, chosen=("lr", "initial_lr", "weight_decay",
                                                                *settings.optimizer_args))
        if ema is not None and resume.ema is not None:     # else the average starts from the resumed weights
            ema.load_state_dict(resume.ema)

    # A private generator for noise, timesteps and batch order: same seed, same run.
    generator = torch.Generator().manual_seed(settings.seed)
    batches = data.batch_plan(settings.batch_size, settings.seed)
    for _ in range(start * settings.gradient_accumulation):  # resume: replay the data order and draws
        indices = next(batches)
        draw(generator, (len(indices), *data.examples[indices[0]].latent.shape), settings.noise)

    for step in range(start, settings.steps):
        began = time.perf_counter()
        step_loss, non_finite = 0.0, False
        for micro in range(settings.gradient_accumulation):
            indices = next(batches)                 # the global batch: the same on every rank
            noise, u = draw(generator, (len(indices), *data.examples[indices[0]].latent.shape), settings.noise)
            mine = parallel.share(len(indices))     # positions in the global batch this process computes
            # An empty share (more ranks than pictures) runs the first picture at weight 0: every rank must
            # take part in DDP's gradient exchange.
            part = list(mine) or [0]
            weight = parallel.weight(len(mine), len(indices))
            chosen = [indices[p] for p in part]
            latents, texts, sizes = data.collate(chosen, device)
            if captions_vary or text_encoder_trains:
                captions = augment_batch([data.examples[i].caption for i in indices], settings.captions,
                                         settings.seed, step, micro)
                encode = encode_caption if text_encoder_trains else text_for   # a trained encoder keeps its graph
                texts = [as_text_encoding(encode(captions[p])) for p in part]
            with parallel.accumulating(last=micro == settings.gradient_accumulation - 1):
                loss = parallel.forward(lambda: batch_loss(
                    denoiser, latents, texts, sizes, noise[part].to(device), u[part].to(device), device, settings,
                    data.loss_weights(chosen, device)))
                value = loss.item()
                non_finite = non_finite or not math.isfinite(value)
                scaled = loss * weight / settings.gradient_accumulation     # weight 1.0 in one process: exact
                (scaler.scale(scaled) if scaler else scaled).backward()
            step_loss += value * weight / parallel.world / settings.gradient_accumulation

        # One exchange per step decides together: a NaN anywhere stops every rank before the weights change.
        outcome = parallel.step_outcome(step_loss, non_finite)
        if outcome.non_finite:
            optimizer.zero_grad(set_to_none=True)
            where = f" (on rank {', '.join(map(str, outcome.non_finite_ranks))})" if outcome.non_finite_ranks else ""
            raise NonFiniteLoss(step + 1, outcome.loss, what="loss" + where)
        step_loss = outcome.loss
        if scaler:
            scaler.unscale_(optimizer)
        max_norm = settings.max_grad_norm if settings.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        if not math.isfinite(grad_norm) and scaler is None:
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(step + 1, grad_norm, what="gradient norm")
        lr = scheduler.get_last_lr()[0]
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ema is not None:
            ema.update()
        seconds, done = time.perf_counter() - began, step + 1
        epoch, validation_loss = epochs.completed_at(done), None
        if validation and parallel.is_main and epoch > epochs.completed_at(step):     # an epoch ended: measure
            # ...with the weights the saves hold: the moving average, when it replaces them.
            with ema.applied() if ema is not None and ema.saved_instead else contextlib.nullcontext():
                validation_loss = validation_loss_of(denoiser, validation, device, settings, adapter_dropout,
                                                     encode_caption if text_encoder_trains else None)
        if on_step:
            on_step(StepReport(done, settings.steps, step_loss, lr, seconds,
                               snapshot=lambda: _snapshot(done, optimizer, scheduler, scaler, ema),
                               epoch=epoch, validation_loss=validation_loss))
        if outcome.cancel:          # a Cancel that reached any rank: all stop after the same step
            raise RunStopped(done)
    return _snapshot(settings.steps, optimizer, scheduler, scaler, ema)


def _held_out_loss(held_out: EncodedDataset | None, settings: TrainSettings) -> HeldOutLoss | None:
    given = len(held_out.examples) if held_out is not None else 0
    if given != settings.validation_pictures:
        raise ValueError(f"settings.validation_pictures is {settings.validation_pictures}, but {given} held-out "
                         "pictures were given: hold them out with validation.hold_out")
    return HeldOutLoss(held_out, settings.seed, settings.noise) if given else None


@torch.no_grad()
def validation_loss_of(denoiser: Denoiser, validation: HeldOutLoss, device: torch.device, settings: TrainSettings,
                       adapter_dropout: Callable[[bool], object] | None = None,
                       encode_caption: Callable[[str], torch.Tensor] | None = None) -> float:
    """The held-out pictures' loss as training measures it (batch_loss), with the adapters as they are:
    no gradients, no adapter dropout, and the global RNG (adapter dropout's) left as it was."""
    if adapter_dropout:
        adapter_dropout(False)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return validation.measure(
                lambda latents, texts, sizes, noise, u, weights: batch_loss(
                    denoiser, latents, texts, sizes, noise, u, device, settings, weights).item(),
                device, encode_caption)
    finally:
        if adapter_dropout:
            adapter_dropout(True)


ADAPTER_PARTS = ("unet", "text_encoder", "text_encoder_2")


def learning_rate_groups(adapters, settings: TrainSettings) -> list[dict]:
    """The optimizer's parameter groups: each part of the adapters at its learning rate from ``settings``."""
    parts = dict(adapters) if isinstance(adapters, Mapping) else {"unet": adapters}
    unknown = set(parts) - set(ADAPTER_PARTS)
    if unknown:
        raise ValueError(f"adapter parts {sorted(unknown)} are not among {ADAPTER_PARTS}")
    text_encoder_lr, text_encoder_2_lr = settings.text_encoder_rates()
    return param_groups(parts.get("unet", ()), settings.learning_rate, parts.get("text_encoder", ()), text_encoder_lr,
                        parts.get("text_encoder_2", ()), text_encoder_2_lr)


def _grad_scaler(device: torch.device):
    # torch.amp.GradScaler arrived in torch 2.3; ComfyUI installs of early 2024 may have 2.1/2.2.
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler(enabled=device.type == "cuda")


def _snapshot(step, optimizer, scheduler, scaler, ema=None) -> LoopState:
    # The global RNG drives adapter dropout; keeping it makes a resumed run draw the same masks.
    rng = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return LoopState(step, optimizer.state_dict(), scheduler.state_dict(),
                     scaler.state_dict() if scaler else None, rng, ema.state_dict() if ema is not None else None)


def _restore(resume: LoopState, optimizer, scheduler, scaler, chosen: tuple[str, ...]) -> None:
    """The saved optimizer state (moments, step counts) under this run's own settings: the ``chosen``
    hyperparameters of every param group (learning rate, weight decay, optimizer_args) keep the values
    this run was given, as the saved file records them, and the schedule continues from the saved
    step over this run's rates and length."""
    ours = [{key: group[key] for key in chosen if key in group} for group in optimizer.param_groups]
    if resume.optimizer is not None:
        saved = [group.get("initial_lr", group.get("lr")) for group in resume.optimizer.get("param_groups", [])]
        optimizer.load_state_dict(resume.optimizer)
        for group, values in zip(optimizer.param_groups, ours):
            group.update(values)
        now = [values.get("initial_lr", values.get("lr")) for values in ours]
        if saved != now:
            log.warning("[LoRA Lab] resuming with learning rate %s (the save was trained at %s)", now, saved)
    scheduler.last_epoch = resume.step
    for group, base, multiplier in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * multiplier(resume.step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]   # what get_last_lr() reports
    if scaler is not None and resume.scaler:
        scaler.load_state_dict(resume.scaler)
    if resume.rng:
        torch.random.set_rng_state(resume.rng["cpu"])
        if "cuda" in resume.rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume.rng["cuda"])


@torch.no_grad()
def measure_loss(denoiser: Denoiser, data: EncodedDataset, device: torch.device, seed: int = 1234,
                 draws: int = 4) -> float:
    """Loss over the whole training set at fixed noise and timesteps: the learning proof's yardstick."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for index in range(len(data.examples)):
        for _ in range(draws):
            latents, texts, sizes = data.collate([index], device)
            cond = model_conditioning(denoiser, [text.to(device) for text in texts], sizes, device)
            noise, u = draw(generator, tuple(latents.shape), NoiseSettings())
            total += denoising_loss(denoiser, latents, cond, noise.to(device), u.to(device)).item()
            count += 1
    return total / max(1, count)

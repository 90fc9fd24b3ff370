"""Train LoRA: dataset + the MODEL/CLIP/VAE already loaded -> a saved LoRA and the model wearing it."""
from __future__ import annotations

import logging
import math
import os
import time
import weakref

import torch

import comfy.model_management
import comfy.utils

from ..trainer.examples import encode_dataset
from ..trainer.latent_disk_cache import EncodeDatasetCache, LatentDiskCache, describe as describe_cache
from ..trainer.lora import InjectedLora
from ..trainer.lora_file import load_lora_file, save_lora_file
from ..trainer.loop import NonFiniteLoss, StepReport, TrainSettings, train
from ..trainer.loss_plot import loss_curve_image
from ..trainer.optimizers import lr_advice, parse_optimizer_args
from . import comfy_bridge, training_files
from .messages import user_error
from .training_options import OPTIONS_TYPE, TrainingOptions

log = logging.getLogger("LoRA Lab")
NODE = "Train LoRA"
PROGRESS_EVENT = "loralab.train.progress"

# Latents survive across queue runs (per VAE object, keyed by picture content and bucket), so changing
# only the learning rate and queueing again does not re-encode the dataset. Weak keys: a VAE that is
# unloaded takes its latents with it, and a new VAE can never be served another one's latents.
_LATENTS_BY_VAE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LATENT_CACHE_LIMIT = 4096


class LoraLabTrainLora:
    DESCRIPTION = ("Trains a LoRA on the dataset with the MODEL/CLIP/VAE you loaded, saves it to "
                   "models/loras, and outputs MODEL and CLIP wearing it, so the next KSampler samples with it.")
    CATEGORY = "LoRA Lab/Train"
    FUNCTION = "train_lora"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "IMAGE")
    RETURN_NAMES = ("model", "clip", "lora_name", "loss_curve")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "vae": ("VAE",),
                "dataset": ("LORALAB_DATASET",),
                "output_name": ("STRING", {"default": "my_lora", "tooltip":
                                "File name in models/loras (a subfolder like 'mychar/v1' is fine). "
                                "An existing file is kept: a numbered name is used instead."}),
                "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 64, "tooltip":
                               "Training size in pixels; 0 = the model's own (512 for SD1.5, 1024 for SDXL). "
                               "Pictures keep their aspect ratio in buckets of about this area."}),
                "steps": ("INT", {"default": 1500, "min": 1, "max": 1_000_000, "tooltip":
                          "Total optimizer steps (SD1.5 LoRAs usually want 1500-3000). Ignored when epochs > 0."}),
                "epochs": ("INT", {"default": 0, "min": 0, "max": 10_000, "tooltip":
                           "0 = use steps. Otherwise steps = epochs x (images x repeats / batch size)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5,
                                            "round": False}),
                "rank": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip": "network_dim"}),
                "alpha": ("FLOAT", {"default": 8.0, "min": 0.01, "max": 256.0, "step": 0.5, "tooltip":
                          "network_alpha; the LoRA is scaled by alpha / rank."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
            },
            "optional": {
                "trigger_word": ("STRING", {"default": "", "tooltip":
                                 "Stored in the file's metadata; empty = the first tag all captions share."}),
                "options": (OPTIONS_TYPE, {"tooltip": "Advanced settings from a LoRA Lab Training Options node."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train_lora(self, model, clip, vae, dataset, output_name, resolution, steps, epochs, batch_size,
                   learning_rate, rank, alpha, seed, trigger_word="", options=None, unique_id=None):
        options = options or TrainingOptions()
        check_inputs(model, dataset, output_name, rank, alpha)
        resolution = resolution or comfy_bridge.default_resolution(model)
        device = torch.device(model.load_device)
        run = TrainingRun(training_files.free_base_name(output_name, options.overwrite_existing), unique_id,
                          options.save_dtype, options.optimizer)

        with torch.inference_mode(False):   # tensors made in here (resume state too) may take part in autograd
            resume = (training_files.load_resume(options.resume_from, NODE).for_optimizer(options.optimizer)
                      if options.resume_from else None)
            data, run.cache_report = encode_for_training(model, clip, vae, dataset, resolution,
                                                         options.latent_disk_cache)
            per_epoch = data.steps_per_epoch(batch_size, options.gradient_accumulation)
            settings = TrainSettings(
                steps=epochs * per_epoch if epochs > 0 else steps, batch_size=batch_size,
                learning_rate=learning_rate, lr_schedule=options.lr_schedule, warmup_steps=options.warmup_steps,
                gradient_accumulation=options.gradient_accumulation, max_grad_norm=options.max_grad_norm,
                mixed_precision=options.resolved_precision(device), seed=seed,
                # A UNet ComfyUI runs in fp16 gives fp16 gradients whatever we choose: scale them.
                loss_scaling=model.model.get_dtype() == torch.float16,
                optimizer=options.optimizer, optimizer_args=parse_optimizer_args(options.optimizer_args),
                weight_decay=options.weight_decay, lr_cycles=options.lr_cycles, noise=options.noise,
                captions=options.captions)
            check_noise_settings(model, settings)
            describe = training_files.Description(
                output_name=run.output_name, family=comfy_bridge.model_family(model), rank=rank, alpha=alpha,
                resolution=resolution, settings=settings, dataset=dataset, buckets=data.buckets,
                trigger_word=trigger_word or training_files.shared_first_tag(dataset), per_epoch=per_epoch,
                epochs=epochs)
            if resume and resume.step >= settings.steps:
                raise user_error(NODE, "steps", f"'{options.resume_from}' already has {resume.step} steps; "
                                 f"steps is {settings.steps}.", f"set steps above {resume.step} to train further.")
            saved = train_adapters(model, clip, data, settings, options, rank, alpha, seed, device, run, describe,
                                   resume)
            del data
        comfy.model_management.soft_empty_cache()

        tensors, _ = load_lora_file(saved)
        model_out, clip_out = comfy_bridge.apply_lora(model, clip, tensors)
        lora_name = os.path.relpath(saved, training_files.loras_root())
        curve = torch.from_numpy(loss_curve_image(run.losses, title=f"{lora_name} loss")).unsqueeze(0)
        return {"ui": {"text": [run.report(lora_name, describe)], "loss": run.losses[-5000:]},
                "result": (model_out, clip_out, lora_name, curve)}


def encode_for_training(model, clip, vae, dataset, resolution, use_disk_cache: bool):
    """VAE and text encoder run once per picture/caption, with a progress bar and Cancel.

    Latents are looked up in memory (this VAE object, this session), then on disk (any session, keyed
    by picture content, bucket and a fingerprint of the VAE's encoder and the latent format).
    """
    progress = comfy.utils.ProgressBar(len(dataset.items))

    def on_progress(done, total):
        progress.update_absolute(done, total)
        comfy.model_management.throw_exception_if_processing_interrupted()

    memory = _LATENTS_BY_VAE.setdefault(vae, {})
    cache, disk = memory, None
    if use_disk_cache:
        disk = LatentDiskCache(training_files.latent_cache_folder(),
                               comfy_bridge.vae_fingerprint(vae, model, resolution))
        cache = EncodeDatasetCache(disk, memory=memory)
    data = encode_dataset(dataset, resolution, comfy_bridge.pixel_encoder(vae, model),
                          comfy_bridge.caption_encoder(clip), latent_cache=cache,
                          cache_key=f"{resolution}:{comfy_bridge.latent_space_name(model)}", on_progress=on_progress)
    _trim(memory)
    return data, (describe_cache(disk.stats) if disk else "latent disk cache: off")


def check_noise_settings(model, settings):
    kind = comfy_bridge.prediction_type(comfy_bridge.model_sampling(model))
    if settings.noise.min_snr_gamma > 0 and kind not in ("eps", "v"):
        raise user_error(NODE, "options", f"min_snr_gamma applies to eps and v prediction; this model predicts {kind}.",
                         "set min_snr_gamma to 0 in Training Options.")
    advice = lr_advice(settings.optimizer, settings.learning_rate)
    if advice:
        log.warning("[LoRA Lab] %s", advice)


def train_adapters(model, clip, data, settings, options, rank, alpha, seed, device, run, describe, resume):
    """Inject, train, save; whatever happens the shared model comes back as it was."""
    try:
        with comfy_bridge.trainable_unet(model, options.gradient_checkpointing) as network, \
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            lora = InjectedLora(network, comfy_bridge.unet_lora_targets(model), rank=rank, alpha=alpha,
                                dropout=options.dropout, seed=seed, device=device)
            try:
                lora.train(True)
                if resume:
                    lora.load_kohya_state_dict(resume.tensors)
                loop_state = train(comfy_bridge.ComfyDenoiser(model), data, lora.parameters(), settings, device,
                                   on_step=run.step_callback(lora, describe, options),
                                   resume=resume.loop_state if resume else None,
                                   encode_caption=comfy_bridge.caption_encoder(clip))
                return run.save(lora, describe, loop_state, settings.steps, final=True,
                                overwrite=options.overwrite_existing)
            except comfy.model_management.InterruptProcessingException:
                run.save_partial(lora, describe, "cancelled")
                raise
            except NonFiniteLoss as bad:
                run.save_partial(lora, describe, "stopped: the loss was not a number")
                raise user_error(NODE, "learning_rate", f"{bad}. {run.last_save_text()}",
                                 "lower the learning rate, use fp32 or bf16 precision, or check the dataset "
                                 "for broken pictures.") from None
            except Exception as error:
                run.save_partial(lora, describe, f"stopped by an error ({type(error).__name__})")
                raise
            finally:
                lora.remove()
    except comfy_bridge.PartiallyLoaded as too_big:
        raise user_error(NODE, "model", f"{too_big}.", "free VRAM (close other models), lower the resolution or "
                         "batch size, turn on gradient checkpointing, or start ComfyUI with --normalvram.") from None


def check_inputs(model, dataset, output_name, rank, alpha):
    unsupported = comfy_bridge.unsupported_family(model)
    if unsupported:
        raise user_error(NODE, "model", f"{unsupported} models cannot be trained yet; "
                         f"LoRA Lab trains SD1.x and SD2.x models.", "load an SD1.5 or SD2.x checkpoint.")
    if dataset is None or not getattr(dataset, "items", None):
        raise user_error(NODE, "dataset", "the dataset has no pictures.",
                         "check the folder in the dataset node and its report.")
    if not str(output_name).strip():
        raise user_error(NODE, "output_name", "the name is empty.", "type a name such as 'my_lora'.")
    training_files.check_output_name(output_name, NODE)
    if alpha > rank * 4:
        log.warning("[LoRA Lab] alpha %.3g is more than 4x rank %d: the LoRA will be very strong", alpha, rank)


def _trim(cache: dict):
    while len(cache) > _LATENT_CACHE_LIMIT:
        cache.pop(next(iter(cache)))


class TrainingRun:
    """Progress, events, saves and the report of one training run."""

    def __init__(self, output_name: str, unique_id, save_dtype: torch.dtype, optimizer_name: str):
        self.output_name, self.unique_id, self.save_dtype = output_name, unique_id, save_dtype
        self.optimizer_name = optimizer_name
        self.losses: list[float] = []
        self.step = 0
        self.started_at = time.time()
        self.saves: list[str] = []
        self.progress = None
        self.snapshot = None      # the loop's resumable state after the last finished step
        self.saved_step = 0
        self.cache_report = ""

    def step_callback(self, lora, describe, options):
        def on_step(report: StepReport):
            self.step = report.step
            self.snapshot = report.snapshot
            self.losses.append(report.loss)
            if self.progress is None:
                self.progress = comfy.utils.ProgressBar(report.total)
            self.progress.update_absolute(report.step, report.total)
            self.send_event(report)
            if options.save_every_n_steps and report.step % options.save_every_n_steps == 0 \
                    and report.step < report.total:
                self.save(lora, describe, report.snapshot(), report.step, final=False, overwrite=True)
            # Cancel: ComfyUI's own check, so it works with or without a progress hook installed.
            comfy.model_management.throw_exception_if_processing_interrupted()
        return on_step

    def send_event(self, report: StepReport):
        try:
            from server import PromptServer
        except ImportError:
            return
        server = getattr(PromptServer, "instance", None)
        if server is None:
            return
        remaining = (report.total - report.step) * report.seconds
        server.send_sync(PROGRESS_EVENT, {
            "node": self.unique_id, "step": report.step, "total": report.total, "loss": report.loss,
            "lr": report.lr, "seconds_per_step": report.seconds, "eta_seconds": remaining,
        }, getattr(server, "client_id", None))

    def save(self, lora, describe, loop_state, step, final, overwrite):
        name = self.output_name if final else f"{self.output_name}_step{step}"
        metadata = describe.metadata(step=step, started_at=self.started_at, finished_at=time.time())
        path = save_lora_file(training_files.loras_root(), name, lora.kohya_state_dict(), metadata,
                              overwrite=overwrite, dtype=self.save_dtype)
        training_files.save_resume_state(path, lora, loop_state, step, self.optimizer_name)
        self.saves.append(str(path))
        self.saved_step = step
        log.info("[LoRA Lab] saved %s (step %d)", path, step)
        return path

    def save_partial(self, lora, describe, why):
        if self.step == 0:
            log.warning("[LoRA Lab] training %s before the first step finished; nothing to save", why)
            return None
        if self.saves and self.saved_step == self.step:   # a periodic save already holds this very step
            log.warning("[LoRA Lab] training %s at step %d; what was trained is saved as %s", why, self.step,
                        self.saves[-1])
            return self.saves[-1]
        path = self.save(lora, describe, self.snapshot() if self.snapshot else None, self.step,
                         final=False, overwrite=False)
        log.warning("[LoRA Lab] training %s at step %d; what was trained is saved as %s", why, self.step, path)
        try:
            from server import PromptServer
            if getattr(PromptServer, "instance", None):
                PromptServer.instance.send_sync("loralab.train.stopped", {
                    "node": self.unique_id, "step": self.step, "reason": why, "saved": str(path)},
                    getattr(PromptServer.instance, "client_id", None))
        except ImportError:
            pass
        return path

    def last_save_text(self) -> str:
        return f"The last good save is {self.saves[-1]}." if self.saves else "Nothing was saved."

    def report(self, lora_name, describe) -> str:
        elapsed = time.time() - self.started_at
        finite = [v for v in self.losses if math.isfinite(v)]
        lines = [f"Saved {lora_name} in {training_files.loras_root()}",
                 f"{len(self.losses)} steps in {elapsed:.0f}s; loss {finite[0]:.4f} -> {finite[-1]:.4f}"
                 if finite else "no steps", describe.arithmetic(), self.cache_report]
        return "\n".join(lines)


NODE_CLASS_MAPPINGS = {"LoraLabTrainLora": LoraLabTrainLora}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraLabTrainLora": "Train LoRA (LoRA Lab)"}

"""Training Options: the advanced settings, kept off the main Train LoRA node so it stays simple."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

import folder_paths

from ..trainer.captions.augment import CaptionAugment
from ..trainer.lora.files import PICKLE_SUFFIXES
from ..trainer.training.schedules import SCHEDULES
from ..trainer.lora.network import PRESETS as NETWORK_PRESETS, Network
from ..trainer.training.noise import NoiseSettings
from ..trainer.training.optimizers import OPTIMIZERS, parse_optimizer_args, unavailable_reason
from . import folders
from .messages import user_error, validation_message
from .training_previews import PreviewSettings

OPTIONS_TYPE = "LORALAB_TRAINING_OPTIONS"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NODE = "Training Options"
NO_RESUME = "none"        # resume_from's first choice; "" (a text box's empty value) means the same
LOG = logging.getLogger("lora_lab.training_options")


def resume_choices() -> list[str]:
    """resume_from's list: "none", then every LoRA in the loras folders that has a resume state."""
    try:
        return [NO_RESUME, *folders.resume_points()]
    except Exception as failed:      # an unreadable folder must not break the node list of the whole front end
        LOG.warning("[LoRA Lab] could not list the resume points (%s: %s)", type(failed).__name__, failed)
        return [NO_RESUME]


def is_no_resume(value) -> bool:
    return not value or not str(value).strip() or str(value).strip() == NO_RESUME


@dataclass(frozen=True)
class TrainingOptions:
    """Defaults are what a kohya_ss user expects for an SD1.5 LoRA."""
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    precision: str = "auto"
    dropout: float = 0.0
    save_every_n_steps: int = 0
    save_precision: str = "fp16"
    overwrite_existing: bool = False
    resume_from: str = ""
    # kohya-style extras (all optional inputs, so older prompts still validate)
    optimizer: str = "AdamW"
    optimizer_args: str = ""
    weight_decay: float = 0.01
    lr_cycles: int = 1
    noise_offset: float = 0.0
    min_timestep: int = 0
    max_timestep: int = 1000
    min_snr_gamma: float = 0.0
    scale_v_pred_loss: bool = False
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 1
    tag_dropout: float = 0.0
    latent_disk_cache: bool = True
    network_preset: str = "kohya default"
    conv_rank: int = 0
    conv_alpha: float = 0.0
    keep_last_saves: int = 0
    train_text_encoder: bool = False
    text_encoder_lr: float = 5e-5
    preview_every_n_steps: int = 0
    preview_prompts: str = PreviewSettings.prompts
    preview_seed: int = PreviewSettings.seed
    preview_steps: int = PreviewSettings.steps
    preview_cfg: float = PreviewSettings.cfg
    text_encoder_2_lr: float = 0.0
    save_every_n_epochs: int = 0

    @property
    def previews(self) -> PreviewSettings:
        return PreviewSettings(every_n_steps=self.preview_every_n_steps, prompts=self.preview_prompts,
                               seed=self.preview_seed, steps=self.preview_steps, cfg=self.preview_cfg)

    def network(self, rank: int = 16, alpha: float = 8.0) -> Network:
        """The network Train LoRA trains: its rank and alpha, with these options' layers, convs and dropout."""
        return Network(rank=rank, alpha=alpha, preset=self.network_preset, dropout=self.dropout,
                       conv_rank=self.conv_rank, conv_alpha=self.conv_alpha)

    @property
    def noise(self) -> NoiseSettings:
        return NoiseSettings.from_kohya_timesteps(
            self.min_timestep, self.max_timestep, noise_offset=self.noise_offset,
            min_snr_gamma=self.min_snr_gamma, scale_v_pred_loss=self.scale_v_pred_loss)

    @property
    def captions(self) -> CaptionAugment:
        return CaptionAugment(caption_dropout=self.caption_dropout, shuffle_tags=self.shuffle_tags,
                              keep_tokens=self.keep_tokens, tag_dropout=self.tag_dropout)

    @property
    def save_dtype(self) -> torch.dtype:
        return SAVE_DTYPES[self.save_precision]

    def resolved_precision(self, device: torch.device) -> str:
        """auto: bf16 on GPUs that have it, else fp16 with loss scaling; fp32 on the CPU."""
        if self.precision != "auto":
            return self.precision
        if device.type == "cuda":
            # Native bf16 needs Ampere or newer; older cards only emulate it (slowly).
            return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
        return "fp32"


class LoraLabTrainingOptions:
    DESCRIPTION = "Advanced settings for Train LoRA: schedule, accumulation, precision, periodic saves, resume."
    CATEGORY = "LoRA Lab/Train"
    FUNCTION = "build"
    RETURN_TYPES = (OPTIONS_TYPE,)
    RETURN_NAMES = ("options",)

    @classmethod
    def INPUT_TYPES(cls):
        d = TrainingOptions()
        return {
            "required": {
                "lr_schedule": (list(SCHEDULES), {"default": d.lr_schedule, "tooltip":
                                "How the learning rate moves over the run: constant (flat, no warm-up), "
                                "constant_with_warmup, linear or cosine (down to 0 at the last step), "
                                "cosine_with_restarts (lr_cycles times)."}),
                "warmup_steps": ("INT", {"default": d.warmup_steps, "min": 0, "max": 100_000, "tooltip":
                                 "Optimizer steps over which the learning rate rises to full. Used by "
                                 f"{', '.join(name for name in SCHEDULES if name != 'constant')}; constant "
                                 "ignores it (use constant_with_warmup). 0 = off."}),
                "gradient_accumulation": ("INT", {"default": d.gradient_accumulation, "min": 1, "max": 256,
                                                  "tooltip": "Batches per optimizer step (a bigger batch without the memory)."}),
                "max_grad_norm": ("FLOAT", {"default": d.max_grad_norm, "min": 0.0, "max": 100.0, "step": 0.1,
                                            "tooltip": "Clip gradients to this norm; 0 = off."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": d.gradient_checkpointing,
                                                       "tooltip": "Less memory, about 30% slower."}),
                "precision": (list(PRECISIONS), {"default": d.precision, "tooltip":
                              "auto = bf16 (or fp16 with loss scaling) on a GPU, fp32 on the CPU. With bf16/fp16 "
                              "the frozen model weights train in that precision too (less memory); your loaded "
                              "model gets its exact weights back afterwards."}),
                "dropout": ("FLOAT", {"default": d.dropout, "min": 0.0, "max": 0.9, "step": 0.05, "tooltip":
                            "network_dropout: dropout on the LoRA layers' input while training; 0 = off."}),
                "save_every_n_steps": ("INT", {"default": d.save_every_n_steps, "min": 0, "max": 1_000_000,
                                               "tooltip": "Also save <name>_step<N> every N steps; 0 = only at the end."}),
                "save_precision": (list(SAVE_DTYPES), {"default": d.save_precision, "tooltip":
                                   "Precision of the saved file; fp16 is what kohya and Civitai use."}),
                "overwrite_existing": ("BOOLEAN", {"default": d.overwrite_existing, "tooltip":
                                       "Off: an existing LoRA of that name is kept and a numbered name is used."}),
                "resume_from": (resume_choices(), {"default": NO_RESUME, "tooltip":
                                "A LoRA Lab save to continue exactly (weights, optimizer, schedule, step count); "
                                "the list holds every LoRA in models/loras with a resume state and refreshes with "
                                "the node definitions (R). steps on Train LoRA is then the new total."}),
            },
            "optional": {
                "optimizer": (list(OPTIMIZERS), {"default": d.optimizer, "tooltip":
                              "AdamW8bit needs bitsandbytes, Prodigy needs prodigyopt (use lr 1.0 with Prodigy)."}),
                "optimizer_args": ("STRING", {"default": d.optimizer_args, "tooltip":
                                   "kohya-style extra arguments, e.g. 'd_coef=2 decouple=True'."}),
                "weight_decay": ("FLOAT", {"default": d.weight_decay, "min": 0.0, "max": 1.0, "step": 0.001}),
                "lr_cycles": ("INT", {"default": d.lr_cycles, "min": 1, "max": 100,
                                      "tooltip": "Restarts for cosine_with_restarts."}),
                "noise_offset": ("FLOAT", {"default": d.noise_offset, "min": 0.0, "max": 1.0, "step": 0.01,
                                           "tooltip": "0.05-0.1 helps very dark and very bright pictures; 0 = off."}),
                "min_timestep": ("INT", {"default": d.min_timestep, "min": 0, "max": 999}),
                "max_timestep": ("INT", {"default": d.max_timestep, "min": 1, "max": 1000}),
                "min_snr_gamma": ("FLOAT", {"default": d.min_snr_gamma, "min": 0.0, "max": 20.0, "step": 0.5,
                                            "tooltip": "5 is typical; 0 = off."}),
                "scale_v_pred_loss": ("BOOLEAN", {"default": d.scale_v_pred_loss}),
                "caption_dropout": ("FLOAT", {"default": d.caption_dropout, "min": 0.0, "max": 1.0, "step": 0.05}),
                "shuffle_tags": ("BOOLEAN", {"default": d.shuffle_tags}),
                "keep_tokens": ("INT", {"default": d.keep_tokens, "min": 0, "max": 32, "tooltip":
                                "Tags kept in place when shuffling (1 keeps the trigger word first)."}),
                "tag_dropout": ("FLOAT", {"default": d.tag_dropout, "min": 0.0, "max": 1.0, "step": 0.05}),
                "latent_disk_cache": ("BOOLEAN", {"default": d.latent_disk_cache, "tooltip":
                                      "Keep VAE latents on disk (user/loralab/latent-cache), so a second run "
                                      "on the same pictures skips encoding."}),
                "network_preset": (list(NETWORK_PRESETS), {"default": d.network_preset, "tooltip":
                                   "Which layers learn. kohya default: attention, feed-forward and proj_in/out of "
                                   "the transformer blocks. attention only: to_q/k/v/out (smaller, gentler). "
                                   "LoCon (+conv): also the ResBlock and down/upsample convolutions (more detail "
                                   "and style, bigger file). SD3/Flux: kohya default = every Linear of the "
                                   "transformer blocks; attention only = attention qkv/proj (Flux single blocks' "
                                   "fused linear1/linear2 whole); LoCon = kohya default (no convolutions)."}),
                "conv_rank": ("INT", {"default": d.conv_rank, "min": 0, "max": 256, "tooltip":
                              "LoCon: rank of the 3x3 convolutions (kohya conv_dim); 0 = same as rank."}),
                "conv_alpha": ("FLOAT", {"default": d.conv_alpha, "min": 0.0, "max": 256.0, "step": 0.5, "tooltip":
                               "LoCon: alpha of the 3x3 convolutions (kohya conv_alpha); 0 = same as alpha."}),
                "keep_last_saves": ("INT", {"default": d.keep_last_saves, "min": 0, "max": 10_000, "tooltip":
                                    "Keep only the newest K periodic <name>_step<N> saves of this run (older ones "
                                    "of this run are deleted; the final file is always kept); 0 = keep all."}),
                "train_text_encoder": ("BOOLEAN", {"default": d.train_text_encoder, "tooltip":
                                       "Also train a LoRA on the text encoder (CLIP). Captions are then encoded "
                                       "every step: slower, and stronger prompt binding."}),
                "text_encoder_lr": ("FLOAT", {"default": d.text_encoder_lr, "min": 0.0, "max": 1.0, "step": 1e-5,
                                    "round": False, "tooltip":
                                    "Learning rate of the text-encoder LoRA (kohya text_encoder_lr); usually "
                                    "a half to a tenth of the UNet's; 0 = the same as learning_rate."}),
                "preview_every_n_steps": ("INT", {"default": d.preview_every_n_steps, "min": 0, "max": 1_000_000,
                                          "tooltip": "Render the preview prompts with the LoRA as it trains every N "
                                          "steps, shown on Train LoRA as they arrive; 0 = off."}),
                # dynamicPrompts off: the front ends would otherwise read {trigger} as a {a|b} choice.
                "preview_prompts": ("STRING", {"default": d.preview_prompts, "multiline": True,
                                    "dynamicPrompts": False, "tooltip":
                                    "One prompt per line; {trigger} becomes the run's trigger word."}),
                "preview_seed": ("INT", {"default": d.preview_seed, "min": 0, "max": 0xFFFFFFFF, "tooltip":
                                 "The same seed every time, so previews show what the LoRA learned."}),
                "preview_steps": ("INT", {"default": d.preview_steps, "min": 1, "max": 150}),
                "preview_cfg": ("FLOAT", {"default": d.preview_cfg, "min": 0.0, "max": 30.0, "step": 0.5, "tooltip":
                                "Classifier-free guidance of the previews. Flux.1 (guidance-distilled) previews "
                                "are sampled at cfg 1 whatever this says."}),
                # Added after the first release: kept last so saved workflows keep their widget values.
                "text_encoder_2_lr": ("FLOAT", {"default": d.text_encoder_2_lr, "min": 0.0, "max": 1.0, "step": 1e-5,
                                      "round": False, "tooltip":
                                      "SDXL only: learning rate of the second text encoder (OpenCLIP bigG, "
                                      "lora_te2_); 0 = the same as text_encoder_lr."}),
                "save_every_n_epochs": ("INT", {"default": d.save_every_n_epochs, "min": 0, "max": 10_000, "tooltip":
                                        "Also save <name>_epoch<E> at the end of every N epochs (epochs = pictures x "
                                        "repeats / batch size steps); 0 = off. Works with save_every_n_steps."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, resume_from="", optimizer="AdamW", optimizer_args=""):
        # Naming an input here makes ComfyUI skip its own check of that input: check the combo too.
        if optimizer not in OPTIMIZERS:
            return validation_message(NODE, "optimizer", f"'{optimizer}' is not an optimizer LoRA Lab knows.",
                                      f"choose one of {', '.join(OPTIMIZERS)}.")
        reason = unavailable_reason(optimizer)
        if reason:
            return validation_message(NODE, "optimizer", reason, "install it, or choose AdamW.")
        try:
            parse_optimizer_args(optimizer_args or "")
        except ValueError as bad:
            return validation_message(NODE, "optimizer_args", str(bad), "write pairs like 'd_coef=2 decouple=True'.")
        # resume_from is named here, so ComfyUI leaves its list check to this method: "" (saved by versions
        # where resume_from was a text box) must keep meaning "none".
        problem = None if is_no_resume(resume_from) else _resume_problem(resume_from.strip())
        if problem:
            return validation_message(NODE, "resume_from", *problem)
        return True

    def build(self, **values):
        resume_from = values.get("resume_from", "")
        values["resume_from"] = "" if is_no_resume(resume_from) else resume_from.strip()
        # Checked again here: ComfyUI 2024-03 validates only nodes reached through required inputs, and this
        # node feeds Train LoRA's optional one, so VALIDATE_INPUTS never runs for it there.
        problem = _resume_problem(values["resume_from"]) if values["resume_from"] else None
        if problem:
            raise user_error(NODE, "resume_from", *problem)
        options = TrainingOptions(**values)
        try:
            options.noise            # validates the timestep range and the other noise settings
            options.network()        # validates the preset, dropout and conv rank/alpha
            parse_optimizer_args(options.optimizer_args)
        except ValueError as bad:
            raise user_error(NODE, None, str(bad), "check min_timestep < max_timestep, the optimizer_args and "
                             "the network_preset.")
        return (options,)


def _resume_problem(name: str) -> tuple[str, str] | None:
    """None for a resume point on the list, else (why it is not one, what to do)."""
    suffix = os.path.splitext(name)[1].lower()
    pick = f"pick a save from the list (refresh it with R after training), or '{NO_RESUME}' to start fresh."
    if suffix != ".safetensors":
        return (f"'{name}' is not a .safetensors save" + (" (a Python pickle, which can run code when loaded)"
                                                          if suffix in PICKLE_SUFFIXES else "") + ".", pick)
    if name in resume_choices():
        return None
    if folder_paths.get_full_path("loras", name) is None:
        return f"'{name}' is not in any loras folder (any more).", pick
    return (f"'{name}' has no resume state (LoRA Lab keeps one for each save it writes, under "
            f"user/loralab/train-state/), so it cannot be continued where it stopped.", pick)


NODE_CLASS_MAPPINGS = {"LoraLabTrainingOptions": LoraLabTrainingOptions}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraLabTrainingOptions": "Training Options (LoRA Lab)"}

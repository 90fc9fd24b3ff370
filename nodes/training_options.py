"""The training options: the advanced settings, kept off the main Train LoRA node so it stays simple.

They come in groups, each set by a small option node (option_nodes.py) that takes the options so far and
returns them with its group set, the way SamplerCustomAdvanced takes small nodes. A group no node set keeps
its defaults, or the values of Train LoRA's preset."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import torch

import folder_paths

from ..trainer.captions.augment import CaptionAugment
from ..trainer.lora.files import PICKLE_SUFFIXES
from ..trainer.lora.network import Network
from ..trainer.training.noise import NoiseSettings
from ..trainer.training.optimizers import OPTIMIZERS, parse_optimizer_args, unavailable_reason
from . import folders
from .messages import user_error
from .training_previews import PreviewSettings

OPTIONS_TYPE = "LORALAB_TRAINING_OPTIONS"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
EMA_WEIGHTS = ("replace", "beside")
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
    validation_pictures: int = 0       # pictures held out of training to measure a validation loss per epoch
    fp8_base: bool = False             # the frozen model's Linear weights in fp8 (trainer/training/fp8_base.py)
    blocks_to_swap: int = 0            # blocks whose frozen weights wait in CPU memory (trainer/training/block_swap.py)
    # The loss's shape and the timesteps' spread (trainer/training/loss_shapes.py), and Flux's guidance input:
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float = 0.0
    flux_guidance: float = 3.5         # ComfyUI's Flux default; kohya's --guidance_scale (its recipes: 1.0)
    ema_decay: float = 0.0             # a moving average of the adapters (trainer/training/ema.py); 0 = off
    ema_weights: str = "replace"       # replace: saves hold the average; beside: also <name>_ema, saves raw
    network_type: str = "LoRA"         # LoRA, DoRA, LoHa or LoKr (trainer/lora/network_types.py)
    lokr_factor: int = -1
    masked_loss: bool = False          # weigh the loss by each picture's mask (trainer/data/loss_masks.py)
    unmasked_weight: float = 0.1       # OneTrainer's: what the loss outside a mask still counts
    prior_loss_weight: float = 1.0     # kohya's: the regularization pictures' loss (trainer/data/regularization.py)
    # The groups an option node set (GROUPS' keys); the others are Train LoRA's preset's to fill.
    groups_set: frozenset = field(default=frozenset())

    def with_group(self, group: str, values: dict) -> "TrainingOptions":
        """These options with one group's values set by its node (a later node of the same group wins)."""
        unknown = set(values) - set(GROUPS[group])
        if unknown:
            raise TypeError(f"{sorted(unknown)} are not options of the {group} group")
        return replace(self, **values, groups_set=self.groups_set | {group})

    def with_defaults_from(self, chosen: dict) -> tuple["TrainingOptions", dict]:
        """These options with `chosen` values (a preset's) for the groups no node set, and which applied."""
        applied = {name: value for name, value in chosen.items() if GROUP_OF[name] not in self.groups_set}
        return replace(self, **applied), applied

    @property
    def previews(self) -> PreviewSettings:
        return PreviewSettings(every_n_steps=self.preview_every_n_steps, prompts=self.preview_prompts,
                               seed=self.preview_seed, steps=self.preview_steps, cfg=self.preview_cfg)

    def network(self, rank: int = 16, alpha: float = 8.0) -> Network:
        """The network Train LoRA trains: its rank and alpha, with these options' layers, convs and dropout."""
        return Network(rank=rank, alpha=alpha, preset=self.network_preset, dropout=self.dropout,
                       conv_rank=self.conv_rank, conv_alpha=self.conv_alpha, network_type=self.network_type,
                       lokr_factor=self.lokr_factor)

    @property
    def noise(self) -> NoiseSettings:
        return NoiseSettings.from_kohya_timesteps(
            self.min_timestep, self.max_timestep, noise_offset=self.noise_offset,
            min_snr_gamma=self.min_snr_gamma, scale_v_pred_loss=self.scale_v_pred_loss, loss_type=self.loss_type,
            huber_schedule=self.huber_schedule, huber_c=self.huber_c, huber_scale=self.huber_scale,
            timestep_sampling=self.timestep_sampling, logit_mean=self.logit_mean, logit_std=self.logit_std,
            flow_shift=self.flow_shift)

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


# Each group's options, set together by one option node (option_nodes.py). Train LoRA's preset fills
# the groups no option node set.
GROUPS = {
    "optimizer": ("optimizer", "optimizer_args", "weight_decay", "lr_schedule", "warmup_steps", "lr_cycles",
                  "gradient_accumulation", "max_grad_norm"),
    "network": ("network_preset", "conv_rank", "conv_alpha", "dropout", "train_text_encoder", "text_encoder_lr",
                "text_encoder_2_lr", "network_type", "lokr_factor"),
    # Inputs added after a group's first release come last: saved workflows map widget values by position.
    "noise": ("noise_offset", "min_timestep", "max_timestep", "min_snr_gamma", "scale_v_pred_loss", "loss_type",
              "huber_schedule", "huber_c", "huber_scale", "timestep_sampling", "logit_mean", "logit_std", "flow_shift",
              "flux_guidance", "masked_loss", "unmasked_weight", "prior_loss_weight"),
    "captions": ("caption_dropout", "shuffle_tags", "keep_tokens", "tag_dropout"),
    "saves": ("save_every_n_steps", "save_every_n_epochs", "keep_last_saves", "save_precision", "overwrite_existing",
              "resume_from", "ema_decay", "ema_weights"),
    "previews": ("preview_every_n_steps", "preview_prompts", "preview_seed", "preview_steps", "preview_cfg",
                 "validation_pictures"),
    "memory": ("precision", "gradient_checkpointing", "latent_disk_cache", "fp8_base", "blocks_to_swap"),
}
GROUP_OF = {name: group for group, names in GROUPS.items() for name in names}


def checked(options: TrainingOptions, node: str) -> TrainingOptions:
    """The options, or a message naming `node` for values that cannot train (run when each node builds)."""
    problem = _resume_problem(options.resume_from) if options.resume_from else None
    if problem:
        raise user_error(node, "resume_from", *problem)
    if not 0.0 <= options.ema_decay < 1.0:
        raise user_error(node, "ema_decay", f"ema_decay is {options.ema_decay}; a moving average needs a decay "
                         "from 0 to below 1.", "use 0.99-0.9999, or 0 to keep no average.")
    if not 0.0 <= options.unmasked_weight < 1.0:
        raise user_error(node, "unmasked_weight", f"unmasked_weight is {options.unmasked_weight}; it must be from 0 "
                         "(outside a mask counts nothing) to below 1 (1 would be no mask).",
                         "use 0.1 (OneTrainer's default), or 0 to learn only inside the masks.")
    if not options.prior_loss_weight > 0.0:
        raise user_error(node, "prior_loss_weight", f"prior_loss_weight is {options.prior_loss_weight}; the "
                         "regularization pictures' loss needs a weight above 0.",
                         "use 1.0 (kohya's default), or disconnect Train LoRA's regularization input instead.")
    if options.ema_weights not in EMA_WEIGHTS:
        raise user_error(node, "ema_weights", f"ema_weights is {options.ema_weights!r}.",
                         f"choose one of {', '.join(EMA_WEIGHTS)}.")
    try:
        options.noise            # validates the timestep range and the other noise settings
        options.network()        # validates the preset, type, dropout and conv rank/alpha
        parse_optimizer_args(options.optimizer_args)
    except ValueError as bad:
        raise user_error(node, None, str(bad), "check min_timestep < max_timestep, the loss and timestep "
                         "settings, the optimizer_args, and the network_preset, network_type and "
                         "dropout.") from None
    return options


def optimizer_problem(optimizer: str, optimizer_args: str) -> tuple[str, str, str] | None:
    """(input, problem, fix) for an optimizer choice that cannot run here, else None."""
    if optimizer not in OPTIMIZERS:
        return ("optimizer", f"'{optimizer}' is not an optimizer LoRA Lab knows.",
                f"choose one of {', '.join(OPTIMIZERS)}.")
    reason = unavailable_reason(optimizer)
    if reason:
        return "optimizer", reason, "install it, or choose AdamW."
    try:
        parse_optimizer_args(optimizer_args or "")
    except ValueError as bad:
        return "optimizer_args", str(bad), "write pairs like 'd_coef=2 decouple=True'."
    return None


def resume_problem(resume_from) -> tuple[str, str] | None:
    """resume_from's check; "" (saved by versions where resume_from was a text box) means none."""
    return None if is_no_resume(resume_from) else _resume_problem(str(resume_from).strip())


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


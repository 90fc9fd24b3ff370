"""Training Options: the advanced settings, kept off the main Train LoRA node so it stays simple."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import folder_paths

from ..trainer.schedules import SCHEDULES
from .messages import validation_message

OPTIONS_TYPE = "LORALAB_TRAINING_OPTIONS"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NODE = "Training Options"


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

    @property
    def save_dtype(self) -> torch.dtype:
        return SAVE_DTYPES[self.save_precision]

    def resolved_precision(self, device: torch.device) -> str:
        """auto: bf16 on GPUs that have it, else fp16 with loss scaling; fp32 on the CPU."""
        if self.precision != "auto":
            return self.precision
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
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
                "lr_schedule": (list(SCHEDULES), {"default": d.lr_schedule}),
                "warmup_steps": ("INT", {"default": d.warmup_steps, "min": 0, "max": 100_000}),
                "gradient_accumulation": ("INT", {"default": d.gradient_accumulation, "min": 1, "max": 256,
                                                  "tooltip": "Batches per optimizer step (a bigger batch without the memory)."}),
                "max_grad_norm": ("FLOAT", {"default": d.max_grad_norm, "min": 0.0, "max": 100.0, "step": 0.1,
                                            "tooltip": "Clip gradients to this norm; 0 = off."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": d.gradient_checkpointing,
                                                       "tooltip": "Less memory, about 30% slower."}),
                "precision": (list(PRECISIONS), {"default": d.precision, "tooltip":
                              "auto = bf16 (or fp16 with loss scaling) on a GPU, fp32 on the CPU."}),
                "dropout": ("FLOAT", {"default": d.dropout, "min": 0.0, "max": 0.9, "step": 0.05}),
                "save_every_n_steps": ("INT", {"default": d.save_every_n_steps, "min": 0, "max": 1_000_000,
                                               "tooltip": "Also save <name>_step<N> every N steps; 0 = only at the end."}),
                "save_precision": (list(SAVE_DTYPES), {"default": d.save_precision, "tooltip":
                                   "Precision of the saved file; fp16 is what kohya and Civitai use."}),
                "overwrite_existing": ("BOOLEAN", {"default": d.overwrite_existing, "tooltip":
                                       "Off: an existing LoRA of that name is kept and a numbered name is used."}),
                "resume_from": ("STRING", {"default": d.resume_from, "tooltip":
                                "A LoRA Lab save in models/loras (e.g. 'my_lora_step500.safetensors') to continue; "
                                "steps on Train LoRA is then the new total."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, resume_from=""):
        if resume_from and resume_from.strip():
            if folder_paths.get_full_path("loras", resume_from.strip()) is None:
                return validation_message(NODE, "resume_from", f"'{resume_from}' is not in any loras folder.",
                                          "use a name exactly as the LoRA loaders list it, or leave it empty.")
        return True

    def build(self, **values):
        values["resume_from"] = values.get("resume_from", "").strip()
        return (TrainingOptions(**values),)


NODE_CLASS_MAPPINGS = {"LoraLabTrainingOptions": LoraLabTrainingOptions}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraLabTrainingOptions": "Training Options (LoRA Lab)"}

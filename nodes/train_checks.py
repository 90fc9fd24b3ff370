"""What Train LoRA refuses before any work, each with the input to change and how."""
from __future__ import annotations

import logging

import torch

from ..trainer.training.optimizers import OptimizerUnavailable, make_optimizer, parse_optimizer_args
from . import comfy_bridge, folders
from .messages import user_error

log = logging.getLogger("LoRA Lab")
NODE = "Train LoRA"        # how Train LoRA's messages name it (train.py, train_adapters.py)


FLOW_FAMILY_NAMES = {"sd3": "SD3", "flux1": "Flux.1"}


def check_inputs(model, dataset, output_name, rank, alpha, options=None):
    unsupported = comfy_bridge.unsupported_family(model)
    if unsupported:
        raise user_error(NODE, "model", f"{unsupported} models cannot be trained yet; "
                         f"LoRA Lab trains SD1.x, SD2.x, SDXL, SD3 and Flux.1 (dev, schnell) models.",
                         "load an SD1.5, SD2.x, SDXL, SD3 or Flux.1 base checkpoint.")
    family = comfy_bridge.model_family(model)
    if options is not None and options.train_text_encoder and family in FLOW_FAMILY_NAMES:
        # kohya rarely trains these text encoders (Flux: CLIP-L only, T5-XXL not at all); LoRA Lab trains the
        # CLIP text encoders of SD1.x/SD2.x/SDXL only.
        raise user_error(NODE, "options", f"train_text_encoder is not supported for {FLOW_FAMILY_NAMES[family]} "
                         "models: LoRA Lab trains the CLIP text encoders of SD1.x, SD2.x and SDXL only (T5-XXL "
                         "cannot carry a LoRA here).",
                         "turn train_text_encoder off on the Network options node: the LoRA then trains the "
                         f"{FLOW_FAMILY_NAMES[family]} transformer alone, as kohya does by default.")
    if options is not None and options.network_type == "DoRA" and not comfy_bridge.loader_applies_dora():
        raise user_error(NODE, "options", "network_type is DoRA, but this ComfyUI's Load LoRA skips DoRA's "
                         "magnitudes (dora_scale; ComfyUI applies them from May 2024 on), so the LoRA would sample "
                         "otherwise than it trained.",
                         "update ComfyUI, or choose network_type LoRA, LoHa or LoKr on the Network options node.")
    if dataset is None or not getattr(dataset, "items", None):
        raise user_error(NODE, "dataset", "the dataset has no pictures.",
                         "check the folder in the dataset node and its report.")
    if getattr(dataset, "waiting_for_review", ""):
        raise user_error(NODE, "dataset", dataset.waiting_for_review,
                         "read and fix the captions on Review Captions (its pictures are listed now), then switch its "
                         "ready_to_train on and queue again.")
    if not str(output_name).strip():
        raise user_error(NODE, "output_name", "the name is empty.", "type a name such as 'my_lora'.")
    folders.check_output_name(output_name, NODE)
    if alpha > rank * 4:
        log.warning("[LoRA Lab] alpha %.3g is more than 4x rank %d: the LoRA will be very strong", alpha, rank)


def check_optimizer(options, learning_rate):
    """Build the chosen optimizer once over a stand-in parameter, so optimizer_args it does not take
    (Prodigy's d_coef given to AdamW, say) fail now, not after the dataset is encoded."""
    try:
        args = parse_optimizer_args(options.optimizer_args)
        make_optimizer(options.optimizer, [torch.nn.Parameter(torch.zeros(2))], learning_rate,
                       **{"weight_decay": options.weight_decay, **args})
    except OptimizerUnavailable as missing:
        raise user_error(NODE, "options", f"{missing}", "install the package, or choose AdamW on an Optimizer & "
                         "Schedule node (or the preset's GPU memory: its optimizer may need it).") from None
    except (TypeError, ValueError) as bad:
        raise user_error(NODE, "options", f"the {options.optimizer} optimizer does not accept optimizer_args "
                         f"'{options.optimizer_args}' ({bad}).",
                         f"remove or correct optimizer_args on the Optimizer & Schedule node: they must be keyword arguments of "
                         f"{options.optimizer} (d_coef and decouple are Prodigy's; AdamW takes betas, eps and "
                         "amsgrad).") from None


def check_noise_settings(model, settings):
    kind = comfy_bridge.prediction_type(comfy_bridge.model_sampling(model))
    if settings.noise.min_snr_gamma > 0 and kind == "flow":
        raise user_error(NODE, "options", "min_snr_gamma weights the loss by the signal-to-noise ratio of eps- and "
                         "v-prediction models (SD1.x, SD2.x, SDXL); this model is trained by flow matching (SD3, "
                         "Flux.1), where that weighting does not apply.",
                         "set min_snr_gamma to 0 on the Noise & Loss options node (flow models train with the plain loss).")
    if settings.noise.min_snr_gamma > 0 and kind not in ("eps", "v"):
        raise user_error(NODE, "options", f"min_snr_gamma applies to eps and v prediction; this model predicts {kind}.",
                         "set min_snr_gamma to 0 on the Noise & Loss options node.")
    if settings.noise.loss_type in ("huber", "smooth_l1") and settings.noise.huber_schedule == "snr" and kind == "flow":
        raise user_error(NODE, "options", "huber_schedule 'snr' follows the signal-to-noise ratio of eps- and "
                         "v-prediction models (SD1.x, SD2.x, SDXL); this model is trained by flow matching (SD3, "
                         "Flux.1), where kohya refuses it too.",
                         "set huber_schedule to exponential or constant on the Noise & Loss options node.")

"""Where the LoRA goes in a ComfyUI model: the UNet's (or DiT's) layers and each CLIP text encoder's, as
one LoraSet whose parts the training loop gives their own learning rates."""
from __future__ import annotations

import torch

from ..trainer.lora.adapters import InjectedLora, LoraSet
from . import comfy_bridge
from .messages import user_error
from .train_checks import NODE


def inject_adapters(model, unet, clip, text_model, network, seed, device) -> LoraSet:
    """The UNet's adapters (and each text encoder's, when they train) as one LoraSet, parts labelled
    "unet", "text_encoder", "text_encoder_2" (the loop gives each its learning rate)."""
    parts = {}
    try:
        targets, ranks, alphas = network.adapter_arguments(comfy_bridge.unet_lora_layers(model, network))
        kind = dict(network_type=network.network_type, lokr_factor=network.lokr_factor)
        parts["unet"] = InjectedLora(unet, targets, rank=network.rank, alpha=network.alpha, ranks=ranks,
                                     alphas=alphas, dropout=network.dropout, seed=seed, device=device, **kind)
        if text_model is not None:
            for encoder, (root, targets) in text_encoder_targets(clip, text_model).items():
                parts[encoder] = InjectedLora(root, targets, rank=network.rank, alpha=network.alpha,
                                              dropout=network.dropout, seed=seed,
                                              device=torch.device(clip.patcher.load_device), **kind)
        return LoraSet(parts)
    except BaseException as error:
        for part in parts.values():         # nothing may stay injected in the shared model
            part.remove()
        if isinstance(error, (RuntimeError, ValueError)) and not isinstance(error, torch.cuda.OutOfMemoryError):
            where = "the text encoder" if "unet" in parts else "the UNet"
            fix = ("use network_type LoRA with this model, or load it in bf16 or fp16." if "DoRA" in str(error) else
                   "use network_preset 'kohya default' with train_text_encoder off, or load an SD1.5, SD2.x, SDXL, "
                   "SD3 or Flux.1 checkpoint.")
            raise user_error(NODE, "options", f"{network.network_type} layers could not be added to {where} of this "
                             f"model ({error}).", fix) from None
        raise


def text_encoder_targets(clip, text_model) -> dict[str, tuple[torch.nn.Module, dict[str, str]]]:
    """{"text_encoder" | "text_encoder_2": (the encoder's own module, {path inside it: kohya name})}.

    Each text encoder gets its adapters in its own module (SDXL: clip_l and clip_g), so each can
    learn at its own rate and peft never sees two adapter sets in one module tree.
    """
    by_encoder: dict[str, dict[str, str]] = {}
    for path, name in comfy_bridge.clip_lora_targets(clip).items():
        by_encoder.setdefault(comfy_bridge.text_encoder_of(name), {})[path] = name
    parts = {}
    for encoder, targets in by_encoder.items():
        tops = {path.split(".", 1)[0] for path in targets}
        if len(tops) == 1 and all("." in path for path in targets):
            top = tops.pop()
            parts[encoder] = (text_model.get_submodule(top), {path[len(top) + 1:]: n for path, n in targets.items()})
        else:
            parts[encoder] = (text_model, targets)
    if len(parts) > 1 and any(root is text_model for root, _ in parts.values()):
        raise RuntimeError("the text encoders' layers could not be told apart")
    return parts

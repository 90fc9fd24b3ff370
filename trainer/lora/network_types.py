"""The network types LoRA Lab trains, each on peft's own layers, and the keys each one's file uses.

  type   peft layer                        file keys per module (kohya / LyCORIS, read by ComfyUI's LoraLoader)
  LoRA   LoraConfig                        lora_down.weight, lora_up.weight, alpha
  DoRA   LoraConfig + a magnitude (below)  lora_down.weight, lora_up.weight, dora_scale, alpha
  LoHa   LoHaConfig                        hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, alpha
  LoKr   LoKrConfig                        lokr_w1 (or lokr_w1_a, lokr_w1_b), lokr_w2 (or lokr_w2_a, lokr_w2_b), alpha

Every update is scaled by alpha / rank (peft's ``scaling``), as ComfyUI applies a file, except a LoKr
module whose two factors are both whole matrices: ComfyUI applies that one unscaled, and LyCORIS trains it
at scale 1, so it trains at scale 1 here too. A file then computes what the adapters computed, and a
saved module loads back bitwise.

DoRA splits each weight into a direction and a magnitude: W' = (W + ΔW) · m / ‖W + ΔW‖. ComfyUI applies
the magnitude per input channel when ``dora_scale`` is (1, in[, 1, 1]) -- LyCORIS' and OneTrainer's
default -- and it does that correctly; for a per-output-row magnitude, the one peft's ``use_dora`` trains,
ComfyUI divides by the norm of W instead of W + ΔW (ComfyUI PR #15458, open), so a peft DoRA would
sample differently in ComfyUI than it trained. LoRA Lab therefore trains the per-input-channel form on
peft's LoRA layer: scaling a layer's input channel j by m_j / ‖column j of W + ΔW‖ before the layer is the
same as scaling column j of the weight, for the base weight and the LoRA beside it alike (and, for a
convolution with zero padding, for every kernel position). As in the DoRA paper (section 4.3) and peft,
the norm is a constant for the backward pass.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

LORA, DORA, LOHA, LOKR = "LoRA", "DoRA", "LoHa", "LoKr"
NETWORK_TYPES = (LORA, DORA, LOHA, LOKR)
# kohya's ss_network_module: its own LoRA, or the LyCORIS module for the others (algo in ss_network_args).
NETWORK_MODULES = {LORA: "networks.lora", DORA: "lycoris.kohya", LOHA: "lycoris.kohya", LOKR: "lycoris.kohya"}
LYCORIS_ALGOS = {DORA: "lora", LOHA: "loha", LOKR: "lokr"}
DORA_SCALE = "dora_scale"


def peft_config(network_type: str, rank: int, alpha: float, dropout: float, paths: list[str], lokr_factor: int):
    """peft's config for one (rank, alpha) group of target paths. A string target is matched with
    re.fullmatch against whole module paths (a list would also match any path ending in ``.<target>``)."""
    targets = "(?:" + "|".join(re.escape(path) for path in paths) + ")"
    if network_type in (LORA, DORA):
        from peft import LoraConfig
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=targets)
    if network_type == LOHA:
        from peft import LoHaConfig
        # Whole-kernel factors (no Tucker cores): the hada_w*_b of a 3x3 conv holds in·3·3 columns, the form
        # ComfyUI 2024-03 and later read (its hada_t1/t2 form is the use_effective_conv2d one).
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets, use_effective_conv2d=False)
    if network_type == LOKR:
        from peft import LoKrConfig
        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, use_effective_conv2d=False,
                          decompose_factor=lokr_factor)
    raise ValueError(f"network type {network_type!r} is not one of {', '.join(NETWORK_TYPES)}")


def adapter_weights(network_type: str, layer: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """{file key suffix: the trainable tensor} of one adapted layer, in the order the optimizer sees them."""
    if network_type in (LORA, DORA):
        weights = {"lora_down.weight": layer.lora_A[adapter].weight, "lora_up.weight": layer.lora_B[adapter].weight}
        if network_type == DORA:
            weights[DORA_SCALE] = layer.loralab_dora_scale
        return weights
    names = [name for name in layer.adapter_layer_names if adapter in getattr(layer, name)]
    return {name: getattr(layer, name)[adapter] for name in names}


def starts_at_zero(suffix: str, present: set[str]) -> bool:
    """Which factor is zero at the start, so that the adapters change nothing before the first step (as peft
    and kohya initialise them); the others are drawn kaiming-uniform."""
    if suffix in ("lora_up.weight", "hada_w2_b"):
        return True
    return suffix == ("lokr_w1" if "lokr_w1" in present else "lokr_w1_a")


def scaled_weight(network_type: str, present: set[str]) -> str:
    """The one tensor that carries a change of scale (a file's alpha other than ours, on load): the update is
    linear in it, so multiplying it multiplies the update."""
    if network_type in (LORA, DORA):
        return "lora_up.weight"
    if network_type == LOHA:
        return "hada_w1_a"
    return "lokr_w1" if "lokr_w1" in present else "lokr_w1_a"


def loader_scale(network_type: str, present: set[str], alpha: float, rank: int) -> float:
    """The factor ComfyUI's LoraLoader multiplies this module's update by, and training uses (module doc)."""
    if network_type == LOKR and not present & {"lokr_w1_b", "lokr_w2_b"}:
        return 1.0
    return alpha / rank


# --- DoRA ---------------------------------------------------------------------------------------------
ROWS_AT_A_TIME = 1024      # the norms are summed over blocks of output rows: no layer-sized float32 copy


def add_dora_magnitude(layer: nn.Module, base: nn.Module, adapter: str) -> torch.utils.hooks.RemovableHandle:
    """Give peft's LoRA ``layer`` (around ``base``) a magnitude per input channel and scale its input by it.

    The magnitude starts as the base weight's column norms, so the layer computes exactly what it did (the
    forward pass sums the same rows in the same order, plus an update of exactly zero). Returns the hook's
    handle (removed with the adapters)."""
    _check_readable(base)
    lora_down, lora_up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    with torch.no_grad():
        magnitude = adapted_column_norms(base, lora_up, lora_down, layer.scaling[adapter])
    layer.loralab_dora_scale = nn.Parameter(magnitude.reshape(_magnitude_shape(base.weight)).to(lora_down.device))

    def scale_input(module, args):
        x = args[0]
        # In float32 whatever autocast would do: it is the weight's norm, as ComfyUI computes it. A constant for
        # the backward pass (DoRA paper, section 4.3).
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            norm = adapted_column_norms(base, module.lora_B[adapter].weight, module.lora_A[adapter].weight,
                                        module.scaling[adapter])
        scale = module.loralab_dora_scale.reshape(-1) / norm.clamp_min(torch.finfo(torch.float32).tiny)
        channels_first = (-1, 1, 1) if isinstance(base, nn.Conv2d) else (-1,)
        return (x * scale.reshape(channels_first).to(x.dtype), *args[1:])

    return layer.register_forward_pre_hook(scale_input)


def adapted_column_norms(base: nn.Module, lora_up: torch.Tensor, lora_down: torch.Tensor,
                         scaling: float) -> torch.Tensor:
    """‖column j of W + scaling · up @ down‖ for each input channel j (over the output rows and, for a
    convolution, the kernel), in float32. The weight is read as it is now (block swap brings it over before the
    layer runs; fp8_base's weights are upcast with their row scale), a block of rows at a time: Flux's largest
    layer would otherwise take a 0.26 GB float32 copy, twice, each step."""
    weight, fp8_scale = base.weight, getattr(base, "loralab_fp8_scale", None)
    down = lora_down.detach().flatten(1).float()
    up = lora_up.detach().flatten(1)
    squares = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], ROWS_AT_A_TIME):
        rows = weight.detach()[start:start + ROWS_AT_A_TIME].float()
        if fp8_scale is not None:
            rows = rows * fp8_scale[start:start + ROWS_AT_A_TIME].float().reshape(-1, *[1] * (weight.dim() - 1))
        update = (up[start:start + ROWS_AT_A_TIME].float() @ down).to(rows.device).reshape(rows.shape)
        adapted = rows + scaling * update
        squares += adapted.transpose(0, 1).reshape(weight.shape[1], -1).square().sum(dim=1)
    return squares.sqrt().to(lora_down.device)


def _check_readable(base: nn.Module) -> None:
    if type(base.weight) not in (torch.Tensor, nn.Parameter) or getattr(base, "scale_weight", None) is not None:
        raise ValueError(f"DoRA needs the base weight of every layer it adapts; a {type(base).__name__} here "
                         "computes its weight itself (a scaled fp8 or quantized checkpoint)")


def _magnitude_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """dora_scale's shape in the file: (1, in) for a Linear, (1, in, 1, 1) for a conv (ComfyUI's input axis)."""
    return (1, weight.shape[1], *[1] * (weight.dim() - 2))


def kaiming_bound(shape: torch.Size) -> float:
    """kaiming_uniform_(a=sqrt(5))'s bound, as peft and kohya initialise: gain · sqrt(3 / fan_in) =
    1 / sqrt(fan_in)."""
    return 1.0 / math.sqrt(math.prod(shape[1:]))

"""The frozen base's Linear weights held in float8 (e4m3fn) while a LoRA trains beside them: half the memory
of bf16 for the part that dominates Flux (12 B parameters: 24 GB in bf16, 12 GB in fp8).

Each weight is stored as fp8 with one scale per output row (absmax / 448, e4m3fn's largest value), so small
rows keep e4m3's 3 mantissa bits instead of sinking into its subnormals, and upcast to the compute dtype
layer by layer in the forward pass. The LoRA attaches beside the weight, never merged into it (peft's layer
adds ``up(down(x))`` to the base layer's output), as kohya's ``--fp8_base``, musubi's fp8 and ComfyUI's
weight-adapter bypass mode do. Autograd keeps only the fp8 weight for the backward pass (the upcast copy of a
layer lives while that layer computes), so training never holds a second copy of the base.

The originals are parked (CPU memory or a temporary file, half_precision_base.py) and put back bitwise on
exit: success, error and Cancel. Weights that already are fp8 (ComfyUI's Load Diffusion Model with
``weight_dtype fp8_e4m3fn``) are used as they are, with a scale of 1: nothing to park, no second copy.
Layers whose ComfyUI op computes the weight itself (scaled fp8 checkpoints, quantized tensors, low-VRAM
weight patches) keep their own forward pass.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..lora.adapters import _autocast_enabled
from .half_precision_base import RestoreFailed, park_parameters, restore_parameters

log = logging.getLogger("LoRA Lab")
FP8 = torch.float8_e4m3fn
FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = torch.finfo(FP8).max          # 448


@dataclass
class Fp8Report:
    converted: int = 0        # Linear weights stored in fp8 for this run (originals parked)
    already_fp8: int = 0      # weights that came in fp8 (used as they are)
    kept: int = 0             # Linear layers left as they were (their op computes the weight)
    fp8_bytes: int = 0        # the fp8 weights' size
    original_bytes: int = 0   # what the converted weights took before
    converted_fp8_bytes: int = 0

    def describe(self) -> str:
        if not (self.converted or self.already_fp8):
            return "fp8 base: no Linear weight could be held in fp8"
        saved = (self.original_bytes - self.converted_fp8_bytes) / 2**30
        text = f"fp8 base: {self.converted + self.already_fp8} Linear weights in fp8 ({self.fp8_bytes / 2**30:.2f} GiB"
        text += f", {saved:.2f} GiB less)" if self.converted else ")"
        if self.kept:
            text += f"; {self.kept} layer(s) kept their own precision (their ComfyUI op computes the weight)"
        return text


QUANTIZE_ROWS = 1024       # rows quantized at a time: one fp32 block of them, not of the whole layer


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 scale per output row) with ``fp8.float() * scale`` close to ``weight``. Works a block of
    rows at a time, so the largest temporary is 1024 rows in fp32, not a layer (Flux's largest is 0.26 GB)."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    quantized = torch.empty(rows.shape, dtype=FP8, device=rows.device)
    scale = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    for start in range(0, rows.shape[0], QUANTIZE_ROWS):
        block = rows[start:start + QUANTIZE_ROWS].to(torch.float32, copy=True)     # never the weight itself
        block_scale = (block.abs().amax(dim=1) / FP8_MAX).clamp_(min=torch.finfo(torch.float32).tiny)
        quantized[start:start + QUANTIZE_ROWS] = block.div_(block_scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        scale[start:start + QUANTIZE_ROWS] = block_scale
    return quantized.reshape(weight.shape), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight in ``dtype``: one layer-sized copy (scaled in place, so never two at once)."""
    upcast = weight.to(dtype)
    return upcast if scale is None else upcast.mul_(scale.to(dtype)[:, None])


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T + b with W held in fp8: the upcast W is made in forward and again in backward, so what autograd
    keeps between the two is the fp8 W (1 byte a weight), never the upcast one. W and b are frozen: only the
    input gets a gradient (the LoRA beside this layer learns through it)."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)
        return _linear_into_new_tensor(x, dequantize(weight, scale, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        grad_x = grad_out @ dequantize(weight, scale, grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def _linear_into_new_tensor(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, written into a tensor of its own. F.linear returns a view for 3-D inputs, and a view made inside
    a custom Function may not be changed in place afterwards (Flux's blocks do ``txt += ...``)."""
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, weight.shape[0])
    if bias is None:
        torch.mm(flat_x, weight.t(), out=flat_out)
    else:
        torch.addmm(bias, flat_x, weight.t(), out=flat_out)
    return out


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if _autocast_enabled(device_type):
        try:
            return torch.get_autocast_dtype(device_type)
        except AttributeError:             # torch < 2.4: one getter per backend
            return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()
    return x.dtype if x.dtype.is_floating_point and x.dtype not in FP8_TYPES else torch.float32


def _fp8_forward(module: nn.Linear):
    def forward(x, *args, **kwargs):
        dtype = _compute_dtype(x)
        scale = getattr(module, "loralab_fp8_scale", None)
        # Autocast off inside: the cast is ours, and autocast would otherwise cast W again (to its own copy).
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _Fp8Linear.apply(x.to(dtype), module.weight, scale, module.bias)
    return forward


def _keeps_its_own_forward(module: nn.Module) -> bool:
    """ComfyUI ops that compute the weight themselves: scaled fp8, quantized tensors, low-VRAM patches."""
    weight = getattr(module, "weight", None)
    return (weight is None or type(weight) not in (torch.Tensor, nn.Parameter)
            or hasattr(module, "scale_weight") or hasattr(module, "scale_input")
            or bool(getattr(module, "weight_function", None)) or bool(getattr(module, "bias_function", None)))


def has_fp8_weights(network: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) and not _keeps_its_own_forward(m) and m.weight.dtype in FP8_TYPES
               for m in network.modules())


@contextlib.contextmanager
def frozen_base_in_fp8(network: nn.Module, parking_folder: str | None = None, convert: bool = True,
                       leave: Sequence[nn.Module] = ()):
    """Inside: every Linear weight of ``network`` is fp8 with a per-row scale, and its layer computes through
    _Fp8Linear; adapters injected afterwards keep their own dtype (InjectedLora casts them). On exit: the
    original weights, bitwise, and each layer's own forward. Yields an Fp8Report.

    ``convert`` False: only the weights that already are fp8 compute through _Fp8Linear (so a model loaded in
    fp8 trains without autograd keeping an upcast copy of each); the others stay as they are.
    ``leave``: layers that keep their own forward and precision (those ComfyUI left in CPU memory: its op copies
    the weight to the GPU as the layer computes)."""
    report = Fp8Report()
    to_convert, already = [], []
    left = {id(module) for module in leave}
    for module in network.modules():
        if not isinstance(module, nn.Linear):
            continue
        if _keeps_its_own_forward(module) or id(module) in left:
            report.kept += 1
        elif module.weight.dtype in FP8_TYPES:
            already.append(module)
        elif convert and module.weight.dtype.is_floating_point:
            to_convert.append(module)
    parked, file_path = park_parameters([(module, "weight") for module in to_convert], parking_folder) \
        if to_convert else ([], None)
    own_forwards = {}
    try:
        with torch.no_grad():
            for module in to_convert:        # each original is freed as soon as its fp8 copy replaces it
                weight = module.weight
                report.original_bytes += weight.numel() * weight.element_size()
                quantized, scale = quantize(weight)
                module._parameters["weight"] = nn.Parameter(quantized, requires_grad=False)
                module.loralab_fp8_scale = scale
                report.converted_fp8_bytes += quantized.numel()
        for module in to_convert + already:
            if "forward" in vars(module):    # someone's own per-layer forward: put back on exit
                own_forwards[module] = vars(module)["forward"]
            module.forward = _fp8_forward(module)
        report.converted, report.already_fp8 = len(to_convert), len(already)
        report.fp8_bytes = report.converted_fp8_bytes + sum(module.weight.numel() for module in already)
        log.info("[LoRA Lab] %s", report.describe())
        yield report
    finally:
        not_back: set = set()
        try:
            restore_parameters(parked, file_path)
        except RestoreFailed as failed:
            # Those layers keep their fp8 weight, so they keep the forward and scale that read it right.
            not_back = {id(entry.module) for entry in failed.failed}
            raise
        finally:
            for module in to_convert + already:
                if id(module) in not_back:
                    continue
                vars(module).pop("forward", None)
                vars(module).pop("loralab_fp8_scale", None)
                if module in own_forwards:
                    module.forward = own_forwards[module]

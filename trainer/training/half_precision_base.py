"""Frozen base weights held in the training precision, the originals parked and restored bitwise.

With bf16/fp16 training, keeping the frozen Linear/Conv weights in fp32 only costs memory: autocast
casts them for every matmul anyway. ComfyUI's own trainer casts the shared model in place, which is
lossy: the model the user loaded would come back changed. Here the fp32 originals wait elsewhere
while a half-precision copy trains, and are put back exactly as they were on exit (success, error,
Cancel):
- off the device (CPU memory) when training on a GPU;
- in a temporary file when training on the CPU, where parking them in memory would save nothing.
Written tensor by tensor as raw bytes (``numpy.tofile``), so parking never needs a second copy of the model;
fp8_base.py parks its originals (any dtype) the same way.
Norm layers keep their own dtype: CPU kernels refuse a half-precision norm weight with fp32 input.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger("LoRA Lab")
CAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class _Parked:
    module: nn.Module
    name: str
    requires_grad: bool
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    offset: int = 0                        # in the parking file (CPU training)
    copy: torch.Tensor | None = None       # in CPU memory (GPU training)


def castable_parameters(network: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every fp32 weight/bias of a Linear or Conv layer."""
    found = []
    for module in network.modules():
        if isinstance(module, CAST_LAYERS):
            for name, param in module._parameters.items():
                if param is not None and param.dtype == torch.float32:
                    found.append((module, name))
    return found


@contextlib.contextmanager
def frozen_weights_in(network: nn.Module, dtype: torch.dtype | None, parking_folder: str | None = None):
    """Inside: the network's fp32 Linear/Conv parameters are ``dtype`` copies (no gradients needed:
    they are frozen; adapters injected afterwards keep their own dtype). On exit: the originals,
    bitwise, with their requires_grad flags. ``dtype`` None or fp32: nothing changes.

    If the originals cannot be parked (the disk is full, say), training goes on in full precision.
    """
    targets = castable_parameters(network) if dtype not in (None, torch.float32) else []
    if not targets:
        yield 0
        return
    try:
        parked, file_path = park_parameters(targets, parking_folder)
    except OSError as failed:
        log.warning("[LoRA Lab] could not set the fp32 weights aside (%s); training keeps them in fp32", failed)
        yield 0
        return

    log.info("[LoRA Lab] frozen weights train in %s; %d fp32 tensors set aside in %s", dtype, len(parked),
             "a temporary file" if file_path else "CPU memory")
    try:
        with torch.no_grad():
            for entry in parked:         # the fp32 tensor is freed as soon as its copy replaces it
                param = getattr(entry.module, entry.name)
                entry.module._parameters[entry.name] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
        yield len(parked)
    finally:
        restore_parameters(parked, file_path)


def park_parameters(targets: list[tuple[nn.Module, str]], folder: str | None) -> tuple[list[_Parked], str | None]:
    """Copies of the parameters, to put back bitwise later: in CPU memory when they live on a GPU, else in a
    temporary file in ``folder`` (parking in memory would save nothing). Raises OSError (disk full) with
    nothing left behind."""
    parked: list[_Parked] = []
    if not all(getattr(module, name).device.type == "cpu" for module, name in targets):
        for module, name in targets:
            param = getattr(module, name)
            parked.append(_Parked(module, name, param.requires_grad, tuple(param.shape), param.dtype,
                                  copy=param.detach().to("cpu", copy=True)))
        return parked, None
    handle, path = tempfile.mkstemp(prefix="loralab-frozen-", suffix=".bin", dir=folder)
    offset = 0
    try:
        with os.fdopen(handle, "wb") as file:
            for module, name in targets:
                param = getattr(module, name)
                # Raw bytes: numpy has no bf16 or fp8, and bytes come back bitwise whatever the dtype.
                array = param.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                array.tofile(file)
                parked.append(_Parked(module, name, param.requires_grad, tuple(param.shape), param.dtype,
                                      offset=offset))
                offset += array.nbytes
    except BaseException:
        _remove(path)
        raise
    return parked, path


def restore_parameters(parked: list[_Parked], file_path: str | None) -> None:
    """Put the parked originals back, bitwise, with their requires_grad flags; then drop the parking file."""
    try:
        with torch.no_grad():
            for entry in parked:
                current = entry.module._parameters[entry.name]
                if entry.copy is not None:
                    original = entry.copy.to(current.device)
                else:
                    count = (int(np.prod(entry.shape)) if entry.shape else 1) * entry.dtype.itemsize
                    raw = np.fromfile(file_path, dtype=np.uint8, count=count, offset=entry.offset)
                    original = torch.from_numpy(raw).view(entry.dtype).reshape(entry.shape)
                entry.module._parameters[entry.name] = nn.Parameter(original, requires_grad=entry.requires_grad)
    finally:
        _remove(file_path)


def _remove(path: str | None) -> None:
    if path:
        with contextlib.suppress(OSError):
            os.remove(path)

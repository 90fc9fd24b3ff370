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


class RestoreFailed(RuntimeError):
    """Some originals could not be put back (out of memory, an unreadable parking file): the model keeps the
    training copies of those, and the parking file (if any) stays for the user."""

    def __init__(self, failed: list[_Parked], file_path: str | None, error: BaseException):
        kept = f"; the originals are kept in {file_path}" if file_path else ""
        super().__init__(f"{len(failed)} weight(s) of the model could not be put back as loaded ({error}){kept}. "
                         "Reload the model (re-queue from its loader) before using it again.")
        self.failed = failed


def restore_parameters(parked: list[_Parked], file_path: str | None) -> None:
    """Put the parked originals back, bitwise, with their requires_grad flags, one at a time; then drop the
    parking file. An original that cannot come back (the device is out of memory while a failed step's tensors
    are still referenced, say) is tried again after freeing what can be freed; still failing, the others are
    restored anyway and RestoreFailed lists it (the parking file is then kept)."""
    failed, first_error = [], None
    for entry in parked:
        for attempt in range(2):
            try:
                _restore_one(entry, file_path)
                break
            except Exception as error:     # noqa: BLE001 - any failure: try the rest, then report
                if attempt == 0:
                    _free_cached_memory()
                    continue
                failed.append(entry)
                first_error = first_error or error
    if failed:
        log.error("[LoRA Lab] %d weight(s) could not be restored: %s", len(failed), first_error)
        raise RestoreFailed(failed, file_path, first_error)
    _remove(file_path)


def _restore_one(entry: _Parked, file_path: str | None) -> None:
    with torch.no_grad():
        current = entry.module._parameters[entry.name]
        if entry.copy is not None:
            original = entry.copy.to(current.device)
        else:
            count = (int(np.prod(entry.shape)) if entry.shape else 1) * entry.dtype.itemsize
            raw = np.fromfile(file_path, dtype=np.uint8, count=count, offset=entry.offset)
            if raw.size != count:
                raise OSError(f"the parking file {file_path} ends early")
            original = torch.from_numpy(raw).view(entry.dtype).reshape(entry.shape)
        entry.module._parameters[entry.name] = nn.Parameter(original, requires_grad=entry.requires_grad)


def _free_cached_memory() -> None:
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _remove(path: str | None) -> None:
    if path:
        with contextlib.suppress(OSError):
            os.remove(path)

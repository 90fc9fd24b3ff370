"""Gradient checkpointing for modules we do not own, switched on for one training run only."""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def gradient_checkpointing(modules: Iterable[torch.nn.Module], enabled: bool = True):
    """Recompute each module's activations in backward instead of keeping them.

    Wraps the bound ``forward`` of each module as an instance attribute and deletes it afterwards,
    so the shared model is exactly as before once the run ends (successfully or not).
    """
    wrapped = []
    try:
        if enabled:
            for module in modules:
                if "forward" in vars(module):  # someone already patched this instance; leave it alone
                    continue
                original = module.forward

                def run(*args, _forward=original, **kwargs):
                    if not torch.is_grad_enabled():
                        return _forward(*args, **kwargs)
                    # checkpoint keeps the inputs to recompute from in backward, but some blocks add into
                    # their inputs in place (ComfyUI 2024-03's ``x += n``, Flux's ``txt += ...`` on a
                    # keyword argument): they get copies, and the kept inputs stay as they were.
                    return checkpoint(on_copies, _forward, *args, use_reentrant=False, **kwargs)

                run.unwrapped = original       # block_swap.py checkpoints a swapped block itself
                module.forward = run
                wrapped.append(module)
        yield len(wrapped)
    finally:
        for module in wrapped:
            del module.forward


def on_copies(forward, *args, **kwargs):
    """``forward`` on copies of every tensor argument, positional or keyword (Flux's blocks take
    ``img=`` / ``txt=`` as keywords only)."""
    return forward(*(_copy(value) for value in args), **{name: _copy(value) for name, value in kwargs.items()})


def _copy(value):
    return value.clone() if torch.is_tensor(value) else value


@contextlib.contextmanager
def clone_inputs_of(modules: Iterable[torch.nn.Module]):
    """Make each module see a private copy of its first input.

    Needed where a model adds into a tensor in place after a norm layer saved it for backward
    (ComfyUI 2024-03's ``x += n`` in BasicTransformerBlock); harmless elsewhere.
    """
    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(
                lambda _m, args: (args[0].clone(), *args[1:]) if args and torch.is_grad_enabled() else None))
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()

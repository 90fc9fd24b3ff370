"""Learning-rate schedules as plain multipliers of the base rate (torch LambdaLR), kohya's names.

Why not transformers' ``get_scheduler`` (a dependency, and what kohya calls): its semantics are followed,
with one deliberate difference it cannot be configured to make. Warm-up rises as
``(step + 1) / (warmup + 1)`` instead of ``step / warmup``, so the very first step already learns a
little instead of being a no-op at learning rate 0; saved runs and the resume tests depend on these exact
values. A resumed run also asks for the multiplier at any step (``training/loop.py``'s restore), which a
plain function gives directly. ``constant`` ignores warm-up, as in Hugging Face and kohya.

After warm-up, ``progress`` runs from 0 at step ``warmup`` to 1 at step ``total``:
  linear                1 - progress
  cosine                half a cosine wave, 1 -> 0
  cosine_with_restarts  ``cycles`` half-cosines, each a hard restart at 1 (HF
                        ``get_cosine_with_hard_restarts_schedule_with_warmup``, kohya ``lr_scheduler_num_cycles``)
Every multiplier is in [0, 1]; steps at or past ``total`` give 0 for the decaying schedules.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")


def lr_multiplier(schedule: str, step: int, total_steps: int, warmup_steps: int = 0, cycles: int = 1) -> float:
    """The factor applied to the base learning rate before optimizer step ``step`` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if int(cycles) != cycles or cycles < 1:
        raise ValueError(f"lr schedule cycles must be a whole number >= 1, got {cycles!r}")
    if schedule == "constant":
        return 1.0
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant_with_warmup":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    # cosine_with_restarts
    if progress >= 1.0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * ((int(cycles) * progress) % 1.0)))


def schedule_notes(schedule: str, warmup_steps: int, total_steps: int) -> list[str]:
    """Plain-language notes for the run report: warm-up settings that do nothing or take the whole run."""
    if warmup_steps > 0 and schedule == "constant":
        return [f"warmup_steps ({warmup_steps}) does nothing with the constant schedule (as in kohya); "
                "choose constant_with_warmup to warm up."]
    if warmup_steps >= total_steps > 0:
        return [f"warmup_steps ({warmup_steps}) is not below the {total_steps} steps: the whole run is warm-up."]
    return []


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int,
                   warmup_steps: int = 0, cycles: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR scaling every param group's own base rate by the same multiplier.

    The multiplier is a plain closure on purpose: LambdaLR saves callable *objects* into its
    state_dict and would restore an old schedule over a new one on resume; closures are not saved.
    """
    lr_multiplier(schedule, 0, total_steps, warmup_steps, cycles)  # validates the arguments up front
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(schedule, step, total_steps, warmup_steps, cycles))

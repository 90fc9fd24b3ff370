"""Learning-rate schedules as plain multipliers of the base rate (torch LambdaLR), kohya's names."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "constant_with_warmup", "cosine")


def lr_multiplier(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The factor applied to the base learning rate before optimizer step ``step`` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule != "constant" and warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int,
                   warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    lr_multiplier(schedule, 0, total_steps, warmup_steps)  # validates the name up front
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(schedule, step, total_steps, warmup_steps))

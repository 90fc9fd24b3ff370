"""An exponential moving average (EMA) of the adapter weights, as OneTrainer, SimpleTuner and ai-toolkit keep it:
after every optimizer step, shadow = decay * shadow + (1 - decay) * weight. The average smooths the last steps'
noise out of the LoRA; the raw weights keep training as before (the EMA never feeds back into them).

The decay warms up as diffusers' ``EMAModel`` does it (no ``use_ema_warmup``): the first update copies the
weights, the n-th uses min(decay, (1 + n) / (10 + n)), so the average is not held back by the untrained start.

Shadows are fp32, on the weights' device: for a LoRA a few MB. They are part of the loop's resume state, so a
resumed run averages exactly as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch


class AdapterEma:
    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float, saved_instead: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be between 0 and 1 (0.999 is usual), got {decay}")
        self.parameters = list(parameters)
        self.decay = float(decay)
        # The saves hold the average instead of the weights: validation and previews then measure the average.
        self.saved_instead = saved_instead
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in self.parameters]

    def current_decay(self) -> float:
        """The decay of the next update (diffusers' EMAModel.get_decay with update_after_step 0)."""
        n = self.updates
        return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        for shadow, parameter in zip(self.shadow, self.parameters):
            shadow.lerp_(parameter.detach().float(), weight)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": [s.detach().cpu().clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shadows = state["shadow"]
        if len(shadows) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadows, self.shadow)):
            raise ValueError("the saved moving average does not match this LoRA's weights (another rank or network)")
        for mine, saved in zip(self.shadow, shadows):
            mine.copy_(saved)
        self.updates = int(state["updates"])

    @contextlib.contextmanager
    def applied(self):
        """Inside: the parameters hold the averaged weights (to save or measure them); on exit, their own again,
        bitwise. The own weights wait in CPU memory: a save after the GPU ran out of memory must not need more."""
        own = [p.detach().to("cpu", copy=True) for p in self.parameters]
        try:
            with torch.no_grad():
                for parameter, shadow in zip(self.parameters, self.shadow):
                    parameter.copy_(shadow.to(parameter.dtype))
            yield
        finally:
            with torch.no_grad():
                for parameter, saved in zip(self.parameters, own):
                    parameter.copy_(saved)

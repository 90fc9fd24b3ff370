"""ComfyUI as the host of a training run (trainer/training/run.py's ``Host``): its progress bar, its
Cancel, its front-end events, its folders."""
from __future__ import annotations

import comfy.model_management
import comfy.utils

from . import comfy_bridge, events, folders


class ComfyHost:
    def __init__(self, node_name: str):
        self.node_name = node_name
        self.save_folders = folders.save_folders()
        self._bar = None

    def progress(self, step: int, total: int) -> None:
        if self._bar is None:
            self._bar = comfy.utils.ProgressBar(total)
        self._bar.update_absolute(step, total)

    def check_cancel(self) -> None:
        # ComfyUI's own check, so Cancel works with or without a progress hook installed.
        comfy.model_management.throw_exception_if_processing_interrupted()

    def is_cancel(self, error: BaseException) -> bool:
        return isinstance(error, comfy.model_management.InterruptProcessingException)

    def send(self, event: str, data: dict) -> None:
        comfy_bridge.send_to_front_end(events.OF_TRAINING_RUN[event], data)

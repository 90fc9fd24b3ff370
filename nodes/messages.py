"""One shape for every message a user sees: which node, which input, what is wrong, how to fix it
(the shape itself lives in trainer/messages.py, so a training run can speak it too)."""
from __future__ import annotations

from ..trainer.messages import LoraLabError, user_error

__all__ = ["LoraLabError", "user_error", "validation_message"]


def validation_message(node: str, input_name: str, problem: str, fix: str) -> str:
    """The string form VALIDATE_INPUTS returns (ComfyUI rejects the prompt and outlines the node)."""
    return str(user_error(node, input_name, problem, fix))

"""One shape for every message a user sees: which node, which input, what is wrong, how to fix it."""
from __future__ import annotations


class LoraLabError(ValueError):
    """Raised by a node for bad input; ComfyUI shows the text in its error dialog."""


def user_error(node: str, input_name: str | None, problem: str, fix: str) -> LoraLabError:
    where = f"{node} › {input_name}" if input_name else node
    return LoraLabError(f"[LoRA Lab · {where}] {problem} Fix: {fix}")

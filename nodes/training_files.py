"""Where Train LoRA writes, what it writes into the file's metadata, and how a run resumes."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

import folder_paths

from ..trainer.lora_file import kohya_metadata, load_lora_file, lora_relative_path, tag_frequency
from ..trainer.loop import LoopState, TrainSettings
from .messages import user_error

STATE_SUFFIX = ".loralab-state.pt"


def loras_root() -> str:
    """The first loras folder: every LoRA loader lists it on both ComfyUI versions (output/ is not)."""
    return folder_paths.get_folder_paths("loras")[0]


def check_output_name(name: str, node: str) -> None:
    try:
        lora_relative_path(name)
    except ValueError as bad:
        raise user_error(node, "output_name", str(bad),
                         "use a plain name such as 'my_lora' or 'mychar/v2' (no '..', no absolute path).") from None


def shared_first_tag(dataset) -> str:
    """The trigger word kohya users put first in every caption, if all captions agree on one."""
    firsts = {item.caption.split(",")[0].strip() for item in dataset.items}
    return firsts.pop() if len(firsts) == 1 and "" not in firsts else ""


@dataclass
class Description:
    """Everything the saved file says about how it was trained (kohya's ss_* keys and ours)."""
    output_name: str
    family: str
    rank: int
    alpha: float
    resolution: int
    settings: TrainSettings
    dataset: object
    buckets: dict
    trigger_word: str
    per_epoch: int
    epochs: int
    extra: dict = field(default_factory=dict)

    def metadata(self, step: int, started_at: float, finished_at: float) -> dict[str, str]:
        by_folder: dict[str, list[str]] = {}
        for item in self.dataset.items:
            by_folder.setdefault(item.concept or "images", []).append(item.caption)
        extra = {
            "ss_bucket_info": json.dumps({"buckets": {f"{w}x{h}": n for (w, h), n in sorted(self.buckets.items())}}),
            "ss_batch_size_per_device": str(self.settings.batch_size),
            "ss_lr_scheduler": self.settings.lr_schedule,
            "ss_seed": str(self.settings.seed),
            "ss_mixed_precision": self.settings.mixed_precision,
            "ss_num_epochs": str(self.epochs),
            "loralab_total_steps": str(self.settings.steps),
            "loralab_dataset_fingerprint": self.dataset.fingerprint(),
            **self.extra,
        }
        return kohya_metadata(
            output_name=Path(self.output_name).name, base_model_version=self.family, network_dim=self.rank,
            network_alpha=self.alpha, resolution=(self.resolution, self.resolution),
            num_train_images=sum(item.repeats for item in self.dataset.items),
            tag_frequency=tag_frequency(by_folder), steps=step, learning_rate=self.settings.learning_rate,
            started_at=started_at, finished_at=finished_at, trigger_word=self.trigger_word or None, extra=extra)

    def arithmetic(self) -> str:
        images = len(self.dataset.items)
        shown = sum(item.repeats for item in self.dataset.items)
        text = (f"{images} pictures x repeats = {shown} per epoch; batch {self.settings.batch_size} -> "
                f"{self.per_epoch} steps per epoch")
        if self.epochs:
            return text + f"; {self.epochs} epochs = {self.settings.steps} steps"
        return text + f"; {self.settings.steps} steps = {self.settings.steps / max(1, self.per_epoch):.1f} epochs"


# --- resume ---------------------------------------------------------------------------------------
@dataclass
class ResumePoint:
    step: int
    tensors: dict
    loop_state: LoopState


def save_resume_state(lora_path: Path, lora, loop_state: LoopState | None, step: int) -> Path:
    """Beside each save: full-precision adapters + optimizer/scheduler state, for an exact resume."""
    state = {"step": step, "adapters": lora.kohya_state_dict(dtype=torch.float32)}
    if loop_state is not None:
        state.update(optimizer=loop_state.optimizer, scheduler=loop_state.scheduler)
    path = Path(str(lora_path)[: -len(".safetensors")] + STATE_SUFFIX)
    partial = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(state, partial)
    os.replace(partial, path)
    return path


def load_resume(name: str, node: str) -> ResumePoint:
    lora_path = folder_paths.get_full_path("loras", name)
    if lora_path is None:
        raise user_error(node, "resume_from", f"'{name}' is not in any loras folder.",
                         "pick a file the LoRA loaders list.")
    state_path = Path(lora_path[: -len(".safetensors")] + STATE_SUFFIX)
    tensors, metadata = load_lora_file(lora_path)
    if not state_path.exists():
        # A LoRA from elsewhere still resumes its weights; the optimizer starts fresh.
        step = int(metadata.get("ss_steps", "0") or 0)
        return ResumePoint(step, tensors, LoopState(step))
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    step = int(state["step"])
    return ResumePoint(step, state["adapters"], LoopState(step, state.get("optimizer"), state.get("scheduler")))


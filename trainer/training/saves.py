"""What a run writes and reads back: its free name, its saves' resume state, and the saves it may delete.

Every save is a LoRA in the loras folder plus, in a private folder, the state an exact resume needs
(full-precision adapters, optimizer, schedule, loss scaler, RNG). The folders come from the host
(ComfyUI's models/loras and user folder): ``SaveFolders``.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..lora.files import load_lora_file, lora_relative_path
from ..messages import user_error
from .loop import LoopState

STATE_SUFFIX = ".loralab-state.pt"
log = logging.getLogger("LoRA Lab")


@dataclass(frozen=True)
class SaveFolders:
    loras: Path      # where LoRAs are saved (and found by every loader)
    rescue: Path     # where a LoRA goes when the loras folder refuses it (full disk, permissions)
    states: Path     # resume states, mirroring the loras folder's subfolders


def base_name(output_name: str) -> str:
    """The name as a path inside the loras folder, without .safetensors ("mychar/v1")."""
    return str(lora_relative_path(output_name.strip()))[: -len(".safetensors")]


def free_base_name(loras_folder: Path, output_name: str, overwrite: bool) -> str:
    """The name this run saves under, settled before training starts.

    Unless overwriting, the first of name, name_2, name_3... with neither a final file nor any
    ``_step<N>`` / ``_epoch<E>`` save of an earlier run, so a run's periodic saves never replace another run's.
    """
    base = base_name(output_name)          # validates
    if overwrite:
        return base
    root = Path(loras_folder)
    for number in range(1, 10_000):
        candidate = base if number == 1 else f"{base}_{number}"
        stem = glob.escape(Path(candidate).name)      # a name like "char[v2]" is not a pattern
        taken = (root / f"{candidate}.safetensors").exists() or any(
            next((root / candidate).parent.glob(f"{stem}_{kind}*.safetensors"), None) for kind in ("step", "epoch", "ema"))
        if not taken:
            return candidate
    raise RuntimeError(f"no free name left for {base!r}")


def shared_first_tag(dataset) -> str:
    """The trigger word kohya users put first in every caption, if all captions agree on one."""
    firsts = {item.caption.split(",")[0].strip() for item in dataset.items}
    return firsts.pop() if len(firsts) == 1 and "" not in firsts else ""


# --- resume ---------------------------------------------------------------------------------------
@dataclass
class ResumePoint:
    step: int
    tensors: dict
    loop_state: LoopState
    optimizer_name: str | None = None
    run: dict = field(default_factory=dict)   # RUN_KEYS of the run that wrote it, when its state says

    def for_optimizer(self, name: str) -> "ResumePoint":
        """Optimizer state only carries over to the same optimizer; otherwise it starts fresh."""
        if self.optimizer_name not in (None, name) and self.loop_state.optimizer is not None:
            log.warning("[LoRA Lab] the save at step %d was trained with %s, this run uses %s: "
                        "its optimizer starts fresh",
                        self.step, self.optimizer_name, name)
            self.loop_state.optimizer = None
        return self


def resume_state_path(lora_path, folders: SaveFolders) -> Path:
    """<states>/<name>.loralab-state.pt — not beside the LoRA, where every loader (which lists .pt
    files too) would offer it as a LoRA."""
    folder = folders.states
    lora_path = Path(lora_path)
    try:
        relative = lora_path.resolve().relative_to(Path(folders.loras).resolve())
    except ValueError:
        relative = Path(lora_path.name)
    return folder / (str(relative)[: -len(".safetensors")] + STATE_SUFFIX)


# What a state also records about the run that wrote it, so that the run can go on after a crash
# (interrupted_runs.py): its identity (run_reuse) and its losses so far.
RUN_KEYS = ("run_identity", "losses")


def save_resume_state(lora_path: Path, lora, loop_state: LoopState | None, step: int, optimizer_name: str,
                      folders: SaveFolders, run: dict | None = None) -> Path:
    """Beside each save: full-precision adapters + optimizer/scheduler state, for an exact resume."""
    state = {"step": step, "adapters": lora.kohya_state_dict(dtype=torch.float32), "optimizer_name": optimizer_name}
    if loop_state is not None:
        state.update(optimizer=loop_state.optimizer, scheduler=loop_state.scheduler, scaler=loop_state.scaler,
                     rng=loop_state.rng)
        if loop_state.ema is not None:
            state["ema"] = loop_state.ema
    state.update({key: value for key, value in (run or {}).items() if key in RUN_KEYS and value is not None})
    path = resume_state_path(lora_path, folders)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_atomically(state, path)
    return path


def _save_atomically(state: dict, path: Path) -> None:
    """``torch.save`` to ``<path>.tmp-<pid>``, fsync, then one ``os.replace``: whenever the process dies
    (kill -9, power loss, a full disk), ``path`` holds the previous state or the new one, never part of one;
    a failed write removes its temporary file."""
    partial = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with open(partial, "wb") as out:
            torch.save(state, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
    if os.name == "posix":          # the new directory entry survives a power loss too (Windows cannot open folders)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


@dataclass
class WrittenSave:
    """A save this run wrote, as it was written: only that exact file may be deleted later."""
    lora: Path
    state: Path | None
    stamps: dict

    @staticmethod
    def _stamp(path: Path):
        stat = path.stat()
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    @classmethod
    def of(cls, lora, state) -> "WrittenSave":
        lora = Path(lora)
        state = Path(state) if state is not None else None     # None: its resume state failed to write
        stamps = {path: cls._stamp(path) for path in (lora, state) if path is not None}
        return cls(lora, state, stamps)

    def remove(self) -> bool:
        """Delete the LoRA, then its resume state, each only if still the file written.

        A LoRA the user changed (or replaced) is kept, and so is its resume state: without it the LoRA
        could no longer be continued.
        """
        if not self._unlink_if_unchanged(self.lora):
            return False
        if self.state is not None:
            self._unlink_if_unchanged(self.state)
        return True

    def _unlink_if_unchanged(self, path: Path) -> bool:
        try:
            if self._stamp(path) != self.stamps[path]:
                log.warning("[LoRA Lab] %s changed since it was saved; not deleting it", path)
                return False
            path.unlink()
        except FileNotFoundError:
            pass
        return True


def load_resume(lora_path, name: str, node: str, folders: SaveFolders) -> ResumePoint:
    """The save ``name`` (found at ``lora_path``) and, when it exists, its resume state: weights,
    optimizer, schedule, loss scaler and RNG, for an exact resume."""
    state_path = resume_state_path(lora_path, folders)
    try:
        tensors, metadata = load_lora_file(lora_path)       # .safetensors only: pickles are refused unread
        step = int(metadata.get("ss_steps", "0") or 0)
    except ValueError as bad:
        raise user_error(node, "resume_from", f"'{name}' cannot be resumed: {bad}.",
                         "pick a .safetensors save written by LoRA Lab from resume_from's list, or 'none' to "
                         "start fresh.") from None
    if not state_path.exists():
        # Training Options lists only saves with a state; one deleted since still resumes its weights, with
        # a fresh optimizer, rather than failing a run that was already validated.
        return ResumePoint(step, tensors, LoopState(step))
    try:
        return read_resume_state(state_path)
    except Exception as bad:
        raise user_error(node, "resume_from", f"the resume state {state_path} of '{name}' cannot be read safely "
                         f"({problem_text(bad)}).",
                         "pick another save from resume_from's list, or 'none' to start fresh.") from None


def read_resume_state(state_path) -> ResumePoint:
    """A resume state file as a ResumePoint; raises whatever reading or checking it raised."""
    # weights_only: a state file replaced by a crafted pickle is refused, never executed.
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    step = int(state["step"])
    adapters = dict(state["adapters"])
    return ResumePoint(step, adapters, LoopState(step, state.get("optimizer"), state.get("scheduler"),
                                                          state.get("scaler"), state.get("rng"), state.get("ema")),
                       state.get("optimizer_name"), {key: state[key] for key in RUN_KEYS if key in state})


def problem_text(error: BaseException) -> str:
    """``Type: first line`` of an error, short enough for a message or a note."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return f"{type(error).__name__}: {first_line}"


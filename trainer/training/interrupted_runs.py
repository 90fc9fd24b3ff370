"""Queue a run again after ComfyUI died mid-run (killed, crashed, rebooted) and it goes on from its last save.

ai-toolkit users expect this: restart, queue the same job, and training continues where the last save left
it instead of starting over. "The same run" is run_reuse's identity (data, model, settings): every periodic
or partial save carries it, in the LoRA's metadata and in its resume state, so a save of any other run is
never continued. Only a save whose resume state is whole and its own (same identity, same step) is
continued; otherwise the next older one is tried, and each skipped save is noted for the report.

Saves are written atomically (trainer/lora/files.py, saves.py), so after a kill every file under a real
name is whole; the temporary files a kill leaves behind are removed here, once their writer is dead.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .run_reuse import file_metadata
from .saves import ResumePoint, SaveFolders, problem_text, read_resume_state, resume_state_path

UNFINISHED_RUN_KEY = "loralab_unfinished_run"     # a save's metadata: the identity of the run it is part of
log = logging.getLogger("LoRA Lab")


@dataclass
class Continuation:
    base_name: str              # the interrupted run's name ("char" or "char_2"): it goes on saving under it
    lora: Path                  # the save it continues from
    point: ResumePoint
    run_saves: list = field(default_factory=list)   # (LoRA, state or None) of that run up to here, oldest first

    def note(self) -> str:
        return f"continued the interrupted run from step {self.point.step}: {self.lora.name}"


def find_interrupted(folders: SaveFolders, base_name: str, identity: str) -> tuple[Continuation | None, list[str]]:
    """The newest save of the run ``identity`` that can be continued, among the step and epoch saves of
    ``base_name`` and its numbered variants (``char_step40``, ``char_2_epoch3``); and notes on the saves
    of that run that had to be skipped. (None, notes) when there is none: the run starts fresh."""
    folder = (Path(folders.loras) / base_name).parent
    if not folder.is_dir():
        return None, []
    saves = re.compile(re.escape(Path(base_name).name) + r"(?:_\d+)?_(?:step|epoch)\d+\.safetensors")
    remove_stale_partials(folder, saves, folders)
    ours = []
    for path in folder.iterdir():
        if saves.fullmatch(path.name) and path.is_file():
            metadata = file_metadata(path)
            if metadata.get(UNFINISHED_RUN_KEY) == identity:
                ours.append((_int(metadata.get("ss_steps")), path.stat().st_mtime_ns, path))
    notes = []
    for step, _, path in sorted(ours, reverse=True):
        point, problem = _own_state(path, step, identity, folders)
        if problem:
            notes.append(f"skipped {path.name} of the interrupted run (step {step}): {problem}")
            log.warning("[LoRA Lab] %s", notes[-1])
            continue
        run_base = _run_base(path, folders)
        run_saves = [(lora, _state_if_any(lora, folders)) for saved_step, _, lora in sorted(ours)
                     if saved_step <= point.step and _run_base(lora, folders) == run_base]
        return Continuation(run_base, path, point, run_saves), notes
    return None, notes


def _own_state(lora: Path, step: int, identity: str, folders: SaveFolders) -> tuple[ResumePoint | None, str]:
    """The save's resume state, if it is whole and belongs to this very save -> (point, ""), else (None, why)."""
    state = resume_state_path(lora, folders)
    if not state.is_file():
        return None, "it has no resume state (the process died before writing it)"
    try:
        point = read_resume_state(state)
    except Exception as bad:
        return None, f"its resume state cannot be read ({problem_text(bad)})"
    if point.run.get("run_identity") != identity:
        return None, "its resume state belongs to another run"
    if point.step != step:
        return None, f"its resume state is of step {point.step}, not {step}"
    if point.loop_state.optimizer is None:
        return None, "its resume state has no optimizer state"
    return point, ""


def _run_base(lora: Path, folders: SaveFolders) -> str:
    """``char_2_step40.safetensors`` in loras/sub -> "sub/char_2"."""
    relative = lora.relative_to(folders.loras) if lora.is_relative_to(folders.loras) else Path(lora.name)
    return re.sub(r"_(?:step|epoch)\d+\.safetensors$", "", relative.as_posix())


def _state_if_any(lora: Path, folders: SaveFolders) -> Path | None:
    state = resume_state_path(lora, folders)
    return state if state.is_file() else None


def remove_stale_partials(folder: Path, saves: re.Pattern, folders: SaveFolders) -> None:
    """Delete the ``<save>.tmp-<pid>`` files (LoRAs and their resume states) of these saves whose writer is
    gone: a process killed mid-save leaves one behind. Loaders never list them (the name does not end in
    .safetensors), but each holds a whole LoRA's worth of disk."""
    partial = re.compile(r"(?P<save>.+)\.tmp-(?P<pid>\d+)")
    state_folder = resume_state_path(folder / "x.safetensors", folders).parent
    for where, suffix in ((folder, ""), (state_folder, ".loralab-state.pt")):
        if not where.is_dir():
            continue
        for path in where.iterdir():
            found = partial.fullmatch(path.name)
            if not found or not found["save"].endswith(suffix):
                continue
            save = found["save"][: len(found["save"]) - len(suffix)] + (".safetensors" if suffix else "")
            if saves.fullmatch(save) and not _writer_alive(int(found["pid"])):
                try:
                    path.unlink()
                    log.info("[LoRA Lab] removed %s, left by a save that was interrupted", path)
                except OSError as failed:
                    log.warning("[LoRA Lab] could not remove %s (%s)", path, failed)


def _writer_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be writing. Our own process is not: saves happen while Train LoRA
    runs, and this runs before it trains (after a restart in a container, ComfyUI often has its old pid)."""
    if pid == os.getpid():
        return False
    try:
        import psutil          # ComfyUI's own dependency; on Windows os.kill(pid, 0) would end the process
        return psutil.pid_exists(pid)
    except ImportError:
        pass
    if os.name != "posix":
        return True             # cannot tell: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _int(text) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return -1

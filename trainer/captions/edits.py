"""What a caption becomes: the model's text merged with the existing caption, then the user's edits;
and how captions are written back as ``.txt`` sidecars without ever losing one.

Captions are treated kohya-style as comma-separated tags ("ohwx, a cat on the grass"), which also
covers plain sentences (one tag). A comma between two digits ("1,000") is part of a tag, not a separator.
Everything above "Sidecar files" is pure.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Sequence

MODES = ("fill-missing", "overwrite", "append")

_SEPARATOR = re.compile(r"(?<!\d),|,(?!\d)")


@dataclass(frozen=True)
class CaptionEdits:
    """The user's edits, applied to every caption whether or not the model wrote it.

    ``trigger`` may hold several tags ("ohwx, in the style of sks"); ``remove_tags`` is a comma-separated
    list matched case-insensitively against whole tags; ``find`` / ``replace`` is plain text.
    """
    trigger: str = ""
    find: str = ""
    replace: str = ""
    remove_tags: str = ""


def split_tags(text: str) -> list[str]:
    """Tags of a caption, trimmed, whitespace runs (newlines too) collapsed, empty ones dropped."""
    tags = (" ".join(part.split()) for part in _SEPARATOR.split(text or ""))
    return [tag for tag in tags if tag]


def join_tags(tags: Sequence[str]) -> str:
    return ", ".join(tags)


def normalize(text: str) -> str:
    """"a cat ,  dog,,\\n grass, " -> "a cat, dog, grass"."""
    return join_tags(split_tags(text))


def needs_generation(existing: str, mode: str) -> bool:
    """Whether the model must caption an item: always, except in fill-missing for an item that has text."""
    _check_mode(mode)
    return mode != "fill-missing" or not existing.strip()


def merge(existing: str, generated: str | None, mode: str) -> str:
    """Combine the existing caption with the model's text according to ``mode``."""
    _check_mode(mode)
    generated = generated or ""
    if mode == "overwrite":
        return normalize(generated)
    if mode == "append":
        return join_tags(split_tags(existing) + split_tags(generated))
    return normalize(existing) if existing.strip() else normalize(generated)


def remove_tags(caption: str, unwanted: str) -> str:
    drop = {tag.lower() for tag in split_tags(unwanted)}
    return join_tags([tag for tag in split_tags(caption) if tag.lower() not in drop])


def find_replace(caption: str, find: str, replace: str) -> str:
    return caption.replace(find, replace) if find else caption


def put_trigger_first(caption: str, trigger: str) -> str:
    """``trigger, caption`` with every other copy of the trigger's tags removed, so the trigger is the
    first tag exactly once (kohya's keep_tokens relies on it being first)."""
    trigger_tags = _unique(split_tags(trigger))
    if not trigger_tags:
        return normalize(caption)
    lowered = {tag.lower() for tag in trigger_tags}
    return join_tags(trigger_tags + [tag for tag in split_tags(caption) if tag.lower() not in lowered])


def apply_edits(caption: str, edits: CaptionEdits) -> str:
    """Remove tags, find/replace, then the trigger: last, so no other edit can move or break it."""
    caption = remove_tags(caption, edits.remove_tags)
    caption = normalize(find_replace(caption, edits.find, edits.replace))
    return put_trigger_first(caption, edits.trigger)


def final_caption(existing: str, generated: str | None, mode: str, edits: CaptionEdits) -> str:
    return apply_edits(merge(existing, generated, mode), edits)


def _unique(tags: list[str]) -> list[str]:
    seen: set[str] = set()
    return [tag for tag in tags if not (tag.lower() in seen or seen.add(tag.lower()))]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown caption mode {mode!r}; expected one of {', '.join(MODES)}")


# --- Sidecar files -------------------------------------------------------------------------------
BACKUP_FOLDER = ".loralab_caption_backup"


@dataclass
class SidecarReport:
    written: list[str] = field(default_factory=list)                 # new files
    replaced: list[tuple[str, str]] = field(default_factory=list)    # (file, where its old text went)
    unchanged: list[str] = field(default_factory=list)               # already held this caption
    kept: list[str] = field(default_factory=list)                    # had another caption, left alone
    without_path: int = 0                                            # in-memory items: nowhere to write
    moved: list[str] = field(default_factory=list)                   # a link out of the folder now: not written
    too_long: list[str] = field(default_factory=list)                # name too long to write safely: not written


def write_sidecars(paths: Sequence[str | None], captions: Sequence[str], replace_existing: bool,
                   backup_root: str | None = None) -> SidecarReport:
    """Write each caption as UTF-8 text to its path (``None``: an in-memory item, counted and skipped).

    A file that already holds a non-empty, different caption is left alone unless ``replace_existing``;
    when it is replaced, its old text is first copied to ``<backup_root>/.loralab_caption_backup/<time>/``
    (mirroring the file's place under ``backup_root``; without a root, next to the file), so nothing a
    user wrote is ever lost. Every write goes to a temporary file in the same folder, then ``os.replace``:
    a crash leaves the old caption or the new one, never half of either.
    """
    report = SidecarReport()
    backup_run: str | None = None
    for path, caption in zip(paths, captions, strict=True):
        if path is None:
            report.without_path += 1
            continue
        old = _read_text(path)
        if old is None:
            write_text_atomically(path, caption)
            report.written.append(path)
        elif old.split() == caption.split():    # same words; a trailing newline is no reason to rewrite
            report.unchanged.append(path)
        elif old.strip() and not replace_existing:
            report.kept.append(path)
        else:
            backup_run = backup_run or _new_backup_run(backup_root or os.path.dirname(path))
            backup = _backup(path, backup_run, backup_root)
            write_text_atomically(path, caption)
            report.replaced.append((path, backup))
    return report


def write_text_atomically(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644  # mkstemp would make it 0600
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            return stream.read()
    except FileNotFoundError:
        return None


def _new_backup_run(base: str) -> str:
    """A fresh timestamped folder per run, so a second run never overwrites the first run's backups."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        run = os.path.join(base, BACKUP_FOLDER, stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            os.makedirs(run)
            return run
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a new backup folder under {os.path.join(base, BACKUP_FOLDER)}")


def _backup(path: str, run: str, root: str | None) -> str:
    try:
        relative = os.path.relpath(path, root) if root else os.path.basename(path)
    except ValueError:  # another drive (Windows)
        relative = os.path.basename(path)
    if relative.startswith(os.pardir):  # the file is not under the root: keep just its name
        relative = os.path.basename(path)
    target = os.path.join(run, relative)
    stem, counter = target, 1
    while os.path.exists(target):  # same name from another folder: never overwrite a backup
        target, counter = f"{stem}.{counter}", counter + 1
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(path, target)
    return target

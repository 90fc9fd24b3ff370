"""What a caption becomes: the model's text merged with the existing caption, then the user's edits;
and how captions are written back as ``.txt`` sidecars without ever losing one.

Captions are treated kohya-style as comma-separated tags ("ohwx, a cat on the grass"), which also
covers plain sentences (one tag). A comma between two digits ("1,000") is part of a tag, not a separator.
Everything above "Sidecar files" is pure.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass, field
from typing import Sequence

from ..paths import is_inside

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

# Where the platform has O_NOFOLLOW and dir_fd (Linux, macOS, BSD), every sidecar and backup is opened relative
# to a folder descriptor reached from the dataset root one real folder at a time, never following a link: a
# link swapped in after the node's check cannot lead a read or a write out of the dataset folder. Elsewhere
# (Windows) paths are used as they are, and the node's re-check right before writing is the guard.
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
_COMMON = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_FOLDER_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NO_FOLLOW | _COMMON
_READ_FLAGS = os.O_RDONLY | _NO_FOLLOW | getattr(os, "O_NONBLOCK", 0) | _COMMON   # a FIFO must not block
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_FOLLOW | _COMMON
NO_FOLLOW_OPENS = bool(_NO_FOLLOW and hasattr(os, "O_DIRECTORY")) and {
    os.open, os.mkdir, os.rename, os.unlink} <= os.supports_dir_fd    # os.replace is os.rename's twin
_LINK_ERRNOS = {errno.ELOOP, errno.EMLINK, errno.ENOTDIR}           # EMLINK: O_NOFOLLOW on a link, BSD


@dataclass
class SidecarReport:
    written: list[str] = field(default_factory=list)                 # new files
    replaced: list[tuple[str, str]] = field(default_factory=list)    # (file, where its old text went)
    unchanged: list[str] = field(default_factory=list)               # already held this caption
    kept: list[str] = field(default_factory=list)                    # had another caption, left alone
    without_path: int = 0                                            # in-memory items: nowhere to write
    moved: list[str] = field(default_factory=list)                   # a link (or no plain file) now: not written
    too_long: list[str] = field(default_factory=list)                # name too long to write safely: not written


def write_sidecars(paths: Sequence[str | None], captions: Sequence[str], replace_existing: bool,
                   backup_root: str | None = None) -> SidecarReport:
    """Write each caption as UTF-8 text to its path (``None``: an in-memory item, counted and skipped).

    A file that already holds a non-empty, different caption is left alone unless ``replace_existing``;
    when it is replaced, its old text is first copied to ``<backup_root>/.loralab_caption_backup/<time>/``
    (mirroring the file's place under ``backup_root``; without a root, next to the file), so nothing a
    user wrote is ever lost. Every write goes to a temporary file in the same folder, then ``os.replace``:
    a crash leaves the old caption or the new one, never half of either.

    Nothing is read or written through a symbolic link below ``backup_root`` (see NO_FOLLOW_OPENS): a sidecar
    that is a link, or not a plain file, when it is opened, one whose folder leads out of the root, and one
    whose backup folder is a link are skipped and listed in ``moved``.
    """
    report = SidecarReport()
    backup_run: tuple[str, str] | None = None       # (run folder, the root it was reached from)
    for path, caption in zip(paths, captions, strict=True):
        if path is None:
            report.without_path += 1
            continue
        base, name = backup_root or os.path.dirname(path), os.path.basename(path)
        try:
            with _open_folder(base, os.path.dirname(path)) as folder:
                old = _read_sidecar(folder, name)
                if old is None:
                    _write_in(folder, name, caption, 0o644)
                    report.written.append(path)
                    continue
                data, info = old
                text = data.decode("utf-8", errors="replace")
                if text.split() == caption.split():   # same words; a trailing newline is no reason to rewrite
                    report.unchanged.append(path)
                elif text.strip() and not replace_existing:
                    report.kept.append(path)
                else:
                    backup_run = backup_run or (_new_backup_run(base), base)
                    backup = _backup(path, data, info, backup_run, backup_root)
                    _write_in(folder, name, caption, stat.S_IMODE(info.st_mode))
                    report.replaced.append((path, backup))
        except _LinkFound:
            report.moved.append(path)
    return report


def write_text_atomically(path: str, text: str) -> None:
    """``text`` into ``path`` through a temporary file and a rename (the folder's path is trusted here)."""
    folder = os.path.dirname(os.path.abspath(path))
    with _open_folder(folder, folder) as handle:
        try:
            mode = stat.S_IMODE(os.stat(handle.at(os.path.basename(path)), dir_fd=handle.fd).st_mode)
        except FileNotFoundError:
            mode = 0o644                                             # mkstemp would make it 0600
        _write_in(handle, os.path.basename(path), text, mode)


class _LinkFound(Exception):
    """A sidecar, a folder on the way to it or the backup folder is a link (or no plain file/folder) now."""


@dataclass
class _Folder:
    """A folder to open names in: a descriptor reached without following links, or (no O_NOFOLLOW) its path."""
    path: str
    fd: int | None = None

    def at(self, name: str) -> str:
        return name if self.fd is not None else os.path.join(self.path, name)

    def call(self, function, name: str, *args):
        """``function(name, *args)`` inside this folder; an error names the full path, for the node's message."""
        try:
            return function(self.at(name), *args, dir_fd=self.fd)
        except OSError as error:
            raise self.naming(error, name)

    def naming(self, error: OSError, name: str) -> OSError:
        if error.errno is not None:                 # a system error carries the relative name: the full one
            error.filename, error.filename2 = os.path.join(self.path, name), None
        return error

    def __enter__(self):
        return self

    def __exit__(self, *_):
        if self.fd is not None:
            os.close(self.fd)


def _open_folder(root: str, folder: str, create: bool = False) -> _Folder:
    """``folder`` (``root`` or below it), reached from the root one real folder at a time with O_NOFOLLOW, so a
    folder swapped for a link after the path was resolved is refused; ``create`` makes missing folders."""
    if not NO_FOLLOW_OPENS:
        if create:
            os.makedirs(folder, exist_ok=True)
        return _Folder(folder)
    real_root, real = os.path.realpath(root), os.path.realpath(folder)
    if not is_inside(real, real_root):
        raise _LinkFound(folder)
    current = _Folder(folder, os.open(real_root, _FOLDER_FLAGS))
    try:
        relative = os.path.relpath(real, real_root)
        for part in [] if relative == os.curdir else relative.split(os.sep):
            if create:
                try:
                    current.call(os.mkdir, part)          # never follows: a link of that name is EEXIST
                except FileExistsError:
                    pass
            try:
                inner = current.call(os.open, part, _FOLDER_FLAGS)
            except OSError as error:
                if error.errno in _LINK_ERRNOS:
                    raise _LinkFound(folder) from None
                raise
            os.close(current.fd)
            current.fd = inner
    except BaseException:
        os.close(current.fd)
        raise
    return current


def _read_sidecar(folder: _Folder, name: str) -> tuple[bytes, os.stat_result] | None:
    """The file's bytes and status, ``None`` when there is none; a link or a non-file raises _LinkFound."""
    try:
        handle = folder.call(os.open, name, _READ_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno in _LINK_ERRNOS:
            raise _LinkFound(name) from None
        raise
    with os.fdopen(handle, "rb") as stream:
        info = os.fstat(stream.fileno())
        if not stat.S_ISREG(info.st_mode):          # a folder, FIFO or device swapped in
            raise _LinkFound(name)
        return stream.read(), info


def _write_in(folder: _Folder, name: str, text: str, mode: int) -> None:
    """Via a temporary file in the same folder and a rename, which replaces whatever is at ``name`` (a link
    swapped in at the last moment included) and never follows it."""
    temporary, handle = _create_new(folder, lambda attempt: f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(text.encode("utf-8"))
            stream.flush()
            os.fsync(stream.fileno())
            _set_mode(stream.fileno(), folder, temporary, mode)
        try:
            os.replace(folder.at(temporary), folder.at(name), src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
        except OSError as error:
            raise folder.naming(error, name)
    except BaseException:
        try:
            os.unlink(folder.at(temporary), dir_fd=folder.fd)
        except OSError:
            pass
        raise


def _create_new(folder: _Folder, name_for, attempts: int = 1000) -> tuple[str, int]:
    """A new file (O_EXCL, O_NOFOLLOW) named ``name_for(attempt)``: never an existing file or a link."""
    for attempt in range(attempts):
        name = name_for(attempt)
        try:
            return name, folder.call(os.open, name, _CREATE_FLAGS, 0o600)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free file name", os.path.join(folder.path, name_for(0)))


def _set_mode(handle: int, folder: _Folder, name: str, mode: int) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(handle, mode)
    else:                                           # Windows before Python 3.13
        os.chmod(os.path.join(folder.path, name), mode)


def _new_backup_run(base: str) -> str:
    """A fresh timestamped folder per run, so a second run never overwrites the first run's backups."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with _open_folder(base, os.path.join(base, BACKUP_FOLDER), create=True) as backups:
        for attempt in range(1000):
            name = stamp if attempt == 0 else f"{stamp}-{attempt}"
            try:
                backups.call(os.mkdir, name)
                return os.path.join(base, BACKUP_FOLDER, name)
            except FileExistsError:
                continue
    raise FileExistsError(f"could not create a new backup folder under {os.path.join(base, BACKUP_FOLDER)}")


def _backup(path: str, data: bytes, info: os.stat_result, run: tuple[str, str], root: str | None) -> str:
    """The old bytes (read once, through the descriptor the sidecar was opened with) into the run folder."""
    run_folder, run_base = run
    try:
        relative = os.path.relpath(path, root) if root else os.path.basename(path)
    except ValueError:  # another drive (Windows)
        relative = os.path.basename(path)
    if relative.startswith(os.pardir):  # the file is not under the root: keep just its name
        relative = os.path.basename(path)
    target = os.path.join(run_folder, relative)
    stem = os.path.basename(target)
    with _open_folder(run_base, os.path.dirname(target), create=True) as folder:
        # Same name from another folder: never overwrite a backup.
        name, handle = _create_new(folder, lambda attempt: f"{stem}.{attempt}" if attempt else stem)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            _set_mode(stream.fileno(), folder, name, stat.S_IMODE(info.st_mode))
            if os.utime in os.supports_fd:          # like shutil.copy2: the old file's times
                os.utime(stream.fileno(), ns=(info.st_atime_ns, info.st_mtime_ns))
    return os.path.join(os.path.dirname(target), name)

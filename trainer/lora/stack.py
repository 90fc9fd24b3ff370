"""LORA_STACK, the interop list of ``(lora_name, strength_model, strength_clip)``: reading stacks other
packs build, finding their files safely, reading each file once, and the words that trigger a LoRA.

An entry with block weights is a :class:`StackEntry`: still a plain 3-tuple to every other pack (whose
loaders unpack three values and apply the whole LoRA), with the block-weight text beside it for ours.

No ComfyUI here: the node layer passes in what ``folder_paths`` lists, so all of it is unit-testable.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .files import SUFFIX, load_lora_file
from .files import PICKLE_SUFFIXES
from ..paths import is_inside

NONE_NAME = "None"          # what Comfyroll, Efficiency and our pedal put in a slot without a LoRA

Entry = tuple  # (lora_name: str, strength_model: float, strength_clip: float) -- plain, as others expect


class StackEntry(tuple):
    """``(lora_name, strength_model, strength_clip)`` carrying ``blocks``, a block-weight text (see
    block_weights.py; "" = the whole LoRA). A 4-tuple would break Comfyroll's and Efficiency's loaders,
    which unpack three values; this one unpacks as three everywhere."""

    def __new__(cls, name, strength_model, strength_clip, blocks: str = ""):
        entry = super().__new__(cls, (name, strength_model, strength_clip))
        entry.blocks = blocks
        return entry

    def __getnewargs__(self):       # copy and pickle rebuild it with its blocks
        return (*self, self.blocks)

    def __repr__(self) -> str:
        return f"StackEntry({tuple.__repr__(self)[1:-1]}, blocks={self.blocks!r})"


def entry_blocks(entry) -> str:
    """An entry's block-weight text; "" for a plain entry (ours or another pack's)."""
    return getattr(entry, "blocks", "") or ""


def stack_entry(name: str, strength_model: float, strength_clip: float, blocks: str = "") -> Entry:
    """A plain tuple, or a StackEntry when there are block weights."""
    return StackEntry(name, strength_model, strength_clip, blocks) if blocks else (name, strength_model, strength_clip)


def with_strengths(entry, strength_model: float, strength_clip: float) -> Entry:
    """The same LoRA (and block weights) at other strengths."""
    return stack_entry(entry[0], strength_model, strength_clip, entry_blocks(entry))


class LoraStackError(ValueError):
    """A stack or a LoRA file that cannot be used; ``problem`` and ``fix`` are worded for the user."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem} Fix: {fix}")
        self.problem = problem
        self.fix = fix


class LoraNotFoundError(LoraStackError):
    """The name is acceptable but no such file exists (an HTTP caller answers 404, not 400)."""


# --- stacks from anywhere ---------------------------------------------------------------------------
def normalize_stack(stack) -> list[Entry]:
    """Plain ``(name, float, float)`` tuples from our stack or Comfyroll's/Efficiency's (tuples or lists);
    our entries with block weights stay StackEntry.

    Empty and ``"None"`` slots are dropped; the order is kept. Anything else that is not a
    three-item entry with numeric strengths is refused, naming the entry.
    """
    if stack is None:
        return []
    if not isinstance(stack, (list, tuple)):
        raise LoraStackError(f"The LoRA stack is a {type(stack).__name__}, not a list of "
                             "(lora_name, strength_model, strength_clip).",
                             "connect the LORA_STACK output of a LoRA Pedal or another LoRA stack node.")
    entries = []
    for number, entry in enumerate(stack, start=1):
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise LoraStackError(f"Entry {number} of the LoRA stack is {entry!r}, not "
                                 "(lora_name, strength_model, strength_clip).",
                                 "build the stack with LoRA Pedal, CR LoRA Stack or LoRA Stacker nodes.")
        name, strength_model, strength_clip = entry
        if name is None or (isinstance(name, str) and name.strip() in ("", NONE_NAME)):
            continue
        try:
            strengths = float(strength_model), float(strength_clip)
        except (TypeError, ValueError):
            strengths = (math.nan, math.nan)
        if not all(math.isfinite(value) for value in strengths):
            raise LoraStackError(f"Entry {number} of the LoRA stack ({name}) has strengths "
                                 f"{strength_model!r}, {strength_clip!r}; they must be numbers.",
                                 "set both strengths to numbers such as 1.0.")
        entries.append(stack_entry(str(name), *strengths, entry_blocks(entry)))
    return entries


def is_active(entry: Entry, has_clip: bool = True) -> bool:
    """Whether applying the entry changes anything (ComfyUI's LoraLoader skips both-zero too)."""
    return entry[1] != 0 or (has_clip and entry[2] != 0)


# --- names and files --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedLora:
    name: str    # as ComfyUI's LoRA list spells it (relative to its loras folder)
    path: str    # the file to read


def name_key(name: str) -> str:
    """A spelling-independent form of a relative name: ``\\`` and ``/`` are the same separator."""
    text = name.strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return re.sub(r"/+", "/", text)


def looks_absolute(name: str) -> bool:
    return os.path.isabs(name) or bool(re.match(r"^([A-Za-z]:[\\/]|\\\\)", name))


def resolve_lora(name: str, listed: Iterable[str], folders: list[str],
                 full_path: Callable[[str], str | None]) -> ResolvedLora:
    """Find the file a stack entry names.

    - ``listed`` is ComfyUI's LoRA list (``folder_paths.get_filename_list("loras")``), ``folders`` the
      loras folders, ``full_path`` ComfyUI's ``get_full_path`` for the loras kind.
    - Relative names are matched against the list whichever separator they use (a workflow saved on
      Windows runs on Linux), with or without the ``.safetensors`` suffix.
    - Absolute paths are accepted only for files inside one of the loras folders, literally or after
      resolving symbolic links -- i.e. the very files the list offers -- and come back under their
      listed name. Any other absolute path is refused, so a shared workflow or an API prompt cannot
      make the server read files elsewhere (or probe which exist).
    - Only ``.safetensors`` files are usable; pickles (``.ckpt``/``.pt``/...) are refused because
      loading them can run code.
    """
    text = (name or "").strip() if isinstance(name, str) else ""
    if not text or text == NONE_NAME:
        raise LoraStackError("No LoRA is chosen.", "pick a LoRA file, or disable the pedal.")
    if "\x00" in text:
        raise LoraStackError(f"The LoRA name {text!r} contains a NUL character.", "pick the LoRA again from the list.")
    listed = list(listed)
    where = ", ".join(folders) if folders else "(no loras folder is configured)"
    if looks_absolute(text):
        resolved = _resolve_absolute(text, listed, folders, where)
    else:
        resolved = _resolve_relative(text, listed, full_path)
        if resolved is None:
            raise LoraNotFoundError(f"The LoRA file '{text}' was not found in the loras folders ({where}).",
                                 "put the file into one of those folders (subfolders are fine) and press R "
                                 "to refresh, or pick another LoRA.")
    _check_suffix(resolved.name)
    return resolved


def _resolve_relative(text: str, listed: list[str], full_path) -> ResolvedLora | None:
    by_key = {name_key(entry): entry for entry in listed}
    key = name_key(text)
    candidates = [key] if key.lower().endswith(SUFFIX) else [key, key + SUFFIX]
    for candidate in candidates:
        if candidate in by_key:
            path = full_path(by_key[candidate])
            if path:
                return ResolvedLora(by_key[candidate], path)
    # Not listed yet (ComfyUI caches its listing): ComfyUI's own lookup, which never leaves the folders.
    for candidate in candidates:
        native = candidate.replace("/", os.sep)
        path = full_path(native)
        if path:
            return ResolvedLora(native, path)
    return None


def _resolve_absolute(text: str, listed: list[str], folders: list[str], where: str) -> ResolvedLora:
    outside = LoraStackError(
        f"'{text}' is outside the loras folders ({where}). LoRA Lab reads LoRAs only from those folders, "
        "so a shared workflow cannot make ComfyUI read other files.",
        "move or link the file into a loras folder (or add its folder under `loras` in "
        "extra_model_paths.yaml and restart ComfyUI), then pick it by name.")
    if not os.path.isabs(text):     # a Windows drive or UNC path on POSIX: never one of our folders
        raise outside
    path = os.path.normpath(text)
    real = os.path.realpath(path)
    for folder in folders:
        folder_abs = os.path.normpath(os.path.abspath(folder))
        folder_real = os.path.realpath(folder)
        for candidate, base in ((path, folder_abs), (real, folder_real)):
            if is_inside(candidate, base) and candidate != base:
                if not os.path.isfile(path):
                    raise LoraNotFoundError(f"The LoRA file '{text}' does not exist.",
                                         f"check the path, or pick a LoRA from the list ({where}).")
                relative = os.path.relpath(candidate, base)
                listed_name = {name_key(entry): entry for entry in listed}.get(name_key(relative), relative)
                return ResolvedLora(listed_name, path)
    raise outside


def _check_suffix(name: str) -> None:
    suffix = os.path.splitext(name)[1].lower()
    if suffix in PICKLE_SUFFIXES:
        raise LoraStackError(f"'{name}' is a {suffix} file, a Python pickle, which can run code when it is "
                             "loaded; LoRA Lab only loads .safetensors LoRAs.",
                             "convert it to .safetensors (for example with kohya's sd-scripts or a "
                             "'convert to safetensors' tool) and pick the converted file.")
    if suffix != SUFFIX:
        raise LoraStackError(f"'{name}' is not a .safetensors file.", "pick a .safetensors LoRA.")


# --- reading files once -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraFile:
    path: str
    tensors: dict          # read-only by convention: shared by every model the LoRA is applied to
    metadata: dict
    nbytes: int


class LoraFileCache:
    """The last few LoRA files read, keyed by (real path, modification time, size).

    Flipping one pedal and queueing again re-reads nothing; a file replaced on disk is read afresh
    (its old version is dropped). Bounded by entry count and by bytes, least recently used first out.
    """

    def __init__(self, max_entries: int = 8, max_bytes: int = 3 * 1024 ** 3):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: "OrderedDict[tuple, LoraFile]" = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0

    def get(self, path: str) -> LoraFile:
        real = os.path.realpath(path)
        try:
            stat = os.stat(real)
        except OSError as error:
            raise LoraStackError(f"The LoRA file {path} cannot be read ({error.strerror}).",
                                 "check that the file exists and is readable.") from None
        key = (real, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        try:
            tensors, metadata = load_lora_file(real)   # looked up at call time: tests count reads
        except ValueError as error:
            raise LoraStackError(f"The LoRA file {path} is damaged or not a LoRA: {error}.",
                                 "download or train the file again; a file cut short by an interrupted "
                                 "copy looks like this.") from None
        loaded = LoraFile(path, tensors, metadata, sum(t.numel() * t.element_size() for t in tensors.values()))
        self.reads += 1
        with self._lock:
            for old in [k for k in self._entries if k[0] == real]:
                del self._entries[old]
            self._entries[key] = loaded
            while len(self._entries) > 1 and (len(self._entries) > self.max_entries or
                                              sum(f.nbytes for f in self._entries.values()) > self.max_bytes):
                self._entries.popitem(last=False)
        return loaded

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


MAX_HEADER_BYTES = 100_000_000    # safetensors' own limit; a LoRA's header is a few KB to a few MB


def read_header(path: str) -> dict:
    """The JSON header of a ``.safetensors`` file (tensor index plus ``__metadata__``), tensors unread.

    Only the 8-byte little-endian length and the JSON after it are read, so asking about a LoRA (its
    trigger words, base model, rank) costs a few KB however large the file, and nothing is unpickled.
    """
    try:
        with open(path, "rb") as opened:
            size = os.fstat(opened.fileno()).st_size
            prefix = opened.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"its header length ({length}) does not fit a {size}-byte safetensors file")
            header = json.loads(opened.read(length).decode("utf-8"))
    except OSError as error:
        raise LoraStackError(f"The LoRA file {path} cannot be read ({error.strerror}).",
                             "check that the file exists and is readable.") from None
    except (ValueError, UnicodeDecodeError) as error:     # json.JSONDecodeError is a ValueError
        raise LoraStackError(f"The LoRA file {path} is damaged or not a safetensors file: {error}.",
                             "download or train the file again.") from None
    except RecursionError:      # JSON nested thousands deep: no safetensors writer makes that
        raise LoraStackError(f"The LoRA file {path} is damaged or not a safetensors file: its header is "
                             "nested too deeply.", "download or train the file again.") from None
    if not isinstance(header, dict):
        raise LoraStackError(f"The LoRA file {path} is damaged: its header is not a JSON object.",
                             "download or train the file again.")
    ends = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(offset, int) and not isinstance(offset, bool) for offset in offsets)):
            raise LoraStackError(f"The LoRA file {path} is damaged: the header entry {key[:80]!r} has no "
                                 "[start, end] data_offsets.", "download or train the file again.")
        ends.append(offsets[1])
    # The tensors end where the file ends: a download cut short shows here without reading them.
    if 8 + length + max(ends, default=0) != size:
        raise LoraStackError(f"The LoRA file {path} is damaged: its size ({size} bytes) does not match its "
                             "header (a download or copy cut short looks like this).",
                             "download or train the file again.")
    return header


def header_metadata(header: dict) -> dict[str, str]:
    """The ``__metadata__`` of a header from :func:`read_header`, str values only (the format's rule)."""
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        return {}
    return {str(key): value for key, value in metadata.items() if isinstance(value, str)}


def read_metadata(path: str) -> dict[str, str]:
    """A ``.safetensors`` file's ``__metadata__``, read from the header only."""
    return header_metadata(read_header(path))


def describe_mismatch(path: str, tensors: dict[str, torch.Tensor]) -> LoraStackError:
    """The error for a file ComfyUI would load without changing anything (nothing maps to the model)."""
    name = os.path.basename(path)
    keys = list(tensors)
    if not keys:
        return LoraStackError(f"The LoRA file {path} holds no tensors.", "train or download the LoRA again.")
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        return LoraStackError(f"{name} ({path}) is a full checkpoint, not a LoRA.",
                              "load it with Load Checkpoint; put only LoRA files into the stack.")
    sample = ", ".join(keys[:3])
    return LoraStackError(
        f"None of the {len(keys)} tensors in {name} ({path}) matches this model, so it would change nothing "
        f"(keys look like: {sample}). It is not a LoRA, or it was made for another model family "
        "(an SDXL LoRA on SD1.5, say), or it only changes the text encoder and no CLIP is connected.",
        "use a LoRA trained for this checkpoint's family, and connect the CLIP if it is a text-encoder LoRA.")


# --- comparison grid columns ------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    label: str
    entries: tuple     # the stack this column renders with; () = the base model


def short_name(name: str) -> str:
    base = name_key(name).rsplit("/", 1)[-1]
    return base[:-len(SUFFIX)] if base.lower().endswith(SUFFIX) else base


def strength_text(entry: Entry) -> str:
    """``0.8`` or ``0.8/1``, then the block weights when the entry has them: ``0.8 blocks MIDD``."""
    strengths = f"{entry[1]:g}" if entry[1] == entry[2] else f"{entry[1]:g}/{entry[2]:g}"
    blocks = entry_blocks(entry)
    return f"{strengths} blocks {_short_blocks(blocks)}" if blocks else strengths


def _short_blocks(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def parse_strengths(text: str, limit: int = 16) -> list[float]:
    """``"0, 0.5, 1"`` -> ``[0.0, 0.5, 1.0]``; commas, semicolons or spaces separate values."""
    parts = [part for part in re.split(r"[,;\s]+", (text or "").strip()) if part]
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise LoraStackError(f"'{part}' in the sweep strengths is not a number.",
                                 "write numbers separated by commas, e.g. 0, 0.5, 1.") from None
        if not math.isfinite(value) or abs(value) > 100:
            raise LoraStackError(f"The sweep strength {part} is outside -100..100.", "use values such as 0, 0.5, 1.")
        values.append(value)
    if len(values) > limit:
        raise LoraStackError(f"{len(values)} sweep strengths were given; at most {limit} fit a grid.",
                             "use fewer values.")
    return values


def comparison_columns(entries: list[Entry], sweep_index: int = -1, sweep: list[float] = ()) -> list[Column]:
    """Base, each active LoRA alone, the whole stack (when it has two or more), then a sweep.

    The sweep varies one entry (0-based ``sweep_index``) inside the whole stack: each value sets both of
    its strengths (its clip strength stays 0 when it was 0), the other entries keep theirs. So the 0
    column shows the mix without that LoRA, and 1 the mix with it at full strength.
    """
    active = [entry for entry in entries if is_active(entry)]
    columns = [Column("base", ())]
    columns += [Column(f"{short_name(e[0])} {strength_text(e)}", (e,)) for e in active]
    if len(active) > 1:
        columns.append(Column(f"stack ({len(active)})", tuple(active)))
    if sweep_index >= 0 and sweep:
        if sweep_index >= len(entries):
            raise LoraStackError(f"sweep_index is {sweep_index} but the stack has {len(entries)} LoRA(s) "
                                 f"(0 is the first).", f"set sweep_index to 0..{len(entries) - 1}, or -1 for no sweep.")
        swept = entries[sweep_index]
        for value in sweep:
            changed = with_strengths(swept, value, value if swept[2] != 0 else 0.0)
            stack = tuple(changed if i == sweep_index else e for i, e in enumerate(entries))
            columns.append(Column(f"{short_name(swept[0])} @ {value:g}", stack))
    return columns

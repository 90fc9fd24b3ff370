"""LoRA files on disk: safe names, atomic saves and kohya's ``sshs_*`` hashes (the ``ss_*`` metadata itself:
trainer/training/kohya_metadata.py).

Files land in ComfyUI's ``models/loras`` while ComfyUI may be listing or loading that folder, so a save
never shows a half-written file under a loadable name and never replaces a user's file by accident.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
import safetensors
import safetensors.torch

from ..paths import is_inside

SUFFIX = ".safetensors"
MAX_NAME_CHARS = 200
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                     *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
_WINDOWS_FORBIDDEN = re.compile(r'[<>:"|?*\x00-\x1f]')


# --- names ----------------------------------------------------------------------------------------
def lora_relative_path(name: str) -> Path:
    """Validate a LoRA name such as ``"mychar/v1"`` and return it as a relative path ending in .safetensors.

    Refused with ValueError: empty names, absolute paths or drive letters, ``.``/``..`` components,
    NUL and the other characters Windows forbids, reserved Windows device names (CON, NUL, COM1…, also
    with an extension), components ending in a dot or space, and names over 200 characters. Both ``/``
    and ``\\`` separate folders, so a name behaves the same on every OS.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError("the LoRA name is empty")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"the LoRA name is {len(name)} characters long; at most {MAX_NAME_CHARS} are allowed")
    if name.lower().endswith(SUFFIX):
        name = name[:-len(SUFFIX)]
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"the LoRA name {name!r} is an absolute path; give a name inside the loras folder")
    parts = re.split(r"[/\\]", name)
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"the LoRA name {name!r} has an empty, '.' or '..' folder component")
        if _WINDOWS_FORBIDDEN.search(part):
            raise ValueError(f"the LoRA name {name!r} contains a character not allowed in file names "
                             '(NUL, control characters or one of <>:"|?*)')
        if part.split(".")[0].strip().upper() in _WINDOWS_RESERVED:
            raise ValueError(f"the LoRA name {name!r} uses {part!r}, a reserved device name on Windows")
        if part[-1] in ". ":
            raise ValueError(f"the LoRA name {name!r} has a component ending in a dot or space")
        if len(part.encode("utf-8")) > MAX_NAME_CHARS:
            raise ValueError(f"the LoRA name component {part[:20]!r}… is too long for a file name")
    return Path(*parts[:-1], parts[-1] + SUFFIX)


def _numbered(path: Path, number: int) -> Path:
    return path if number == 1 else path.with_name(f"{path.name[:-len(SUFFIX)]}_{number}{SUFFIX}")


# --- saving ---------------------------------------------------------------------------------------
def save_lora_file(folder: str | Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                   overwrite: bool = False, dtype: torch.dtype | None = None, add_sshs_hashes: bool = True) -> Path:
    """Write ``tensors`` with ``metadata`` to ``folder/name.safetensors`` atomically; return the final path.

    - Naming: ``name`` may contain subfolders (created as needed) but never leaves ``folder``; see
      :func:`lora_relative_path` for what is refused. Unless ``overwrite`` is true an existing file is
      never replaced: ``name.safetensors`` taken -> ``name_2.safetensors``, then ``name_3`` and so on.
    - Atomicity: the bytes go to ``<final>.tmp-<pid>`` in the same folder (a name ComfyUI does not
      list), are fsynced, then published in one step: a hard link when a new name is wanted (fails
      rather than replaces if another writer took the name meanwhile), ``os.replace`` when
      overwriting. If anything fails the temporary file is removed, any previous file is untouched and
      the exception propagates.
    - ``dtype`` casts floating tensors except 0-dim ones (kohya ``.alpha`` stays exact).
    - ``add_sshs_hashes`` adds kohya's ``sshs_model_hash``/``sshs_legacy_hash`` computed on what is written.
    """
    folder = Path(folder)
    final = folder / lora_relative_path(name)
    bad = {key: type(value).__name__ for key, value in metadata.items()
           if not isinstance(key, str) or not isinstance(value, str)}
    if bad:
        raise ValueError(f"safetensors metadata must map str to str; not str: {bad}")
    tensors = {key: _prepared(value, dtype) for key, value in tensors.items()}
    metadata = dict(metadata)
    if add_sshs_hashes:
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = sshs_hashes(tensors, metadata)

    _check_stays_inside(final.parent, folder)      # before mkdir: a link must not make us create folders elsewhere
    final.parent.mkdir(parents=True, exist_ok=True)
    _check_stays_inside(final.parent, folder)
    temporary = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        _write_file(tensors, temporary, metadata)
        with open(temporary, "r+b") as written:
            os.fsync(written.fileno())
        final = _publish(temporary, final, overwrite)
    finally:
        if temporary.exists():
            temporary.unlink()
    _fsync_folder(final.parent)
    return final


def _write_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """The one place bytes are written (the hardening suite makes it fail half-way, like a full disk)."""
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def _check_stays_inside(path: Path, folder: Path) -> None:
    """``path`` (or its deepest existing ancestor) really lies inside ``folder`` -- no symbolic link leads out."""
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    existing = path
    while existing != folder and not os.path.lexists(existing):
        existing = existing.parent      # only the part below ``folder`` matters; a new ``folder`` is made real
    real_folder = os.path.realpath(folder)
    if existing != folder and not is_inside(os.path.realpath(existing), real_folder):
        raise ValueError(f"{path} leads outside {folder} through a symbolic link; LoRA Lab does not write there")


def _prepared(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().to("cpu")
    if dtype is not None and tensor.is_floating_point() and tensor.dim() > 0:
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def _publish(temporary: Path, final: Path, overwrite: bool) -> Path:
    if overwrite:
        os.replace(temporary, final)
        return final
    for number in range(1, 10_000):
        candidate = _numbered(final, number)
        if candidate.exists():
            continue
        try:
            os.link(temporary, candidate)  # atomic and never replaces: FileExistsError if taken
        except FileExistsError:
            continue
        except OSError:
            # No hard links on this filesystem (FAT, some network shares): replace after the check above.
            os.replace(temporary, candidate)
        return candidate
    raise FileExistsError(f"{final} and 9,998 numbered variants exist; choose another name")


def _fsync_folder(folder: Path) -> None:
    # Makes the new directory entry durable on POSIX; Windows cannot open folders this way.
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- loading --------------------------------------------------------------------------------------
def load_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a ``.safetensors`` LoRA onto the CPU: ``(tensors, metadata)``; metadata is ``{}`` when absent.

    Pickle-based formats (.ckpt, .pt, .pth, .bin) are refused: loading them can run arbitrary code.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{path.name}: {suffix} files are Python pickles, which can run code when loaded; "
                         "LoRA Lab only reads .safetensors (convert the file first)")
    if suffix != SUFFIX:
        raise ValueError(f"{path.name}: not a .safetensors file")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as opened:
            metadata = opened.metadata() or {}
            tensors = {key: opened.get_tensor(key) for key in opened.keys()}
    except safetensors.SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    return tensors, dict(metadata)


def sshs_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's ``(sshs_model_hash, sshs_legacy_hash)`` (sd-scripts ``precalculate_safetensors_hashes``).

    Both hash the bytes of ``safetensors.torch.save(tensors, <only the ss_* metadata>)``:
    ``sshs_model_hash`` is the SHA-256 of everything after the 8-byte header length and the JSON header,
    i.e. of the tensor data alone, so no metadata edit changes it; ``sshs_legacy_hash`` is the first 8
    hex digits of the SHA-256 of bytes [0x100000, 0x110000) (sd-webui-additional-networks' old hash;
    that of empty input for files under 1 MiB). sd-webui-additional-networks and A1111 use them to
    identify a LoRA without rehashing it.
    """
    training_only = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    data = safetensors.torch.save(tensors, metadata=training_only)
    header_length = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(memoryview(data)[8 + header_length:]).hexdigest()
    legacy_hash = hashlib.sha256(memoryview(data)[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash

"""A folder of pictures -> a Dataset: kohya's "N_name" repeat folders, same-stem caption sidecars, and a
check of every file before anything trains.

Scanning opens each file (one per worker thread), reads its header, checks that it decodes cheaply
(PNG chunk checksums, JPEG at 1/8 scale) and hashes its bytes; what cannot be used is skipped with the
reason. Results are cached by path, size and modification time, so a re-scan of an unchanged folder
reads no picture again.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from PIL import Image, UnidentifiedImageError

from ..paths import is_inside
from .dataset import (DEFAULT_MAX_PIXELS, IGNORED_NAMES, IMAGE_EXTENSIONS, LARGE_REPEATS, MAX_CAPTION_BYTES,
                      SCAN_THREADS, _KOHYA_FOLDER, Dataset, DatasetError, DatasetItem, _orientation, _os_reason,
                      clean_caption)


def scan_folder(root: str, caption_extension: str = ".txt", default_repeats: int = 1,
                max_pixels: int = DEFAULT_MAX_PIXELS,
                on_progress: Callable[[int, int], None] | None = None) -> Dataset:
    """Find every picture under ``root`` (recursively), with its caption sidecar and kohya repeats.

    Files that cannot be used are listed in ``skipped`` with a reason; only when nothing at all is
    usable does this raise ``DatasetError``. Symbolic links are followed only while they stay inside
    ``root``, so nothing outside it is ever read. ``on_progress(done, total)`` is called as pictures
    are checked (a cold scan of 500 camera photos takes seconds).
    """
    caption_extension = normalize_caption_extension(caption_extension)
    if not isinstance(default_repeats, int) or default_repeats < 1:
        raise DatasetError(f"default_repeats is {default_repeats!r}.", "Use a whole number of 1 or more.")
    root_real = os.path.realpath(root)
    if not os.path.isdir(root_real):
        raise DatasetError(f"The dataset folder {root} does not exist or is not a folder.",
                           "Check the folder name.")

    skipped: list[tuple[str, str]] = []
    warn: list[str] = []
    pictures, captions, others, masks = _discover(root_real, caption_extension, skipped)
    pictures.sort(key=lambda found: (_natural_key(found[0]), found[0]))     # items, warnings: stable order
    root_repeats = _kohya_repeats(os.path.basename(root_real))

    items = []
    warned_concepts = set()
    sidecar_users: dict[str, list[str]] = {}
    inspected = _inspect_all([path for _, path in pictures], max_pixels, on_progress)
    for (rel, path), facts in zip(pictures, inspected):
        concept, repeats = _concept_of(rel, os.path.basename(root_real), root_repeats, default_repeats)
        if repeats == 0:
            skipped.append((rel, f"its folder '{concept}' asks for 0 repeats (kohya N_name rule)"))
            continue
        if repeats >= LARGE_REPEATS and concept not in warned_concepts:
            warned_concepts.add(concept)
            warn.append(f"Folder '{concept}' makes each of its pictures repeat {repeats} times (kohya N_name "
                        f"rule); rename it if that number is a date or an id, not a repeat count.")
        if isinstance(facts, _Unusable):
            skipped.append((rel, str(facts)))
            continue
        width, height, content_hash = facts
        caption, has_caption, caption_path = _caption_for(rel, path, caption_extension, captions, warn)
        if caption_path:
            sidecar_users.setdefault(caption_path, []).append(rel)
        mask = masks.pop(_sidecar_key(rel), None)
        items.append(DatasetItem(key=rel, caption=caption, repeats=repeats, concept=concept, width=width,
                                 height=height, content_hash=content_hash, has_caption=has_caption,
                                 path=path, caption_path=caption_path, mask_path=mask[1] if mask else None))

    for sidecar, users in sidecar_users.items():
        if len(users) > 1:
            warn.append(f"{' and '.join(users)} share the caption file {os.path.relpath(sidecar, root_real)}; "
                        f"rename one picture so each has its own caption.")
    used_sidecars = set(sidecar_users)
    orphans = sorted(rel for rel, path in captions.values() if path not in used_sidecars)
    if orphans:
        warn.append(f"{len(orphans)} caption file(s) have no picture with the same name: {_short_list(orphans)}.")
    if masks:
        warn.append(f"{len(masks)} mask file(s) have no picture with the same name: "
                    f"{_short_list(sorted(rel for rel, _ in masks.values()))}.")
    top_folders = {rel.split("/", 1)[0].lower() for rel, _ in pictures if "/" in rel}
    if top_folders & {"reg", "regularization", "regularisation"}:
        warn.append("A 'reg' folder is trained like any other pictures here; for prior preservation choose the "
                    "folder that holds only your training pictures, and give the reg folder to a second dataset "
                    "node connected to Train LoRA's regularization input.")

    if not items:
        raise _nothing_usable(root, pictures, others, skipped)
    return Dataset(items=tuple(items), root=root_real, skipped=tuple(sorted(skipped)), warnings=tuple(warn))


def folder_signature(root: str, caption_extension: str = ".txt") -> str:
    """A cheap change detector (ComfyUI's IS_CHANGED): the same walk as ``scan_folder``, hashing
    relative paths, sizes and modification times instead of file contents."""
    root_real = os.path.realpath(root)
    skipped: list[tuple[str, str]] = []
    pictures, captions, _, masks = _discover(root_real, normalize_caption_extension(caption_extension), skipped)
    digest = hashlib.sha256()
    for rel, path in sorted(pictures + list(captions.values()) + list(masks.values())):
        try:
            stat = os.stat(path)
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogatepass"))
        except OSError:
            digest.update(f"{rel}\0unreadable\n".encode("utf-8", "surrogatepass"))
    digest.update(repr(sorted(skipped)).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def normalize_caption_extension(extension: str) -> str:
    """".txt", "txt" and ".caption" are fine; anything that could name another folder is not."""
    extension = (extension or "").strip()
    if extension and not extension.startswith("."):
        extension = "." + extension
    if not re.fullmatch(r"\.[A-Za-z0-9_-]{1,16}", extension) or extension.lower() in IMAGE_EXTENSIONS:
        raise DatasetError(f"Caption extension {extension or '(empty)'!r} is not usable.",
                           "Use a short file extension such as .txt or .caption.")
    return extension


def _discover(root_real: str, caption_extension: str, skipped: list):
    """Walk the folder: pictures, captions and mask sidecars found, and a count of other files (which go to
    ``skipped``)."""
    pictures: list[tuple[str, str]] = []
    captions: dict[tuple[str, str], tuple[str, str]] = {}    # (folder, stem.lower()) -> (rel, path)
    masks: dict[tuple[str, str], tuple[str, str]] = {}       # (folder, picture stem.lower()) -> (rel, path)
    others = 0
    visited = {root_real}
    pending = [("", root_real)]
    while pending:
        rel_dir, abs_dir = pending.pop()
        try:
            with os.scandir(abs_dir) as listing:
                # Real entries before links, so a folder reached both ways is listed under its real name.
                entries = sorted(listing, key=lambda entry: (entry.is_symlink(), entry.name))
        except OSError as error:
            skipped.append((rel_dir or ".", f"cannot list this folder ({_os_reason(error)})"))
            continue
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            stem, extension = os.path.splitext(entry.name)
            if entry.name.startswith(".") or entry.name.lower() in IGNORED_NAMES:
                # Dot-folders (.git, .ipynb_checkpoints) hold copies; "._x.png" is macOS metadata, not a PNG.
                if extension.lower() in IMAGE_EXTENSIONS:
                    skipped.append((rel, "hidden file (macOS '._' metadata or similar), not a picture"))
                continue
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if not is_inside(target, root_real):
                    skipped.append((rel, "symbolic link leading outside the dataset folder; not followed"))
                    continue
                if not os.path.exists(target):
                    skipped.append((rel, "broken symbolic link"))
                    continue
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError as error:
                skipped.append((rel, f"cannot read ({_os_reason(error)})"))
                continue
            if is_dir:
                real = os.path.realpath(entry.path)
                if real in visited:
                    skipped.append((rel, "link to a folder that is already included"))
                else:
                    visited.add(real)
                    pending.append((rel, entry.path))
            elif not is_file:
                skipped.append((rel, "not a regular file"))    # a FIFO or socket would block a read forever
            elif owner := sidecar_owner(entry.name):      # cat.mask.png: where cat.png's loss counts, not a picture
                masks[(rel_dir, owner.lower())] = (rel, entry.path)
            elif extension.lower() in IMAGE_EXTENSIONS:
                pictures.append((rel, entry.path))
            elif extension.lower() == caption_extension.lower():
                captions[(rel_dir, stem.lower())] = (rel, entry.path)
            else:
                others += 1
                skipped.append((rel, f"not a picture ({extension or 'no extension'}); pictures are "
                                     f"{', '.join(sorted(IMAGE_EXTENSIONS))}"))
    return pictures, captions, others, masks


MASK_SIDECAR_SUFFIXES = (".mask.png", "-masklabel.png")     # lower-cased; LoRA Lab's, OneTrainer's


def sidecar_owner(file_name: str) -> str | None:
    """The picture stem a mask sidecar belongs to ("cat.mask.png" -> "cat"), or None for other files."""
    lowered = file_name.lower()
    for suffix in MASK_SIDECAR_SUFFIXES:
        if lowered.endswith(suffix) and len(file_name) > len(suffix):
            return file_name[:-len(suffix)]
    return None


def _sidecar_key(rel: str) -> tuple[str, str]:
    """(folder, stem.lower()) of a picture, as captions and masks are filed by ``_discover``."""
    rel_dir = rel.rsplit("/", 1)[0] if "/" in rel else ""
    return rel_dir, os.path.splitext(os.path.basename(rel))[0].lower()


def _kohya_repeats(folder_name: str) -> int | None:
    match = _KOHYA_FOLDER.fullmatch(folder_name)
    return int(match.group(1)) if match else None


def _concept_of(rel: str, root_name: str, root_repeats: int | None, default_repeats: int) -> tuple[str, int]:
    """The nearest enclosing "N_name" folder sets the repeats (kohya_ss's img/10_name layout works too)."""
    parts = rel.split("/")[:-1]
    for depth in range(len(parts), 0, -1):
        repeats = _kohya_repeats(parts[depth - 1])
        if repeats is not None:
            return "/".join(parts[:depth]), repeats
    if root_repeats is not None:     # the user picked the "10_name" folder itself
        return root_name, root_repeats
    return "", default_repeats


class _Unusable(Exception):
    """A per-file reason to skip a picture."""


_facts_lock = threading.Lock()


_facts_cache: "OrderedDict[tuple, tuple[int, int, str]]" = OrderedDict()


_FACTS_CACHE_SIZE = 50_000


def clear_scan_cache() -> None:
    """Forget what earlier scans learned about files (the benchmark measures cold scans with it)."""
    with _facts_lock:
        _facts_cache.clear()


def _inspect_all(paths: list[str], max_pixels: int, on_progress=None) -> list:
    """Facts or an ``_Unusable`` per path, in order. PIL and hashlib release the GIL while decoding
    and hashing, so a few threads make a cold scan of a big folder scale with the cores."""
    def inspect(path: str):
        try:
            return _inspect_picture(path, max_pixels)
        except _Unusable as unusable:
            return unusable

    results = []
    with ThreadPoolExecutor(max_workers=SCAN_THREADS, thread_name_prefix="loralab-scan") as pool:
        for result in pool.map(inspect, paths):     # in order; progress reported from this thread
            results.append(result)
            if on_progress:
                on_progress(len(results), len(paths))
    return results


def _inspect_picture(path: str, max_pixels: int) -> tuple[int, int, str]:
    """(width, height after EXIF orientation, sha256) of one picture, or ``_Unusable`` with the reason.

    Rescans of unchanged files (same size, mtime and inode) come from a cache, so pressing Queue
    again on a 500-picture folder does not re-hash gigabytes.
    """
    try:
        stat = os.stat(path)
    except OSError as error:
        raise _Unusable(f"cannot read ({_os_reason(error)})") from None
    if stat.st_size == 0:
        raise _Unusable("empty file (0 bytes)")
    cache_key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    with _facts_lock:
        facts = _facts_cache.get(cache_key)
        if facts:
            _facts_cache.move_to_end(cache_key)
    if facts:
        _check_pixel_count(facts[0], facts[1], max_pixels)
        return facts
    width, height = _read_and_check(path, max_pixels)
    facts = (width, height, _sha256_of_file(path))
    with _facts_lock:
        _facts_cache[cache_key] = facts
        while len(_facts_cache) > _FACTS_CACHE_SIZE:
            _facts_cache.popitem(last=False)
    return facts


def _read_and_check(path: str, max_pixels: int) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            width, height = image.size
            if _orientation(image) in (5, 6, 7, 8):
                width, height = height, width
            _check_pixel_count(width, height, max_pixels)
            _check_decodes(image)
    except Image.DecompressionBombError as error:
        size = _header_size_without_bomb_check(path)
        if size:
            _check_pixel_count(size[0], size[1], max_pixels)
        raise _Unusable(f"too large to open safely ({error})") from None
    except UnidentifiedImageError:
        raise _Unusable("not a picture PIL can read (the contents are not PNG, JPEG, WebP or BMP)") from None
    except Exception as error:
        # PIL reports truncated or corrupt data as OSError/SyntaxError, but damaged headers can raise
        # almost anything; one bad file must never sink the scan of the others.
        raise _Unusable(f"broken or unreadable picture ({_os_reason(error)})") from None
    return width, height


def _check_pixel_count(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise _Unusable(f"{width}x{height} is {width * height / 1e6:.0f} megapixels, above the "
                        f"{max_pixels / 1e6:.0f}-megapixel limit (a decompression-bomb guard); downscale it")


def _check_decodes(image: Image.Image) -> None:
    """Catch truncated and corrupt files at scan time without decoding full-size pixels."""
    if image.format == "PNG":
        image.verify()                      # walks every chunk's CRC up to IEND; no decompression
    elif image.format in ("JPEG", "MPO"):
        width, height = image.size
        image.draft(None, (max(1, width // 8), max(1, height // 8)))    # libjpeg decodes at 1/8 scale
        image.load()
    else:
        image.load()                        # BMP/WebP have no cheap check; one picture per thread


def _header_size_without_bomb_check(path: str) -> tuple[int, int] | None:
    """The size PIL refused to open, for a message that names it (the format plugins skip the check)."""
    from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin, WebPImagePlugin
    for plugin in (PngImagePlugin.PngImageFile, JpegImagePlugin.JpegImageFile,
                   WebPImagePlugin.WebPImageFile, BmpImagePlugin.BmpImageFile):
        try:
            with plugin(path) as image:
                return image.size
        except Exception:       # wrong format for this plugin: try the next
            continue
    return None


def _sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise _Unusable(f"cannot read ({_os_reason(error)})") from None
    return digest.hexdigest()


def _caption_for(rel: str, path: str, extension: str, captions: dict, warn: list) -> tuple[str, bool, str | None]:
    """(caption, has_caption, caption_path) for one picture, from its same-stem sidecar."""
    rel_dir = rel.rsplit("/", 1)[0] if "/" in rel else ""
    stem = os.path.splitext(os.path.basename(rel))[0]
    found = captions.get((rel_dir, stem.lower()))
    if found is None:
        would_be = os.path.splitext(path)[0] + extension
        if os.path.lexists(would_be):
            # A sidecar we refused (a link out of the folder, a directory): never write through it either.
            warn.append(f"{rel}: the caption file next to it was skipped, so it gets no caption and "
                        f"captioning will not write one.")
            return "", False, None
        return "", False, would_be
    caption_rel, caption_path = found
    text, problem = _read_caption(caption_path)
    if problem:
        warn.append(f"{caption_rel}: {problem}")
    return text, bool(text), caption_path


def _read_caption(path: str) -> tuple[str, str | None]:
    """Caption text and an optional warning. UTF-8 (BOM or not), UTF-16 and UTF-32 with BOM are read as is."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CAPTION_BYTES + 1)
    except OSError as error:
        return "", f"cannot read this caption ({_os_reason(error)}); the picture counts as uncaptioned."
    problem = None
    if len(raw) > MAX_CAPTION_BYTES:
        raw = raw[:MAX_CAPTION_BYTES]
        problem = f"caption longer than {MAX_CAPTION_BYTES // 1024} KB; only the start is used."
    if raw.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        text = raw.decode("utf-32", errors="replace")      # checked first: its BOM starts like UTF-16's
    elif raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = raw.decode("utf-16", errors="replace")      # Windows Notepad's "Unicode"
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            try:
                text = raw.decode("cp1252")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            problem = ("not UTF-8 text; read it as Windows-1252/Latin-1. Check the caption and re-save the "
                       "file as UTF-8.")
    if "\x00" in text:
        return "", "looks like binary data, not text; ignored (the picture counts as uncaptioned)."
    return clean_caption(text), problem


def _nothing_usable(root: str, pictures: list, others: int, skipped: list) -> DatasetError:
    kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
    if not pictures:
        found = f" It holds {others} other file(s)." if others else " It is empty."
        return DatasetError(f"No pictures in {root} (looked for {kinds}, in subfolders too).{found}",
                            "Put your training pictures in this folder, or choose the folder that holds them.")
    reasons = "; ".join(f"{rel}: {reason}" for rel, reason in sorted(skipped)[:5])
    more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
    return DatasetError(f"None of the {len(pictures)} picture(s) in {root} could be used: {reasons}{more}.",
                        "Replace the broken files (re-export them as PNG or JPEG) and run again.")


def _natural_key(key: str) -> list:
    """"img2" before "img10", case-insensitive; split alternates text and digits, so types line up."""
    return [int(part) if index % 2 else part.casefold() for index, part in enumerate(re.split(r"(\d+)", key))]


def _short_list(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" … and {len(names) - limit} more" if len(names) > limit else "")

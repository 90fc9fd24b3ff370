"""The immutable captioned dataset, from a folder (folder_scan.py) or an IMAGE batch, and its step arithmetic.

Full-size pixels are decoded only when the trainer or the preview asks for one picture
(``Dataset.load_image``). Nothing here imports ComfyUI.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from ..paths import is_inside

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}   # compared lower-cased
DEFAULT_MAX_PIXELS = 100_000_000       # 100 MP: a 12000x8000 photo passes, a 20000x20000 bomb does not
MAX_CAPTION_BYTES = 64 * 1024          # CLIP reads 77 tokens; anything this long is not a caption
BACKGROUND = (255, 255, 255)           # transparent areas become white, like most image viewers show them
LARGE_REPEATS = 200                    # "2024_trip" is far more likely a date than a repeat count
SCAN_THREADS = min(4, os.cpu_count() or 1)
IGNORED_NAMES = {"thumbs.db", "desktop.ini"}    # OS clutter, never worth a line in the report
_KOHYA_FOLDER = re.compile(r"(\d+)_(.+)")
_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


class DatasetError(ValueError):
    """Nothing usable (or a bad argument). ``problem`` and ``fix`` are worded for the user."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem} Fix: {fix}")
        self.problem = problem
        self.fix = fix


@dataclass(frozen=True)
class DatasetItem:
    key: str              # "10_cat/a.png" (relative, "/"-separated) or "image_0003" for in-memory
    caption: str
    repeats: int
    concept: str          # the kohya "N_name" folder that set the repeats, or ""
    width: int            # after EXIF orientation
    height: int
    content_hash: str     # sha256 of the file bytes, or of the float32 pixels for in-memory images
    has_caption: bool     # False: empty caption, needs captioning
    path: str | None = None
    caption_path: str | None = None
    mask_path: str | None = None   # its <name>.mask.png / <name>-masklabel.png (loss_masks.py), if any


# eq=False: the pixels tensor makes field-wise equality ambiguous; identity is what callers need.
@dataclass(frozen=True, eq=False)
class Dataset:
    items: tuple[DatasetItem, ...]
    root: str | None = None
    skipped: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = ()
    pixels: "torch.Tensor | None" = None    # (N,H,W,3) float 0..1, IMAGE-batch datasets only
    masks: "torch.Tensor | None" = None     # (N,H,W) float 0..1 with ``pixels``: where the loss counts (loss_masks.py)
    # Set by a review that is not finished (Review Captions' ready_to_train off): why training must wait.
    waiting_for_review: str = ""

    @property
    def num_images(self) -> int:
        return len(self.items)

    @property
    def total_repeats(self) -> int:
        return sum(item.repeats for item in self.items)

    def load_image(self, index: int, max_side: int | None = None) -> Image.Image:
        """Decode one picture: RGB, EXIF-oriented, alpha flattened onto white.

        ``max_side`` (previews) fits the result inside a square of that size and lets JPEG decode
        at a reduced scale, which is several times faster for camera photos.
        """
        item = self.items[index]
        if self.pixels is not None:
            array = (self.pixels[index].clamp(0, 1) * 255).round().byte().cpu().numpy()
            image = Image.fromarray(array)
        else:
            image = _decode_file(item, self.root, max_side)
        if max_side:
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return image

    def with_captions(self, captions: Sequence[str]) -> "Dataset":
        if isinstance(captions, str) or len(captions) != len(self.items):
            count = 1 if isinstance(captions, str) else len(captions)
            raise DatasetError(f"Got {count} captions for {len(self.items)} pictures.",
                               "Give exactly one caption per picture, in dataset order.")
        items = tuple(dataclasses.replace(item, caption=clean_caption(text), has_caption=bool(clean_caption(text)))
                      for item, text in zip(self.items, captions))
        return dataclasses.replace(self, items=items)

    def fingerprint(self) -> str:
        """Changes when any picture, caption or repeat count changes; the trainer skips retraining on a match."""
        rows = [[item.key, item.content_hash, item.caption, item.repeats] for item in self.items]
        digest = hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        if self.masks is not None:          # only then: the fingerprints of datasets without masks stay as they were
            digest.update(self.masks.numpy().tobytes())
        return digest.hexdigest()


def clean_caption(text: str) -> str:
    """One line, single spaces: sidecars written by hand often end with a newline or wrap lines."""
    return re.sub(r"\s+", " ", text).strip()


# --- reading one picture ------------------------------------------------------------------------------


def _orientation(image: Image.Image) -> int:
    """EXIF orientation read from the header only (PNG's getexif would decode the whole picture)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:           # malformed EXIF: treat as upright rather than losing the picture
        return 1
    return value if value in _TRANSPOSE_FOR_ORIENTATION else 1


def _os_reason(error: BaseException) -> str:
    if isinstance(error, PermissionError):
        return "permission denied"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _decode_file(item: DatasetItem, root: str | None, max_side: int | None) -> Image.Image:
    if not item.path:
        raise DatasetError(f"Picture {item.key} has no file and no pixels.", "Rebuild the dataset.")
    real = os.path.realpath(item.path)
    if root and not is_inside(real, root):    # the file was swapped for a link after the scan
        raise DatasetError(f"{item.key} now leads outside the dataset folder.",
                           "Replace the link with the picture itself and run the dataset node again.")
    try:
        with Image.open(item.path) as image:
            orientation = _orientation(image)
            if max_side:
                image.draft(None, (max_side, max_side))    # JPEG only: decode at 1/2..1/8 scale
            image.load()
            rgb = to_rgb(image)
    except Exception as error:      # anything PIL raises on a file that changed since the scan
        raise DatasetError(f"Cannot read {item.key} ({_os_reason(error)}); it changed after the dataset was scanned.",
                           "Fix or remove the file and run the dataset node again.") from None
    transpose = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
    return rgb.transpose(transpose) if transpose is not None else rgb


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparency becomes ``BACKGROUND``, 16-bit greys are scaled rather than clipped."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        scale = 1.0 if image.mode == "F" else 255.0 / 65535.0
        grey = np.clip(np.asarray(image, dtype=np.float32) * scale, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" or "transparency" in image.info:
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba.convert("RGB"), (0, 0), rgba.getchannel("A"))
        return flat
    return image if image.mode == "RGB" else image.convert("RGB")


# --- IMAGE batches --------------------------------------------------------------------------------
def dataset_from_pixels(pixels: "torch.Tensor", captions: list[str], repeats: int = 1,
                        masks: "torch.Tensor | None" = None) -> Dataset:
    """A dataset over a ComfyUI IMAGE batch (B,H,W,C float 0..1).

    ``captions`` holds one caption per picture, or one for all, or none (all uncaptioned). ``masks``: a
    ComfyUI MASK batch (B,H,W or H,W; one for all pictures or one each), white = where the loss counts. The
    pixels are copied outside inference mode so the trainer may use them with autograd.
    """
    import torch
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[0] < 1:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise DatasetError(f"Expected an IMAGE batch shaped (count, height, width, channels), got {shape}.",
                           "Connect an IMAGE output (Load Image, a batch node) to this input.")
    if pixels.shape[-1] not in (1, 3, 4):
        raise DatasetError(f"The IMAGE batch has {pixels.shape[-1]} channels per pixel.",
                           "Connect an RGB IMAGE (3 channels); convert masks to images first.")
    if not isinstance(repeats, int) or repeats < 1:
        raise DatasetError(f"repeats is {repeats!r}.", "Use a whole number of 1 or more.")
    count = pixels.shape[0]
    if len(captions) == 1:
        captions = list(captions) * count
    elif len(captions) == 0:
        captions = [""] * count
    elif len(captions) != count:
        raise DatasetError(f"Got {len(captions)} captions for {count} pictures.",
                           "Write one caption per line (one line per picture, in batch order), "
                           "or a single line to use for every picture.")
    with torch.inference_mode(False), torch.no_grad():
        rgb = pixels.detach().to(device="cpu", dtype=torch.float32).clone()
        if rgb.shape[-1] == 1:
            rgb = rgb.expand(-1, -1, -1, 3).clone()
        elif rgb.shape[-1] == 4:    # straight alpha onto white, as for files
            alpha = rgb[..., 3:].clamp(0, 1)
            rgb = rgb[..., :3] * alpha + (1 - alpha)
        rgb = rgb.clamp(0, 1).contiguous()
    height, width = rgb.shape[1], rgb.shape[2]
    masks = mask_batch(masks, count, height, width) if masks is not None else None
    items = tuple(
        DatasetItem(key=f"image_{index:04d}", caption=clean_caption(caption), repeats=repeats, concept="",
                    width=width, height=height, content_hash=hashlib.sha256(rgb[index].numpy().tobytes()).hexdigest(),
                    has_caption=bool(clean_caption(caption)))
        for index, caption in enumerate(captions))
    return Dataset(items=items, pixels=rgb, masks=masks)


def mask_batch(masks: "torch.Tensor", count: int, height: int, width: int) -> "torch.Tensor":
    """A MASK input as (count, H, W) float32 CPU values in 0..1, or a DatasetError saying what does not fit."""
    import torch
    if not isinstance(masks, torch.Tensor) or masks.dim() not in (2, 3):
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise DatasetError(f"masks should be a MASK batch shaped (count, height, width), got {shape}.",
                           "Connect a MASK output (Load Image's, a mask editor's, Convert Image to Mask).")
    masks = masks if masks.dim() == 3 else masks[None]
    if tuple(masks.shape[1:]) != (height, width) or masks.shape[0] not in (1, count):
        raise DatasetError(f"The masks are {masks.shape[0]} of {masks.shape[2]}x{masks.shape[1]}; the pictures are "
                           f"{count} of {width}x{height}.",
                           "Give one mask per picture (or one for all), at the pictures' size.")
    with torch.inference_mode(False), torch.no_grad():
        return masks.detach().to("cpu", torch.float32).expand(count, -1, -1).clamp(0, 1).contiguous()


# --- the report -------------------------------------------------------------------------------------
EXACT_STEPS_NOTE = "Train LoRA's report has the exact count (per bucket, with gradient accumulation)"


def steps_report(dataset: Dataset, batch_size: int, target_steps: int, source: str | None = None,
                 max_lines: int = 15) -> str:
    """What was found, and kohya's arithmetic: steps per epoch = pictures x repeats / batch size.

    ``source`` names where the pictures came from (default: the folder's full path).
    """
    if batch_size < 1:
        raise DatasetError(f"batch_size is {batch_size}.", "Use a batch size of 1 or more.")
    items = dataset.items
    captioned = sum(item.has_caption for item in items)
    source = source or (f"in {dataset.root}" if dataset.root else "from an IMAGE batch")
    lines = [f"{len(items)} picture(s) {source}: {captioned} captioned, {len(items) - captioned} without a caption."]
    if captioned < len(items):
        lines.append("  Uncaptioned pictures need captions: run the dataset through LoRA Lab's Caption node "
                     "or write a caption file next to each picture.")
    if items:
        smallest = min(items, key=lambda item: item.width * item.height)
        largest = max(items, key=lambda item: item.width * item.height)
        lines.append(f"Sizes: smallest {smallest.width}x{smallest.height} ({smallest.key}), "
                     f"largest {largest.width}x{largest.height} ({largest.key}).")

    lines.append("Repeats per folder:")
    groups: dict[tuple[str, int], int] = {}
    for item in items:
        groups[(item.concept, item.repeats)] = groups.get((item.concept, item.repeats), 0) + 1
    named_folders = any(concept for concept, _ in groups)
    for (concept, repeats), count in sorted(groups.items()):
        label = concept or ("pictures outside N_name folders" if named_folders else "all pictures")
        lines.append(f"  {label}: {count} x {repeats} repeat{'s' * (repeats != 1)} = {count * repeats}")

    for title, entries in (("Skipped", [f"{rel}: {reason}" for rel, reason in dataset.skipped]),
                           ("Warnings", list(dataset.warnings))):
        if entries:
            lines.append(f"{title} ({len(entries)}):")
            lines.extend(f"  - {entry}" for entry in entries[:max_lines])
            if len(entries) > max_lines:
                lines.append(f"  … and {len(entries) - max_lines} more")

    total = dataset.total_repeats
    per_epoch = math.ceil(total / batch_size)
    # kohya's estimate: Train LoRA also rounds batches up per aspect-ratio bucket and divides by accumulation.
    lines.append(f"Steps per epoch = pictures x repeats / batch size = {total} / {batch_size} = {per_epoch}"
                 + (" (rounded up)" if total % batch_size else "") + f"; {EXACT_STEPS_NOTE}.")
    if target_steps > 0 and per_epoch > 0:
        epochs = math.ceil(target_steps / per_epoch)
        lines.append(f"For {target_steps} steps: {epochs} epoch{'s' * (epochs != 1)} = {epochs * per_epoch} steps.")
    return "\n".join(lines)

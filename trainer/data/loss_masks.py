"""Masked loss: where in each picture the loss counts, as a weight per latent pixel.

A picture's mask comes from, in this order:
  1. the MASK batch given with an IMAGE-batch dataset (Dataset From Images' ``masks``; white = learned);
  2. a sidecar next to the file: ``<name>.mask.png`` or ``<name>-masklabel.png`` (OneTrainer's name), white =
     learned (folder_scan.py files them with their picture, never as pictures);
  3. the picture's own alpha channel: opaque = learned, transparent = background.
A picture with none of them trains whole. The mask goes through the picture's own EXIF orientation (a
sidecar through its own), the same resize and centre crop to the bucket, and is then averaged down to the
latent's size ("area", as kohya's ``apply_masked_loss``). The weight is ``floor + (1 - floor) * mask``: the
floor (OneTrainer's ``unmasked_weight``) keeps some of the background in the loss. As in kohya, the
weighted error is averaged over all latent pixels, not divided by the mask's area.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .buckets import fit_to_bucket
from .dataset import Dataset, DatasetError, _TRANSPOSE_FOR_ORIENTATION, _orientation

ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")


@dataclass(frozen=True)
class PictureMask:
    image: Image.Image      # mode "L", the size of the (oriented) picture; 255 = learned
    source: str             # "MASK input", "mask file", "alpha channel"


def picture_mask(dataset: Dataset, index: int) -> PictureMask | None:
    """The mask of picture ``index`` (sources in the module doc), or None when it has none."""
    item = dataset.items[index]
    if dataset.masks is not None:
        array = (dataset.masks[index].clamp(0, 1) * 255).round().byte().cpu().numpy()
        return PictureMask(Image.fromarray(array, mode="L"), "MASK input")
    if item.mask_path:
        mask = _oriented(item.mask_path, item.key, lambda image: image.convert("L"))
        if mask.size != (item.width, item.height):
            raise DatasetError(f"The mask {os.path.basename(item.mask_path)} is {mask.size[0]}x{mask.size[1]}, but "
                               f"{item.key} is {item.width}x{item.height}.",
                               "Save the mask at the picture's size (and the same way up).")
        return PictureMask(mask, "mask file")
    if item.path:
        alpha = _oriented(item.path, item.key, _alpha_channel)
        if alpha is not None:
            return PictureMask(alpha, "alpha channel")
    return None


def latent_weights(mask: Image.Image, bucket: tuple[int, int], latent_size: tuple[int, int],
                   floor: float) -> torch.Tensor:
    """(h, w) float32 loss weights: the mask fitted to the bucket as the picture is, averaged down to the latent
    grid, then ``floor + (1 - floor) * mask``."""
    fitted = np.asarray(fit_to_bucket(mask, bucket), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(fitted).clamp_(0.0, 1.0)[None, None]      # resampling may ring past 0 and 1
    latent = F.interpolate(pixels, size=latent_size, mode="area")[0, 0]
    return (floor + (1.0 - floor) * latent).contiguous()


def _alpha_channel(image: Image.Image) -> Image.Image | None:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif "transparency" in image.info and image.mode in ("L", "RGB"):
        image = image.convert("LA" if image.mode == "L" else "RGBA")
    if image.mode not in ALPHA_MODES:
        return None
    return image.convert("RGBA").getchannel("A")


def _oriented(path: str, key: str, read):
    """``read(image)`` of the file at ``path``, turned by the file's EXIF orientation as its picture is."""
    try:
        with Image.open(path) as image:
            orientation = _orientation(image)
            image.load()
            result = read(image)
    except Exception as error:
        raise DatasetError(f"Cannot read the mask of {key} from {os.path.basename(path)} ({error}).",
                           "Fix or remove that file and run again.") from None
    transpose = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
    return result.transpose(transpose) if result is not None and transpose is not None else result


class MaskedLoss:
    """encode_dataset's ``loss_weight`` for one run: each picture's weights, and where its mask came from (for
    the report and the file's metadata)."""

    def __init__(self, dataset: Dataset, unmasked_weight: float):
        if not 0.0 <= unmasked_weight < 1.0:
            raise ValueError(f"unmasked_weight is {unmasked_weight}; it must be from 0 (outside a mask counts "
                             "nothing) to below 1 (1 would be no mask)")
        self.dataset, self.floor = dataset, float(unmasked_weight)
        self.sources: dict[str, int] = {}
        self.unmasked = 0

    def __call__(self, index: int, bucket: tuple[int, int], latent_size: tuple[int, int]) -> torch.Tensor | None:
        mask = picture_mask(self.dataset, index)
        if mask is None:
            self.unmasked += 1
            return None
        self.sources[mask.source] = self.sources.get(mask.source, 0) + 1
        return latent_weights(mask.image, bucket, latent_size, self.floor)

    @property
    def masked(self) -> int:
        return sum(self.sources.values())

    def description(self) -> str:
        """'12 of 20 pictures (8 alpha channel, 4 mask file); outside a mask the loss weighs 0.1'."""
        sources = ", ".join(f"{count} {source}" for source, count in sorted(self.sources.items()))
        return (f"{self.masked} of {self.masked + self.unmasked} pictures ({sources}); outside a mask the loss "
                f"weighs {self.floor:g}")

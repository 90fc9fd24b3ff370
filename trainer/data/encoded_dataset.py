"""Turn a dataset into training examples: bucket, crop, VAE-encode once, encode each caption once."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .buckets import crop_offset, fit_to_bucket, group_into_batches, make_buckets, nearest_bucket


@dataclass
class TextEncoding:
    """What a text encoder makes of one caption: per-token states for cross-attention and, for models
    conditioned on it (SDXL), the pooled vector."""
    cross_attn: torch.Tensor                 # (1,T,D)
    pooled: torch.Tensor | None = None       # (1,P)

    def stored(self) -> "TextEncoding":
        """A detached float32 CPU copy, to keep between steps and runs."""
        def keep(tensor):
            return None if tensor is None else tensor.detach().to("cpu", torch.float32).clone()
        return TextEncoding(keep(self.cross_attn), keep(self.pooled))

    def to(self, device) -> "TextEncoding":
        return TextEncoding(self.cross_attn.to(device), None if self.pooled is None else self.pooled.to(device))


def as_text_encoding(value) -> TextEncoding:
    """Encoders may return a bare cross-attention tensor (SD1/SD2 without pooled use, plain-torch tests)."""
    return value if isinstance(value, TextEncoding) else TextEncoding(value)


@dataclass(frozen=True)
class PictureSize:
    """Where a training picture came from, for SDXL's size conditioning (kohya's original_size,
    crop_top_left and target_size); models without it ignore this."""
    original: tuple[int, int]     # (width, height) of the file
    crop: tuple[int, int]         # (left, top) of the crop in the scaled picture
    target: tuple[int, int]       # (width, height) trained at: the bucket

    @classmethod
    def of(cls, width: int, height: int, bucket: tuple[int, int]) -> "PictureSize":
        return cls((width, height), crop_offset(width, height, bucket), tuple(bucket))


EncodePixels = Callable[[torch.Tensor], torch.Tensor]   # (1,H,W,3) in 0..1 -> (1,C,h,w) model-space latent
EncodeCaption = Callable[[str], "TextEncoding | torch.Tensor"]   # caption -> its encoding


@dataclass
class Example:
    latent: torch.Tensor      # (C,h,w), model space (already scaled for the denoiser)
    caption: str
    bucket: tuple[int, int]   # (width, height) in pixels
    repeats: int
    size: PictureSize | None = None   # None: the picture was the bucket's size, uncropped
    loss_weight: torch.Tensor | None = None   # (h,w) per latent pixel (masked loss, loss_masks.py); None: all 1

    def picture_size(self) -> PictureSize:
        return self.size or PictureSize(self.bucket, (0, 0), self.bucket)


@dataclass
class EncodedDataset:
    examples: list[Example]
    conds: dict[str, TextEncoding] = field(default_factory=dict)   # caption -> its encoding (frozen encoder)
    buckets: dict[tuple[int, int], int] = field(default_factory=dict)  # bucket -> number of pictures

    def batch_plan(self, batch_size: int, seed: int) -> Iterator[list[int]]:
        """Endless batches of example indices, epoch after epoch; each batch comes from one bucket.

        An epoch shows every picture ``repeats`` times (kohya's convention), shuffled per epoch from
        ``seed`` so a run is reproducible.
        """
        expanded = [i for i, ex in enumerate(self.examples) for _ in range(ex.repeats)]
        for epoch in itertools.count():
            buckets_of = [self.examples[i].bucket for i in expanded]
            for batch in group_into_batches(buckets_of, batch_size, seed + epoch):
                yield [expanded[j] for j in batch]

    def steps_per_epoch(self, batch_size: int, gradient_accumulation: int = 1) -> int:
        """Optimizer steps per epoch: batches (per bucket, rounded up) / accumulation, rounded up."""
        return self.epochs(batch_size, gradient_accumulation).steps

    def epochs(self, batch_size: int, gradient_accumulation: int = 1) -> "Epochs":
        batches = len(group_into_batches([ex.bucket for ex in self.examples for _ in range(ex.repeats)],
                                         batch_size, 0))
        return Epochs(batches, gradient_accumulation)

    def collate(self, indices: Sequence[int], device: torch.device
                ) -> tuple[torch.Tensor, list[TextEncoding], list[PictureSize]]:
        """A batch: stacked latents, and each example's caption encoding and picture size (the model
        turns those into its conditioning: see loop.model_conditioning)."""
        examples = [self.examples[i] for i in indices]
        latents = torch.stack([ex.latent for ex in examples]).to(device)
        return (latents, [as_text_encoding(self.conds[ex.caption]) for ex in examples],
                [ex.picture_size() for ex in examples])

    def loss_weights(self, indices: Sequence[int], device: torch.device) -> torch.Tensor | None:
        """(B,1,h,w) loss weights of a batch (masked loss), pictures without a mask all 1; None when no picture
        of the batch has one (the plain loss, exactly)."""
        examples = [self.examples[i] for i in indices]
        if all(ex.loss_weight is None for ex in examples):
            return None
        return torch.stack([ex.loss_weight if ex.loss_weight is not None else torch.ones(ex.latent.shape[1:])
                            for ex in examples])[:, None].to(device)


@dataclass(frozen=True)
class Epochs:
    """Epoch arithmetic in optimizer steps. An epoch shows every picture x repeats, in ``batches``
    batches (each from one bucket). With gradient accumulation several batches make one step and the
    batch plan runs on across epoch ends, so an epoch may end inside a step: counting in batches keeps
    N epochs exactly N epochs of pictures, as kohya counts them."""
    batches: int               # per epoch
    accumulation: int = 1      # batches per optimizer step

    @property
    def steps(self) -> int:
        """Steps per epoch, rounded up (for reports)."""
        return -(-self.batches // self.accumulation)

    def steps_for(self, epochs: int) -> int:
        """Steps that show ``epochs`` epochs of pictures (the last step may run a little past the end)."""
        return -(-epochs * self.batches // self.accumulation)

    def completed_at(self, step: int) -> int:
        """Whole epochs shown after ``step`` steps."""
        return step * self.accumulation // self.batches if self.batches else 0


def concat_conds(conds: Sequence[torch.Tensor]) -> torch.Tensor:
    """(1,T_i,D) conds -> (B,T,D). Captions over 75 tokens encode to 154, 231... tokens. Repeat each up
    to a common length, as ComfyUI does when it batches conds (CONDCrossAttn.concat): attention is
    unchanged by it."""
    length = math.lcm(*(c.shape[1] for c in conds))
    return torch.cat([c.repeat(1, length // c.shape[1], 1) for c in conds])


def pil_to_pixels(image) -> torch.Tensor:
    """PIL RGB -> (1,H,W,3) float in 0..1, the layout ComfyUI's IMAGE and VAE.encode use."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)


def encode_dataset(dataset, resolution: int, encode_pixels: EncodePixels, encode_caption: EncodeCaption,
                   latent_cache: dict | None = None, cache_key: str = "",
                   on_progress: Callable[[int, int], None] | None = None,
                   loss_weight: Callable[[int, tuple[int, int], tuple[int, int]], torch.Tensor | None] | None = None
                   ) -> EncodedDataset:
    """Bucket and encode every picture once and every distinct caption once.

    Pictures are decoded one at a time, so a big dataset never sits in memory as pixels. When
    ``latent_cache`` is given, latents are reused across runs keyed by (``cache_key``, content hash,
    bucket) — re-queueing with another learning rate skips the VAE entirely. ``loss_weight(index, bucket,
    latent (h, w))``: a picture's loss weights for masked loss (loss_masks.py), or None.
    """
    buckets = make_buckets(resolution)
    encoded = EncodedDataset(examples=[])
    total = len(dataset.items)
    for index, item in enumerate(dataset.items):
        bucket = nearest_bucket(item.width, item.height, buckets)
        key = (cache_key, item.content_hash, bucket)
        latent = latent_cache.get(key) if latent_cache is not None else None
        if latent is None:
            picture = fit_to_bucket(dataset.load_image(index), bucket)
            latent = encode_pixels(pil_to_pixels(picture))[0].detach().to("cpu", torch.float32).clone()
            if latent_cache is not None:
                latent_cache[key] = latent
        weight = loss_weight(index, bucket, tuple(latent.shape[1:])) if loss_weight else None
        encoded.examples.append(Example(latent=latent, caption=item.caption, bucket=bucket, repeats=item.repeats,
                                        size=PictureSize.of(item.width, item.height, bucket), loss_weight=weight))
        encoded.buckets[bucket] = encoded.buckets.get(bucket, 0) + 1
        if item.caption not in encoded.conds:
            encoded.conds[item.caption] = as_text_encoding(encode_caption(item.caption)).stored()
        if on_progress:
            on_progress(index + 1, total)
    return encoded

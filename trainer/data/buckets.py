"""Aspect-ratio buckets, kohya style: each picture trains at the largest size of about the chosen
area whose shape matches its own, so portraits stay portraits instead of being squashed or padded.
"""
from __future__ import annotations

import math
import random
from typing import Hashable, Sequence

from PIL import Image

Bucket = tuple[int, int]    # (width, height)


def make_buckets(resolution: int, step: int | None = None, min_side: int | None = None,
                 max_side: int | None = None) -> list[Bucket]:
    """Bucket sizes for a training resolution, sorted from tallest to widest.

    Defaults scale kohya's for 512 (step 64, sides 256..1024): sides from resolution/2 to
    resolution*2. Below 256 the step is 8 so tiny test resolutions still get several shapes.
    Like kohya, each width gets only the tallest height that fits in resolution² (and its
    transpose): a smaller bucket of slightly closer shape would throw away most of the pixels.
    """
    step = step or bucket_step(resolution)
    if step < 1 or resolution < step:
        raise ValueError(f"resolution {resolution} must be at least the bucket step {step}")
    default_min, default_max = bucket_side_range(resolution, step)
    min_side = default_min if min_side is None else _round_up(min_side, step)
    max_side = default_max if max_side is None else max_side // step * step
    square = resolution // step * step
    if not min_side <= square <= max_side:
        raise ValueError(f"bucket sides {min_side}..{max_side} must include the square side {square}")

    max_area = resolution * resolution
    buckets = {(square, square)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, max_area // width // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets, key=lambda bucket: (bucket[0] / bucket[1], bucket))


def bucket_step(resolution: int) -> int:
    return 64 if resolution >= 256 else 8


def bucket_side_range(resolution: int, step: int | None = None) -> tuple[int, int]:
    """The default shortest and longest bucket side (kohya's min/max_bucket_reso): half and twice the resolution."""
    step = step or bucket_step(resolution)
    return _round_up(resolution // 2, step), resolution * 2 // step * step


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket closest in log-aspect ratio (so 2:1 and 1:2 are equally far from square); ties go to
    the larger area, then to the smaller (width, height) so the choice never depends on list order."""
    if not buckets:
        raise ValueError("no buckets to choose from")
    target = math.log(width / height)

    def distance(bucket: Bucket):
        # Rounding keeps mathematically equal distances equal despite floating-point noise.
        return round(abs(math.log(bucket[0] / bucket[1]) - target), 9), -bucket[0] * bucket[1], bucket

    return min(buckets, key=distance)


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Scale so the picture covers the bucket, then crop the centre: no padding, no stretching."""
    bucket_width, bucket_height = bucket
    width, height = image.size
    scale = _cover_scale(width, height, bucket)
    crop_width, crop_height = bucket_width / scale, bucket_height / scale
    left, top = (width - crop_width) / 2, (height - crop_height) / 2
    downscaling = scale < 1
    return image.resize(
        (bucket_width, bucket_height),
        Image.Resampling.LANCZOS if downscaling else Image.Resampling.BICUBIC,
        box=(left, top, left + crop_width, top + crop_height),
        # A cheap box-reduce first makes 4000px -> 512px several times faster, visually identical.
        reducing_gap=3.0 if downscaling else None,
    )


def crop_offset(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """(left, top) of fit_to_bucket's centre crop, in pixels of the scaled picture: SDXL's
    crop_top_left conditioning, as kohya computes it."""
    scale = _cover_scale(width, height, bucket)
    return round((width * scale - bucket[0]) / 2), round((height * scale - bucket[1]) / 2)


def _cover_scale(width: int, height: int, bucket: Bucket) -> float:
    return max(bucket[0] / width, bucket[1] / height)


def group_into_batches(bucket_of_each_item: Sequence[Hashable], batch_size: int,
                       seed: int | random.Random = 0, repeats: Sequence[int] | None = None) -> list[list[int]]:
    """One epoch of batches of item indices; every batch holds items of a single bucket.

    ``repeats`` (optional) lists how often each item appears in the epoch, kohya's N_name repeats.
    The same seed (or an equally seeded ``random.Random``) always gives the same batches; the last
    batch of a bucket may be short, as in kohya.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if repeats is not None and len(repeats) != len(bucket_of_each_item):
        raise ValueError(f"{len(repeats)} repeat counts for {len(bucket_of_each_item)} items")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    groups: dict[Hashable, list[int]] = {}     # insertion order: deterministic for a given input
    for index, bucket in enumerate(bucket_of_each_item):
        groups.setdefault(bucket, []).extend([index] * (1 if repeats is None else repeats[index]))
    batches = []
    for members in groups.values():
        rng.shuffle(members)
        batches.extend(members[start:start + batch_size] for start in range(0, len(members), batch_size))
    rng.shuffle(batches)
    return batches


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step

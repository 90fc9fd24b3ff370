"""Aspect-ratio buckets: which sizes exist, which one a picture gets, how it is cropped and batched."""
from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lora_lab.trainer.data.buckets import fit_to_bucket, group_into_batches, make_buckets, nearest_bucket


@pytest.mark.parametrize("resolution, step, low, high", [(512, 64, 256, 1024), (1024, 64, 512, 2048),
                                                         (768, 64, 384, 1536), (64, 8, 32, 128)])
def test_buckets_follow_kohya_defaults_scaled_to_the_resolution(resolution, step, low, high):
    buckets = make_buckets(resolution)
    assert (resolution, resolution) in buckets
    for width, height in buckets:
        assert width % step == 0 and height % step == 0
        assert low <= width <= high and low <= height <= high
        assert width * height <= resolution * resolution
        assert (height, width) in buckets
    assert len(buckets) == len(set(buckets)) > 5
    ratios = [width / height for width, height in buckets]
    assert ratios == sorted(ratios)


def test_kohya_512_and_sdxl_1024_buckets_are_there():
    assert {(256, 1024), (384, 640), (448, 576), (576, 448), (640, 384), (1024, 256)} <= set(make_buckets(512))
    assert {(832, 1216), (896, 1152), (1216, 832), (1344, 768)} <= set(make_buckets(1024))


def test_every_bucket_is_as_large_as_its_width_or_height_allows():
    """A slightly better aspect match is never worth a bucket with a fraction of the pixels."""
    def could_grow(side, other):
        return side * (other + 64) <= 512 * 512 and other + 64 <= 1024

    for width, height in make_buckets(512):
        assert not (could_grow(width, height) and could_grow(height, width)), (width, height)
    assert (320, 256) not in make_buckets(512)


def test_custom_step_and_sides_and_bad_arguments():
    buckets = make_buckets(512, step=32, min_side=384, max_side=640)
    assert all(w % 32 == 0 and h % 32 == 0 and 384 <= min(w, h) and max(w, h) <= 640 for w, h in buckets)
    with pytest.raises(ValueError):
        make_buckets(4)
    with pytest.raises(ValueError):
        make_buckets(512, min_side=600)


@pytest.mark.parametrize("size, expected", [((1000, 1000), (512, 512)), ((3000, 4000), (448, 576)),
                                            ((4000, 3000), (576, 448)), ((1920, 1080), (640, 384)),
                                            ((100, 1000), (256, 1024))])
def test_nearest_bucket_by_aspect(size, expected):
    assert nearest_bucket(*size, make_buckets(512)) == expected


def test_ties_go_to_the_larger_area_whatever_the_order():
    assert nearest_bucket(10, 10, [(32, 32), (64, 64), (48, 48)]) == (64, 64)
    assert nearest_bucket(10, 10, [(64, 64), (32, 32)]) == (64, 64)
    # exactly between 1:2 and 2:1 in log-aspect: equal area, so the smaller (w, h) wins either way
    assert nearest_bucket(50, 50, [(128, 64), (64, 128)]) == nearest_bucket(50, 50, [(64, 128), (128, 64)])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20000), st.integers(1, 20000), st.sampled_from([64, 512, 1024]))
def test_no_bucket_is_closer_in_aspect_than_the_chosen_one(width, height, resolution):
    buckets = make_buckets(resolution)
    chosen = nearest_bucket(width, height, buckets)
    distance = lambda b: abs(math.log(b[0] / b[1]) - math.log(width / height))  # noqa: E731
    assert all(distance(chosen) <= distance(other) + 1e-9 for other in buckets)


def gradient(width: int, height: int) -> Image.Image:
    """Each column's value is its x position scaled to 0..255: shows where the crop came from."""
    row = np.linspace(0, 255, width, dtype=np.float32)
    return Image.fromarray(np.tile(row, (height, 1)).round().astype(np.uint8)).convert("RGB")


def test_fit_covers_then_crops_the_centre_without_stretching():
    fitted = fit_to_bucket(gradient(400, 100), (50, 50))   # keeps x = 150..250 of 400
    assert fitted.size == (50, 50)
    values = np.asarray(fitted)[25, :, 0].astype(int)
    assert abs(values[0] - 150 * 255 / 399) < 6 and abs(values[-1] - 250 * 255 / 399) < 6
    assert np.all(np.diff(values) >= 0) and 48 < values[-1] - values[0] < 70   # not 0..255: not squashed


def test_fit_same_aspect_keeps_everything_and_upscales_without_padding():
    whole = np.asarray(fit_to_bucket(gradient(300, 100), (60, 20)))[10, :, 0].astype(int)
    assert whole[0] < 6 and whole[-1] > 249
    small = Image.new("RGB", (30, 20), (10, 200, 30))
    fitted = fit_to_bucket(small, (64, 64))
    assert fitted.size == (64, 64)
    corners = [fitted.getpixel(corner) for corner in [(0, 0), (63, 0), (0, 63), (63, 63)]]
    assert all(max(abs(a - b) for a, b in zip(pixel, (10, 200, 30))) <= 2 for pixel in corners)


def test_fit_portrait_crops_top_and_bottom():
    image = Image.new("RGB", (100, 300), (0, 0, 255))
    image.paste((255, 0, 0), (0, 100, 100, 200))       # red middle third
    fitted = fit_to_bucket(image, (64, 64))
    assert fitted.getpixel((32, 2))[0] > 240 and fitted.getpixel((32, 61))[0] > 240


def test_batches_keep_one_bucket_each_and_cover_every_repeat():
    buckets_of_items = [(512, 512)] * 5 + [(448, 576)] * 3 + [(576, 448)]
    repeats = [2, 1, 1, 1, 1, 10, 10, 10, 1]
    batches = group_into_batches(buckets_of_items, 4, seed=7, repeats=repeats)
    assert all(len({buckets_of_items[i] for i in batch}) == 1 for batch in batches)
    assert Counter(i for batch in batches for i in batch) == Counter({i: r for i, r in enumerate(repeats)})
    per_bucket = Counter(buckets_of_items[batch[0]] for batch in batches)
    assert per_bucket == {(512, 512): math.ceil(6 / 4), (448, 576): math.ceil(30 / 4), (576, 448): 1}


def test_batches_are_deterministic_per_seed_and_shuffled_between_seeds():
    buckets_of_items = [i % 3 for i in range(60)]
    first = group_into_batches(buckets_of_items, 2, seed=1)
    assert group_into_batches(buckets_of_items, 2, seed=1) == first
    assert group_into_batches(buckets_of_items, 2, seed=random.Random(1)) == first
    assert group_into_batches(buckets_of_items, 2, seed=2) != first
    with pytest.raises(ValueError):
        group_into_batches(buckets_of_items, 0)
    with pytest.raises(ValueError):
        group_into_batches(buckets_of_items, 2, repeats=[1])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=40), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_batching_properties(buckets_of_items, batch_size, seed):
    batches = group_into_batches(buckets_of_items, batch_size, seed=seed)
    assert sorted(i for batch in batches for i in batch) == list(range(len(buckets_of_items)))
    assert all(0 < len(batch) <= batch_size for batch in batches)
    assert all(len({buckets_of_items[i] for i in batch}) == 1 for batch in batches)
    counts = Counter(buckets_of_items)
    assert len(batches) == sum(math.ceil(n / batch_size) for n in counts.values())

"""Fixtures of the in-process ComfyUI tests that train: a dataset maker and a fresh random UNet per test."""
from __future__ import annotations

import pytest
import torch

import random_models
from training import pattern_pixels


@pytest.fixture
def make_dataset(pack):
    from lora_lab.trainer.data.dataset import dataset_from_pixels

    def make(count=4, captions=None, repeats=1, pixels=None):
        pixels = pattern_pixels(count) if pixels is None else pixels
        captions = captions or [f"sks, striped pattern {i}" for i in range(pixels.shape[0])]
        with torch.inference_mode():  # as ComfyUI runs nodes
            return dataset_from_pixels(pixels, captions, repeats)
    return make


@pytest.fixture
def fresh_unet(comfy):
    return random_models.sd15_model_patcher(model_channels=32, seed=5)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (use with ``pytest.mark.usefixtures``): a step is dozens of small ops, and torch's
    thread pool costs more than it gives (measured on the DiTs: 0.06 s a step on one thread, 0.25 s on two, and 5 s
    on two while another process keeps the two cores busy); one thread also takes one arithmetic path, so two runs
    sum in the same order. Put back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

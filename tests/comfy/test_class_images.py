"""Class Images (prior preservation's class pictures sampled by the base model) in a real in-process ComfyUI with
a small random SD1.5-architecture model: ComfyUI's KSampler path samples them, they are kept on disk and only
missing ones are sampled again, each carries the class prompt as its caption, and Train LoRA trains with them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training import run_train


def class_images(model, clip, vae, count, seed=0, prompt="a photo of stripes"):
    from lora_lab.nodes.class_images import LoraLabClassImages
    with torch.inference_mode():       # as ComfyUI runs nodes
        return LoraLabClassImages().sample(model, clip, vae, prompt, count, 64, 2, 0.0, seed)


def test_class_pictures_are_sampled_once_kept_and_train_as_regularization(fresh_unet, sd15_clip, small_vae,
                                                                          make_dataset, monkeypatch):
    import nodes as comfy_nodes
    sampled = []
    real = comfy_nodes.common_ksampler
    monkeypatch.setattr(comfy_nodes, "common_ksampler", lambda *a, **k: sampled.append(a[1]) or real(*a, **k))

    first = class_images(fresh_unet, sd15_clip, small_vae, count=2, seed=10)
    dataset, preview, report = first["result"]
    assert sampled == [10, 11], "picture i is sampled alone at seed + i"
    assert [item.caption for item in dataset.items] == ["a photo of stripes"] * 2
    assert preview.shape == (2, 64, 64, 3) and "2 sampled now, 0 kept from before" in report
    assert "cfg 7" in report                                     # 0 = SD1.5's usual
    assert float(preview[0].std()) > 0.01, "a blank picture: the sampler or the VAE did nothing"

    # Queued again: nothing sampled, the same pictures. One more: only the new one.
    again = class_images(fresh_unet, sd15_clip, small_vae, count=2, seed=10)
    assert sampled == [10, 11] and "0 sampled now, 2 kept from before" in again["result"][2]
    assert torch.equal(again["result"][1], preview)
    more = class_images(fresh_unet, sd15_clip, small_vae, count=3, seed=10)
    assert sampled == [10, 11, 12] and len(more["result"][0].items) == 3
    assert np.array_equal(np.asarray(more["result"][0].load_image(0)), np.asarray(dataset.load_image(0)))
    # Another seed is another set, in a folder of its own.
    other = class_images(fresh_unet, sd15_clip, small_vae, count=1, seed=99)
    assert sampled[-1] == 99 and other["result"][0].root != dataset.root

    result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "with_class", steps=1, epochs=1,
                       regularization=dataset)
    assert "prior preservation: 2 regularization picture(s) shown 2 times per epoch" in result["ui"]["text"][0]


def test_an_empty_class_prompt_is_refused(fresh_unet, sd15_clip, small_vae):
    with pytest.raises(ValueError) as refused:
        class_images(fresh_unet, sd15_clip, small_vae, count=1, prompt="  ")
    assert str(refused.value).startswith("[LoRA Lab · Class Images › class_prompt] the class prompt is empty.")

"""Masked loss (Noise & Loss › masked_loss, unmasked_weight; Dataset From Images' masks) in a real in-process
ComfyUI with a small random SD1.5-architecture UNet: the masks reach training, the report and the file say which
pictures had one, another mask trains anew, and a run that asks for masks without any is refused clearly. (The
loss itself against a hand computation, the folder sidecars and transparency: tests/unit/data/test_loss_masks.py.)"""
from __future__ import annotations

import pytest
import torch

from training import options, pattern_pixels, run_train


def images_dataset(masks=None, count=2):
    from lora_lab.nodes.dataset import LoraLabDatasetFromImages
    with torch.inference_mode():
        return LoraLabDatasetFromImages().build(pattern_pixels(count), "sks, striped", 1, masks)[0]


def half_masks(side: str, count=2):
    masks = torch.zeros(count, 64, 64)
    masks[:, :, :32] = 1
    return masks if side == "left" else 1 - masks


def test_masks_reach_training_and_another_mask_trains_anew(fresh_unet, sd15_clip, small_vae, loras_dir, monkeypatch):
    from lora_lab.nodes import train as train_node
    from lora_lab.trainer.lora.files import load_lora_file
    trained = []
    real_train = train_node.train
    monkeypatch.setattr(train_node, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k))

    masked = options(masked_loss=True, unmasked_weight=0.0)
    left = run_train(fresh_unet, sd15_clip, small_vae, images_dataset(half_masks("left")), "masked", steps=2,
                     options=masked)
    report = left["ui"]["text"][0]
    assert "masked loss: 2 of 2 pictures (2 MASK input); outside a mask the loss weighs 0" in report, report
    _, metadata = load_lora_file(loras_dir / left["result"][2])
    assert metadata["loralab_masked_loss"].startswith("2 of 2 pictures")

    # The other half of each picture: other weights, so the run is not the one already trained.
    right = run_train(fresh_unet, sd15_clip, small_vae, images_dataset(half_masks("right")), "masked", steps=2,
                      options=masked)
    assert right["result"][2] == "masked_2.safetensors" and len(trained) == 2
    assert left["ui"]["loss"] != right["ui"]["loss"]
    # Masks given but masked_loss off: the plain loss, as before masks existed.
    plain = run_train(fresh_unet, sd15_clip, small_vae, images_dataset(half_masks("left")), "plain", steps=2)
    assert "masked loss" not in plain["ui"]["text"][0]
    assert "loralab_masked_loss" not in load_lora_file(loras_dir / plain["result"][2])[1]


def test_masked_loss_without_any_mask_is_refused_with_the_ways_to_give_one(fresh_unet, sd15_clip, small_vae,
                                                                          loras_dir):
    with pytest.raises(ValueError) as refused:
        run_train(fresh_unet, sd15_clip, small_vae, images_dataset(), "nomask", steps=2,
                  options=options(masked_loss=True))
    problem, fix = str(refused.value).split(" Fix: ", 1)
    assert problem == "[LoRA Lab · Train LoRA › options] masked_loss is on, but none of the 2 pictures has a mask."
    assert ".mask.png" in fix and "transparent" in fix and "masks on Dataset From Images" in fix
    assert not list(loras_dir.glob("nomask*"))


def test_dataset_from_images_names_its_masks_input_when_they_do_not_fit(pack):
    with pytest.raises(ValueError) as refused:
        images_dataset(torch.ones(3, 64, 64))
    message = str(refused.value)
    assert message.startswith("[LoRA Lab · Dataset from Images › masks] The masks are 3 of 64x64; the pictures are "
                              "2 of 64x64."), message
    assert "Fix: Give one mask per picture (or one for all), at the pictures' size." in message


@pytest.mark.parametrize("bad", [1.0, -0.1])
def test_a_bad_unmasked_weight_is_refused_by_the_noise_node(pack, bad):
    from lora_lab.nodes import option_nodes
    from lora_lab.nodes.training_options import GROUPS, TrainingOptions
    make = option_nodes.NODE_CLASS_MAPPINGS["LoraLabNoiseOptions"]
    values = {name: getattr(TrainingOptions(), name) for name in GROUPS["noise"]}
    with pytest.raises(ValueError) as refused:
        make().build(**dict(values, masked_loss=True, unmasked_weight=bad))
    assert str(refused.value).startswith("[LoRA Lab · Noise & Loss › unmasked_weight]"), str(refused.value)

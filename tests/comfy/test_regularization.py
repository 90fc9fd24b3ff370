"""Prior preservation (Train LoRA's regularization input, Noise & Loss › prior_loss_weight) in a real in-process
ComfyUI with a small random SD1.5-architecture UNet: the epoch holds both sets as kohya counts it, the file has
kohya's keys, another weight trains anew, and uncaptioned pictures without a class folder are refused clearly.
(kohya's count and the weighted loss by hand: tests/unit/data/test_regularization.py.)"""
from __future__ import annotations

import pytest
import torch

from training import options, pattern_pixels, run_train


def test_regularization_pictures_train_beside_the_dataset_as_kohya_counts_them(
        fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir):
    from lora_lab.trainer.lora.files import load_lora_file
    regularization = make_dataset(3, captions=["a photo of stripes"], pixels=pattern_pixels(3, seed=7))
    # 2 training pictures at batch size 2: one step an epoch alone; with 2 of the 3 regularization pictures
    # beside them (kohya takes them in order until the counts match), two.
    plain = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "noreg", steps=1, epochs=1)
    result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "prior", steps=1, epochs=1,
                       regularization=regularization, options=options(prior_loss_weight=0.5))
    report = result["ui"]["text"][0]
    assert "prior preservation: 2 regularization picture(s) (1 not needed) shown 2 times per epoch" in report, report
    assert "their loss x 0.5" in report
    _, metadata = load_lora_file(loras_dir / result["result"][2])
    assert load_lora_file(loras_dir / plain["result"][2])[1]["ss_steps"] == "1" and metadata["ss_steps"] == "2"
    assert metadata["ss_num_reg_images"] == "3" and metadata["ss_prior_loss_weight"] == "0.5"
    assert metadata["ss_reg_dataset_dirs"] != "{}"

    # The weight shapes the loss: another one is another run, not the file already trained.
    other = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "prior", steps=1, epochs=1,
                      regularization=regularization, options=options(prior_loss_weight=1.0))
    assert other["result"][2] == "prior_2.safetensors"
    # Without a regularization input the weight does nothing, and the finished plain run is reused.
    again = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "noreg", steps=1, epochs=1,
                      options=options(prior_loss_weight=2.0))
    assert again["result"][2] == "noreg.safetensors" and "Reused" in again["ui"]["text"][0]


def test_uncaptioned_regularization_pictures_without_a_class_folder_are_refused(fresh_unet, sd15_clip, small_vae,
                                                                                  make_dataset, loras_dir):
    from lora_lab.trainer.data.dataset import dataset_from_pixels
    uncaptioned = dataset_from_pixels(pattern_pixels(2), [])
    with pytest.raises(ValueError) as refused:
        run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "reg_nocaption", steps=1,
                  regularization=uncaptioned)
    message = str(refused.value)
    assert message.startswith("[LoRA Lab · Train LoRA › regularization] 2 regularization picture(s) have no "
                              "caption and no class folder"), message
    assert not list(loras_dir.glob("reg_nocaption*"))


def test_a_resumed_run_with_regularization_equals_the_uninterrupted_one(
        fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir, one_arithmetic_path):
    """Cancelled after step 2 of 5 and resumed: the same losses and, bitwise, the same file (one arithmetic path,
    tests/conftest.py). Two epochs and a half: the resumed run must rebuild each epoch's mix of both sets."""
    import comfy.model_management
    from training import cancel_at_step, saved_tensors
    regularization = make_dataset(3, captions=["a photo of stripes"], pixels=pattern_pixels(3, seed=7))
    exact = dict(prior_loss_weight=0.5, save_precision="fp32")
    straight = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "reg_straight", steps=5,
                         regularization=regularization, options=options(**exact))
    with cancel_at_step(2, 5), pytest.raises(comfy.model_management.InterruptProcessingException):
        run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "reg_split", steps=5,
                  regularization=regularization, options=options(**exact))
    resumed = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "reg_split", steps=5,
                        regularization=regularization,
                        options=options(resume_from="reg_split_step2.safetensors", **exact))
    assert resumed["ui"]["loss"] == straight["ui"]["loss"][2:]
    one, two = saved_tensors(loras_dir, straight["result"][2]), saved_tensors(loras_dir, resumed["result"][2])
    assert one.keys() == two.keys() and all(torch.equal(one[key], two[key]) for key in one)

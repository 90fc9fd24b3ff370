"""Train LoRA's validation loss (Previews -> validation_pictures) in a real in-process ComfyUI with small
random-weight SD1.5-architecture models: per epoch in the ui, the report, the loss curve and every save;
identical for identical runs; and switching it on changes nothing that is trained. Runs compared for
equality take one arithmetic path (tests/conftest.py), so equal means bitwise equal."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training import cancel_at_step, options, pattern_pixels, run_train, saved_tensors

CAPTIONS = ["sks, red stripes", "sks, blue blocks", "sks, green waves"]


def metadata_of(path) -> dict:
    from lora_lab.trainer.lora.files import load_lora_file
    return load_lora_file(path)[1]


def history_in(path) -> list:
    from lora_lab.trainer.training.validation import ValidationHistory
    return ValidationHistory.from_metadata(metadata_of(path)).chart_points()


def three_pictures(make_dataset):
    return make_dataset(3, captions=CAPTIONS, repeats=2)


def test_each_epoch_ends_with_a_validation_loss_in_the_ui_report_curve_and_saves(
        fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir, one_arithmetic_path):
    # 3 pictures, 1 held out: 2 x 2 repeats / batch 2 = 2 steps per epoch, 3 epochs = 6 steps.
    held = options(validation_pictures=1, save_every_n_epochs=1, save_precision="fp32")
    result = run_train(fresh_unet, sd15_clip, small_vae, three_pictures(make_dataset), "validated", steps=1, epochs=3,
                       options=held)
    ui = result["ui"]
    assert [(epoch, step) for epoch, _, step in ui["validation_loss"]] == [(1, 2), (2, 4), (3, 6)]
    numbers = [loss for _, loss, _ in ui["validation_loss"]]
    assert all(isinstance(loss, float) and math.isfinite(loss) for loss in numbers), numbers
    assert ui["loss_steps"] == [1, 6] and len(ui["loss"]) == 6
    report = ui["text"][0]
    best = min(ui["validation_loss"], key=lambda entry: entry[1])
    best_file = "validated.safetensors" if best[0] == 3 else f"validated_epoch{best[0]}.safetensors"
    assert f"lowest validation loss: epoch {best[0]} ({best[1]:.4g}, step {best[2]}): {best_file}" in report
    assert "validation loss (1 held-out picture): epoch 1 " in report
    assert "2 pictures x repeats = 4 per epoch" in report, "the epoch arithmetic counts the held-out picture"

    # every save keeps the history up to its epoch; the metadata describes the pictures trained
    assert history_in(loras_dir / "validated_epoch1.safetensors") == ui["validation_loss"][:1]
    assert history_in(loras_dir / "validated_epoch2.safetensors") == ui["validation_loss"][:2]
    assert history_in(loras_dir / "validated.safetensors") == ui["validation_loss"]
    assert metadata_of(loras_dir / "validated.safetensors")["ss_num_train_images"] == "4"

    # the loss_curve picture draws the validation points in their own colour
    from lora_lab.trainer.loss_plot import VALIDATION
    curve = (result["result"][3][0].numpy() * 255).round().astype(np.uint8)
    assert (curve == np.array(VALIDATION, dtype=np.uint8)).all(axis=-1).sum() > 20

    # the same run again (another name, so not reused) measures the very same numbers
    again = run_train(fresh_unet, sd15_clip, small_vae, three_pictures(make_dataset), "validated_again", steps=1,
                      epochs=3, options=held)
    assert again["ui"]["validation_loss"] == ui["validation_loss"]


def test_switching_validation_on_trains_what_the_same_pictures_held_out_by_hand_train(
        fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir, one_arithmetic_path):
    """With the held-out picture removed from the dataset by hand and validation off, the run trains the
    very same LoRA: the held-out picture is not trained on, and measuring it draws nothing from the
    training's random streams."""
    from lora_lab.trainer.training.validation import held_out_indices
    (held,) = held_out_indices(3, 1, seed=0)          # run_train's seed
    kept = [index for index in range(3) if index != held]
    by_hand = make_dataset(2, captions=[CAPTIONS[i] for i in kept], repeats=2, pixels=pattern_pixels(3)[kept])
    exact = dict(save_precision="fp32", noise_offset=0.05, dropout=0.1)
    validated = run_train(fresh_unet, sd15_clip, small_vae, three_pictures(make_dataset), "held_out", steps=5,
                          options=options(validation_pictures=1, **exact))
    plain = run_train(fresh_unet, sd15_clip, small_vae, by_hand, "by_hand", steps=5, options=options(**exact))

    assert len(validated["ui"]["validation_loss"]) == 2 and plain["ui"]["validation_loss"] == []
    assert validated["ui"]["loss"] == plain["ui"]["loss"]
    a, b = saved_tensors(loras_dir, validated["result"][2]), saved_tensors(loras_dir, plain["result"][2])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}: validation changed what was trained"


def test_holding_out_every_picture_is_refused_naming_the_previews_node(fresh_unet, sd15_clip, small_vae, make_dataset):
    with pytest.raises(ValueError) as error:
        run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "all_held", steps=2,
                  options=options(validation_pictures=2))
    message = str(error.value)
    assert "Previews › validation_pictures" in message and "at least one must be left to train" in message
    assert "Fix: set validation_pictures to at most 1" in message


def test_a_resumed_run_carries_on_the_validation_history_and_equals_an_uninterrupted_one(
        fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir, one_arithmetic_path):
    import comfy.model_management
    exact = dict(validation_pictures=1, save_precision="fp32")
    straight = run_train(fresh_unet, sd15_clip, small_vae, three_pictures(make_dataset), "val_straight", steps=1,
                         epochs=3, options=options(**exact))
    # after step 3 of 6: inside the second epoch
    with cancel_at_step(3, 6), pytest.raises(comfy.model_management.InterruptProcessingException):
        run_train(fresh_unet, sd15_clip, small_vae, three_pictures(make_dataset), "val_halfway", steps=1,
                  epochs=3, options=options(**exact))
    assert history_in(loras_dir / "val_halfway_step3.safetensors") == straight["ui"]["validation_loss"][:1]

    resumed = run_train(fresh_unet, sd15_clip, small_vae, three_pictures(make_dataset), "val_resumed", steps=1,
                        epochs=3, options=options(resume_from="val_halfway_step3.safetensors", **exact))
    assert resumed["ui"]["validation_loss"] == straight["ui"]["validation_loss"]
    assert resumed["ui"]["loss_steps"] == [4, 6]
    assert history_in(loras_dir / resumed["result"][2]) == straight["ui"]["validation_loss"]
    a, b = saved_tensors(loras_dir, straight["result"][2]), saved_tensors(loras_dir, resumed["result"][2])
    assert all(torch.equal(a[key], b[key]) for key in a)

    # Resumed with another seed, the held-out picture and its draws differ: the old numbers do not compare.
    other = run_train(fresh_unet, sd15_clip, small_vae, three_pictures(make_dataset), "val_other_seed", steps=1,
                      epochs=3, seed=1, options=options(resume_from="val_halfway_step3.safetensors", **exact))
    assert [entry[0] for entry in other["ui"]["validation_loss"]] == [2, 3]


def test_a_reused_run_shows_its_validation_history(fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir):
    held = options(validation_pictures=1)
    first = run_train(fresh_unet, sd15_clip, small_vae, three_pictures(make_dataset), "val_reused", steps=1, epochs=2,
                      options=held)
    again = run_train(fresh_unet, sd15_clip, small_vae, three_pictures(make_dataset), "val_reused", steps=1, epochs=2,
                      options=held)
    assert again["result"][2] == first["result"][2] and "Reused" in again["ui"]["text"][0]
    assert again["ui"]["validation_loss"] == first["ui"]["validation_loss"]
    assert again["ui"]["loss_steps"] == first["ui"]["loss_steps"] == [1, 4]
    assert "lowest validation loss: epoch" in again["ui"]["text"][0]


def test_the_previews_node_offers_validation_pictures_last(pack):
    from lora_lab.nodes.option_nodes import LoraLabPreviewOptions, LoraLabTrainingOptions
    from lora_lab.nodes.training_options import GROUPS, TrainingOptions
    required = LoraLabPreviewOptions.INPUT_TYPES()["required"]
    assert list(required)[-1] == "validation_pictures"         # saved workflows keep their widget values
    spec = required["validation_pictures"][1]
    assert spec["default"] == 0 and spec["min"] == 0 and "forward pass" in spec["tooltip"]
    # Options are appended in the order they were added, after it.
    optional = list(LoraLabTrainingOptions.INPUT_TYPES()["optional"])
    assert optional[optional.index("validation_pictures"):] == [
        "validation_pictures", "fp8_base", "blocks_to_swap", "loss_type", "huber_schedule", "huber_c", "huber_scale",
        "timestep_sampling", "logit_mean", "logit_std", "flow_shift", "flux_guidance", "ema_decay", "ema_weights",
        "masked_loss", "unmasked_weight", "prior_loss_weight", "network_type", "lokr_factor"]
    assert "validation_pictures" in GROUPS["previews"]
    defaults = TrainingOptions()
    (built,) = LoraLabPreviewOptions().build(**{name: getattr(defaults, name) for name in GROUPS["previews"]}
                                             | {"validation_pictures": 2})
    assert built.validation_pictures == 2 and "previews" in built.groups_set

"""Train LoRA's preset in a real in-process ComfyUI: what it sets, what the user and option nodes keep,
what the report says, and the kohya arithmetic of its steps."""
from __future__ import annotations

import pytest
from safetensors import safe_open

from training import run_train

PICK = ("SD1.5", "character", "8 GB")


def preset_args(preset, **changed):
    """Train LoRA's widgets as the front end leaves them after picking `preset`, with `changed` typed over."""
    values = preset.widget_values()
    return dict(resolution=values["resolution"], steps=values["steps"], batch_size=values["batch_size"],
                learning_rate=values["learning_rate"], rank=values["rank"], alpha=values["alpha"],
                preset=preset.family, goal=preset.goal, gpu_memory=preset.gpu_memory) | changed


def test_the_preset_fills_what_no_option_node_set_and_the_report_says_what_came_from_it(
        fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir):
    from lora_lab.nodes.option_nodes import LoraLabMemoryOptions
    from lora_lab.trainer.training.optimizers import unavailable_reason
    from lora_lab.trainer.training.presets import preset_for
    preset = preset_for(*PICK)
    # Memory & Speed set by a node (fp32: this CPU), and a resolution and step count it trains in seconds.
    (memory,) = LoraLabMemoryOptions().build(precision="fp32", gradient_checkpointing=False, latent_disk_cache=False)
    result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "preset_run", options=memory,
                       **preset_args(preset, resolution=64, steps=2))
    report = result["ui"]["text"][0]
    values = preset.widget_values()
    assert f"preset {preset.label()}: " in report, report
    assert f"rank {values['rank']}" in report and f"batch_size {values['batch_size']}" in report, report
    assert f"changed from the preset by you: resolution 64 (preset: {values['resolution']}), steps 2 (preset: " \
           f"{values['steps']})" in report, report
    assert len(result["ui"]["loss"]) == 2, "steps typed over the preset's are trained as typed (no rounding)"

    memory_options = {"precision", "gradient_checkpointing", "latent_disk_cache"} & set(preset.options)
    if memory_options:
        assert "option nodes set " + ", ".join(sorted(memory_options)) in report, report
    optimizer = preset.options.get("optimizer", "AdamW")
    if unavailable_reason(optimizer):
        assert f"the preset's optimizer {optimizer} is not available" in report, report
        optimizer = "AdamW"
    with safe_open(str(loras_dir / result["result"][2]), "pt") as f:
        metadata = f.metadata()
    assert optimizer in metadata["ss_optimizer"], metadata["ss_optimizer"]
    assert metadata["ss_network_dim"] == str(values["rank"])
    if "lr_schedule" in preset.options:
        assert metadata["ss_lr_scheduler"] == preset.options["lr_schedule"]
    assert metadata["ss_mixed_precision"] == "no", "the Memory & Speed node's fp32 wins over the preset"


def test_a_preset_for_another_family_is_refused_before_any_work(fresh_unet, sd15_clip, small_vae, make_dataset):
    from lora_lab.trainer.training.presets import preset_for
    with pytest.raises(ValueError) as refused:
        run_train(fresh_unet, sd15_clip, small_vae, make_dataset(1), "wrong_family",
                  **preset_args(preset_for("SDXL", "style", "16 GB"), resolution=64, steps=1))
    message = str(refused.value)
    assert "[LoRA Lab · Train LoRA › preset]" in message and "SDXL" in message and "SD1.x" in message, message
    assert "Fix:" in message


def test_no_preset_changes_nothing(fresh_unet, sd15_clip, small_vae, make_dataset):
    result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(1), "no_preset", steps=1, preset="none")
    assert "note: preset " not in result["ui"]["text"][0] and "from the preset" not in result["ui"]["text"][0]


def test_the_presets_steps_become_whole_epochs(pack):
    """kohya's arithmetic: pictures x repeats / batch size steps per epoch, and the preset's step count rounded
    to the nearest whole number of epochs; steps the user typed, or epochs, are kept as they are."""
    from lora_lab.nodes import train_preset
    from lora_lab.nodes.training_options import TrainingOptions
    from lora_lab.trainer.data.encoded_dataset import Epochs
    from lora_lab.trainer.training.presets import preset_for
    preset = preset_for(*PICK)
    widgets = dict(preset.widget_values(), epochs=0)

    def choose(**changed):
        return train_preset.choose(preset.family, preset.goal, preset.gpu_memory, "sd_v1", widgets | changed,
                                   TrainingOptions())

    target = preset.target_steps
    per_epoch = Epochs(batches=7 * 10)        # e.g. 7 pictures x 10 repeats at batch size 1
    steps, note = train_preset.steps_in_whole_epochs(choose(), per_epoch)
    epochs = max(1, round(target / 70))
    assert steps == epochs * 70 and f"{epochs} epoch(s) x 70 steps per epoch" in note
    steps, note = train_preset.steps_in_whole_epochs(choose(), Epochs(batches=10 * target))
    assert steps == 10 * target and "= 1 epoch(s)" in note, "a dataset bigger than the preset's steps: one epoch"
    assert train_preset.steps_in_whole_epochs(choose(steps=target + 1), per_epoch) == (target + 1, None)
    assert train_preset.steps_in_whole_epochs(choose(epochs=3), per_epoch) == (target, None)
    with_accumulation = Epochs(batches=70, accumulation=4)      # an epoch ends inside a step: kohya counts batches
    steps, _ = train_preset.steps_in_whole_epochs(choose(), with_accumulation)
    assert steps == with_accumulation.steps_for(max(1, round(target / with_accumulation.steps)))


def test_every_preset_fits_train_lora_and_the_option_nodes(pack):
    """The route's table: 4 families x 3 goals x 4 GPU sizes; each writes only widgets Train LoRA has and sets
    only options an option node has, with values those widgets accept."""
    from lora_lab.nodes import train_preset
    from lora_lab.nodes.option_inputs import option_inputs
    from lora_lab.nodes.train import LoraLabTrainLora
    table = train_preset.presets_table()
    inputs = LoraLabTrainLora.INPUT_TYPES()
    widgets = inputs["required"] | inputs["optional"]
    specs = option_inputs()
    cells = [cell for goals in table.values() for sizes in goals.values() for cell in sizes.values()]
    assert len(cells) == 48
    for cell in cells:
        for name, value in cell["widgets"].items():
            kind, spec = widgets[name]
            assert spec.get("min", value) <= value <= spec.get("max", value), (cell["label"], name, value)
        for name, value in cell["options"].items():
            kind, spec = specs[name]
            if isinstance(kind, list):
                assert value in kind, (cell["label"], name, value)
            else:
                assert spec.get("min", value) <= value <= spec.get("max", value), (cell["label"], name, value)


def test_options_added_since_runs_were_saved_leave_their_identity_unchanged_while_off(pack):
    """A finished (or interrupted) run saved before validation_pictures and the option groups existed must
    still be found by the same identity: the new fields enter it only when they change the training."""
    from lora_lab.nodes.train import NOT_IN_RUN_IDENTITY, options_added_since_saved
    from lora_lab.nodes.training_options import TrainingOptions
    from lora_lab.trainer.training.run_reuse import settings_of
    plain = TrainingOptions(groups_set=frozenset({"memory"}))
    assert not {"validation_pictures", "groups_set"} & set(
        settings_of(plain, NOT_IN_RUN_IDENTITY + options_added_since_saved(plain)))
    held_out = TrainingOptions(validation_pictures=2)
    assert settings_of(held_out, NOT_IN_RUN_IDENTITY + options_added_since_saved(held_out))["validation_pictures"] == 2


def test_a_workflow_saved_before_the_preset_inputs_runs_with_the_defaults(fresh_unet, sd15_clip, small_vae,
                                                                          make_dataset):
    """Such a workflow holds null where preset, goal and gpu_memory now are (the front end fills the widgets
    by position): ComfyUI must not refuse it, and it trains with no preset. A value that is really wrong is
    refused with the input named."""
    from lora_lab.nodes.train import LoraLabTrainLora
    assert LoraLabTrainLora.VALIDATE_INPUTS(preset=None, goal=None, gpu_memory=None) is True
    assert LoraLabTrainLora.VALIDATE_INPUTS(preset="SD1.5", goal="style", gpu_memory="12 GB") is True
    message = LoraLabTrainLora.VALIDATE_INPUTS(preset="none", goal="style", gpu_memory="Saved old.safetensors")
    assert "[LoRA Lab · Train LoRA › gpu_memory]" in message and "24+ GB" in message, message
    result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(1), "saved_before_presets", steps=1,
                       preset=None, goal=None, gpu_memory=None)
    assert len(result["ui"]["loss"]) == 1 and "preset " not in result["ui"]["text"][0]


def test_the_preset_optimizer_note_only_when_the_preset_chooses_the_optimizer(pack):
    """An Optimizer & Schedule node's optimizer wins over the preset's, so a missing AdamW8bit is not news."""
    from lora_lab.nodes import train_preset
    from lora_lab.nodes.option_nodes import LoraLabOptimizerOptions
    from lora_lab.nodes.training_options import TrainingOptions
    from lora_lab.trainer.training.optimizers import unavailable_reason
    widgets = dict(resolution=512, batch_size=2, learning_rate=5e-4, rank=32, alpha=16, steps=2000, epochs=0)
    (chosen_by_node,) = LoraLabOptimizerOptions().build(optimizer="AdamW")
    with_node = train_preset.choose(*PICK, "sd_v1", widgets, chosen_by_node)
    assert not any("is not available" in note for note in with_node.notes), with_node.notes
    assert with_node.options.optimizer == "AdamW"
    alone = train_preset.choose(*PICK, "sd_v1", widgets, TrainingOptions())
    preset_optimizer = alone.preset.options.get("optimizer")
    if preset_optimizer and unavailable_reason(preset_optimizer):      # bitsandbytes missing (this machine)
        assert any("is not available" in note for note in alone.notes) and alone.options.optimizer == "AdamW"
    else:
        assert alone.options.optimizer == (preset_optimizer or "AdamW")

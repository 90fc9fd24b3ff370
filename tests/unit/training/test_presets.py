"""trainer/training/presets.py: every cell of the preset table exists and the engine can run what it says.

No ComfyUI: the TrainingOptions field names, their types, the option groups and the precision choices
are read from nodes/training_options.py with ``ast`` (importing it would import ComfyUI).
"""
import ast
import dataclasses
import json
from pathlib import Path

import pytest

from lora_lab.trainer.lora.network import PRESETS as NETWORK_PRESETS, Network
from lora_lab.trainer.training import presets
from lora_lab.trainer.training.optimizers import OPTIMIZERS, lr_advice, parse_optimizer_args
from lora_lab.trainer.training.presets import (FAMILIES, GOALS, GPU_MEMORY, Preset, all_presets, preset_for,
                                               whole_epochs)
from lora_lab.trainer.training.schedules import SCHEDULES, lr_multiplier

REPO = Path(__file__).resolve().parents[3]
ALL = all_presets()
CELLS = [(f, g, m) for f in FAMILIES for g in GOALS for m in GPU_MEMORY]
FLOW_FAMILIES = ("SD3", "Flux")


def _training_options_source():
    tree = ast.parse((REPO / "nodes" / "training_options.py").read_text(encoding="utf-8"))
    fields, constants = {}, {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "TrainingOptions":
            fields = {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("GROUPS", "PRECISIONS"):
                constants[node.targets[0].id] = ast.literal_eval(node.value)
    return fields, constants


FIELDS, _CONSTANTS = _training_options_source()
GROUPS, PRECISIONS = _CONSTANTS["GROUPS"], _CONSTANTS["PRECISIONS"]
TYPES = {"bool": bool, "int": int, "float": (int, float), "str": str}


def test_the_option_source_was_read():
    assert {"optimizer", "lr_schedule", "precision", "network_preset"} <= set(FIELDS)
    assert "optimizer" in GROUPS and "auto" in PRECISIONS


def test_every_cell_in_order():
    assert len(ALL) == 48
    assert [(p.family, p.goal, p.gpu_memory) for p in ALL] == CELLS
    for cell, preset in zip(CELLS, ALL):
        assert preset_for(*cell) is preset
        assert preset.label() == " · ".join(cell)
        assert preset.widget_values() == {"resolution": preset.resolution, "batch_size": preset.batch_size,
                                          "learning_rate": preset.learning_rate, "rank": preset.rank,
                                          "alpha": preset.alpha, "steps": preset.target_steps}


@pytest.mark.parametrize("preset", ALL, ids=lambda p: p.label())
def test_cell_is_valid_for_the_engine(preset):
    options = preset.options
    assert options["optimizer"] in OPTIMIZERS
    assert options["lr_schedule"] in SCHEDULES
    assert options["network_preset"] in NETWORK_PRESETS
    assert options["precision"] in PRECISIONS
    args = parse_optimizer_args(options.get("optimizer_args", ""))
    assert "lr" not in args
    assert lr_advice(options["optimizer"], preset.learning_rate) is None     # Prodigy would need ~1.0
    lr_multiplier(options["lr_schedule"], 0, preset.target_steps, options.get("warmup_steps", 0),
                  options.get("lr_cycles", 1))                                 # validates schedule and cycles
    Network(rank=preset.rank, alpha=preset.alpha, preset=options["network_preset"],
            conv_rank=options.get("conv_rank", 0), conv_alpha=options.get("conv_alpha", 0.0))
    assert preset.alpha <= preset.rank * 4          # under Train LoRA's "very strong" warning
    assert preset.resolution % 64 == 0 and preset.batch_size >= 1 and 0 < preset.learning_rate < 0.1
    assert preset.sources and all(isinstance(s, str) and s for s in preset.sources)
    assert all(isinstance(n, str) and n for n in preset.notes)
    json.dumps({"widgets": preset.widget_values(), "options": dict(options), "notes": list(preset.notes)})


@pytest.mark.parametrize("preset", ALL, ids=lambda p: p.label())
def test_option_keys_are_training_options_fields(preset):
    grouped = {name for names in GROUPS.values() for name in names}
    for name, value in preset.options.items():
        assert name in FIELDS, f"{name} is not a TrainingOptions field"
        assert name in grouped, f"{name} is in no option group (with_defaults_from needs one)"
        assert isinstance(value, TYPES[FIELDS[name]]), f"{name}={value!r} is not {FIELDS[name]}"
        assert not (FIELDS[name] != "bool" and isinstance(value, bool))


@pytest.mark.parametrize("preset", ALL, ids=lambda p: p.label())
def test_family_rules(preset):
    options = preset.options
    if preset.family == "SD1.5":
        assert preset.resolution == 512
    if preset.family == "SDXL":
        assert preset.resolution == 1024
    if preset.family in FLOW_FAMILIES:
        # The engine refuses text-encoder training and min-SNR weighting for flow-matching models.
        assert options["train_text_encoder"] is False and options.get("min_snr_gamma", 0) == 0
        assert preset.resolution in (512, 768, 1024)
        assert options["fp8_base"] is True       # every recipe holds SD3 and Flux 8-bit
    # Block swap where kohya's recipe for the card swaps and the predicted peak (docs/memory.md) needs it.
    swapped = {("Flux", "12 GB"): 20, ("Flux", "8 GB"): 40}.get((preset.family, preset.gpu_memory), 0)
    assert options.get("blocks_to_swap", 0) == swapped
    assert (swapped > 0) == any("blocks_to_swap" in note and "ComfyUI loads what fits" in note for note in preset.notes)
    if options.get("optimizer") == "AdamW8bit":
        assert any("bitsandbytes" in note for note in preset.notes)
    if not options.get("train_text_encoder"):
        assert "text_encoder_lr" not in options and "text_encoder_2_lr" not in options
    if options["network_preset"] != "LoCon (+conv)":
        assert "conv_rank" not in options and "conv_alpha" not in options


def test_steps_aim_at_the_seed_guides():
    # 1500-3000 steps (users.md; every recipe read lands on 2000 at its own batch size). A cell that
    # needs another number must cite its recipe and be listed here with it.
    cited_otherwise = {}
    for preset in ALL:
        if preset.label() not in cited_otherwise:
            assert 1500 <= preset.target_steps <= 3000, preset.label()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("goal", GOALS)
def test_less_memory_never_means_more(family, goal):
    cells = [preset_for(family, goal, memory) for memory in GPU_MEMORY]
    for smaller, larger in zip(cells, cells[1:]):
        assert smaller.batch_size <= larger.batch_size
        assert smaller.resolution <= larger.resolution
        assert smaller.rank <= larger.rank
        assert smaller.options["gradient_checkpointing"] >= larger.options["gradient_checkpointing"]


def test_recipes_spot_checks():
    # A few cells against the recipe text quoted in presets.py.
    sd15 = preset_for("SD1.5", "character", "8 GB")          # Civitai's SD1.5 defaults
    assert (sd15.learning_rate, sd15.rank, sd15.alpha, sd15.options["text_encoder_lr"]) == (5e-4, 32, 16.0, 5e-5)
    assert sd15.options["lr_schedule"] == "cosine_with_restarts" and sd15.options["lr_cycles"] == 3
    assert sd15.options["gradient_checkpointing"] is True
    style = preset_for("SD1.5", "style", "16 GB")            # Holostrawberry's LoCon row 16/8/8/4
    assert (style.rank, style.alpha, style.options["conv_rank"], style.options["conv_alpha"]) == (16, 8.0, 8, 4.0)
    assert style.options["train_text_encoder"] is False
    xl8 = preset_for("SDXL", "style", "8 GB")                # kohya: dim 4-8 at 8 GB, alpha = dim / 2
    assert (xl8.rank, xl8.alpha, xl8.options["conv_rank"], xl8.options["conv_alpha"]) == (8, 4.0, 8, 4.0)
    xl = preset_for("SDXL", "character", "16 GB")
    assert xl.options["optimizer"] == "Adafactor" and xl.options["weight_decay"] == 0.0
    assert xl.options["train_text_encoder"] is True and preset_for("SDXL", "character", "12 GB").options[
        "train_text_encoder"] is False
    flux = preset_for("Flux", "character", "24+ GB")         # ai-toolkit's 24 GB example
    assert (flux.resolution, flux.batch_size, flux.learning_rate, flux.rank, flux.alpha, flux.target_steps) == (
        1024, 1, 1e-4, 16, 16.0, 2000)
    assert preset_for("Flux", "character", "12 GB").resolution == 512


@pytest.mark.parametrize("target, per_epoch, epochs", [
    (2000, 500, 4),       # exact
    (2000, 400, 5),       # exact
    (2000, 600, 3),       # 1800 beats 2400
    (2000, 900, 2),       # 1800 beats 2700
    (2000, 700, 3),       # 2100 beats 1400
    (2000, 800, 2),       # tie 1600 / 2400: the fewer epochs
    (2000, 1, 2000),
    (2000, 2600, 1),      # one epoch is already past the target
    (2000, 5000, 1),      # never 0 epochs
    (1, 1, 1),
])
def test_whole_epochs(target, per_epoch, epochs):
    assert whole_epochs(target, per_epoch) == epochs


@pytest.mark.parametrize("target, per_epoch", [(0, 10), (10, 0), (-5, 10)])
def test_whole_epochs_refuses_nonsense(target, per_epoch):
    with pytest.raises(ValueError):
        whole_epochs(target, per_epoch)


@pytest.mark.parametrize("args, bad, choices", [
    (("SD2", "character", "8 GB"), "family", FAMILIES),
    (("SDXL", "landscape", "8 GB"), "goal", GOALS),
    (("SDXL", "style", "10 GB"), "gpu_memory", GPU_MEMORY),
])
def test_preset_for_names_the_bad_argument(args, bad, choices):
    with pytest.raises(ValueError) as raised:
        preset_for(*args)
    message = str(raised.value)
    assert message.startswith(bad) and all(choice in message for choice in choices)


def test_presets_are_read_only():
    preset = ALL[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.rank = 4
    with pytest.raises(TypeError):
        preset.options["optimizer"] = "AdamW"
    assert isinstance(preset, Preset) and hash(preset) == hash(preset_for(*CELLS[0]))


def test_no_comfy_or_torch_in_the_table_module():
    tree = ast.parse(Path(presets.__file__).read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"torch", "comfy", "folder_paths", "nodes"}
    assert imported <= {"__future__", "dataclasses", "types", "typing"}

"""Train LoRA's preset: base family x goal x GPU memory -> the settings public recipes use.

The preset's values for Train LoRA's own widgets are written into them by the front end when a preset is
picked (js/presets.js), so they show on the node and can be changed there; its training options fill the
option groups no option node set. The report then says which values came from the preset and which the
user changed. The table itself, with its sources, is trainer/training/presets.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..trainer.training.optimizers import unavailable_reason
from ..trainer.training.presets import FAMILIES, GOALS, GPU_MEMORY, Preset, all_presets, preset_for, whole_epochs
from .messages import user_error, validation_message
from .train_checks import NODE

NO_PRESET = "none"
# The model families (comfy_bridge.model_family) each preset family is for.
MODEL_FAMILIES = {"SD1.5": ("sd_v1",), "SDXL": ("sdxl_base_v1-0",), "SD3": ("sd3",), "Flux": ("flux1",)}
FAMILY_NAMES = {"sd_v1": "SD1.x", "sd_v2": "SD2.x", "sdxl_base_v1-0": "SDXL", "sd3": "SD3", "flux1": "Flux.1"}
WIDGETS = ("resolution", "batch_size", "learning_rate", "rank", "alpha", "steps")

PRESET_INPUTS = {
    "preset": ([NO_PRESET, *FAMILIES], {"default": NO_PRESET, "tooltip":
               "A starting point from public recipes (kohya_ss, Civitai's trainer, ai-toolkit) for this base "
               "model: picking one fills resolution, batch size, learning rate, rank, alpha and steps above (change "
               "any of them freely), and sets the optimizer, precision, checkpointing and caching unless an option "
               "node says otherwise. The report lists what came from the preset. none = only what you set."}),
    "goal": (list(GOALS), {"default": GOALS[0], "tooltip":
             "character: one person or creature; style: a look across subjects; concept: an object, pose or idea."}),
    "gpu_memory": (list(GPU_MEMORY), {"default": GPU_MEMORY[0], "tooltip":
                   "Your card's memory: the preset trades batch size, resolution and memory savers for it."}),
}


def choice_problem(preset=None, goal=None, gpu_memory=None) -> str | None:
    """A validation message for a preset input that is not one of its choices, else None. Empty (None or "")
    is fine: a workflow saved before these inputs existed holds null (or an old report's text, which the
    front end resets) in their places, and such a run takes the defaults (see `with_defaults`)."""
    for name, value in (("preset", preset), ("goal", goal), ("gpu_memory", gpu_memory)):
        choices = PRESET_INPUTS[name][0]
        if value not in (None, "") and value not in choices:
            return validation_message(NODE, name, f"{value!r} is not one of its choices.",
                                      f"pick one of {', '.join(choices)}.")
    return None


def with_defaults(preset, goal, gpu_memory) -> tuple[str, str, str]:
    """The three preset inputs with an empty value (see `choice_problem`) replaced by its default."""
    return tuple(value if value not in (None, "") else PRESET_INPUTS[name][1]["default"]
                 for name, value in (("preset", preset), ("goal", goal), ("gpu_memory", gpu_memory)))


@dataclass
class PresetChoice:
    """What a preset decided for one run, for the run and for its report."""
    preset: Preset | None
    widgets: dict
    options: object                       # TrainingOptions, with the preset's values in the groups no node set
    from_preset: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def report_lines(self) -> list[str]:
        if self.preset is None:
            return []
        lines = [f"preset {self.preset.label()}: " + (", ".join(self.from_preset) or "nothing")]
        if self.changed:
            lines.append("changed from the preset by you: " + ", ".join(self.changed))
        return lines + self.notes


def choose(preset_name: str, goal: str, gpu_memory: str, model_family: str, widgets: dict, options) -> PresetChoice:
    """The run's settings under the preset (None = no preset): Train LoRA's widgets as set, options filled."""
    if not preset_name or preset_name == NO_PRESET:
        return PresetChoice(None, dict(widgets), options)
    try:
        preset = preset_for(preset_name, goal, gpu_memory)
    except ValueError as bad:
        raise user_error(NODE, "preset", str(bad), f"choose one of {', '.join(PRESET_INPUTS['preset'][0])}.") from None
    if model_family not in MODEL_FAMILIES[preset.family]:
        raise user_error(NODE, "preset", f"the preset is for {preset.family} models; the model loaded is "
                         f"{FAMILY_NAMES.get(model_family, model_family)}.",
                         "pick the preset of your model's family, or 'none' to set everything yourself.")
    choice = PresetChoice(preset, dict(widgets), options, notes=list(preset.notes))
    wanted = preset.widget_values()
    for name in WIDGETS:
        if _same(widgets[name], wanted[name]):
            choice.from_preset.append(f"{name} {_shown(wanted[name])}")
        else:
            choice.changed.append(f"{name} {_shown(widgets[name])} (preset: {_shown(wanted[name])})")
    chosen = dict(preset.options)
    # Only when the preset's optimizer is the one used: an Optimizer & Schedule node's choice wins.
    fallback = ("optimizer" not in options.groups_set and chosen.get("optimizer")
                and unavailable_reason(chosen["optimizer"]))
    if fallback:
        choice.notes.append(f"the preset's optimizer {chosen['optimizer']} is not available ({fallback}); "
                            "AdamW is used instead, at the preset's learning rate.")
        chosen["optimizer"], chosen["optimizer_args"] = "AdamW", ""
    choice.options, applied = options.with_defaults_from(chosen)
    choice.from_preset += [f"{name} {_shown(value)}" for name, value in applied.items()]
    kept = sorted(set(chosen) - set(applied))
    if kept:
        choice.notes.append("option nodes set " + ", ".join(kept) + " (the preset's values for them are not used)")
    return choice


def steps_in_whole_epochs(choice: PresetChoice, epoch_plan) -> tuple[int, str | None]:
    """The preset's steps rounded to whole epochs (the kohya arithmetic: pictures x repeats / batch size per
    epoch), when the steps are the preset's own and epochs are not set; else the steps as set."""
    steps = choice.widgets["steps"]
    if choice.preset is None or choice.widgets["epochs"] > 0 or steps != choice.preset.target_steps:
        return steps, None
    whole = whole_epochs(steps, epoch_plan.steps)
    rounded = epoch_plan.steps_for(whole)
    return rounded, (f"steps {rounded} = {whole} epoch(s) x {epoch_plan.steps} steps per epoch: the whole epochs "
                     f"nearest the preset's {steps} steps")


def _same(value, wanted) -> bool:
    if isinstance(wanted, float) or isinstance(value, float):
        # 1e-6 relative: the front ends may print and re-read a float widget through a few decimal digits.
        return abs(float(value) - float(wanted)) <= 1e-6 * abs(float(wanted))
    return value == wanted


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def presets_table() -> dict:
    """Every preset as the front end shows it: family -> goal -> GPU memory -> widgets, options, notes."""
    table: dict = {}
    for preset in all_presets():
        table.setdefault(preset.family, {}).setdefault(preset.goal, {})[preset.gpu_memory] = {
            "label": preset.label(), "widgets": preset.widget_values(), "options": dict(preset.options),
            "notes": list(preset.notes), "sources": list(preset.sources)}
    return table

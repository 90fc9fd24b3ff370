"""The option nodes: one small node per group of training options, chained into Train LoRA's `options`.

Each node takes the options so far and returns them with its own group set (the way SamplerCustomAdvanced
takes a sampler, sigmas and a guider from small nodes), so a graph shows only the settings it changes,
next to each other. Groups no node set keep Train LoRA's preset's values, else the defaults.

The all-in-one Training Options node of the first releases stays, deprecated: workflows saved with it
load and train as before (it sets every group, so no preset value overrides what it says).
"""
from __future__ import annotations

from .messages import validation_message
from .option_inputs import option_inputs
from .training_options import (GROUPS, OPTIONS_TYPE, TrainingOptions, checked, is_no_resume, optimizer_problem,
                               resume_problem)

CATEGORY = "LoRA Lab/Train/Options"
CHAIN_TOOLTIP = ("Options from another option node (chain as many as you like; a later node of the same kind "
                 "wins). Unconnected: this node's settings alone, the rest from Train LoRA's preset.")


class _OptionGroupNode:
    GROUP = ""          # a GROUPS key
    TITLE = ""          # how messages name the node
    FUNCTION = "build"
    CATEGORY = CATEGORY
    RETURN_TYPES = (OPTIONS_TYPE,)
    RETURN_NAMES = ("options",)

    @classmethod
    def INPUT_TYPES(cls):
        specs = option_inputs()
        return {"required": {name: specs[name] for name in GROUPS[cls.GROUP]},
                "optional": {"options": (OPTIONS_TYPE, {"tooltip": CHAIN_TOOLTIP})}}

    def build(self, options=None, **values):
        upstream = options or TrainingOptions()
        return (checked(upstream.with_group(self.GROUP, _as_stored(values)), self.TITLE),)


class LoraLabOptimizerOptions(_OptionGroupNode):
    GROUP, TITLE = "optimizer", "Optimizer & Schedule"
    DESCRIPTION = ("Which optimizer, how the learning rate moves over the run (warm-up, decay, restarts), "
                   "gradient accumulation and clipping.")

    @classmethod
    def VALIDATE_INPUTS(cls, optimizer="AdamW", optimizer_args=""):
        # Naming an input here makes ComfyUI skip its own check of that input: the combo is checked here too.
        problem = optimizer_problem(optimizer, optimizer_args)
        return validation_message(cls.TITLE, *problem) if problem else True


class LoraLabNetworkOptions(_OptionGroupNode):
    GROUP, TITLE = "network", "Network"
    DESCRIPTION = ("Which layers learn (attention only, kohya's default, LoCon with convolutions), LoRA dropout, "
                   "and whether the text encoder learns too, at its own learning rate.")


class LoraLabNoiseOptions(_OptionGroupNode):
    GROUP, TITLE = "noise", "Noise & Loss"
    DESCRIPTION = ("Noise offset, the timestep range trained and how timesteps are drawn (logit-normal, a flow "
                   "shift), Min-SNR loss weighting, v-prediction loss scaling, the loss type (l2, l1, Huber) and "
                   "Flux's guidance value.")


class LoraLabCaptionOptions(_OptionGroupNode):
    GROUP, TITLE = "captions", "Caption Augment"
    DESCRIPTION = ("Caption dropout, tag shuffling (keeping the first tags in place) and tag dropout, drawn anew "
                   "every step. Any of them makes the text encoder run during training.")


class LoraLabSaveOptions(_OptionGroupNode):
    GROUP, TITLE = "saves", "Saves & Resume"
    DESCRIPTION = ("Saves every N steps or epochs (to compare epochs), how many to keep, the file's precision, "
                   "a save to resume exactly where it stopped, and a moving average (EMA) of the weights.")

    @classmethod
    def VALIDATE_INPUTS(cls, resume_from=""):
        # resume_from is named here, so ComfyUI leaves its list check to this method: "" (saved by versions
        # where resume_from was a text box) must keep meaning "none".
        problem = resume_problem(resume_from)
        return validation_message(cls.TITLE, "resume_from", *problem) if problem else True


class LoraLabPreviewOptions(_OptionGroupNode):
    GROUP, TITLE = "previews", "Previews"
    DESCRIPTION = "Pictures sampled with the LoRA as it trains, every N steps, from fixed prompts and a fixed seed."


class LoraLabMemoryOptions(_OptionGroupNode):
    GROUP, TITLE = "memory", "Memory & Speed"
    DESCRIPTION = ("Training precision (bf16/fp16 halve the memory of the frozen model), gradient checkpointing "
                   "(less memory, about 30% slower), the latent cache on disk, the fp8 base (halves the "
                   "frozen model's memory again) and block swap (blocks wait in CPU memory until they compute).")


class LoraLabTrainingOptions:
    """The all-in-one node of the first releases: every option on one 964 px node. Deprecated for the
    group nodes above; kept so saved workflows load and train exactly as before."""
    DEPRECATED = True       # the new front end hides it from search and marks it; the legacy one ignores this
    TITLE = "Training Options"
    DESCRIPTION = ("Deprecated: every training option on one node. Use the small option nodes (Optimizer & "
                   "Schedule, Network, Noise & Loss, Caption Augment, Saves & Resume, Previews, Memory & Speed) "
                   "instead; workflows saved with this node keep working.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (OPTIONS_TYPE,)
    RETURN_NAMES = ("options",)
    # Its first releases' required inputs, in their order: the front ends map saved widget values by position.
    REQUIRED = ("lr_schedule", "warmup_steps", "gradient_accumulation", "max_grad_norm", "gradient_checkpointing",
                "precision", "dropout", "save_every_n_steps", "save_precision", "overwrite_existing", "resume_from")

    @classmethod
    def INPUT_TYPES(cls):
        specs = option_inputs()
        return {"required": {name: specs[name] for name in cls.REQUIRED},
                "optional": {name: spec for name, spec in specs.items() if name not in cls.REQUIRED}}

    @classmethod
    def VALIDATE_INPUTS(cls, resume_from="", optimizer="AdamW", optimizer_args=""):
        problem = optimizer_problem(optimizer, optimizer_args)
        if problem:
            return validation_message(cls.TITLE, *problem)
        problem = resume_problem(resume_from)
        return validation_message(cls.TITLE, "resume_from", *problem) if problem else True

    def build(self, **values):
        # Checked again in checked(): ComfyUI 2024-03 validates only nodes reached through required inputs,
        # and this node feeds Train LoRA's optional one, so VALIDATE_INPUTS never runs for it there.
        options = TrainingOptions(**_as_stored(values), groups_set=frozenset(GROUPS))
        return (checked(options, self.TITLE),)


def _as_stored(values: dict) -> dict:
    """resume_from as TrainingOptions keeps it: "" for none (the list's first choice, or an old text box)."""
    if "resume_from" in values:
        values = dict(values, resume_from="" if is_no_resume(values["resume_from"])
                      else str(values["resume_from"]).strip())
    return values


GROUP_NODES = (LoraLabOptimizerOptions, LoraLabNetworkOptions, LoraLabNoiseOptions, LoraLabCaptionOptions,
               LoraLabSaveOptions, LoraLabPreviewOptions, LoraLabMemoryOptions)
NODE_CLASS_MAPPINGS = {node.__name__: node for node in GROUP_NODES} | {"LoraLabTrainingOptions": LoraLabTrainingOptions}
NODE_DISPLAY_NAME_MAPPINGS = {node.__name__: f"{node.TITLE} (LoRA Lab)" for node in GROUP_NODES} | {
    "LoraLabTrainingOptions": "Training Options, all in one (deprecated, LoRA Lab)"}

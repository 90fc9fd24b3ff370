"""Compare Epochs: one labelled grid of a training run's epoch saves (rows) x fixed prompts and strengths
(columns), all from the same seed, to pick the epoch before it overfits.

The pictures are made exactly as LoRA Compare Grid makes them (pedals.py: each LoRA applied like a Load LoRA
node, ComfyUI's own sampler, the same noise for every cell); rows are labelled with the validation loss a
save recorded when the run held pictures out (Previews -> validation_pictures).
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import torch

import comfy.model_management
import comfy.samplers
import folder_paths

from ..trainer.image_grid import compose_grid
from ..trainer.lora import stack as stacks
from ..trainer.lora import trigger_words as lora_words
from ..trainer.training.epoch_saves import run_saves, same_run
from ..trainer.training.validation import ValidationHistory
from .messages import user_error, validation_message
from .pedals import (GRID_PROMPTS, STRENGTH_LIMIT, CellRenderer, apply_stack, file_signature, lora_choices,
                     loras_folders, read_lora, resolve, with_trigger)
from .training_previews import TRIGGER_PLACEHOLDER

NODE = "Compare Epochs"
MAX_STRENGTHS = 4
NO_EPOCH_SAVES_FIX = ("turn on save_every_n_epochs on the Saves & Resume node (1 = a save after every epoch), train "
                      "again, and connect Train LoRA's lora_name output to lora_name_override.")


class LoraLabEpochGrid:
    TITLE = NODE
    DESCRIPTION = ("Renders a training run's epoch saves (<name>_epoch<E>, from save_every_n_epochs) and its final "
                   "file as rows, and fixed prompts at one or two strengths as columns, all from the same seed: "
                   "pick the last epoch before it overfits. Rows show each save's validation loss when the run "
                   "held pictures out (Previews -> validation_pictures).")
    CATEGORY = "LoRA Lab/Train"
    FUNCTION = "compare"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "vae": ("VAE",),
                "lora_name": (lora_choices(), {"tooltip": "The run to compare: its final LoRA or any of its saves; "
                              "its <name>_epoch<E> saves are found beside it."}),
                # dynamicPrompts off: the front ends would otherwise read {trigger} as a {a|b} choice.
                "prompts": ("STRING", {"multiline": True, "default": GRID_PROMPTS, "dynamicPrompts": False,
                                       "tooltip": "One prompt per line; each is a column (per strength). "
                                       "{trigger} becomes the trigger word (see trigger_word)."}),
                "strengths": ("STRING", {"default": "0.8, 1.0", "tooltip":
                              f"One or two (at most {MAX_STRENGTHS}) LoRA strengths, each a column per prompt; "
                              "the model and CLIP strength are the same."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip":
                         "The same seed for every picture, so only the epochs differ."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS,),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS,),
                "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8}),
                "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8}),
            },
            "optional": {
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "One negative prompt for every picture."}),
                "lora_name_override": ("STRING", {"forceInput": True, "tooltip":
                                       "Connect Train LoRA's lora_name: the run just trained (replaces lora_name)."}),
                "trigger_word": ("STRING", {"default": "", "tooltip":
                                 "Replaces {trigger} in the prompts. Empty: the trigger word stored in the run's "
                                 "files."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, prompts=None, strengths=None, lora_name=None):
        # Naming lora_name turns off ComfyUI's strict list check: with lora_name_override connected, the
        # run's files may not exist before it is trained, and a stale choice must not reject the prompt.
        if isinstance(prompts, str) and not prompt_lines(prompts):
            return validation_message(NODE, "prompts", "there is no prompt.", "write one prompt per line.")
        if isinstance(strengths, str):
            try:
                parse_strengths(strengths)
            except ValueError as error:
                return validation_message(NODE, "strengths", *error.args)
        return True

    @classmethod
    def IS_CHANGED(cls, lora_name=None, lora_name_override=None, **_):
        # A save rewritten under the same name (trained again with overwrite) renders the grid again.
        name = lora_name_override or lora_name
        if not isinstance(name, str):
            return ""
        found = run_saves(name, folder_paths.get_filename_list("loras"))
        names = [listed for _, listed in found.epochs] + ([found.final] if found.final else [])
        return "|".join(f"{listed}:{file_signature(listed)}" for listed in names)

    def compare(self, model, clip, vae, lora_name, prompts, strengths, seed, steps, cfg, sampler_name, scheduler,
                width, height, negative_prompt="", lora_name_override=None, trigger_word=""):
        lines = prompt_lines(prompts)
        if not lines:
            raise user_error(NODE, "prompts", "there is no prompt.", "write one prompt per line.")
        try:
            strength_values = parse_strengths(strengths)
        except ValueError as error:
            raise user_error(NODE, "strengths", *error.args) from None
        overridden = isinstance(lora_name_override, str) and lora_name_override.strip() != ""
        input_name = "lora_name_override" if overridden else "lora_name"
        rows, notes = epoch_rows(lora_name_override.strip() if overridden else lora_name, input_name)
        trigger = (trigger_word or "").strip()
        if not trigger and any(TRIGGER_PLACEHOLDER in line for line in lines):
            trigger = lora_words.join_words(lora_words.trigger_words(rows[-1].metadata))
        filled = [with_trigger(line, trigger) for line in lines]
        columns = [(prompt, strength) for prompt in filled for strength in strength_values]

        renderer = CellRenderer(vae, seed, steps, cfg, sampler_name, scheduler, width, height,
                                cells=len(rows) * len(columns))
        cells = []
        for row in rows:
            pictures = {}
            for strength in strength_values:
                applied = apply_stack(model, clip, [(row.name, strength, strength)], NODE, input_name)
                negative = renderer.encode(applied.clip, negative_prompt or "")
                for prompt in filled:
                    comfy.model_management.throw_exception_if_processing_interrupted()
                    pictures[prompt, strength] = renderer.render(applied.model, renderer.encode(applied.clip, prompt),
                                                                 negative)
            cells.append([pictures[column] for column in columns])
        column_labels = [f"{strength:g} · {prompt}" for prompt, strength in columns]
        grid = compose_grid(cells, column_labels, [row.label for row in rows])
        summary = "\n".join([f"{row.name}: {row.label}" for row in rows] + [f"note: {note}" for note in notes])
        return {"ui": {"text": [summary]},
                "result": (torch.from_numpy(grid.astype(np.float32) / 255.0).unsqueeze(0),)}


def prompt_lines(prompts) -> list[str]:
    return [line.strip() for line in str(prompts or "").splitlines() if line.strip()]


def parse_strengths(text: str) -> list[float]:
    """"0.8, 1.0" -> [0.8, 1.0]; ValueError(problem, fix) for anything that is not 1..MAX_STRENGTHS strengths."""
    parts = [part for part in re.split(r"[,;\s]+", str(text or "").strip()) if part]
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"'{part}' is not a number.", "write one or two strengths separated by a comma, "
                             "e.g. 0.8, 1.0.") from None
        if not math.isfinite(value) or abs(value) > STRENGTH_LIMIT:
            raise ValueError(f"the strength {part} is outside -{STRENGTH_LIMIT:g}..{STRENGTH_LIMIT:g}.",
                             "use strengths such as 0.8, 1.0 (1 is the LoRA as trained).")
        values.append(value)
    if not values:
        raise ValueError("there is no strength.", "write one or two strengths, e.g. 0.8, 1.0.")
    if len(values) > MAX_STRENGTHS:
        raise ValueError(f"{len(values)} strengths were given; at most {MAX_STRENGTHS} fit a grid.",
                         "use one or two strengths.")
    return values


class EpochRow:
    """One save of the run: its listed name, its file's metadata and the label of its row."""

    def __init__(self, name: str, metadata: dict, epoch: int | None, final: bool):
        self.name, self.metadata, self.epoch, self.final = name, metadata, epoch, final
        history = ValidationHistory.from_metadata(metadata)
        self.validation_loss = history.at_step(_int(metadata.get("ss_steps"))) if history else None
        self.lowest = False

    @property
    def label(self) -> str:
        epoch = self.epoch if self.epoch is not None else _int(self.metadata.get("ss_epoch"))
        parts = [f"final, epoch {epoch}" if self.final and epoch is not None else
                 "final" if self.final else f"epoch {epoch}"]
        if self.validation_loss is not None:
            parts.append(f"val loss {self.validation_loss:.4g}" if math.isfinite(self.validation_loss)
                         else "val loss not a number")
        if self.lowest:
            parts.append("lowest")
        return " · ".join(parts)


def epoch_rows(name, input_name: str) -> tuple[list[EpochRow], list[str]]:
    """The run's epoch saves in epoch order, then its final file; every file is read now, so a missing or
    unreadable one fails before any rendering. Notes say what was left out."""
    if not isinstance(name, str) or name.strip() in ("", stacks.NONE_NAME):
        raise user_error(NODE, input_name, "no LoRA is chosen.", "pick the run's LoRA in lora_name, or connect "
                         "Train LoRA's lora_name output to lora_name_override.")
    found = run_saves(name, folder_paths.get_filename_list("loras"))
    where = ", ".join(loras_folders()) or "(no loras folder is configured)"
    if not found.epochs and not found.final:
        raise user_error(NODE, input_name, f"no LoRA '{found.base}' and no epoch saves of it "
                         f"({os.path.basename(found.base)}_epoch<E>.safetensors) were found in the loras folders "
                         f"({where}).", "pick the run's LoRA in lora_name (R refreshes the list after training), "
                         "or connect Train LoRA's lora_name output to lora_name_override.")
    if not found.epochs:
        raise user_error(NODE, input_name, f"'{found.final}' has no epoch saves "
                         f"({os.path.basename(found.base)}_epoch<E>.safetensors) beside it in {where}, so there "
                         "are no epochs to compare.", NO_EPOCH_SAVES_FIX)

    def metadata_of(listed: str) -> dict:
        return dict(read_lora(resolve(listed, NODE, input_name), NODE, input_name).metadata)

    final = EpochRow(found.final, metadata_of(found.final), None, True) if found.final else None
    rows, notes = [], []
    for epoch, listed in found.epochs:
        metadata = metadata_of(listed)
        if same_run(final.metadata if final else None, metadata):
            rows.append(EpochRow(listed, metadata, epoch, False))
        else:
            notes.append(f"left out {listed}: it is a save of another run than {found.final}")
    if not rows:
        raise user_error(NODE, input_name, f"the epoch saves beside '{found.final}' are of another run (it was "
                         "trained again under the same name).", NO_EPOCH_SAVES_FIX)
    if final is None:
        notes.append(f"{found.base}.safetensors is not there (the run stopped early?): only its epoch saves are shown")
    else:
        rows.append(final)
    measured = [row for row in rows if row.validation_loss is not None and math.isfinite(row.validation_loss)]
    if len(measured) > 1:
        min(measured, key=lambda row: row.validation_loss).lowest = True
    return rows, notes


def _int(text) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


NODE_CLASS_MAPPINGS = {"LoraLabEpochGrid": LoraLabEpochGrid}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraLabEpochGrid": "Compare Epochs (LoRA Lab)"}

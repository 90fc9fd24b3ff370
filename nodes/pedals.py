"""LoRA pedals: build a LORA_STACK, apply it the way ComfyUI's LoraLoader does, compare it in a grid.

LORA_STACK is the plain list of ``(lora_name, strength_model, strength_clip)`` tuples Comfyroll,
Efficiency and others pass around, names spelled as ComfyUI's LoRA list spells them, incoming entries
first. Every entry is applied with ``comfy.sd.load_lora_for_models``, so a stack equals the same chain
of LoraLoader nodes. An entry with block weights (stack.StackEntry) goes through ComfyUI's same steps,
its patches grouped by block ratio (comfy_bridge.apply_lora_by_blocks).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

import comfy.lora
import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths

from ..trainer.lora.block_weights import BlockWeightsError, FAMILY_NAMES, FLUX, SD, SDXL, unnamed_blocks
from ..trainer.lora.block_weights import parse as parse_block_weights
from ..trainer.lora import stack as stacks
from ..trainer.lora import trigger_words as lora_words
from ..trainer.image_grid import compose_grid
from ..trainer.lora.stack import LoraStackError
from . import comfy_bridge
from .messages import user_error, validation_message
from ..trainer.training.saves import STATE_SUFFIX
from .training_previews import TRIGGER_PLACEHOLDER

CATEGORY = "LoRA Lab/Stack"
STACK_TYPE = "LORA_STACK"
STRENGTH_LIMIT = 10.0
NODE_PEDAL, NODE_APPLY, NODE_GRID = "LoRA Pedal", "Apply LoRA Stack", "LoRA Compare Grid"
# The grid's default rows: short forms of the test prompts LoRA users compare LoRAs with
# (research/users.md): rendering technique, colour and mood, architecture.
GRID_PROMPTS = (f"{TRIGGER_PLACEHOLDER}, an old lighthouse on a rocky cliff, stormy sea, sunset\n"
                f"{TRIGGER_PLACEHOLDER}, a cluttered inventor's workshop, blueprints, warm desk lamp\n"
                f"{TRIGGER_PLACEHOLDER}, low-angle view of a suburb street, rainy, puddles, dark clouds")

# Files read once and shared across queue runs and nodes (see LoraFileCache).
LORA_FILES = stacks.LoraFileCache(max_entries=8)


def strength_input(what: str):
    return ("FLOAT", {"default": 1.0, "min": -STRENGTH_LIMIT, "max": STRENGTH_LIMIT, "step": 0.05, "tooltip":
            f"How strongly the LoRA changes the {what}; 0 leaves it alone, negative values invert it."})


def lora_choices() -> list[str]:
    # Train LoRA keeps resume states in ComfyUI's user/loralab/train-state/; ones an older LoRA Lab left
    # beside the LoRAs are still hidden here, as they are not LoRAs.
    return [stacks.NONE_NAME] + [name for name in folder_paths.get_filename_list("loras")
                                 if not name.endswith(STATE_SUFFIX)]


def loras_folders() -> list[str]:
    return list(folder_paths.get_folder_paths("loras"))


def _checked(node: str, input_name: str, function, *args):
    """Call a trainer function; its LoraStackError becomes the node's user-facing error."""
    try:
        return function(*args)
    except LoraStackError as error:
        raise user_error(node, input_name, error.problem, error.fix) from None


def resolve_name(name: str) -> stacks.ResolvedLora:
    """The file a LoRA name means, or LoraStackError (LoraNotFoundError when it simply is not there)."""
    return stacks.resolve_lora(name, folder_paths.get_filename_list("loras"), loras_folders(),
                               lambda listed: folder_paths.get_full_path("loras", listed))


def resolve(name: str, node: str, input_name: str) -> stacks.ResolvedLora:
    return _checked(node, input_name, resolve_name, name)


def file_signature(name) -> str:
    """Modification time and size of the file a name means ("" when there is none), for IS_CHANGED:
    a file replaced under the same name (retrained with overwrite) reruns the node and what follows."""
    if not isinstance(name, str) or name.strip() in ("", stacks.NONE_NAME):
        return ""
    try:
        stat = os.stat(resolve_name(name).path)
        return f"{stat.st_mtime_ns}:{stat.st_size}"
    except (OSError, ValueError):
        return ""


BLOCK_WEIGHTS_TOOLTIP = (
    "Optional: this LoRA's strength per block of the model, as in LoRA Block Weight (Inspire Pack, hako-mikan). "
    "A preset (ALL, NONE, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, MOUT, ...; Flux: DBL-ALL, SINGLE-ALL, ...) or "
    "one number per block, BASE first: SD1.5 17 (LyCORIS 26/27), SDXL 12 (20/21), Flux 20/58. A block the LoRA "
    "lacks is skipped, never shifting the rest. Empty = the whole LoRA. Other packs' stack loaders apply the "
    "whole LoRA.")
# kohya's ss_base_model_version families (comfy_bridge.model_family) that have a block layout.
BLOCK_FAMILIES = {"sd_v1": SD, "sd_v2": SD, "sdxl_base_v1-0": SDXL, "flux1": FLUX}


def parsed_blocks(text, node: str, input_name: str):
    """A block-weight text checked as far as it can be without the model; None when empty."""
    try:
        return parse_block_weights(text)
    except BlockWeightsError as error:
        raise user_error(node, input_name, error.problem, error.fix) from None


def block_ratios(model, text: str, node: str, input_name: str):
    """The ratio of each block for this model, from an entry's block-weight text."""
    family = BLOCK_FAMILIES.get(comfy_bridge.model_family(model))
    if family is None:
        raise user_error(node, input_name, f"block weights name the blocks of {', '.join(FAMILY_NAMES.values())} "
                         f"models; this model is {comfy_bridge.model_family(model)}, whose blocks they do not "
                         "describe.", "clear the block weights (the LoRA then applies whole).")
    try:
        return parsed_blocks(text, node, input_name).for_family(family)
    except BlockWeightsError as error:
        raise user_error(node, input_name, error.problem, error.fix) from None


def strength_out_of_range(value) -> tuple[str, str] | None:
    """(problem, fix) for a strength outside -STRENGTH_LIMIT..STRENGTH_LIMIT, or None when it is inside."""
    if -STRENGTH_LIMIT <= value <= STRENGTH_LIMIT:
        return None
    return (f"{value:g} is outside -{STRENGTH_LIMIT:g}..{STRENGTH_LIMIT:g}.",
            f"use a strength between -{STRENGTH_LIMIT:g} and {STRENGTH_LIMIT:g} (1 is the LoRA as trained).")


# --- the pedal ------------------------------------------------------------------------------------------
class LoraLabLoraStack:
    TITLE = NODE_PEDAL
    DESCRIPTION = ("One LoRA at its strengths, added to the end of the incoming LoRA stack. Chain pedals like "
                   "guitar pedals; switch one off to hear the others. Connect Train LoRA's lora_name to "
                   "lora_name_override to stack the LoRA you just trained.")
    CATEGORY = CATEGORY
    FUNCTION = "stack"
    RETURN_TYPES = (STACK_TYPE,)
    RETURN_NAMES = ("lora_stack",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": (lora_choices(), {"tooltip": "A LoRA from the loras folders; None adds nothing."}),
                "strength_model": strength_input("diffusion model"),
                "strength_clip": strength_input("text encoder (CLIP)"),
                "enabled": ("BOOLEAN", {"default": True, "tooltip":
                            "Off: the stack passes through unchanged, as if the pedal were not there."}),
            },
            "optional": {
                "lora_stack": (STACK_TYPE, {"tooltip": "Entries from earlier pedals; they stay first."}),
                "lora_name_override": ("STRING", {"forceInput": True, "tooltip":
                                       "A LoRA name from another node (Train LoRA's lora_name); "
                                       "when connected it replaces lora_name."}),
                # Added after the first release: last, so saved workflows keep their widget values.
                "block_weights": ("STRING", {"default": "", "tooltip": BLOCK_WEIGHTS_TOOLTIP}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, strength_model=None, strength_clip=None, lora_name=None, enabled=None,
                        lora_name_override="", block_weights=None):
        # Naming lora_name here turns off ComfyUI's strict list check: a name saved on Windows, or a stale
        # choice while lora_name_override is connected, must not reject the prompt. Linked inputs arrive
        # as None; an unconnected override keeps its default "".
        for input_name, value in (("strength_model", strength_model), ("strength_clip", strength_clip)):
            if isinstance(value, (int, float)) and strength_out_of_range(value):
                return validation_message(NODE_PEDAL, input_name, *strength_out_of_range(value))
        try:
            parse_block_weights(block_weights)
        except BlockWeightsError as error:
            return validation_message(NODE_PEDAL, "block_weights", error.problem, error.fix)
        name_decides = enabled is not False and lora_name_override == "" and isinstance(lora_name, str)
        if name_decides and lora_name != stacks.NONE_NAME:
            try:
                resolve(lora_name, NODE_PEDAL, "lora_name")
            except ValueError as error:
                return str(error)
        return True

    @classmethod
    def IS_CHANGED(cls, lora_name=None, enabled=True, lora_name_override=None, **_):
        return file_signature(lora_name_override or lora_name) if enabled else ""

    def stack(self, lora_name, strength_model, strength_clip, enabled, lora_stack=None, lora_name_override=None,
              block_weights=""):
        incoming = [] if lora_stack is None else lora_stack
        overridden = isinstance(lora_name_override, str) and lora_name_override.strip() != ""
        name = lora_name_override.strip() if overridden else lora_name
        if not enabled or name == stacks.NONE_NAME or (strength_model == 0 and strength_clip == 0):
            return (incoming,)
        for input_name, value in (("strength_model", strength_model), ("strength_clip", strength_clip)):
            if strength_out_of_range(value):
                raise user_error(NODE_PEDAL, input_name, *strength_out_of_range(value))
        blocks = parsed_blocks(block_weights, NODE_PEDAL, "block_weights")
        resolved = resolve(name, NODE_PEDAL, "lora_name_override" if overridden else "lora_name")
        entry = stacks.stack_entry(resolved.name, float(strength_model), float(strength_clip),
                                   blocks.text if blocks else "")
        return (list(incoming) + [entry],)


# --- applying a stack -----------------------------------------------------------------------------------
def patches_that_map(tensors: dict, key_map: dict) -> dict:
    """What ComfyUI would patch from this file: empty means the LoRA would silently change nothing."""
    return comfy_bridge.quiet_load_lora(comfy_bridge.converted_lora(tensors), key_map)


def read_lora(resolved: stacks.ResolvedLora, node: str, input_name: str) -> stacks.LoraFile:
    return _checked(node, input_name, LORA_FILES.get, resolved.path)


@dataclass
class AppliedStack:
    model: object
    clip: object
    trigger_words: str
    applied: list      # the entries that changed something, names as listed (block weights kept)
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{entry[0]}  {stacks.strength_text(entry)}" for entry in self.applied] or ["no LoRA applied"]
        lines += self.notes
        if self.trigger_words:
            lines.append(f"trigger words: {self.trigger_words}")
        return "\n".join(lines)


def apply_stack(model, clip, stack, node: str = NODE_APPLY, input_name: str = "lora_stack") -> AppliedStack:
    """Apply every active entry in order, each exactly like a LoraLoader node. Inputs stay untouched."""
    entries = _checked(node, input_name, stacks.normalize_stack, stack)
    key_map = None
    words: list[str] = []
    applied, notes = [], []
    for entry in entries:
        name, strength_model, strength_clip = entry
        if clip is None:
            strength_clip = 0.0        # like LoraLoaderModelOnly
        if not stacks.is_active((name, strength_model, strength_clip), clip is not None):
            continue
        blocks = stacks.entry_blocks(entry)
        ratios = block_ratios(model, blocks, node, input_name) if blocks else None
        resolved = resolve(name, node, input_name)
        lora = read_lora(resolved, node, input_name)
        if key_map is None:
            key_map = comfy_bridge.lora_key_map(model, clip)
        patches = patches_that_map(lora.tensors, key_map)
        if not patches:
            error = stacks.describe_mismatch(resolved.path, lora.tensors)
            raise user_error(node, input_name, error.problem, error.fix)
        if ratios is None:
            model, clip = comfy_bridge.apply_lora(model, clip, dict(lora.tensors), strength_model, strength_clip)
        else:
            model, clip = comfy_bridge.apply_lora_by_blocks(model, clip, dict(lora.tensors), strength_model,
                                                            strength_clip, ratios.of_key)
            unnamed = unnamed_blocks(patches, ratios)
            if unnamed:
                notes.append(f"  {stacks.short_name(resolved.name)}: {', '.join(unnamed)} not in the block "
                             "weights' layout, kept at strength 1 (a LyCORIS layout names them)")
        if any(key.endswith(".dora_scale") for key in lora.tensors) and not comfy_bridge.loader_applies_dora():
            # ComfyUI's own Load LoRA skips the key too; the user should know the picture is not the DoRA's.
            note = (f"{stacks.short_name(resolved.name)}: a DoRA, whose magnitudes (dora_scale) this ComfyUI "
                    "cannot apply: it samples as the plain LoRA part, not as trained. Update ComfyUI (May 2024 "
                    "or newer) to apply it whole.")
            notes.append(f"  {note}")
            logging.warning("[LoRA Lab] %s › %s: %s", node, input_name, note)
        words += lora_words.sidecar_words(resolved.path) + lora_words.trigger_words(lora.metadata)
        applied.append(stacks.stack_entry(resolved.name, strength_model, strength_clip, blocks))
    return AppliedStack(model, clip, lora_words.join_words(words), applied, notes)


class LoraLabApplyLoraStack:
    TITLE = NODE_APPLY
    DESCRIPTION = ("Applies every LoRA of a LoRA stack (ours, Comfyroll's or Efficiency's) to MODEL and CLIP, in "
                   "order, exactly as a chain of Load LoRA nodes would, and outputs the LoRAs' trigger words.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "trigger_words")
    OUTPUT_TOOLTIPS = ("The model wearing the LoRAs.", "The CLIP wearing the LoRAs (None without a CLIP input).",
                       "Trigger words of the applied LoRAs, comma-separated: the words in each file's <name>.txt "
                       "or <name>.civitai.info beside it, then its stored trigger word, else its "
                       f"{lora_words.TRIGGER_TAGS_FROM_FREQUENCY} most frequent training tags.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "lora_stack": (STACK_TYPE, {"tooltip": "From a LoRA Pedal (or CR LoRA Stack / LoRA Stacker)."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Leave unconnected to change the diffusion model only."}),
            },
        }

    def apply(self, model, lora_stack, clip=None):
        result = apply_stack(model, clip, lora_stack)
        # "ui" text: what was applied, for the history and the front end (any node may report one).
        return {"ui": {"text": [result.summary()]},
                "result": (result.model, result.clip, result.trigger_words)}


# --- the comparison grid --------------------------------------------------------------------------------
class LoraLabLoraCompareGrid:
    TITLE = NODE_GRID
    DESCRIPTION = ("Renders every prompt (rows) with the base model, each LoRA of the stack alone, the whole stack "
                   "and optionally a strength sweep of one LoRA (columns), all from the same seed, as one "
                   "labelled picture.")
    CATEGORY = CATEGORY
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
                "lora_stack": (STACK_TYPE,),
                # dynamicPrompts off: the front ends would otherwise read {trigger} as a {a|b} choice.
                "prompts": ("STRING", {"multiline": True, "default": GRID_PROMPTS, "dynamicPrompts": False,
                                       "tooltip": "One prompt per line; each line is a row of the grid. "
                                       "{trigger} becomes the trigger word (see trigger_word)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip":
                         "The same seed is used for every picture, so only the LoRAs differ."}),
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
                "sweep_index": ("INT", {"default": -1, "min": -1, "max": 63, "tooltip":
                                "Which LoRA of the stack to sweep (0 = the first); -1 = no sweep."}),
                "sweep_strengths": ("STRING", {"default": "0, 0.5, 1", "tooltip":
                                    "Strengths for the swept LoRA, inside the whole stack; one column each."}),
                # Added after the first release: kept last so saved workflows keep their widget values.
                "trigger_word": ("STRING", {"default": "", "tooltip":
                                 "Replaces {trigger} in the prompts, the same text in every column. Empty: the "
                                 "trigger words stored in the stack's LoRAs (as Apply LoRA Stack outputs them)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, prompts=None, sweep_strengths=None):
        if isinstance(prompts, str) and not [line for line in prompts.splitlines() if line.strip()]:
            return validation_message(NODE_GRID, "prompts", "there is no prompt.", "write one prompt per line.")
        if isinstance(sweep_strengths, str):
            try:
                stacks.parse_strengths(sweep_strengths)
            except LoraStackError as error:
                return validation_message(NODE_GRID, "sweep_strengths", error.problem, error.fix)
        return True

    def compare(self, model, clip, vae, lora_stack, prompts, seed, steps, cfg, sampler_name, scheduler, width,
                height, negative_prompt="", sweep_index=-1, sweep_strengths="0, 0.5, 1", trigger_word=""):
        lines = [line.strip() for line in prompts.splitlines() if line.strip()]
        if not lines:
            raise user_error(NODE_GRID, "prompts", "there is no prompt.", "write one prompt per line.")
        entries = _checked(NODE_GRID, "lora_stack", stacks.normalize_stack, lora_stack)
        sweep = _checked(NODE_GRID, "sweep_strengths", stacks.parse_strengths, sweep_strengths) \
            if sweep_index >= 0 else []
        columns = _checked(NODE_GRID, "sweep_index", stacks.comparison_columns, entries, sweep_index, sweep)
        for name, *_ in entries:            # a missing file fails now, not after minutes of rendering
            resolve(name, NODE_GRID, "lora_stack")
        trigger = (trigger_word or "").strip()
        if not trigger and any(TRIGGER_PLACEHOLDER in line for line in lines):
            trigger = stored_trigger_words(columns)
        rows = [with_trigger(line, trigger) for line in lines]

        renderer = CellRenderer(vae, seed, steps, cfg, sampler_name, scheduler, width, height,
                                cells=len(rows) * len(columns))
        cells = [[None] * len(columns) for _ in rows]
        for column_index, column in enumerate(columns):
            applied = apply_stack(model, clip, list(column.entries), NODE_GRID)
            column_model, column_clip = applied.model, applied.clip
            negative = renderer.encode(column_clip, negative_prompt or "")
            for row_index, prompt in enumerate(rows):
                comfy.model_management.throw_exception_if_processing_interrupted()
                cells[row_index][column_index] = renderer.render(column_model, renderer.encode(column_clip, prompt),
                                                                 negative)
        grid = compose_grid(cells, [column.label for column in columns], rows)
        return (torch.from_numpy(grid.astype(np.float32) / 255.0).unsqueeze(0),)


def with_trigger(prompt: str, trigger: str) -> str:
    """The prompt with {trigger} filled in, as Training Options' preview prompts are (no dangling comma)."""
    return prompt.replace(TRIGGER_PLACEHOLDER, trigger).strip(" ,")


def stored_trigger_words(columns) -> str:
    """The trigger words stored in the LoRAs the grid shows, in stack order (one text for every column,
    so only the LoRAs differ between columns)."""
    names = list(dict.fromkeys(entry[0] for column in columns for entry in column.entries if stacks.is_active(entry)))
    words = []
    for name in names:
        lora = read_lora(resolve(name, NODE_GRID, "lora_stack"), NODE_GRID, "lora_stack")
        words += lora_words.trigger_words(lora.metadata)
    return lora_words.join_words(words)


class CellRenderer:
    """One picture per call with ComfyUI's own nodes and sampler: same noise every time, one progress bar."""

    def __init__(self, vae, seed, steps, cfg, sampler_name, scheduler, width, height, cells: int):
        import nodes as comfy_nodes       # ComfyUI's nodes.py (absolute import; ours are relative)
        self.nodes = comfy_nodes
        self.vae, self.seed, self.steps, self.cfg = vae, seed, steps, cfg
        self.sampler_name, self.scheduler = sampler_name, scheduler
        self.latent = comfy_nodes.EmptyLatentImage().generate(width, height, 1)[0]["samples"]
        self.progress = comfy.utils.ProgressBar(cells * steps)
        self.done = 0

    def encode(self, clip, text: str):
        return self.nodes.CLIPTextEncode().encode(clip, text)[0]

    def render(self, model, positive, negative) -> np.ndarray:
        latent = self.latent
        fix_channels = getattr(comfy.sample, "fix_empty_latent_channels", None)   # 2024-08+
        if fix_channels is not None:
            latent = fix_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, self.seed)
        previewer = self._previewer(model)
        start = self.done

        def on_step(step, x0, x, total_steps):
            preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
            self.progress.update_absolute(start + step + 1, None, preview)

        samples = comfy.sample.sample(model, noise, self.steps, self.cfg, self.sampler_name, self.scheduler,
                                      positive, negative, latent, denoise=1.0, callback=on_step,
                                      disable_pbar=True, seed=self.seed)
        self.done += self.steps
        self.progress.update_absolute(self.done)
        pixels = self.nodes.VAEDecode().decode(self.vae, {"samples": samples})[0]
        return (pixels[0, ..., :3].clamp(0, 1).float().cpu().numpy() * 255.0).round().astype(np.uint8)

    @staticmethod
    def _previewer(model):
        try:
            import latent_preview
            return latent_preview.get_previewer(model.load_device, model.model.latent_format)
        except Exception:        # previews are a nicety; never fail a render for them
            return None


NODE_CLASS_MAPPINGS = {
    "LoraLabLoraStack": LoraLabLoraStack,
    "LoraLabApplyLoraStack": LoraLabApplyLoraStack,
    "LoraLabLoraCompareGrid": LoraLabLoraCompareGrid,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoraLabLoraStack": "LoRA Pedal (LoRA Lab)",
    "LoraLabApplyLoraStack": "Apply LoRA Stack (LoRA Lab)",
    "LoraLabLoraCompareGrid": "LoRA Compare Grid (LoRA Lab)",
}

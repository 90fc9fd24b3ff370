"""The pedalboard: any number of LoRA rows on one node, each switchable, with its own strengths.

The rows live in one STRING input, ``pedals``, holding JSON::

    [{"on": true, "lora": "style.safetensors", "strength_model": 0.8, "strength_clip": 1.0, "blocks": "MIDD"}, ...]

(``blocks`` is optional: block weights, as the LoRA Pedal's ``block_weights`` input takes them.)

A plain widget value survives saving, reloading and API-format export without any front-end code on
the server side; js/pedalboard.js only draws the rows and writes this JSON back. Everything else --
names, files, applying, trigger words -- is the pedal's and Apply LoRA Stack's code in pedals.py.

Order of the output stack: the incoming ``lora_stack`` first (as everywhere in LORA_STACK land), then
the board's rows top to bottom, then the LoRA on the ``trained_lora`` input last, like a pedal added
at the end of the board.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..trainer.lora import stack as stacks
from ..trainer.lora import trigger_words as lora_words
from ..trainer.lora.block_weights import BlockWeightsError
from ..trainer.lora.block_weights import parse as parse_block_weights
from ..trainer.lora.stack import LoraStackError
from . import pedals as pedal_nodes
from .messages import user_error, validation_message

NODE_BOARD = "LoRA Pedalboard"
DEFAULT_STRENGTH = 1.0
ROW_EXAMPLE = '[{"on": true, "lora": "style.safetensors", "strength_model": 1.0, "strength_clip": 1.0}]'


@dataclass(frozen=True)
class Pedal:
    number: int          # 1-based row number, as the user sees it
    on: bool
    lora: str
    strength_model: float
    strength_clip: float
    blocks: str = ""     # block weights (block_weights.py); "" = the whole LoRA

    @property
    def active(self) -> bool:
        """Disabled, empty and both-zero rows change nothing, so they are left out of the stack."""
        return self.on and self.lora.strip() not in ("", stacks.NONE_NAME) and \
            (self.strength_model != 0 or self.strength_clip != 0)


def parse_pedals(text) -> list[Pedal]:
    """The rows of a ``pedals`` value; LoraStackError naming the row for anything malformed.

    Missing keys take defaults (on, strengths 1.0) so hand-written API prompts stay short; unknown keys
    are ignored so a newer front end can store more per row.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return []
    if not isinstance(text, str):
        raise LoraStackError(f"pedals is a {type(text).__name__}, not a JSON string.",
                             f"send the rows as a JSON text, e.g. {ROW_EXAMPLE}.")
    try:
        rows = json.loads(text)
    except ValueError as error:
        raise LoraStackError(f"pedals is not valid JSON ({error}).",
                             f"write the rows as a JSON list, e.g. {ROW_EXAMPLE}, or rebuild them in the "
                             "node's rows (a hand edit may have cut the text).") from None
    if not isinstance(rows, list):
        raise LoraStackError(f"pedals holds a JSON {type(rows).__name__}, not a list of rows.",
                             f"wrap the rows in [...], e.g. {ROW_EXAMPLE}.")
    return [_pedal(number, row) for number, row in enumerate(rows, start=1)]


def _pedal(number: int, row) -> Pedal:
    if not isinstance(row, dict):
        raise LoraStackError(f"Row {number} of pedals is {row!r}, not an object.",
                             f"write each row as an object, e.g. {ROW_EXAMPLE[1:-1]}.")
    on = row.get("on", True)
    if not isinstance(on, bool):
        raise LoraStackError(f"Row {number} of pedals has \"on\": {on!r}; it must be true or false.",
                             "set \"on\" to true or false.")
    lora = row.get("lora", "")
    if lora is None:
        lora = ""
    if not isinstance(lora, str):
        raise LoraStackError(f"Row {number} of pedals has \"lora\": {lora!r}; it must be a LoRA file name.",
                             "set \"lora\" to a name from the loras folder, e.g. \"style.safetensors\".")
    strengths = []
    for key in ("strength_model", "strength_clip"):
        value = row.get(key, DEFAULT_STRENGTH)
        # bool is an int in Python, but true/false as a strength is a mistake worth naming
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LoraStackError(f"Row {number} of pedals has \"{key}\": {value!r}; it must be a number.",
                                 f"set \"{key}\" to a number such as 1.0.")
        strengths.append(float(value))
    blocks = row.get("blocks", "")
    if blocks is None:
        blocks = ""
    try:
        parsed = parse_block_weights(blocks)
    except BlockWeightsError as error:
        raise LoraStackError(f"Row {number} of pedals has \"blocks\": {error.problem}", error.fix) from None
    return Pedal(number, on, lora, *strengths, parsed.text if parsed else "")


def _board_problem(text) -> tuple[str, str] | None:
    """(problem, fix) for what VALIDATE_INPUTS and the run both refuse: bad rows, bad strengths, names."""
    try:
        pedals = parse_pedals(text)
    except LoraStackError as error:
        return error.problem, error.fix
    for pedal in pedals:
        for key in ("strength_model", "strength_clip"):
            problem = pedal_nodes.strength_out_of_range(getattr(pedal, key))
            if problem:
                return f"Row {pedal.number} ({pedal.lora or 'no LoRA'}) {key} {problem[0]}", problem[1]
    for pedal in pedals:
        if pedal.active:
            try:
                pedal_nodes.resolve_name(pedal.lora)
            except LoraStackError as error:
                return f"Row {pedal.number}: {error.problem}", error.fix
    return None


def _words_from_headers(entries, strict: bool, input_name: str) -> list[str]:
    """Trigger words without applying anything: each file's header only, never its tensors."""
    words = []
    for name, *_ in entries:
        try:
            path = pedal_nodes.resolve_name(name).path
            words += lora_words.sidecar_words(path) + lora_words.trigger_words(stacks.read_metadata(path))
        except LoraStackError as error:
            if strict:
                raise user_error(NODE_BOARD, input_name, error.problem, error.fix) from None
    return words


def _outputs_in_use(prompt, unique_id) -> set[int]:
    """Which of this node's outputs the queued prompt connects to something (indexes)."""
    used = set()
    if not isinstance(prompt, dict) or unique_id is None:
        return used
    for node in prompt.values():
        for value in ((node or {}).get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) == str(unique_id):
                used.add(value[1])
    return used


TRAINED_STRENGTH_TOOLTIP = (
    "The strength of the LoRA arriving on trained_lora (connect Train LoRA's lora_name output there): it plays "
    "as the board's last row, changing the {part} this strongly (1 = as trained, 0 = not at all, negative "
    "inverts it). Unused while trained_lora is not connected.")


class LoraLabPedalboard:
    TITLE = NODE_BOARD
    DESCRIPTION = ("A whole pedalboard of LoRAs on one node: add rows, switch each on or off, set its model and "
                   "clip strengths, reorder them. Outputs the LORA_STACK (incoming entries first, the trained_lora "
                   "input last) and, when MODEL is connected, MODEL and CLIP wearing the LoRAs, exactly like a "
                   "chain of Load LoRA nodes.")
    CATEGORY = pedal_nodes.CATEGORY
    FUNCTION = "play"
    RETURN_TYPES = (pedal_nodes.STACK_TYPE, "MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("lora_stack", "model", "clip", "trigger_words")
    OUTPUT_TOOLTIPS = ("The incoming stack, then the active rows, then trained_lora; for Apply LoRA Stack or "
                       "any LORA_STACK node.",
                       "The model wearing the whole stack; connect the MODEL input to use it.",
                       "The CLIP wearing the whole stack; without a CLIP input it is None.",
                       "Trigger words of every LoRA in the stack, comma-separated (the words in its <name>.txt "
                       "or <name>.civitai.info, then its stored trigger word, else the "
                       f"{lora_words.TRIGGER_TAGS_FROM_FREQUENCY} most frequent training tags).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pedals": ("STRING", {"default": "[]", "multiline": False, "tooltip":
                           "The rows as JSON (the node's row editor writes it): a list of "
                           '{"on", "lora", "strength_model", "strength_clip", "blocks"}. Off, empty and both-zero '
                           "rows are skipped. blocks (optional): block weights, as the LoRA Pedal's "
                           "block_weights takes them."}),
            },
            "optional": {
                "lora_stack": (pedal_nodes.STACK_TYPE, {"tooltip": "Entries from earlier pedals; they stay first."}),
                "model": ("MODEL", {"tooltip": "Connect to get the MODEL output wearing the stack."}),
                "clip": ("CLIP", {"tooltip": "Connect (with MODEL) to apply the LoRAs to the text encoder too."}),
                "trained_lora": ("STRING", {"forceInput": True, "tooltip":
                                 "A LoRA name from another node (Train LoRA's lora_name): added as the last "
                                 "row, at the trained strengths below."}),
                "trained_strength_model": ("FLOAT", dict(pedal_nodes.strength_input("")[1], tooltip=
                                           TRAINED_STRENGTH_TOOLTIP.format(part="diffusion model"))),
                "trained_strength_clip": ("FLOAT", dict(pedal_nodes.strength_input("")[1], tooltip=
                                          TRAINED_STRENGTH_TOOLTIP.format(part="text encoder"))),
            },
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, pedals=None, trained_strength_model=None, trained_strength_clip=None):
        # Linked inputs arrive as None; trained_lora is never listed here so a freshly trained name
        # (unknown until Train LoRA runs) cannot reject the prompt.
        for input_name, value in (("trained_strength_model", trained_strength_model),
                                  ("trained_strength_clip", trained_strength_clip)):
            if isinstance(value, (int, float)) and pedal_nodes.strength_out_of_range(value):
                return validation_message(NODE_BOARD, input_name, *pedal_nodes.strength_out_of_range(value))
        if pedals is None:
            return True
        problem = _board_problem(pedals)
        return validation_message(NODE_BOARD, "pedals", *problem) if problem else True

    @classmethod
    def IS_CHANGED(cls, pedals=None, trained_lora=None, **_):
        try:
            names = [pedal.lora for pedal in parse_pedals(pedals) if pedal.active]
        except LoraStackError:
            return ""
        if isinstance(trained_lora, str):
            names.append(trained_lora)
        return "|".join(pedal_nodes.file_signature(name) for name in names)

    def play(self, pedals, lora_stack=None, model=None, clip=None, trained_lora=None,
             trained_strength_model=DEFAULT_STRENGTH, trained_strength_clip=DEFAULT_STRENGTH,
             prompt=None, unique_id=None):
        problem = _board_problem(pedals)
        if problem:
            raise user_error(NODE_BOARD, "pedals", *problem)
        board = [stacks.stack_entry(pedal_nodes.resolve(pedal.lora, NODE_BOARD, "pedals").name,
                                    pedal.strength_model, pedal.strength_clip, pedal.blocks)
                 for pedal in parse_pedals(pedals) if pedal.active]
        trained = self._trained_entry(trained_lora, trained_strength_model, trained_strength_clip)
        try:    # refuse a malformed upstream stack here, where it can be named, not halfway through applying
            plain_incoming = stacks.normalize_stack(lora_stack)
        except LoraStackError as error:
            raise user_error(NODE_BOARD, "lora_stack", error.problem, error.fix) from None
        incoming = [] if lora_stack is None else list(lora_stack)     # passed on as given, like the pedal
        segments = (("lora_stack", incoming), ("pedals", board), ("trained_lora", trained))
        self._check_outputs(model, clip, prompt, unique_id)

        if model is None:
            # Stack only: nothing to apply, but the words still come from the files' headers. Upstream
            # entries are only passed on (another pack's apply node may accept names we would not), so
            # their words are best-effort; our rows and trained_lora resolved above and must be readable.
            words = _words_from_headers(plain_incoming, False, "lora_stack")
            words += _words_from_headers(board, True, "pedals") + _words_from_headers(trained, True, "trained_lora")
            listed = plain_incoming + board + trained
            lines = [f"{entry[0]}  {stacks.strength_text(entry)}" for entry in listed]
            summary = "\n".join((lines or ["no LoRA in the stack"]) + ["(MODEL not connected: nothing applied)"])
            return {"ui": {"text": [summary]},
                    "result": (incoming + board + trained, None, None, lora_words.join_words(words))}

        applied, words, notes = [], [], []
        for input_name, entries in segments:     # one chain; each part's errors name its own input
            result = pedal_nodes.apply_stack(model, clip, entries, NODE_BOARD, input_name)
            model, clip = result.model, result.clip
            applied += result.applied
            notes += result.notes
            words += result.trigger_words.split(", ") if result.trigger_words else []
        total = pedal_nodes.AppliedStack(model, clip, lora_words.join_words(words), applied, notes)
        return {"ui": {"text": [total.summary()]},
                "result": (incoming + board + trained, total.model, total.clip, total.trigger_words)}

    @staticmethod
    def _trained_entry(name, strength_model, strength_clip) -> list:
        if not isinstance(name, str) or name.strip() in ("", stacks.NONE_NAME):
            return []
        for input_name, value in (("trained_strength_model", strength_model),
                                  ("trained_strength_clip", strength_clip)):
            if pedal_nodes.strength_out_of_range(value):
                raise user_error(NODE_BOARD, input_name, *pedal_nodes.strength_out_of_range(value))
        if strength_model == 0 and strength_clip == 0:
            return []
        resolved = pedal_nodes.resolve(name.strip(), NODE_BOARD, "trained_lora")
        return [(resolved.name, float(strength_model), float(strength_clip))]

    @staticmethod
    def _check_outputs(model, clip, prompt, unique_id) -> None:
        """A MODEL/CLIP output wired onwards while its input is not connected would hand the next node
        None and fail there with a confusing message; say what to connect here instead."""
        used = _outputs_in_use(prompt, unique_id)
        if model is None and (1 in used or 2 in used):
            raise user_error(NODE_BOARD, "model", "the model/clip output is connected but the model input is not, "
                             "so there is nothing to apply the LoRAs to.",
                             "connect a MODEL (and CLIP) to the pedalboard, or take only its lora_stack output "
                             "into Apply LoRA Stack.")
        if clip is None and 2 in used:
            raise user_error(NODE_BOARD, "clip", "the clip output is connected but the clip input is not.",
                             "connect the CLIP from your checkpoint loader to the pedalboard.")
        if model is None and clip is not None:
            raise user_error(NODE_BOARD, "model", "CLIP is connected without MODEL.",
                             "connect the MODEL too (the LoRAs go onto both, as with Load LoRA).")


NODE_CLASS_MAPPINGS = {"LoraLabPedalboard": LoraLabPedalboard}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraLabPedalboard": "LoRA Pedalboard (LoRA Lab)"}

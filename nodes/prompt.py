"""Prompt with Trigger: a text prompt whose {trigger} becomes the trigger word that arrives from the graph.

So a workflow's sample prompt follows the trigger word set once (on the Caption node, or Train LoRA's own
trigger_word, or the stacked LoRAs' stored ones) instead of repeating it by hand in every prompt box.
Encoding is ComfyUI's own CLIPTextEncode, so the conditioning is exactly what that node gives.
"""
from __future__ import annotations

import nodes as comfy_nodes

from .messages import user_error
from .pedals import with_trigger
from .training_previews import TRIGGER_PLACEHOLDER

NODE = "Prompt with Trigger"


class LoraLabPromptWithTrigger:
    TITLE = NODE
    DESCRIPTION = ("Encodes a prompt like CLIP Text Encode, with {trigger} replaced by the trigger word from "
                   "Train LoRA's trigger_word output or Apply LoRA Stack's trigger_words.")
    CATEGORY = "LoRA Lab/Sample"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("conditioning", "prompt")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP",),
                # dynamicPrompts off: the front ends would otherwise read {trigger} as a {a|b} choice.
                "text": ("STRING", {"multiline": True, "dynamicPrompts": False,
                                    "default": f"{TRIGGER_PLACEHOLDER}, a portrait, detailed, best quality",
                                    "tooltip": "The prompt; {trigger} becomes the trigger word below."}),
            },
            "optional": {
                "trigger_word": ("STRING", {"forceInput": True, "tooltip":
                                 "Connect Train LoRA's trigger_word (or Apply LoRA Stack's trigger_words)."}),
            },
        }

    def encode(self, clip, text, trigger_word=None):
        trigger = (trigger_word or "").strip()
        if TRIGGER_PLACEHOLDER in text and not trigger:
            raise user_error(NODE, "trigger_word", "the prompt says {trigger} but no trigger word arrived.",
                             "connect Train LoRA's trigger_word output (or set Train LoRA's trigger_word / the "
                             "Caption node's), or write the word into the prompt instead of {trigger}.")
        prompt = with_trigger(text, trigger)
        (conditioning,) = comfy_nodes.CLIPTextEncode().encode(clip, prompt)
        return conditioning, prompt


NODE_CLASS_MAPPINGS = {"LoraLabPromptWithTrigger": LoraLabPromptWithTrigger}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraLabPromptWithTrigger": "Prompt with Trigger (LoRA Lab)"}

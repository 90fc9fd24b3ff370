"""Prompt with Trigger in a real ComfyUI: the conditioning CLIP Text Encode gives for the filled-in text."""
from __future__ import annotations

import pytest
import torch


def encode(pack, clip, text, trigger=None):
    node = pack.NODE_CLASS_MAPPINGS["LoraLabPromptWithTrigger"]()
    with torch.inference_mode():
        return node.encode(clip, text, trigger)


def test_trigger_is_filled_in_and_encoded_as_clip_text_encode_does(pack, sd15_clip):
    import nodes
    conditioning, prompt = encode(pack, sd15_clip, "{trigger}, a portrait, detailed", "sks person")
    assert prompt == "sks person, a portrait, detailed"
    with torch.inference_mode():
        (native,) = nodes.CLIPTextEncode().encode(sd15_clip, prompt)
    assert torch.equal(conditioning[0][0], native[0][0])       # one deterministic encode of the same tokens
    assert torch.equal(conditioning[0][1]["pooled_output"], native[0][1]["pooled_output"])


def test_a_prompt_without_the_placeholder_needs_no_trigger(pack, sd15_clip):
    _, prompt = encode(pack, sd15_clip, "a lighthouse at dusk")
    assert prompt == "a lighthouse at dusk"


def test_a_placeholder_without_a_trigger_word_says_what_to_connect(pack, sd15_clip):
    with pytest.raises(ValueError) as refused:
        encode(pack, sd15_clip, "{trigger}, a portrait", "  ")
    message = str(refused.value)
    assert "[LoRA Lab · Prompt with Trigger › trigger_word]" in message and "trigger_word output" in message

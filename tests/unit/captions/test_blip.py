"""BlipCaptioner on a tiny real BLIP (transformers' classes, random weights): generate() really runs."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import random_models
from lora_lab.trainer.captions import blip as cap
from lora_lab.trainer.captions.blip import BlipCaptioner


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory):
    return random_models.tiny_blip(tmp_path_factory.mktemp("blip") / "tiny")


@pytest.fixture(scope="module")
def blip(blip_folder):
    return BlipCaptioner(blip_folder, "cpu")


def pictures(count=6, seed=0):
    """Noise and flat colours of different sizes and modes: the processor must cope with all of them."""
    rng = np.random.default_rng(seed)
    noise = [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(count - 3)]
    return noise + [Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("L", (30, 50), 0),
                    Image.new("RGBA", (40, 40), (255, 255, 255, 128))][: max(0, count - len(noise))]


class Recording:
    """A lazy picture sequence that remembers which pictures were asked for."""

    def __init__(self, images):
        self.images, self.loaded = images, []

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        self.loaded.append(index)
        return self.images[index]


# --- folders --------------------------------------------------------------------------------------
def test_missing_files_names_every_required_file(tmp_path):
    assert cap.missing_files(tmp_path / "nowhere") == ["config.json", "model.safetensors",
                                                       "preprocessor_config.json", "tokenizer_config.json",
                                                       "tokenizer.json"]
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "vocab.txt").write_text("a\n")
    assert cap.missing_files(tmp_path) == ["model.safetensors", "preprocessor_config.json", "tokenizer_config.json"]


def test_a_saved_blip_folder_is_complete(blip_folder):
    assert cap.missing_files(blip_folder) == []


def test_hugging_face_cache_layout_resolves_to_its_complete_snapshot(tmp_path, blip_folder):
    repo = tmp_path / "models--Salesforce--blip-image-captioning-base"
    (repo / "snapshots" / "half").mkdir(parents=True)
    (repo / "snapshots" / "half" / "config.json").write_text("{}")
    os.symlink(blip_folder, repo / "snapshots" / "abc123")
    assert cap.resolve_snapshot(repo) == str(repo / "snapshots" / "abc123")
    assert cap.resolve_snapshot(blip_folder) == str(blip_folder)


def test_incomplete_folder_is_refused_before_transformers_sees_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        BlipCaptioner(tmp_path)


def test_dtype_choice():
    assert cap.pick_dtype("cpu", "auto") == torch.float32
    assert cap.pick_dtype("cpu", "fp16") == torch.float32      # the CPU always runs fp32
    assert cap.pick_dtype("cuda", "auto") == torch.float16
    assert cap.pick_dtype("cuda", "bf16") == torch.bfloat16
    assert cap.pick_dtype("cuda", "fp32") == torch.float32


def test_cpu_model_is_fp32_even_when_half_is_asked_for(blip_folder):
    half = BlipCaptioner(blip_folder, "cpu", torch.float16)
    assert half.dtype == torch.float32 and next(half.model.parameters()).dtype == torch.float32


# --- captioning -----------------------------------------------------------------------------------
def test_one_caption_per_picture_from_the_models_vocabulary(blip):
    result = blip.caption(pictures(), min_length=2, max_length=8, num_beams=1, batch_size=4)
    assert len(result) == 6
    vocabulary = set(random_models.BLIP_VOCAB)
    assert all(set(text.split()) <= vocabulary for text in result)
    assert any(result)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_captions_equal_one_at_a_time(blip, num_beams):
    # Exact string equality is safe only if no token choice is a near tie: batched and single generation
    # multiply matrices of different shapes, so their logits differ by float rounding, about 1e-6 of
    # their size (order 1-10 here). Measured on these pictures (greedy, output_scores), the smallest gap
    # between the best and second-best next-token logit is 5e-4: 50 times or more that rounding.
    images = pictures()
    batched = blip.caption(images, min_length=2, max_length=8, num_beams=num_beams, batch_size=4)
    single = blip.caption(images, min_length=2, max_length=8, num_beams=num_beams, batch_size=1)
    assert batched == single
    assert len(set(batched)) > 1, "captions must depend on the picture, or this test proves nothing"


def test_one_generate_call_per_batch(blip, monkeypatch):
    calls = []
    real = blip.model.generate
    monkeypatch.setattr(blip.model, "generate", lambda **kw: calls.append(kw["pixel_values"].shape[0]) or real(**kw))
    blip.caption(pictures(5), max_length=3, min_length=1, batch_size=2)
    assert calls == [2, 2, 1]


def test_progress_after_every_batch_and_lazy_loading(blip):
    seen, images = [], Recording(pictures(5))
    blip.caption(images, max_length=3, min_length=1, batch_size=2, on_batch_done=lambda d, t: seen.append((d, t)))
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert images.loaded == [0, 1, 2, 3, 4]


def test_an_exception_from_the_callback_stops_before_the_next_batch(blip):
    images = Recording(pictures(6))

    def cancel(done, total):
        raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        blip.caption(images, max_length=3, min_length=1, batch_size=2, on_batch_done=cancel)
    assert images.loaded == [0, 1]


def test_max_length_bounds_the_caption(blip):
    for text in blip.caption(pictures(), min_length=0, max_length=2, num_beams=1):
        assert len(text.split()) <= 2


def test_bad_lengths_are_refused(blip):
    with pytest.raises(ValueError, match="min_length"):
        blip.caption(pictures(1), min_length=9, max_length=3)
    with pytest.raises(ValueError, match="batch_size"):
        blip.caption(pictures(1), batch_size=0)


def test_empty_input_needs_no_model(blip):
    assert blip.caption([]) == []


# --- conditional captioning -----------------------------------------------------------------------
def test_prompt_is_continued_and_not_echoed(blip):
    images = pictures(4)
    prompt = "A photo  of"     # the tokenizer lower-cases and the captioner collapses spaces
    result = blip.caption(images, prompt=prompt, min_length=3, max_length=8, num_beams=1, batch_size=2)
    inputs = blip.processor(images=images, text=["a photo of"] * 4, return_tensors="pt")
    with torch.inference_mode():
        raw = blip.model.generate(**inputs, min_new_tokens=3, max_new_tokens=8, num_beams=1)
    echoed = blip.processor.batch_decode(raw, skip_special_tokens=True)
    assert all(text.startswith("a photo of") for text in echoed)
    assert result == [" ".join(text.split())[len("a photo of"):].strip() for text in echoed]
    assert result != blip.caption(images, min_length=3, max_length=8, num_beams=1)


@pytest.mark.parametrize("text, echoed, expected", [
    ("a photo of a cat", "a photo of", "a cat"),
    ("a photo of, a cat", "a photo of", "a cat"),
    ("a photograph of a cat", "a photo", "a photograph of a cat"),   # mid-word: keep the whole caption
    ("the cat", "a photo of", "the cat"),
    ("a photo of", "a photo of", ""),
])
def test_strip_echo(text, echoed, expected):
    assert cap._strip_echo(text, echoed) == expected

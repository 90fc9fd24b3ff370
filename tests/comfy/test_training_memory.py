"""What Train LoRA holds on the device while it trains, inside a real ComfyUI: the text encoder leaves once the
captions (and preview prompts) are encoded, unless the run needs it every step (a training text encoder, captions
that change per step); the VAE leaves too. On a GPU that is the text encoders' gigabytes (SDXL: 1.6 GB in bf16,
Flux's T5-XXL: 9.5 GB) handed back before the first step."""
from __future__ import annotations

import pytest

from training import options, run_train

pytestmark = pytest.mark.usefixtures("leave_models_unpatched")


@pytest.fixture
def loaded_during_training(monkeypatch, pack):
    """The patchers ComfyUI holds loaded when the training loop starts."""
    import comfy.model_management
    import importlib
    train_module = importlib.import_module(pack.__name__ + ".train")
    seen = []
    real = train_module.train

    def recording(*args, **kwargs):
        seen.append([loaded.model for loaded in comfy.model_management.current_loaded_models])
        return real(*args, **kwargs)
    monkeypatch.setattr(train_module, "train", recording)
    return seen


@pytest.mark.parametrize("needs_clip", [False, True], ids=["frozen captions", "captions shuffled every step"])
def test_the_text_encoder_leaves_before_the_first_step_unless_a_step_needs_it(
        needs_clip, tiny_unet, sd15_clip, small_vae, make_dataset, loaded_during_training):
    import comfy.model_management
    # Encoding loads them (ComfyUI's loader), as a sampler run before would have.
    comfy.model_management.load_models_gpu([sd15_clip.patcher])
    run_train(tiny_unet, sd15_clip, small_vae, make_dataset(2), f"memory_{needs_clip}", steps=2,
              options=options(shuffle_tags=needs_clip, preview_every_n_steps=1, preview_steps=1))
    [loaded] = loaded_during_training
    assert any(model is tiny_unet or model.model is tiny_unet.model for model in loaded)
    clip_loaded = any(model.model is sd15_clip.patcher.model for model in loaded)
    assert clip_loaded == needs_clip, [type(model.model).__name__ for model in loaded]
    assert not any(model.model is small_vae.patcher.model for model in loaded), "the VAE's work is done"

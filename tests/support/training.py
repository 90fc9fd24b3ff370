"""Train LoRA in a test: small patterned pictures, the node called as ComfyUI calls it, and checks that the
shared base model came back untouched. Shared by every test that trains."""
from __future__ import annotations

import math

import torch


SIZE = 64  # pixels; 8x8 latents keep a step well under a second on the CPU


def pattern_pixels(count: int, height: int = SIZE, width: int = SIZE, seed: int = 0) -> torch.Tensor:
    """Pictures with structure (coloured stripes and blocks), so there is something to learn."""
    g = torch.Generator().manual_seed(seed)
    pictures = []
    ys = torch.linspace(0, 1, height).view(-1, 1, 1)
    xs = torch.linspace(0, 1, width).view(1, -1, 1)
    for i in range(count):
        colour = torch.rand(1, 1, 3, generator=g)
        stripes = (torch.sin((xs * (3 + i) + ys * 2) * math.pi) > 0).float()
        pictures.append((colour * stripes + (1 - colour) * (1 - stripes)).expand(height, width, 3))
    return torch.stack(pictures).clamp(0, 1)


def run_train(model, clip, vae, dataset, name, steps=4, options=None, **overrides):
    from lora_lab.nodes.train import LoraLabTrainLora
    args = dict(model=model, clip=clip, vae=vae, dataset=dataset, output_name=name, resolution=SIZE,
                steps=steps, epochs=0, batch_size=2, learning_rate=1e-3, rank=4, alpha=4.0, seed=0,
                options=options, unique_id="7")
    args.update(overrides)
    with torch.inference_mode():  # ComfyUI executes every node inside inference mode
        return LoraLabTrainLora().train_lora(**args)


def options(**values):
    from lora_lab.nodes.training_options import TrainingOptions
    return TrainingOptions(**values)


def weights_snapshot(patcher):
    return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


def assert_base_untouched(patcher, before, flags_before):
    from peft.tuners.tuners_utils import BaseTunerLayer
    after = patcher.model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{key} changed"
    assert [p.requires_grad for p in patcher.model.parameters()] == flags_before
    for module in patcher.model.modules():
        assert not isinstance(module, BaseTunerLayer)
        assert "forward" not in vars(module), "a forward wrapper was left behind"
        assert not module._forward_pre_hooks, "a hook was left behind"


def encoded_training_set(model, clip, vae, dataset):
    from lora_lab.nodes import comfy_bridge
    from lora_lab.trainer.data.encoded_dataset import encode_dataset
    with torch.inference_mode(False):
        return encode_dataset(dataset, SIZE, comfy_bridge.pixel_encoder(vae, model),
                              comfy_bridge.caption_encoder(clip))


def training_loss(model, data):
    """The loss on the training set at fixed noise and timesteps, with whatever patches the model has."""
    import comfy.model_management
    from lora_lab.nodes import comfy_bridge
    from lora_lab.trainer.training.loop import measure_loss
    comfy.model_management.load_models_gpu([model])
    return measure_loss(comfy_bridge.ComfyDenoiser(model), data, torch.device("cpu"), draws=6)


def saved_tensors(loras_dir, name):
    from lora_lab.trainer.lora.files import load_lora_file
    return load_lora_file(loras_dir / name)[0]

"""Train LoRA in a test: small patterned pictures, the node called as ComfyUI calls it, and checks that the
shared base model came back untouched. Shared by every test that trains."""
from __future__ import annotations

import contextlib
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


# Runs compared across processes train with AdamW's eps raised from torch's 1e-8 to 1e-2. AdamW moves a weight by
# about lr * g / (|g| + eps): with eps = 1e-8 a gradient within float32 rounding of zero, its sum taken in another
# order on two processes, can flip sign and move the weight by a whole step the other way (seen on ComfyUI 2025-10:
# 0.84 lr, in 2 of 493,652 weights). With eps = 1e-2 the step changes by at most lr / eps per unit of gradient, so
# rounding in the gradients stays rounding in the weights.
COMPARABLE_OPTIMIZER_ARGS = "eps=1e-2"


def assert_trained_alike(one: dict, two: dict) -> None:
    """Two LoRAs (key -> tensor) trained from the same start on the same batches and draws, with
    COMPARABLE_OPTIMIZER_ARGS, whose gradients were summed in another order (a batch of 3 in one process, shares of
    2 + 1 on two processes). lora_up starts at zero, so its largest value is the most training moved a weight.
    Float32 rounding of the gradients (about 6e-8 relative per addition, a few 1e-6 over the backward's sums)
    reaches the weights through that bounded step: measured at most 3.7e-6 x that movement (every comparison in
    tests/comfy/test_distributed_training.py and test_server_distributed.py, ComfyUI 2024-03 and 2025-10).
    1e-4 x leaves 27x room; a wrong share weighting changes whole gradients by a third or more
    (tests/unit/distributed's negative control)."""
    assert one.keys() == two.keys()
    moved = max(float(one[key].float().abs().max()) for key in one if "lora_up" in key)
    assert moved > 0, "the LoRA did not train: the comparison would prove nothing"
    for key in one:
        largest = float((one[key].float() - two[key].float()).abs().max())
        assert largest <= 1e-4 * moved, f"{key}: differs by {largest:.3g}, training moved weights by {moved:.3g}"


@contextlib.contextmanager
def cancel_at_step(step: int, steps: int):
    """Cancel pressed once a run of ``steps`` steps has finished ``step`` (as the front end's button: ComfyUI's
    interrupt flag); the run saves there and raises InterruptProcessingException. Encoding's bars count
    pictures, so only the training bar's total is matched."""
    import comfy.model_management
    import comfy.utils

    def press(value, total, *_, **__):
        if total == steps and value == step:
            comfy.model_management.interrupt_current_processing(True)
    comfy.utils.set_progress_bar_global_hook(press)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)


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


def assert_loader_matches_adapter(via_loader, via_adapter, plain) -> None:
    """ComfyUI's LoraLoader (the LoRA merged into the weights) and our adapter (beside the weights) give the
    same output, and that output is not the base model's.

    The two paths round differently: a merged weight W + s·up·down is rounded once per layer, the adapter
    adds s·up·(down·x) after the layer. fp32 keeps 24 bits (6e-8 relative), so each layer differs by about
    that times its activations, and the differences add up over the network's depth: for these small
    random models, outputs of order 1 and tens of layers, the measured mismatch stays near 1e-6. The
    tolerance is 1e-4 absolute plus 1e-4 relative, about 100 times that, and it grows with the LoRA's own
    effect (1 %), since a stronger LoRA means larger merged weights and larger rounding.
    """
    effect = (via_adapter - plain).abs().max().item()
    mismatch = (via_loader - via_adapter).abs().max().item()
    assert effect > 1e-4, f"the LoRA changes nothing (largest change {effect:.2e})"
    allowed = 1e-4 + 1e-4 * via_adapter.abs().max().item() + 0.01 * effect
    assert mismatch < allowed, (mismatch, allowed, effect)


def small_family_models(family, request):
    """(model, clip, vae) of a small random SD1.5 ("sd15") or Flux ("flux"; skips on 2024-03, which has none),
    for tests that train each family the same way."""
    import pytest
    import random_models
    if family == "sd15":
        return (random_models.sd15_model_patcher(model_channels=32, seed=41), request.getfixturevalue("sd15_clip"),
                request.getfixturevalue("small_vae"))
    import comfy.supported_models
    if not hasattr(comfy.supported_models, "Flux"):
        pytest.skip("this ComfyUI has no Flux (2024-03)")
    import random_flow_models
    return (random_flow_models.flux_model_patcher(seed=42, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=3,
                                                  context_dim=32, pooled_dim=768),
            random_flow_models.flux_clip(seed=43), random_flow_models.small_flow_vae(seed=44))

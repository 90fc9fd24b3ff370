"""kohya-format LoRA files written by the tests (for small random models and for the full-shape checkpoint),
and what a model wearing them denoises: shared by the pedal, pedalboard and browser tests."""
from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

import random_models


def kohya_tensors(shapes: dict[str, tuple], seed: int, rank: int = 4, scale: float = 0.15) -> dict:
    """Random non-zero down/up pairs (and alpha) for {kohya module name: weight shape}."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(shapes.items()):
        out_features, in_features = shape[0], shape[1]
        down = torch.randn(rank, in_features, generator=g) * scale
        up = torch.randn(out_features, rank, generator=g) * scale
        if len(shape) == 4:   # 1x1 convolutions (SD1.5 proj_in/proj_out)
            down, up = down[..., None, None], up[..., None, None]
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return tensors


def unet_shapes(patcher, every: int = 1) -> dict[str, tuple]:
    from lora_lab.nodes import comfy_bridge
    network = patcher.model.diffusion_model
    targets = sorted(comfy_bridge.unet_lora_targets(patcher).items())[::every]
    return {name: tuple(network.get_submodule(path).weight.shape) for path, name in targets}


def clip_shapes(clip, layers=(0, 1)) -> dict[str, tuple]:
    import comfy.lora
    weights = clip.cond_stage_model.state_dict()
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    return {name: tuple(weights[key].shape) for name, key in key_map.items()
            if name.startswith("lora_te_") and any(f"_layers_{i}_" in name for i in layers)}


def write_lora(folder: Path, name: str, tensors: dict, metadata: dict | None = None) -> Path:
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata or {})
    return path


def native_chain(model, clip, stack):
    """The same entries through ComfyUI's own LoraLoader / LoraLoaderModelOnly nodes."""
    import nodes as comfy_nodes
    with torch.inference_mode():
        for name, strength_model, strength_clip in stack:
            if clip is None:
                (model,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength_model)
            else:
                model, clip = comfy_nodes.LoraLoader().load_lora(model, clip, name, strength_model, strength_clip)
    return model, clip


def denoised(patcher, seed=0):
    import comfy.model_management
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, 768, generator=g)
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patcher])
        return patcher.model.apply_model(x, torch.tensor([3.0]), c_crossattn=context).clone()


def encoded(clip, text="a red cape in the city at night"):
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text)).clone()


def full_size_lora(server_overlay: Path, name: str, tiny_unet, sd15_clip, seed: int, pick: slice,
                   metadata: dict | None = None) -> str:
    """A LoRA for the full-shape SD1.5 checkpoint: kohya names from the (same-layout) tiny UNet, shapes read
    from the checkpoint's header, so a few layers are targeted without loading 2 GB."""
    from lora_lab.nodes import comfy_bridge
    checkpoint = server_overlay / "models" / "checkpoints" / random_models.CHECKPOINT_NAME
    targets = sorted(comfy_bridge.unet_lora_targets(tiny_unet).items())[pick]
    with safe_open(str(checkpoint), "pt") as f:
        shapes = {name: tuple(f.get_slice(f"model.diffusion_model.{path}.weight").get_shape())
                  for path, name in targets}
    shapes.update(clip_shapes(sd15_clip, (0,)))          # CLIP-L has its real shape in-process already
    write_lora(server_overlay / "models" / "loras", name, kohya_tensors(shapes, seed=seed, scale=0.3), metadata)
    return name

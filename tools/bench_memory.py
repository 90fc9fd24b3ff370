"""Benchmark: predict the GPU memory of a LoRA training run (SDXL, Flux) from parts measured on this machine.

    .venv/bin/python tools/bench_memory.py                          # every model, CPU: measure, extrapolate, print
    COMFYUI_ROOT=/path/to/ComfyUI-2025-10 .venv/bin/python tools/bench_memory.py --model flux
    python tools/bench_memory.py --device cuda --model flux         # on a GPU: also the real peak of the same step

The peak of a training step is the sum of four parts, each found here on ComfyUI's own model classes:
- frozen weights: counted exactly on the full-size architecture, built on the meta device (no memory): every
  Linear weight in fp8 (1 byte, plus a 4-byte scale per row) with fp8_base, everything else in bf16;
- LoRA adapters: kohya's default targets at the rank, from the pack's own target list: fp32 weights and
  gradients (8 bytes a parameter) and the optimizer's state (AdamW 8, AdamW8bit 2, Adafactor its row and
  column factors);
- activations: measured. One training step (the pack's path: trainable_unet, the fp8 or bf16 base, peft
  adapters, bf16 autocast, forward and backward) runs on a model of full width and fewer blocks, under a
  dispatch mode that adds up the bytes of every tensor the step makes while it lives and keeps the peak.
  Two or three depths give the fixed part and the part each block adds; the full depth is extrapolated;
- the CUDA context and allocator slack, which torch does not count: 0.5 GB, kohya's and PyTorch's usual
  figure (the context alone is 0.3-0.5 GB on recent drivers).
Attention runs through PyTorch's scaled_dot_product_attention, as ComfyUI does: on a GPU and on this CPU its
fused kernels keep memory linear in the tokens, so a measurement here stands for one on a GPU.
With --device cuda the same step runs on the GPU and torch.cuda.max_memory_allocated is printed beside the
prediction (the full-depth model too when it fits: --full).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import types
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))   # the test harness: a real ComfyUI in-process

import comfyui_home  # noqa: E402

GB = 1024 ** 3
CUDA_OVERHEAD_GB = 0.5
FLUX_DEV = dict(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38, context_dim=4096, pooled_dim=768)
FLUX_T5_TOKENS = 512           # Flux dev's T5 sequence (ComfyUI pads T5-XXL to 256 for schnell, 512 for dev)
SDXL_FULL = dict(model_channels=320, transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])
OPTIMIZER_BYTES = {"AdamW": 8, "AdamW8bit": 2}          # per adapter parameter; Adafactor: see adapter_bytes


# --- counting live tensor bytes ------------------------------------------------------------------------
def live_bytes_tracker():
    """A TorchDispatchMode that adds up the bytes of every storage an op creates while the storage lives, and
    keeps the peak. An op's output that shares an input's storage (a view, an in-place op) is no new memory:
    so the weights, and views of them, are never counted."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    import torch

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.known: weakref.WeakSet = weakref.WeakSet()

        def _free(self, nbytes):
            self.live -= nbytes

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor) and t.device.type != "meta"}
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                    storage = tensor.untyped_storage()
                    if storage.data_ptr() not in inputs and storage not in self.known:
                        self.known.add(storage)
                        nbytes = storage.nbytes()
                        self.live += nbytes
                        self.peak = max(self.peak, self.live)
                        weakref.finalize(storage, self._free, nbytes)
            return out

    return LiveBytes()


# --- the models ------------------------------------------------------------------------------------------
def flux_patcher(device, fp8=False, meta=False, **sizes):
    import comfy.supported_models
    import random_flow_models
    config = comfy.supported_models.Flux(random_flow_models.flux_unet_config(**{**FLUX_DEV, **sizes}))
    return _patcher(config, device, fp8, meta)


def sdxl_patcher(device, fp8=False, meta=False, **sizes):
    import comfy.supported_models
    import random_models
    unet = random_models.sdxl_unet_config(320, pooled_dim=1280)
    unet.update(context_dim=2048, adm_in_channels=2816, **{**SDXL_FULL, **sizes})
    return _patcher(comfy.supported_models.SDXL(unet), device, fp8, meta)


def _patcher(config, device, fp8, meta):
    """ComfyUI's model built on the meta device, then (unless ``meta``) given random values on ``device`` one
    tensor at a time: Linear weights in fp8 when ``fp8`` (as Load Diffusion Model's weight_dtype fp8_e4m3fn
    holds them; the full bf16 model never has to fit), other Linear and Conv weights in bf16, the rest in bf16
    on a GPU and fp32 on the CPU (CPU kernels refuse a bf16 norm weight with an fp32 input). The values do not
    matter here, only the sizes; they are small and finite."""
    import comfy.model_patcher
    import torch
    with torch.inference_mode():
        with torch.device("meta"):
            model = config.get_model({})
        if not meta:
            model.to_empty(device=device)
            generator = torch.Generator(device=device).manual_seed(0)
            for module in model.modules():
                for name, param in list(module._parameters.items()):
                    if param is None:
                        continue
                    layer = isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
                    dtype = torch.bfloat16 if layer or device.type != "cpu" else torch.float32
                    values = torch.empty(param.shape, dtype=dtype, device=device).normal_(0, 0.02, generator=generator)
                    if name == "weight" and not layer and param.dim() == 1:
                        values.fill_(1.0)                          # norm scales
                    if fp8 and name == "weight" and isinstance(module, torch.nn.Linear):
                        values = values.to(torch.float8_e4m3fn)
                    module._parameters[name] = torch.nn.Parameter(values, requires_grad=False)
            for module in model.modules():
                for name, buffer in list(module._buffers.items()):
                    if buffer is not None and buffer.device.type != device.type:
                        module._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype, device=device)
    model.eval()
    where = torch.device("cpu") if meta else device
    return comfy.model_patcher.ModelPatcher(model, load_device=where, offload_device=where)


def step_inputs(family: str, resolution: int, batch: int, device, dtype):
    import torch
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    if family == "flux":
        x = torch.randn(batch, 16, side, side, generator=g)
        cond = {"c_crossattn": torch.randn(batch, FLUX_T5_TOKENS, 4096, generator=g),
                "y": torch.randn(batch, 768, generator=g), "guidance": torch.full((batch,), 1.0)}
        sigma = torch.full((batch,), 0.6)
    else:
        x = torch.randn(batch, 4, side, side, generator=g)
        cond = {"c_crossattn": torch.randn(batch, 77, 2048, generator=g), "y": torch.randn(batch, 2816, generator=g)}
        sigma = torch.full((batch,), 5.0)
    move = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    return move(x), move(sigma), {k: move(v) for k, v in cond.items()}


# --- the parts ---------------------------------------------------------------------------------------------
@dataclass
class Inventory:
    linear_params: int
    linear_rows: int
    other_params: int
    lora_params: int
    lora_factor_floats: int        # Adafactor's row + column state over every adapter matrix
    blocks: list                   # (linear_params, linear_rows, other_params) of each block, as block swap sees them

    def weights_bytes(self, fp8: bool, swap: int = 0) -> int:
        """The frozen weights on the GPU: with block swap, less the swapped blocks, plus the three of them that can
        be on the GPU at once (the computing one, the next one coming over, and the one before while the GPU
        finishes with it), counted as the three largest."""
        on_gpu = _bytes(self.linear_params, self.linear_rows, self.other_params, fp8)
        if swap:
            from lora_lab.trainer.training.block_swap import chosen_blocks
            swapped = sorted((_bytes(*self.blocks[i], fp8) for i in chosen_blocks(swap, len(self.blocks))), reverse=True)
            on_gpu += -sum(swapped) + sum(swapped[:3])
        return on_gpu

    def adapter_bytes(self, optimizer: str) -> int:
        state = 4 * self.lora_factor_floats if optimizer == "Adafactor" else OPTIMIZER_BYTES[optimizer] * self.lora_params
        return 8 * self.lora_params + state


def _bytes(linear_params: int, linear_rows: int, other_params: int, fp8: bool) -> int:
    """Every Linear weight in fp8 (1 byte, plus a 4-byte scale per row) with fp8_base, everything else in bf16."""
    return linear_params + 4 * linear_rows + 2 * other_params if fp8 else 2 * (linear_params + other_params)


def inventory(family: str, rank: int) -> Inventory:
    """The full-size model's parameters and its LoRA's, counted on the meta device."""
    import torch
    from lora_lab.nodes import comfy_bridge
    from lora_lab.trainer.lora.network import Network
    patcher = (flux_patcher if family == "flux" else sdxl_patcher)(None, meta=True)
    network = patcher.model.diffusion_model
    linear_params = linear_rows = 0
    for module in network.modules():
        if isinstance(module, torch.nn.Linear):
            linear_params += module.weight.numel()
            linear_rows += module.weight.shape[0]
    total = sum(p.numel() for p in network.parameters())
    lora = factors = 0
    modules = dict(network.named_modules())
    for path, (_, kind) in comfy_bridge.unet_lora_layers(patcher, Network(rank=rank, alpha=rank)).items():
        weight = modules[path].weight
        out_f, in_f = weight.shape[0], math.prod(weight.shape[1:])
        lora += rank * (in_f + out_f)
        factors += (rank + in_f) + (out_f + rank)
    blocks = []
    for block in comfy_bridge.blocks_of(network):
        linears = [m.weight for m in block.modules() if isinstance(m, torch.nn.Linear)]
        params = sum(p.numel() for p in block.parameters())
        blocks.append((sum(w.numel() for w in linears), sum(w.shape[0] for w in linears),
                       params - sum(w.numel() for w in linears)))
    return Inventory(linear_params, linear_rows, total - linear_params, lora, factors, blocks)


def measure_step(family: str, sizes: dict, resolution: int, batch: int, rank: int, fp8: bool, checkpointing: bool,
                 device, whole: list | None = None, swap: int = 0) -> int:
    """Peak bytes the training step's own tensors take (activations, gradients, transient copies). On a GPU,
    ``whole`` (a list) also gets torch.cuda.max_memory_allocated() itself: weights, adapters and step."""
    import torch
    from lora_lab.nodes import comfy_bridge
    from lora_lab.trainer.lora.adapters import InjectedLora
    from lora_lab.trainer.lora.network import Network
    from lora_lab.trainer.training.block_swap import blocks_swapped
    from lora_lab.trainer.training.fp8_base import frozen_base_in_fp8
    patcher = (flux_patcher if family == "flux" else sdxl_patcher)(device, fp8=fp8, **sizes)
    x, sigma, cond = step_inputs(family, resolution, batch, device, torch.bfloat16)
    tracker = live_bytes_tracker() if device.type == "cpu" else None
    with torch.inference_mode(False), \
            comfy_bridge.trainable_unet(patcher, checkpointing) as network, \
            (frozen_base_in_fp8(network, convert=False) if fp8 else contextlib.nullcontext()):
        targets = comfy_bridge.unet_lora_targets(patcher, Network(rank=rank, alpha=rank))
        with InjectedLora(network, targets, rank=rank, alpha=float(rank), seed=0, device=device) as lora, \
                blocks_swapped(comfy_bridge.blocks_of(network), swap, device):      # on the CPU: nothing moves
            lora.train(True)
            x, sigma, cond = x.clone(), sigma.clone(), {k: v.clone() for k, v in cond.items()}
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                baseline = torch.cuda.memory_allocated()
            with (tracker or contextlib.nullcontext()), torch.autocast(device.type, dtype=torch.bfloat16):
                out = patcher.model.apply_model(x, sigma, **cond)
                loss = torch.nn.functional.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32))
                loss.backward()
                del out, loss
            peak = tracker.peak if tracker else torch.cuda.max_memory_allocated() - baseline
            if whole is not None and device.type == "cuda":
                whole.append(torch.cuda.max_memory_allocated())
    del patcher
    gc.collect()
    return peak


# Each model's block kinds: how many the real one has ("full") and the reduced one ("base"), the reduced sizes,
# and one probe per kind with that kind doubled (so a probe adds as many blocks as the base has of it).
LAYOUT = {
    "flux": {"full": {"double": 19, "single": 38}, "base_blocks": {"double": 1, "single": 1},
             "base": dict(depth=1, depth_single_blocks=1),
             "probes": {"double": dict(depth=2, depth_single_blocks=1), "single": dict(depth=1, depth_single_blocks=2)}},
    # SDXL: transformer blocks at 64x64-latent level ("mid": 2 per attention, 5 attentions) and at the 32x32
    # level ("low": 10 per attention, 5 attentions + the middle block's 10). ResBlocks are all there already.
    "sdxl": {"full": {"mid": 5 * 2, "low": 5 * 10 + 10}, "base_blocks": {"mid": 5, "low": 6},
             "base": dict(transformer_depth=[0, 0, 1, 1, 1, 1], transformer_depth_middle=1,
                          transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1]),
             "probes": {"mid": dict(transformer_depth=[0, 0, 2, 2, 1, 1], transformer_depth_middle=1,
                                    transformer_depth_output=[0, 0, 0, 2, 2, 2, 1, 1, 1]),
                        "low": dict(transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_middle=2,
                                    transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2])}},
}


@dataclass
class Activations:
    fixed: float        # bytes at the reduced depth, less its blocks' share
    per_block: dict     # bytes each block of a kind adds
    full: float         # extrapolated to the real depth


def activations(family: str, resolution: int, batch: int, rank: int, fp8: bool, checkpointing: bool, device,
                log) -> Activations:
    layout = LAYOUT[family]
    started = time.perf_counter()
    base = measure_step(family, layout["base"], resolution, batch, rank, fp8, checkpointing, device)
    per_block = {}
    for kind, sizes in layout["probes"].items():
        probe = measure_step(family, sizes, resolution, batch, rank, fp8, checkpointing, device)
        per_block[kind] = max(0.0, (probe - base) / layout["base_blocks"][kind])
    fixed = base - sum(per_block[kind] * layout["base_blocks"][kind] for kind in per_block)
    full = fixed + sum(per_block[kind] * count for kind, count in layout["full"].items())
    log(f"  measured {family} {resolution}px batch {batch} {'fp8' if fp8 else 'bf16'} base, checkpointing "
        f"{'on' if checkpointing else 'off'}: {base / GB:.2f} GB at reduced depth -> {full / GB:.2f} GB at full "
        f"depth ({time.perf_counter() - started:.0f} s)")
    return Activations(fixed, per_block, full)


# --- the table -----------------------------------------------------------------------------------------------
@dataclass
class Setting:
    label: str
    family: str
    resolution: int
    batch: int
    rank: int
    optimizer: str
    fp8: bool
    checkpointing: bool
    peers: str = ""
    swap: int = 0                  # blocks_to_swap


SETTINGS = [
    # The presets (trainer/training/presets.py) for these memory sizes, and what peers publish for the same.
    Setting("SDXL preset 8 GB (rank 8, Adafactor, U-Net only)", "sdxl", 1024, 1, 8, "Adafactor", False, True,
            "kohya: 'LoRA training can be done with 8GB GPU memory (10GB recommended)' with these options"),
    Setting("SDXL preset 8 GB + fp8_base", "sdxl", 1024, 1, 8, "Adafactor", True, True, ""),
    Setting("SDXL preset 12 GB (rank 32, U-Net only)", "sdxl", 1024, 1, 32, "Adafactor", False, True,
            "ComfyUI's own trainer runs out of memory on 32 GB (ComfyUI #12575)"),
    Setting("SDXL without checkpointing (rank 32)", "sdxl", 1024, 1, 32, "AdamW", False, False, ""),
    Setting("Flux preset 12 GB (512 px, fp8 base, 20 blocks swapped)", "flux", 512, 1, 16, "AdamW8bit", True, True,
            "kohya: 12 GB with --fp8_base, --blocks_to_swap 16 and 8-bit AdamW", swap=20),
    Setting("Flux preset 8 GB (512 px, fp8 base, 40 blocks swapped)", "flux", 512, 1, 16, "AdamW8bit", True, True,
            "kohya: 8 GB with --fp8_base and --blocks_to_swap 28", swap=40),
    Setting("Flux 12 GB settings without block swap", "flux", 512, 1, 16, "AdamW8bit", True, True, ""),
    Setting("Flux preset 16 GB (1024 px, fp8 base)", "flux", 1024, 1, 16, "AdamW8bit", True, True,
            "kohya: 16 GB with --fp8_base, batch 1 and --blocks_to_swap"),
    Setting("Flux 1024 px, bf16 base", "flux", 1024, 1, 16, "AdamW8bit", False, True,
            "ai-toolkit: 24 GB (8-bit base); SimpleTuner: 'a bit more than 30G' unquantised"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sdxl", "flux", "all"], default="all")
    parser.add_argument("--device", default="cpu", help="cpu (measure here, extrapolate) or cuda")
    parser.add_argument("--full", action="store_true", help="with --device cuda: also run the full-depth model and "
                        "print its real peak beside the prediction (it must fit on the card)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    overlay = comfyui_home.build_overlay(Path(tempfile.mkdtemp()) / "comfy", link_pack=False)
    comfyui_home.prepare_in_process(overlay, cpu=args.device == "cpu")
    import torch
    pack = types.ModuleType("lora_lab")
    pack.__path__ = [str(REPO)]
    sys.modules["lora_lab"] = pack
    import comfy.supported_models
    device = torch.device(args.device)
    families = ["sdxl", "flux"] if args.model == "all" else [args.model]
    if "flux" in families and not hasattr(comfy.supported_models, "Flux"):
        print("this ComfyUI has no Flux (2024-03): set COMFYUI_ROOT to a 2025 ComfyUI for the Flux rows")
        families.remove("flux")

    def log(text):
        print(text, file=sys.stderr, flush=True)

    rows, measured = [], {}
    for setting in SETTINGS:
        if setting.family not in families:
            continue
        parts = inventory(setting.family, setting.rank)
        key = (setting.family, setting.resolution, setting.batch, setting.fp8, setting.checkpointing)
        if key not in measured:
            # The rank changes the activations by the adapters' rank-wide intermediates only: measured at 16.
            measured[key] = activations(setting.family, setting.resolution, setting.batch, 16, setting.fp8,
                                        setting.checkpointing, device, log)
        weights, adapters = parts.weights_bytes(setting.fp8, setting.swap), parts.adapter_bytes(setting.optimizer)
        total = weights + adapters + measured[key].full + CUDA_OVERHEAD_GB * GB
        real = []
        if args.full and device.type == "cuda":
            try:
                measure_step(setting.family, {}, setting.resolution, setting.batch, setting.rank, setting.fp8,
                             setting.checkpointing, device, whole=real, swap=setting.swap)
            except torch.cuda.OutOfMemoryError:
                real = [float("inf")]
            torch.cuda.empty_cache()
        rows.append({"real_gb": real[0] / GB + CUDA_OVERHEAD_GB if real else None,
                     "setting": asdict(setting), "weights_gb": weights / GB, "adapters_gb": adapters / GB,
                     "activations_gb": measured[key].full / GB, "predicted_gb": total / GB,
                     "per_block_gb": {k: v / GB for k, v in measured[key].per_block.items()},
                     "lora_params_m": parts.lora_params / 1e6})

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{comfyui_home.comfyui_version_label(comfyui_home.find_comfyui_root())}, measured on {device}")
    print(f"{'setting':<50} {'weights':>8} {'LoRA+opt':>8} {'activ.':>7} {'+CUDA':>6} {'predicted':>10}"
          + (f" {'real':>8}" if args.full else "") + "   peers")
    for row in rows:
        s = row["setting"]
        real = f" {row['real_gb']:7.2f}G" if args.full and row["real_gb"] is not None else (" " * 9 if args.full else "")
        print(f"{s['label']:<50} {row['weights_gb']:7.2f}G {row['adapters_gb']:7.2f}G {row['activations_gb']:6.2f}G "
              f"{CUDA_OVERHEAD_GB:5.1f}G {row['predicted_gb']:9.2f} G{real}   {s['peers']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

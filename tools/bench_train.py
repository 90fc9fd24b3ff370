"""Benchmark: seconds per training step and peak RSS, LoRA Lab vs a bare peft loop vs ComfyUI's trainer.

    .venv/bin/python tools/bench_train.py [--channels 32 64 320] [--size 256] [--steps 8]
    COMFYUI_ROOT=/path/to/ComfyUI-2025-10 .venv/bin/python tools/bench_train.py   # adds ComfyUI's TrainLoraNode

Same model (SD1.5 architecture, random weights; channels 32 = 10 M, 64 = 37 M, 320 = the real 860 M),
same data (4 latents, batch 1), LoRA rank 8 on kohya's default targets, fp32, PyTorch attention, CPU.
- ours : the pack's path (comfy_bridge + InjectedLora + trainer.loop.train), its defaults
- ours_ckpt: the same with gradient checkpointing on (``--which ours_ckpt``)
- ours_bf16: bf16 autocast, frozen weights in bf16 (fp32 originals parked in a file) and gradient
  checkpointing: ComfyUI's trainer's defaults, the like-for-like comparison (``--which ours_bf16``)
- bare : peft injected by hand and a minimal loop over the same apply_model — the floor
- comfy: ComfyUI's own TrainLoraNode at its defaults (ComfyUI >= 2025-06 only)
- te_off / te_on: the node's path with a real SD1 CLIP, text-encoder LoRA off (captions encoded once)
  or on (captions through CLIP with gradients every step); ``--which te_off te_on``
- disk_cache: dataset encoding with the latent disk cache cold, then warm (``--which disk_cache``)
Each runs in its own process so peak RSS is its own. Median step time after one warm-up step.
Two memory figures: the process's peak RSS, and "training", the peak RSS while training minus the RSS
just before it: after the model is built and the trainer's own modules (and their libraries: peft for
ours and bare) are imported, so it is what the training itself takes, not the cost of importing code.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))  # the test harness
import comfyui_home  # noqa: E402
import random_models  # noqa: E402

RANK = 8


def child(which: str, channels: int, size: int, steps: int) -> dict:
    overlay = comfyui_home.build_overlay(Path(tempfile.mkdtemp()) / "comfy", link_pack=False)
    comfyui_home.prepare_in_process(overlay)
    import torch
    pack = types.ModuleType("lora_lab")
    pack.__path__ = [str(comfyui_home.REPO)]
    sys.modules["lora_lab"] = pack
    for module in TRAINER_MODULES[which]:
        importlib.import_module(module)
    patcher = random_models.sd15_model_patcher(channels)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, size // 8, size // 8, generator=g)
    cond = torch.randn(1, 77, 768, generator=g)
    params_m = sum(p.numel() for p in patcher.model.diffusion_model.parameters()) / 1e6
    runner = {"ours": run_ours, "ours_ckpt": run_ours_checkpointed, "ours_bf16": run_ours_bf16, "bare": run_bare, "comfy": run_comfy,
              "te_off": run_text_encoder_off, "te_on": run_text_encoder_on, "disk_cache": run_disk_cache}[which]
    peak_before_mb = rss_mb("VmHWM")
    before_mb = rss_mb("VmRSS")
    can_reset = reset_peak_rss()
    with torch.inference_mode():   # as ComfyUI executes nodes
        times = runner(patcher, latents, cond, steps)
    training_peak_mb = rss_mb("VmHWM")
    return {"which": which, "channels": channels, "size": size, "steps": steps,
            "seconds_per_step": statistics.median(times[1:] or times), "times": times, "params_m": params_m,
            "peak_rss_mb": max(peak_before_mb, training_peak_mb),
            "training_mb": training_peak_mb - before_mb if can_reset else float("nan")}


_OURS = ["lora_lab.nodes.comfy_bridge", "lora_lab.trainer.lora.adapters", "lora_lab.trainer.training.loop",
         "lora_lab.trainer.training.half_precision_base", "lora_lab.trainer.training.optimizers", "peft"]   # lora.py imports peft lazily
TRAINER_MODULES = {"ours": _OURS, "ours_ckpt": _OURS, "ours_bf16": _OURS, "te_off": _OURS, "te_on": _OURS,
                   "disk_cache": _OURS + ["lora_lab.nodes.train"], "bare": _OURS,
                   "comfy": ["comfy_extras.nodes_train"]}


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Start VmHWM again from the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return rss_mb("VmHWM") <= rss_mb("VmRSS") + 1


def run_ours(patcher, latents, cond, steps, checkpointing: bool = False, precision: str = "fp32"):
    import torch
    from lora_lab.nodes import comfy_bridge
    from lora_lab.trainer.training.half_precision_base import frozen_weights_in
    from lora_lab.trainer.data.encoded_dataset import EncodedDataset, Example
    from lora_lab.trainer.lora.adapters import InjectedLora
    from lora_lab.trainer.training.loop import TrainSettings, train
    times = []
    with torch.inference_mode(False):
        data = EncodedDataset(examples=[Example(latent=l.clone(), caption="c", bucket=(1, 1), repeats=1)
                                        for l in latents], conds={"c": cond.clone()})
        half = {"bf16": torch.bfloat16}.get(precision)
        with comfy_bridge.trainable_unet(patcher, checkpointing=checkpointing) as network, \
                frozen_weights_in(network, half, tempfile.gettempdir()):
            with InjectedLora(network, comfy_bridge.unet_lora_targets(patcher), rank=RANK, alpha=RANK, seed=0) as lora:
                train(comfy_bridge.ComfyDenoiser(patcher), data, lora.parameters(),
                      TrainSettings(steps=steps, batch_size=1, learning_rate=1e-4, mixed_precision=precision),
                      torch.device("cpu"),
                      on_step=lambda report: times.append(report.seconds))
    return times


def run_ours_checkpointed(patcher, latents, cond, steps):
    return run_ours(patcher, latents, cond, steps, checkpointing=True)


def run_ours_bf16(patcher, latents, cond, steps):
    return run_ours(patcher, latents, cond, steps, checkpointing=True, precision="bf16")


def run_text_encoder(patcher, latents, steps, text_encoder_trains: bool):
    """The node's training path with a real SD1 CLIP: frozen (captions encoded once) or with a
    text-encoder LoRA (captions encoded through CLIP with gradients every step)."""
    import torch
    from lora_lab.nodes import comfy_bridge
    from lora_lab.trainer.data.encoded_dataset import EncodedDataset, Example
    from lora_lab.trainer.lora.adapters import InjectedLora, LoraSet
    from lora_lab.trainer.training.loop import TrainSettings, train
    clip = random_models.sd15_clip()
    times = []
    with torch.inference_mode(False):
        caption = "sks, a striped pattern, blue"
        data = EncodedDataset(examples=[Example(latent=l.clone(), caption=caption, bucket=(1, 1), repeats=1)
                                        for l in latents],
                              conds={caption: comfy_bridge.caption_encoder(clip)(caption).stored()})
        with comfy_bridge.trainable_unet(patcher, False, clip=clip if text_encoder_trains else None) as network, \
                comfy_bridge.trainable_text_encoder(clip) as text_model:
            parts = {"unet": InjectedLora(network, comfy_bridge.unet_lora_targets(patcher), rank=RANK, alpha=RANK,
                                          seed=0)}
            if text_encoder_trains:
                parts["text_encoder"] = InjectedLora(text_model, comfy_bridge.clip_lora_targets(clip), rank=RANK,
                                                     alpha=RANK, seed=0)
            with LoraSet(parts) as lora:
                train(comfy_bridge.ComfyDenoiser(patcher), data, lora.parameters_by_part(),
                      TrainSettings(steps=steps, batch_size=1, learning_rate=1e-4, text_encoder_lr=5e-5,
                                    train_text_encoder=text_encoder_trains), torch.device("cpu"),
                      on_step=lambda report: times.append(report.seconds),
                      encode_caption=(comfy_bridge.loaded_caption_encoder(clip, with_gradients=True)
                                      if text_encoder_trains else None),
                      text_encoder_trains=text_encoder_trains)
    return times


def run_text_encoder_off(patcher, latents, cond, steps):
    return run_text_encoder(patcher, latents, steps, False)


def run_text_encoder_on(patcher, latents, cond, steps):
    return run_text_encoder(patcher, latents, steps, True)


def run_disk_cache(patcher, latents, cond, steps, pictures: int = 8):
    """Train LoRA's dataset encoding with the latent disk cache: cold (empty cache), then warm with a
    new VAE object of the same weights (a new session: nothing in memory, everything on disk).
    Returns [cold seconds, warm seconds]."""
    import torch
    from lora_lab.nodes.train import encode_for_training
    from lora_lab.trainer.data.dataset import dataset_from_pixels
    size = latents.shape[-1] * 8
    g = torch.Generator().manual_seed(0)
    dataset = dataset_from_pixels(torch.rand(pictures, size, size, 3, generator=g),
                                  [f"sks, picture {i}" for i in range(pictures)])
    clip = random_models.sd15_clip()
    seconds = []
    for _ in ("cold", "warm"):
        vae = random_models.small_vae(seed=2)
        began = time.perf_counter()
        with torch.inference_mode(False):
            encode_for_training(patcher, clip, vae, dataset, size, use_disk_cache=True)
        seconds.append(time.perf_counter() - began)
    return seconds


def run_bare(patcher, latents, cond, steps):
    """The floor: peft on the same targets, the same forward, nothing else."""
    import re
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from lora_lab.nodes import comfy_bridge
    times = []
    with torch.inference_mode(False):
        comfy_bridge.load_fully(patcher)
        network = patcher.model.diffusion_model
        comfy_bridge.detach_from_inference_mode(network)   # unavoidable: ComfyUI builds weights in inference mode
        targets = comfy_bridge.unet_lora_targets(patcher)
        network.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules="(?:" + "|".join(
            re.escape(t) for t in targets) + ")"), network)
        hooks = [m.register_forward_pre_hook(lambda _m, a: (a[0].clone(), *a[1:]))   # the 2024-03 in-place trap
                 for m in network.modules() if isinstance(m, torch.nn.LayerNorm)]
        params = [p for p in network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        sigmas = comfy_bridge.model_sampling(patcher).sigmas.detach().clone()
        g = torch.Generator().manual_seed(0)
        for step in range(steps):
            began = time.perf_counter()
            x0 = latents[step % len(latents)].unsqueeze(0).clone()
            noise = torch.randn(x0.shape, generator=g)
            sigma = sigmas[torch.randint(0, len(sigmas), (1,), generator=g)]
            denoised = patcher.model.apply_model(x0 + noise * sigma, sigma, c_crossattn=cond.clone())
            loss = ((denoised - x0) / sigma).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - began)
        for h in hooks:
            h.remove()
    return times


def run_comfy(patcher, latents, cond, steps):
    """ComfyUI's own TrainLoraNode at its defaults; per-step time from the difference of two run lengths."""
    from comfy_extras.nodes_train import TrainLoraNode
    node = TrainLoraNode()

    def timed(n):
        began = time.perf_counter()
        node.train(patcher, {"samples": latents.clone()}, [[cond.clone(), {}]], batch_size=1, steps=n,
                   grad_accumulation_steps=1, learning_rate=5e-4, rank=RANK, optimizer="AdamW",
                   loss_function="MSE", seed=0, training_dtype="bf16", lora_dtype="bf16", algorithm="LoRA",
                   gradient_checkpointing=True, existing_lora="[None]")
        return time.perf_counter() - began
    timed(1)  # warm-up
    short, long = timed(2), timed(2 + steps)
    return [(long - short) / steps]


def median_of(results: list[dict]) -> dict:
    """One row from several rounds: the median of each figure (times: the first round's)."""
    row = dict(results[0])
    for key in ("seconds_per_step", "peak_rss_mb", "training_mb"):
        row[key] = statistics.median(r[key] for r in results)
    row["rounds"] = len(results)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 320])
    parser.add_argument("--size", type=int, default=256, help="training size in pixels (latents are size/8)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--which", nargs="+", default=["ours", "bare", "comfy"],
                        help="also: ours_ckpt (gradient checkpointing on), ours_bf16 (ComfyUI's trainer's "
                             "defaults: bf16, checkpointing), te_off te_on (text-encoder LoRA "
                             "off/on), disk_cache (latent cache cold/warm)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every row this many times, in turn, and report the medians")
    parser.add_argument("--child", nargs=2, metavar=("WHICH", "CHANNELS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], int(args.child[1]), args.size, args.steps)), flush=True)
        return 0

    root = comfyui_home.find_comfyui_root()
    has_comfy_trainer = (root / "comfy_extras" / "nodes_train.py").exists()
    load = os.getloadavg()[0]
    print(f"{comfyui_home.comfyui_version_label(root)}; CPU x{os.cpu_count()} (load {load:.1f}); fp32; "
          f"{args.size}px; batch 1; LoRA rank {RANK}; {args.steps} steps, median after warm-up; "
          f"median of {args.rounds} round(s)")
    print(f"{'UNet':>14} {'which':>9} {'s/step':>8} {'peak RSS':>10} {'training':>9} {'vs bare':>8}")
    for channels in args.channels:
        rows = {}
        # Rounds of every row in turn, each in a fresh process: a slow spell of this machine then hits
        # all rows alike, and the median of the rounds is reported.
        for _ in range(args.rounds):
            for which in args.which:
                if which == "comfy" and not has_comfy_trainer:
                    continue
                out = subprocess.run([sys.executable, __file__, "--child", which, str(channels), "--size",
                                      str(args.size), "--steps", str(args.steps)], capture_output=True, text=True)
                line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    print(f"{channels:>14} {which:>9} failed: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                rows.setdefault(which, []).append(json.loads(line[len("RESULT "):]))
        rows = {which: median_of(results) for which, results in rows.items()}
        if "disk_cache" in rows:
            cold, warm = rows.pop("disk_cache")["times"]
            print(f"{'':>14} latent disk cache, 8 pictures at {args.size}px: cold {cold:.2f}s, warm {warm:.2f}s "
                  f"({cold / max(warm, 1e-9):.1f}x)")
        for which, r in rows.items():
            ratio = r["seconds_per_step"] / rows["bare"]["seconds_per_step"] if "bare" in rows else float("nan")
            print(f"{r['params_m']:>11.0f} M {which:>9} {r['seconds_per_step']:>8.3f} "
                  f"{r['peak_rss_mb']:>8.0f}MB {r['training_mb']:>7.0f}MB "
                  + (f"{ratio:>7.2f}x" if ratio == ratio else f"{'-':>8}"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

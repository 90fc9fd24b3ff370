"""Benchmark: Train LoRA on 1, 2 (4, 8) training processes -- seconds per step, pictures per second, speed-up and
efficiency, the gradient all-reduce's time per step, time to the first step, and peak memory per rank.

    .venv/bin/python tools/bench_distributed.py                   # this machine's CPU: 1 and 2 processes, slim SD1.5
    COMFYUI_ROOT=/path/to/ComfyUI python tools/bench_distributed.py --device cuda --gpus 1 2 4 8 \\
        --checkpoint /path/to/v1-5-pruned-emaonly.safetensors --resolution 512 --batch 8

It runs the real path: this process is the controller (a ComfyUI in-process, tests/support/comfyui_home.py picks
it), Train LoRA gets a Distributed Training node, and torchrun starts workers that boot the same ComfyUI, load the
checkpoint with its loader node and train. One process goes through a worker too, so every N pays the same
start-up. Without --checkpoint the model is SD1.5's real CLIP and VAE with a slim random UNet (the tests' one).

Figures, per N: s/step is the median of steps 2.. as rank 0 timed them; pictures/s = batch / s/step; speed-up and
efficiency against the smallest N; all-reduce is DDP's gradient all-reduce per step (timed by its comm hook,
mean over ranks; it overlaps the backward pass, so it is not all added to the step); first step is the time from
the job's start to rank 0's first step (booting ComfyUI, loading the model, the first step); peak memory is the
largest rank's (torch.cuda.max_memory_allocated on a GPU, the process's peak resident size on a CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))   # the test harness: a real ComfyUI in-process

import comfyui_home  # noqa: E402

GB = 1024 ** 3


def prepared(args):
    """An in-process ComfyUI with the pack in its custom_nodes (the workers load it from there), and the model."""
    overlay = comfyui_home.build_overlay(Path(tempfile.mkdtemp(prefix="loralab-bench-")) / "comfy")
    comfyui_home.prepare_in_process(overlay, cpu=args.device == "cpu")
    pack = types.ModuleType("lora_lab")
    pack.__path__ = [str(REPO)]
    sys.modules["lora_lab"] = pack
    import random_models
    if args.checkpoint:
        name = Path(args.checkpoint).name
        (overlay / "models" / "checkpoints" / name).symlink_to(Path(args.checkpoint).resolve())
    else:
        name = random_models.link_slim_checkpoint(overlay)
    return overlay, name


def run(args, overlay: Path, checkpoint: str, gpus: int, model, clip, vae, dataset) -> dict:
    import torch
    from lora_lab.nodes.train import LoraLabTrainLora
    from lora_lab.nodes.training_options import TrainingOptions
    from lora_lab.trainer.distributed.job import JobFolder
    from lora_lab.trainer.distributed.launcher import Topology
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
             "7": {"class_type": "LoraLabTrainLora", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2]}}}
    before = set((overlay / "user" / "loralab" / "distributed").glob("*"))
    with torch.inference_mode():
        LoraLabTrainLora().train_lora(
            model, clip, vae, dataset, output_name=f"bench_{gpus}_{time.time_ns()}", resolution=args.resolution,
            steps=args.steps, epochs=0, batch_size=args.batch, learning_rate=1e-4, rank=args.rank, alpha=args.rank,
            seed=0, options=TrainingOptions(precision=args.precision, gradient_checkpointing=args.checkpointing),
            distributed=Topology(gpus=gpus, timeout=1800), unique_id="7", prompt=graph)
    [folder] = set((overlay / "user" / "loralab" / "distributed").glob("*")) - before
    job = JobFolder(folder)
    events, _ = job.events_from(0)
    steps = [e for e in events if e["event"] == "run" and e["name"] == "progress"]
    figures = job.stats()
    per_step = statistics.median(e["data"]["seconds_per_step"] for e in steps[1:] or steps)
    return {"gpus": gpus, "seconds_per_step": per_step, "pictures_per_second": args.batch / per_step,
            "allreduce_seconds_per_step": statistics.mean(f["exchange_seconds"] / max(1, f["steps"]) for f in figures),
            "first_step_seconds": steps[0]["time"] - job.job()["created"],
            "peak_memory_gb_per_rank": max(f["peak_memory_bytes"] for f in figures) / GB,
            "memory": figures[0]["memory"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="training processes to compare")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--checkpoint", help="a checkpoint file (default: the tests' slim random SD1.5)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="the global batch (split across the processes)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--pictures", type=int, default=8)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    overlay, checkpoint = prepared(args)
    import nodes as comfy_nodes
    import torch
    from lora_lab.trainer.data.dataset import dataset_from_pixels
    from training import pattern_pixels
    with torch.inference_mode():
        model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(checkpoint)[:3]
        dataset = dataset_from_pixels(pattern_pixels(args.pictures, args.resolution, args.resolution),
                                      [f"sks, striped pattern {i}" for i in range(args.pictures)], 1)
    rows = [run(args, overlay, checkpoint, gpus, model, clip, vae, dataset) for gpus in args.gpus]
    base = rows[0]
    for row in rows:
        row["speed_up"] = row["pictures_per_second"] / base["pictures_per_second"] * 1.0
        row["efficiency"] = row["speed_up"] / (row["gpus"] / base["gpus"])
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores" if args.device == "cpu"
               else torch.cuda.get_device_name(0))
    print(f"\n{machine}; torch {torch.__version__}; {checkpoint} at {args.resolution} px, global batch {args.batch}, "
          f"rank {args.rank}, {args.steps} steps, precision {args.precision}\n")
    print("| processes | s/step | pictures/s | speed-up | efficiency | all-reduce/step | first step | "
          f"peak memory per rank ({base['memory']}) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['gpus']} | {row['seconds_per_step']:.3f} | {row['pictures_per_second']:.2f} | "
              f"{row['speed_up']:.2f}x | {row['efficiency']:.0%} | {row['allreduce_seconds_per_step'] * 1000:.1f} ms | "
              f"{row['first_step_seconds']:.1f} s | {row['peak_memory_gb_per_rank']:.2f} GB |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "settings": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()

"""Benchmark: BLIP captions per second, batched vs one picture at a time (target: batched >= 3x faster).

    .venv/bin/python tools/bench_captioning.py [--layers 4] [--width 128] [--pictures 32] [--batch 8]

Runs the pack's own ``BlipCaptioner`` on a BLIP with random weights (transformers' real classes; nothing is
downloaded), on the CPU in fp32.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))  # the test harness
import random_models  # noqa: E402


def random_pictures(count: int, size: int = 256, seed: int = 0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def images_per_second(captioner, pictures, batch_size: int, tokens: int, num_beams: int, repeats: int) -> float:
    """Median over ``repeats`` runs. min_length = max_length, so every run writes the same number of tokens."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        captioner.caption(pictures, min_length=tokens, max_length=tokens, num_beams=num_beams, batch_size=batch_size)
        times.append(time.perf_counter() - started)
    return len(pictures) / statistics.median(times)


def _pack_captioner():
    """The pack's trainer/captions/blip.py, imported as ``lora_lab.trainer.captions.blip`` without running the pack's
    __init__ (which needs ComfyUI), the way tests/conftest.py does it."""
    import importlib
    import types
    if "lora_lab" not in sys.modules:
        package = types.ModuleType("lora_lab")
        package.__path__ = [str(Path(__file__).resolve().parents[1])]
        sys.modules["lora_lab"] = package
    return importlib.import_module("lora_lab.trainer.captions.blip")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--pictures", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=20, help="tokens written per caption")
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    # One thread by default: on a small shared machine OpenMP's spinning threads make multi-threaded timings
    # swing tenfold with other processes' load; one thread gives numbers that repeat.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers.utils import logging as transformers_logging
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    BlipCaptioner = _pack_captioner().BlipCaptioner

    with tempfile.TemporaryDirectory() as scratch:
        folder = random_models.tiny_blip(Path(scratch) / "blip", layers=args.layers, width=args.width,
                                         image_size=128, patch_size=16)
        captioner = BlipCaptioner(folder, "cpu")
        pictures = random_pictures(args.pictures)
        captioner.caption(pictures[:2], min_length=1, max_length=4, batch_size=2)  # warm-up: first calls allocate
        one = images_per_second(captioner, pictures, 1, args.tokens, args.beams, args.repeats)
        batched = images_per_second(captioner, pictures, args.batch, args.tokens, args.beams, args.repeats)
    params = sum(p.numel() for p in captioner.model.parameters()) / 1e6
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"BLIP {args.layers} layers x {args.width} wide ({params:.1f} M parameters), {args.pictures} pictures, "
          f"{args.tokens} tokens each, beams {args.beams}, CPU fp32, {torch.get_num_threads()} threads, "
          f"load average {load:.1f} on {os.cpu_count()} cores")
    print(f"one at a time : {one:7.2f} images/s")
    print(f"batch of {args.batch:<4} : {batched:7.2f} images/s")
    print(f"speed-up      : {batched / one:7.2f}x (target >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

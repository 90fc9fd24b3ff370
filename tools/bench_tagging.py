"""Benchmark: WD14 tagging pictures per second, batched vs one picture at a time, on the same model.

    .venv/bin/python tools/bench_tagging.py [--size 448] [--width 32] [--depth 4] [--pictures 32] [--batch 8]

Runs the pack's own ``Wd14Tagger`` as the Tag Images node runs it (preprocessing included, the next batch prepared
while the model runs; once more preparing and running in turn, for comparison) on a tagger exported from torch with SmilingWolf's signature and random weights (no tagger can be downloaded here), on
onnxruntime's CPU provider. A real tagger (SwinV2/ViT/ConvNeXt, about 100 M parameters) does far more work
per picture than this one, so its absolute speed is lower; the batched/single ratio is what this measures.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))  # the test harness's tagger builder
if "lora_lab" not in sys.modules:                    # the pack's trainer/ without its ComfyUI __init__
    _pack = types.ModuleType("lora_lab")
    _pack.__path__ = [str(REPO)]
    sys.modules["lora_lab"] = _pack

import tagger_models  # noqa: E402
from lora_lab.trainer.captions.wd14 import Wd14Tagger, files_in  # noqa: E402
from lora_lab.trainer.captions.wd14_preprocess import prepare_batch  # noqa: E402


def random_pictures(count: int, seed: int = 0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    # Camera-like sizes and both orientations: the padding and the resize are part of the work.
    sizes = [(768, 512), (512, 768), (640, 640)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 3][::-1], 3), dtype=np.uint8)) for i in range(count)]


def pictures_per_second(tagger, pictures, settings: dict[str, dict], repeats: int) -> dict[str, float]:
    """Each setting's pictures/s (median of ``repeats``), the settings taking turns so that other work on the
    machine slows them alike."""
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(repeats):
        for name, keywords in settings.items():
            started = time.perf_counter()
            tagger.probabilities(pictures, **keywords)
            times[name].append(time.perf_counter() - started)
    return {name: len(pictures) / statistics.median(spent) for name, spent in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=448, help="model input size (SmilingWolf's taggers: 448)")
    parser.add_argument("--width", type=int, default=32, help="channels of the test model's convolutions")
    parser.add_argument("--depth", type=int, default=4, help="convolutions of the test model")
    parser.add_argument("--pictures", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the median counts")
    args = parser.parse_args()

    import onnxruntime
    with tempfile.TemporaryDirectory() as scratch:
        folder = tagger_models.build_tagger(Path(scratch) / "bench", size=args.size, width=args.width,
                                            depth=args.depth)
        tagger = Wd14Tagger(files_in(folder), "cpu", name="bench")
        pictures = random_pictures(args.pictures)
        tagger.probabilities(pictures[: args.batch], batch_size=args.batch)       # warm-up: kernels, caches
        speeds = pictures_per_second(tagger, pictures, {
            "single": {"batch_size": 1}, "batched": {"batch_size": args.batch},
            "in turn": {"batch_size": args.batch, "prepare_ahead": False}}, args.repeats)
        single, batched, in_turn = speeds["single"], speeds["batched"], speeds["in turn"]
        model_mb = os.path.getsize(folder / "model.onnx") / 1e6
        started = time.perf_counter()
        prepare_batch(pictures, args.size)
        preprocessing = len(pictures) / (time.perf_counter() - started)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
          f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__} ({', '.join(tagger.providers)})")
    print(f"model:   test tagger exported from torch, input {args.size}x{args.size}x3 NHWC, {args.depth} conv "
          f"x {args.width} channels, {len(tagger.tags)} tags, {model_mb:.2f} MB; {args.pictures} pictures "
          f"(768x512, 512x768, 640x640), preprocessing included; median of {args.repeats}")
    print(f"one at a time:      {single:6.1f} pictures/s")
    print(f"batched ({args.batch:>3}):      {batched:6.1f} pictures/s   ({batched / single:.2f}x)   the node's way: the next "
          f"batch is prepared while the model runs")
    print(f"  same, in turn:    {in_turn:6.1f} pictures/s   ({in_turn / single:.2f}x)   preparing and running one after "
          f"the other")
    print(f"preprocessing only: {preprocessing:6.1f} pictures/s   (pad + BICUBIC resize, the reference's; "
          f"the part batching cannot speed up)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average while measuring: {load:.1f} (other work on the machine slows both figures)")


if __name__ == "__main__":
    main()

"""Benchmark: scan a folder of 500 camera-sized JPEGs (4000x3000) and report time and peak memory.

    .venv/bin/python tools/bench_dataset_scan.py [--count 500] [--folder DIR]

The pictures are written once into ~/.cache/lora-lab/bench-500 (or $LORALAB_CACHE) and reused. The
scan runs in a fresh child process so its peak RSS is not inflated by writing the pictures. The OS
page cache is warm after the first run; "cold" below means LoRA Lab's own cache is empty.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))  # the test harness: a real ComfyUI, random models
from comfyui_home import cache_dir  # noqa: E402

SIZE = (4000, 3000)


def write_pictures(folder: Path, count: int) -> None:
    """Solid colour plus a noise block: decodes like a photo of that size, writes in ~0.1 s each."""
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    missing = [index for index in range(count) if not (folder / f"{index:04}.jpg").is_file()]
    for done, index in enumerate(missing, 1):
        image = Image.new("RGB", SIZE, tuple(int(c) for c in rng.integers(0, 256, 3)))
        noise = rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)
        image.paste(Image.fromarray(noise), (int(rng.integers(0, 3200)), int(rng.integers(0, 2400))))
        partial = folder / f"{index:04}.jpg.part"
        image.save(partial, format="JPEG", quality=90)
        partial.rename(folder / f"{index:04}.jpg")      # an interrupted run never leaves a half file
        if index % 5 == 0:
            (folder / f"{index:04}.txt").write_text(f"picture number {index}", encoding="utf-8")
        if done % 50 == 0:
            print(f"  wrote {done}/{len(missing)} pictures", flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux reports KiB


def measure(folder: Path) -> dict:
    """Runs in the child: import, scan cold, scan warm, signature, decode one picture."""
    pack = types.ModuleType("lora_lab")
    pack.__path__ = [str(REPO)]
    sys.modules["lora_lab"] = pack
    from lora_lab.trainer.data.folder_scan import clear_scan_cache, folder_signature, scan_folder

    baseline = peak_rss_mb()
    clear_scan_cache()
    tracemalloc.start()
    started = time.perf_counter()
    dataset = scan_folder(str(folder))
    cold = time.perf_counter() - started
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    after_scan = peak_rss_mb()

    started = time.perf_counter()
    scan_folder(str(folder))
    warm = time.perf_counter() - started
    started = time.perf_counter()
    folder_signature(str(folder))
    signature = time.perf_counter() - started
    started = time.perf_counter()
    dataset.load_image(0)
    full_decode = time.perf_counter() - started
    started = time.perf_counter()
    dataset.load_image(1, max_side=192)
    thumbnail = time.perf_counter() - started
    return {
        "pictures": dataset.num_images, "skipped": len(dataset.skipped),
        "captioned": sum(item.has_caption for item in dataset.items),
        "bytes": sum(os.path.getsize(item.path) for item in dataset.items),
        "scan_cold_s": cold, "scan_warm_s": warm, "signature_s": signature,
        "load_image_full_s": full_decode, "load_image_thumbnail_s": thumbnail,
        "rss_after_import_mb": baseline, "rss_peak_after_scan_mb": after_scan,
        "python_heap_peak_mb": python_peak / 2**20, "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--folder", type=Path, default=None, help="default: <cache>/bench-<count>")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.folder or cache_dir() / f"bench-{args.count}"
    if args.measure:
        print(json.dumps(measure(folder)))
        return

    started = time.perf_counter()
    write_pictures(folder, args.count)
    print(f"pictures ready in {folder} ({time.perf_counter() - started:.1f} s)")
    child = subprocess.run([sys.executable, __file__, "--measure", "--folder", str(folder)],
                           capture_output=True, text=True, check=True)
    result = json.loads(child.stdout.strip().splitlines()[-1])
    one_decoded_mb = SIZE[0] * SIZE[1] * 3 / 2**20
    print(f"{result['pictures']} pictures {SIZE[0]}x{SIZE[1]} ({result['bytes'] / 2**20:.0f} MB on disk), "
          f"{result['captioned']} captioned, {result['skipped']} skipped")
    print(f"scan, LoRA Lab cache empty : {result['scan_cold_s']:.2f} s "
          f"({1000 * result['scan_cold_s'] / max(result['pictures'], 1):.1f} ms per picture)")
    print(f"scan again (cached facts)  : {result['scan_warm_s']:.3f} s")
    print(f"folder_signature (IS_CHANGED): {result['signature_s']:.3f} s")
    print(f"load_image full / thumbnail: {result['load_image_full_s']:.3f} s / "
          f"{result['load_image_thumbnail_s']:.3f} s")
    print(f"peak RSS: {result['rss_after_import_mb']:.0f} MB after imports -> "
          f"{result['rss_peak_after_scan_mb']:.0f} MB after the scan "
          f"(one decoded picture is {one_decoded_mb:.0f} MB; all of them would be "
          f"{one_decoded_mb * result['pictures'] / 1024:.1f} GB)")
    print(f"Python heap peak during the scan: {result['python_heap_peak_mb']:.2f} MB")


if __name__ == "__main__":
    main()

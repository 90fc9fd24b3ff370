"""A small generated dataset (pictures + kohya-style captions) for the demo, tests and benchmarks."""
from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

TRIGGER = "lrlbdemo"
COLOURS = {"red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 160, 70), "orange": (230, 140, 30),
           "purple": (130, 50, 170), "teal": (30, 150, 150)}
SHAPES = ("circle", "square", "stripes", "triangle")


def draw_picture(shape: str, colour: tuple[int, int, int], size: tuple[int, int], seed: int) -> Image.Image:
    rng = random.Random(seed)
    width, height = size
    background = tuple(255 - c // 3 for c in colour)
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    cx, cy, r = width / 2 + rng.uniform(-0.1, 0.1) * width, height / 2, min(size) * rng.uniform(0.25, 0.4)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        period = max(4, int(min(size) / rng.uniform(4, 8)))
        for x in range(-height, width, period * 2):
            draw.polygon([(x, 0), (x + period, 0), (x + period + height, height), (x + height, height)], fill=colour)
    # a little texture, so no two pictures are identical
    for _ in range(int(width * height / 400)):
        x, y = rng.randrange(width), rng.randrange(height)
        draw.point((x, y), fill=tuple(min(255, c + rng.randint(-30, 30)) for c in image.getpixel((x, y))))
    return image


def fresh_demo_dataset(folder: Path, **options) -> Path:
    """write_demo_dataset into ``folder`` emptied first (what an earlier run left is gone)."""
    if Path(folder).exists():
        shutil.rmtree(folder)
    return write_demo_dataset(folder, **options)


def write_demo_dataset(folder: Path, count: int = 8, repeats: int = 10, size: int = 128,
                       concept: str = "demo") -> Path:
    """Write ``count`` pictures with captions into ``folder/<repeats>_<concept>/`` (kohya layout).

    Some pictures are landscape or portrait so aspect-ratio buckets have work to do.
    Returns the dataset root (``folder``).
    """
    target = Path(folder) / f"{repeats}_{concept}"
    target.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for i in range(count):
        shape, colour = SHAPES[i % len(SHAPES)], names[i % len(names)]
        aspect = (1.0, 1.5, 1 / 1.5)[i % 3]
        dims = (int(size * math.sqrt(aspect)) // 8 * 8, int(size / math.sqrt(aspect)) // 8 * 8)
        draw_picture(shape, COLOURS[colour], dims, seed=i).save(target / f"{i:03d}_{colour}_{shape}.png")
        (target / f"{i:03d}_{colour}_{shape}.txt").write_text(
            f"{TRIGGER}, a {colour} {shape}, flat illustration\n", encoding="utf-8")
    return Path(folder)

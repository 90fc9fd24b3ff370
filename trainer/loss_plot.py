"""A loss curve as a picture (raw and smoothed), drawn with PIL so no plotting library is needed.

matplotlib is not a dependency of ComfyUI or of this pack, and pulling it in (with its font cache built on
first import) for one line chart per run would cost users more than these hundred lines.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def smoothed(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """TensorBoard-style exponential moving average, debiased so the start is not pulled to zero."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def loss_curve_image(losses: Sequence[float], width: int = 640, height: int = 360,
                     title: str = "training loss") -> np.ndarray:
    """An (H, W, 3) float32 image in 0..1: faint raw loss, bold smoothed loss, axes with ranges."""
    image = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 56, width - 16, 28, height - 32
    draw.rectangle([left, top, right, bottom], outline=(170, 170, 170))
    finite = [v for v in losses if math.isfinite(v)]
    draw.text((left, 8), f"{title} - {len(losses)} steps", fill=(30, 30, 30))
    if not finite:
        draw.text((left + 10, (top + bottom) // 2), "no steps recorded", fill=(120, 120, 120))
        return np.asarray(image, dtype=np.float32) / 255.0
    low, high = min(finite), max(finite)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5

    def point(i: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(1, len(losses) - 1))
        y = bottom - (bottom - top) * ((value - low) / (high - low))
        return x, y

    raw = [point(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
    smooth = [point(i, v) for i, v in enumerate(smoothed(finite))]
    if len(raw) > 1:
        draw.line(raw, fill=(160, 190, 230), width=1)
        draw.line(smooth, fill=(20, 80, 180), width=3)
    else:
        x, y = raw[0]
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(20, 80, 180))
    draw.text((4, top - 4), f"{high:.4g}", fill=(60, 60, 60))
    draw.text((4, bottom - 10), f"{low:.4g}", fill=(60, 60, 60))
    draw.text((left, bottom + 8), "step 1", fill=(60, 60, 60))
    draw.text((right - 60, bottom + 8), f"step {len(losses)}", fill=(60, 60, 60))
    return np.asarray(image, dtype=np.float32) / 255.0

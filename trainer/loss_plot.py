"""A loss curve as a picture (raw and smoothed, and the validation loss per epoch), drawn with PIL so no
plotting library is needed.

matplotlib is not a dependency of ComfyUI or of this pack, and pulling it in (with its font cache built on
first import) for one line chart per run would cost users more than these hundred lines.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

TRAINING_RAW, TRAINING = (160, 190, 230), (20, 80, 180)
VALIDATION = (230, 120, 20)       # orange beside the blues: the two curves stay apart for colour-blind eyes too


def smoothed(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """TensorBoard-style exponential moving average, debiased so the start is not pulled to zero."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def loss_curve_image(losses: Sequence[float], width: int = 640, height: int = 360,
                     title: str = "training loss", steps: tuple[int, int] | None = None,
                     validation: Sequence[tuple[int, float, int]] = ()) -> np.ndarray:
    """An (H, W, 3) float32 image in 0..1: faint raw loss, bold smoothed loss, axes with ranges.

    ``steps``: the (first, last) step the losses span, evenly (default: 1 to their count). ``validation``:
    (epoch, loss, step) points, drawn in a second colour at their steps, on the same scale, with a legend.
    """
    image = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 56, width - 16, 28, height - 32
    draw.rectangle([left, top, right, bottom], outline=(170, 170, 170))
    first, last = steps if steps is not None else (1, len(losses))
    finite = [v for v in losses if math.isfinite(v)]
    shown_validation = [(epoch, loss, step) for epoch, loss, step in validation
                        if math.isfinite(loss) and first <= step <= last]
    draw.text((left, 8), f"{title} - {len(losses)} steps", fill=(30, 30, 30))
    if not finite:
        draw.text((left + 10, (top + bottom) // 2), "no steps recorded", fill=(120, 120, 120))
        return np.asarray(image, dtype=np.float32) / 255.0
    everything = finite + [loss for _, loss, _ in shown_validation]
    low, high = min(everything), max(everything)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5

    def at_step(step: float, value: float) -> tuple[float, float]:
        x = left + (right - left) * ((step - first) / max(1, last - first))
        y = bottom - (bottom - top) * ((value - low) / (high - low))
        return x, y

    def point(i: int, value: float) -> tuple[float, float]:
        return at_step(first + (last - first) * (i / max(1, len(losses) - 1)), value)

    raw = [point(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
    smooth = [point(i, v) for i, v in enumerate(smoothed(finite))]
    if len(raw) > 1:
        draw.line(raw, fill=TRAINING_RAW, width=1)
        draw.line(smooth, fill=TRAINING, width=3)
    else:
        x, y = raw[0]
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=TRAINING)
    if shown_validation:
        _draw_validation(draw, [at_step(step, loss) for _, loss, step in shown_validation], right, top)
    draw.text((4, top - 4), f"{high:.4g}", fill=(60, 60, 60))
    draw.text((4, bottom - 10), f"{low:.4g}", fill=(60, 60, 60))
    draw.text((left, bottom + 8), f"step {first}", fill=(60, 60, 60))
    draw.text((right - 60, bottom + 8), f"step {last}", fill=(60, 60, 60))
    return np.asarray(image, dtype=np.float32) / 255.0


def _draw_validation(draw, points: list[tuple[float, float]], right: int, top: int) -> None:
    """Points joined by a thin line, and a legend naming both curves in the top right corner."""
    if len(points) > 1:
        draw.line(points, fill=VALIDATION, width=1)
    for x, y in points:
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=VALIDATION)
    legend_x = right - 190
    draw.line([(legend_x, top + 10), (legend_x + 16, top + 10)], fill=TRAINING, width=3)
    draw.text((legend_x + 22, top + 4), "training loss (smoothed)", fill=(40, 40, 40))
    draw.ellipse([legend_x + 4, top + 20, legend_x + 12, top + 28], fill=VALIDATION)
    draw.text((legend_x + 22, top + 18), "validation loss per epoch", fill=(40, 40, 40))

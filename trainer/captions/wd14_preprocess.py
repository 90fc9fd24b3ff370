"""Pictures into a WD14 tagger's input: exactly what SmilingWolf's reference Space feeds its models.

Reference: https://huggingface.co/spaces/SmilingWolf/wd-tagger/blob/main/app.py, ``Predictor.prepare_image``
(read from a verbatim copy of the Space's app.py; its ``image`` is the RGBA picture Gradio hands over)::

    def prepare_image(self, image):
        target_size = self.model_target_size

        canvas = Image.new("RGBA", image.size, (255, 255, 255))
        canvas.alpha_composite(image)
        image = canvas.convert("RGB")

        # Pad image to square
        image_shape = image.size
        max_dim = max(image_shape)
        pad_left = (max_dim - image_shape[0]) // 2
        pad_top = (max_dim - image_shape[1]) // 2

        padded_image = Image.new("RGB", (max_dim, max_dim), (255, 255, 255))
        padded_image.paste(image, (pad_left, pad_top))

        # Resize
        if max_dim != target_size:
            padded_image = padded_image.resize(
                (target_size, target_size),
                Image.BICUBIC,
            )

        # Convert to numpy array
        image_array = np.asarray(padded_image, dtype=np.float32)

        # Convert PIL-native RGB to BGR
        image_array = image_array[:, :, ::-1]

        return np.expand_dims(image_array, axis=0)

The models were trained on this input (no mean/std normalisation: float 0-255, BGR, NHWC), so any
deviation, a LANCZOS resize or a black border, shifts every probability a little.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

WHITE = (255, 255, 255)


def prepare_image(image: Image.Image, target_size: int) -> np.ndarray:
    """One picture as a (target_size, target_size, 3) float32 BGR array, 0-255."""
    # Any mode (RGB, L, P with transparency, LA...) becomes RGBA first: the reference always gets RGBA.
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, WHITE)
    canvas.alpha_composite(rgba)
    flat = canvas.convert("RGB")

    side = max(flat.size)
    square = Image.new("RGB", (side, side), WHITE)
    square.paste(flat, ((side - flat.width) // 2, (side - flat.height) // 2))
    if side != target_size:
        square = square.resize((target_size, target_size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


def prepare_batch(images: Sequence[Image.Image], target_size: int) -> np.ndarray:
    """(N, target_size, target_size, 3), contiguous, as onnxruntime wants its input."""
    return np.ascontiguousarray(np.stack([prepare_image(image, target_size) for image in images]))

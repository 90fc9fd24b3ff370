"""A small WD14-style tagger made in-process (no tagger weights can be downloaded here).

Same files and signature as SmilingWolf's: ``model.onnx`` exported from a torch module, input
``[batch, size, size, 3]`` float32 BGR 0-255 (dynamic batch), output ``[batch, tags]`` sigmoid
probabilities; ``selected_tags.csv`` with the real columns ``tag_id,name,category,count``.

Some outputs are wired to the picture's colour so tests know what to expect: ``red_theme`` lights up on a red
picture (so a red/blue swap in the preprocessing shows), ``hatsune_miku`` on a green one, ``saber_(fate)`` on
a blue one, ``white_background`` on a white one, ``^_^`` on a yellow one; the rest come from small random convolutions.
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path

import torch

RATING, GENERAL, CHARACTER = 9, 0, 4
TAGS = (  # (name, category), in the order of the real files: ratings first
    ("general", RATING), ("sensitive", RATING), ("questionable", RATING), ("explicit", RATING),
    ("1girl", GENERAL), ("solo", GENERAL), ("red_theme", GENERAL), ("green_theme", GENERAL),
    ("blue_theme", GENERAL), ("white_background", GENERAL), ("simple_background", GENERAL), ("^_^", GENERAL),
    ("star_(symbol)", GENERAL), ("long_hair", GENERAL), ("looking_at_viewer", GENERAL), ("smile", GENERAL),
    ("hatsune_miku", CHARACTER), ("saber_(fate)", CHARACTER),
)
INPUT_NAME, OUTPUT_NAME = "input_1:0", "predictions_sigmoid"       # the names of the v2 exports
_COLOUR_ROWS = {  # tag -> (weights on the mean blue, green, red of the picture, bias): logits
    "general": (0, 0, 0, 2.0), "sensitive": (0, 0, 0, -1.0), "questionable": (0, 0, 0, -2.0),
    "explicit": (0, 0, 0, -3.0),
    "red_theme": (-5, -5, 10, -2.0), "green_theme": (-5, 10, -5, -2.0), "blue_theme": (10, -5, -5, -2.0),
    "white_background": (4, 4, 4, -10.0), "^_^": (-10, 5, 5, -2.0),
    "hatsune_miku": (0, 10, -10, -2.0), "saber_(fate)": (10, 0, -10, -2.0),
}


class TinyTagger(torch.nn.Module):
    def __init__(self, tags=TAGS, width: int = 8, depth: int = 1, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        channels = [3] + [width] * depth
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(a, b, 3, stride=2, padding=1)
                                         for a, b in zip(channels, channels[1:]))
        self.head = torch.nn.Linear(3 + width, len(tags))
        with torch.no_grad():
            for conv in self.convs:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.3)
                conv.bias.zero_()
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=generator) * 1.5)
            self.head.bias.copy_(torch.randn(self.head.bias.shape, generator=generator) * 0.5 - 0.5)
            for row, (name, _) in enumerate(tags):
                if name in _COLOUR_ROWS:
                    *colour, bias = _COLOUR_ROWS[name]
                    self.head.weight[row].zero_()
                    self.head.weight[row, :3] = torch.tensor(colour, dtype=torch.float32)
                    self.head.bias[row] = bias

    def forward(self, pixels):                      # [N, H, W, 3] BGR 0-255
        pixels = pixels / 255.0
        colour = pixels.mean(dim=(1, 2))             # mean blue, green, red
        features = pixels.permute(0, 3, 1, 2)
        for conv in self.convs:
            features = torch.relu(conv(features))
        features = features.mean(dim=(2, 3))
        return torch.sigmoid(self.head(torch.cat([colour, features], dim=1)))


def build_tagger(folder, size: int = 64, tags=TAGS, width: int = 8, depth: int = 1, seed: int = 0,
                 fixed_batch: int | None = None) -> Path:
    """Write ``model.onnx`` and ``selected_tags.csv`` into ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tag_list(folder / "selected_tags.csv", tags)
    model = TinyTagger(tags, width, depth, seed).eval()
    example = torch.zeros(fixed_batch or 1, size, size, 3)
    dynamic = None if fixed_batch else {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    # ComfyUI runs nodes under inference_mode, which tracing refuses; the legacy TorchScript exporter
    # needs no onnxscript (the dynamo one does).
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(folder / "model.onnx"), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes=dynamic, opset_version=17, dynamo=False)
    return folder


def write_tag_list(path, tags=TAGS) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for number, (name, category) in enumerate(tags):
            writer.writerow([9999990 + number if category == RATING else 100 + number, name, category,
                             100000 // (number + 1)])

"""From a WD14 tagger's probabilities to the tags of one picture, the way SmilingWolf's reference Space
picks them (https://huggingface.co/spaces/SmilingWolf/wd-tagger/blob/main/app.py, ``Predictor.predict``):

- general tags: probability strictly above the general threshold (or the MCut threshold of all general
  probabilities), ordered by confidence;
- character tags: the same with their own threshold; an MCut threshold is never below 0.15;
- rating: the most likely of the rating tags (the reference shows all four; a caption takes the winner).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .edits import split_tags
from .wd14_labels import TagList, caption_form, tag_key

CHARACTER_MCUT_FLOOR = 0.15      # the reference's max(0.15, mcut_threshold(...)) for character tags
MCUT_CHOICES = ("off", "general", "character", "both")


@dataclass(frozen=True)
class TagOptions:
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    mcut: str = "off"                   # one of MCUT_CHOICES
    rating: bool = False
    replace_underscores: bool = True
    escape_parentheses: bool = True
    exclude: str = ""                   # comma-separated; matched like tag_key (case, _ and \( ignored)

    def __post_init__(self):
        if self.mcut not in MCUT_CHOICES:
            raise ValueError(f"mcut must be one of {', '.join(MCUT_CHOICES)}, not {self.mcut!r}")


@dataclass(frozen=True)
class PictureTags:
    """One picture's chosen tags as named in selected_tags.csv, each with its probability, by confidence."""
    character: tuple[tuple[str, float], ...]
    general: tuple[tuple[str, float], ...]
    rating: tuple[str, float] | None

    def caption_tags(self, options: TagOptions) -> list[str]:
        """Character tags first (they name the subject), then general tags, each by confidence; the rating
        last, so it never pushes a content tag out of the first tokens kohya's keep_tokens holds."""
        names = [name for name, _ in self.character + self.general]
        if self.rating is not None:
            names.append(self.rating[0])
        return [caption_form(name, options.replace_underscores, options.escape_parentheses) for name in names]


def mcut_threshold(probabilities: np.ndarray) -> float:
    """Maximum Cut Thresholding (Largeron, Moulin & Géry, IDA 2012): the midpoint of the widest gap
    between the sorted probabilities. Transcribed from the reference's ``mcut_threshold``."""
    ordered = probabilities[probabilities.argsort()[::-1]]
    gaps = ordered[:-1] - ordered[1:]
    widest = gaps.argmax()
    return float((ordered[widest] + ordered[widest + 1]) / 2)


def select_tags(probabilities: np.ndarray, tags: TagList, options: TagOptions) -> PictureTags:
    """``probabilities``: the model's output for one picture, one value per row of selected_tags.csv."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(tags),):
        raise ValueError(f"expected {len(tags)} probabilities (one per tag), got shape {probabilities.shape}")
    excluded = {tag_key(tag) for tag in split_tags(options.exclude)}

    def above(indices: np.ndarray, threshold: float, use_mcut: bool, floor: float = 0.0):
        values = probabilities[indices]
        if use_mcut and len(values) >= 2:        # one value has no gap to cut at: keep the fixed threshold
            threshold = max(floor, mcut_threshold(values))
        chosen = [(tags.names[index], float(value)) for index, value in zip(indices, values)
                  if value > threshold and tag_key(tags.names[index]) not in excluded]
        # Stable: equal confidences keep the file's order, so a run is repeatable to the tag.
        return tuple(sorted(chosen, key=lambda pair: -pair[1]))

    rating = None
    if options.rating and len(tags.rating):
        best = tags.rating[int(np.argmax(probabilities[tags.rating]))]
        if tag_key(tags.names[best]) not in excluded:
            rating = (tags.names[best], float(probabilities[best]))
    return PictureTags(
        character=above(tags.character, options.character_threshold, options.mcut in ("character", "both"),
                        CHARACTER_MCUT_FLOOR),
        general=above(tags.general, options.general_threshold, options.mcut in ("general", "both")),
        rating=rating)

"""A WD14 tagger's tag list (``selected_tags.csv``) and how a tag name is written into a caption.

SmilingWolf's taggers ship one row per output of the model: ``tag_id,name,category,count``, with the
Danbooru categories 9 (rating: general / sensitive / questionable / explicit), 4 (character) and
0 (general). Names are Danbooru's: ``long_hair``, ``saber_(fate)``, ``^_^``.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass

import numpy as np

RATING, GENERAL, CHARACTER = 9, 0, 4
REQUIRED_COLUMNS = ("name", "category")

# Emoticons whose underscore is part of the face, never replaced by a space. The reference Space's list
# (https://huggingface.co/spaces/SmilingWolf/wd-tagger/blob/main/app.py, itself from toriato's
# stable-diffusion-webui-wd14-tagger tagger/ui.py).
KAOMOJIS = frozenset({
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
    "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
})


class TagListError(ValueError):
    """selected_tags.csv is missing, unreadable or not a tag list; the message names the file."""


@dataclass(frozen=True)
class TagList:
    names: tuple[str, ...]          # exactly as in the file, one per model output
    rating: np.ndarray              # indices of each category, in file order
    general: np.ndarray
    character: np.ndarray

    def __len__(self) -> int:
        return len(self.names)


def read_tag_list(path: str) -> TagList:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in REQUIRED_COLUMNS if column not in (reader.fieldnames or ())]
            if missing:
                raise TagListError(f"{path} has no {' or '.join(missing)} column (found: "
                                   f"{', '.join(reader.fieldnames or ()) or 'nothing'}); it is not a WD14 "
                                   f"selected_tags.csv (columns tag_id,name,category,count).")
            rows = [(row["name"], row["category"]) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise TagListError(f"Could not read {path} ({error}).") from error
    try:
        categories = np.array([int(category) for _, category in rows], dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise TagListError(f"{path} has a category that is not a number ({error}).") from None
    if not rows:
        raise TagListError(f"{path} lists no tags.")
    return TagList(names=tuple(name for name, _ in rows),
                   rating=np.flatnonzero(categories == RATING),
                   general=np.flatnonzero(categories == GENERAL),
                   character=np.flatnonzero(categories == CHARACTER))


def caption_form(name: str, replace_underscores: bool, escape_parentheses: bool) -> str:
    """``saber_(fate)`` -> ``saber \\(fate\\)``: spaces as people write prompts (faces like ``^_^`` kept), and
    parentheses escaped because ComfyUI's text encoder reads ``(word)`` as "more weight on word"; the trainer
    encodes captions through it, so an unescaped tag would train on a different text than it says."""
    if replace_underscores and name not in KAOMOJIS:
        name = name.replace("_", " ")
    if escape_parentheses:
        name = name.replace("(", r"\(").replace(")", r"\)")
    return name


_ESCAPED = re.compile(r"\\([()])")


def tag_key(text: str) -> str:
    """What makes two tags the same one: case, escaping, underscores and spacing do not count."""
    return " ".join(_ESCAPED.sub(r"\1", text).replace("_", " ").lower().split())

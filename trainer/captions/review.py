"""Captions reviewed by hand in the graph (the Review Captions node): the edits it keeps in the workflow,
applied to a dataset, and which caption files saving them may write.

The node's ``reviewed`` value is JSON, ``{"version": 1, "captions": {"<picture key>": "<caption>"}}``, holding
only the captions the user changed. They win over whatever arrives from upstream, so re-tagging or
re-captioning earlier in the graph cannot undo a review (a tag removed by hand stays removed). Pure: no
ComfyUI, no files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping

from ..data.dataset import MAX_CAPTION_BYTES, Dataset, clean_caption

VERSION = 1
MAX_REVIEWED_BYTES = 16 * 1024 * 1024      # 500 pictures x a long caption is ~100 KB; this is no review


class ReviewError(ValueError):
    """The reviewed value or a save request cannot be used; ``problem`` and ``fix`` are worded for the user."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem} Fix: {fix}")
        self.problem, self.fix = problem, fix


def parse_reviewed(text: str | None) -> dict[str, str]:
    """The reviewed captions by picture key; an empty value is no review."""
    if text is None or not str(text).strip():
        return {}
    if len(str(text).encode("utf-8", "surrogatepass")) > MAX_REVIEWED_BYTES:
        raise ReviewError(f"The reviewed captions are larger than {MAX_REVIEWED_BYTES // 2**20} MB.",
                          "Press 'Forget edits' on the node, or send a shorter value.")
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ReviewError(f"The reviewed captions are not valid JSON ({error}).",
                          "Press 'Forget edits' on the node (or send \"\" through the API) and review again.") from None
    if isinstance(value, dict) and "captions" in value:
        version = value.get("version", VERSION)
        if version != VERSION:
            raise ReviewError(f"The reviewed captions were saved by a newer LoRA Lab (format {version!r}).",
                              "Update LoRA Lab, or press 'Forget edits' and review again.")
        value = value["captions"]
    return checked_captions(value, "reviewed captions")


def checked_captions(value, what: str) -> dict[str, str]:
    """``value`` as {key: one-line caption}, or a ReviewError naming the first bad entry."""
    if not isinstance(value, Mapping):
        raise ReviewError(f"The {what} must be an object of picture name -> caption, not {type(value).__name__}.",
                          "Press 'Forget edits' on the node and review again.")
    captions = {}
    for key, caption in value.items():
        if not isinstance(caption, str):
            raise ReviewError(f"The {what} hold a {type(caption).__name__} for {str(key)[:80]!r}, not text.",
                              "Send each caption as a string.")
        if len(caption.encode("utf-8", "surrogatepass")) > MAX_CAPTION_BYTES:
            raise ReviewError(f"The caption for {str(key)[:80]!r} is longer than {MAX_CAPTION_BYTES // 1024} KB.",
                              "Shorten it: CLIP reads the first 77 tokens only.")
        captions[str(key)] = clean_caption(caption)
    return captions


def serialize_reviewed(captions: Mapping[str, str]) -> str:
    if not captions:
        return ""
    return json.dumps({"version": VERSION, "captions": dict(sorted(captions.items()))}, ensure_ascii=False)


@dataclass(frozen=True)
class ReviewOutcome:
    dataset: Dataset
    edited: tuple[str, ...] = ()           # keys whose caption came from the review and differs from upstream
    unchanged: tuple[str, ...] = ()        # reviewed, but upstream now says the same (e.g. after saving)
    unknown: tuple[str, ...] = ()          # reviewed pictures this dataset does not hold (renamed, removed)


def apply_reviewed(dataset: Dataset, reviewed: Mapping[str, str]) -> ReviewOutcome:
    keys = {item.key for item in dataset.items}
    captions, edited, unchanged = [], [], []
    for item in dataset.items:
        caption = reviewed.get(item.key, item.caption)
        if item.key in reviewed:
            (unchanged if caption == item.caption else edited).append(item.key)
        captions.append(caption)
    unknown = tuple(sorted(key for key in reviewed if key not in keys))
    return ReviewOutcome(dataset.with_captions(captions), tuple(edited), tuple(unchanged), unknown)


@dataclass
class SavePlan:
    """What saving a review writes: a dataset of the items to write (their new captions in place), and the
    items left out, each with why."""
    dataset: Dataset
    not_sent: list[str] = field(default_factory=list)       # items the request held no caption for
    shared: list[str] = field(default_factory=list)         # two pictures, one caption file, two different texts
    unknown: list[str] = field(default_factory=list)        # keys the dataset does not hold


def save_plan(dataset: Dataset, sent: Mapping[str, str]) -> SavePlan:
    """The items to write for a save request ``sent`` ({key: caption}, already checked). Pictures sharing one
    caption file (a.png and a.jpg -> a.txt) are written only when their captions agree: otherwise whichever
    came last would silently win."""
    keys = {item.key for item in dataset.items}
    chosen = [item for item in dataset.items if item.key in sent]
    texts_by_file: dict[str, set[str]] = {}
    for item in chosen:
        if item.caption_path:
            texts_by_file.setdefault(item.caption_path, set()).add(sent[item.key])
    clashing = {path for path, texts in texts_by_file.items() if len(texts) > 1}
    written = [item for item in chosen if item.caption_path not in clashing]
    plan_dataset = Dataset(items=tuple(written), root=dataset.root).with_captions([sent[item.key] for item in written])
    return SavePlan(dataset=plan_dataset,
                    not_sent=[item.key for item in dataset.items if item.key not in sent],
                    shared=[item.key for item in chosen if item.caption_path in clashing],
                    unknown=sorted(key for key in sent if key not in keys))

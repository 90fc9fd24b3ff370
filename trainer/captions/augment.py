"""Captions changed at train time, as kohya does it: caption dropout, tag shuffle, tag dropout.

Captions are comma-separated tags ("sks woman, red dress, smiling"). kohya's ``process_caption``:
with probability ``caption_dropout`` the whole caption becomes "" (the model learns the
unconditional case too); otherwise the first ``keep_tokens`` tags stay where they are (the trigger
word stays first), the rest are shuffled, then each of the rest is dropped with probability
``tag_dropout``. Kept tags are never dropped. Tags are re-joined with ", ".

Randomness comes from a ``random.Random``; ``caption_rng(seed, step, micro_batch, position)`` makes one from the
place in the run instead of from a running stream, so a resumed run gets the same captions without
replaying anything.

When ``varies(settings)`` is true the text embedding of a picture changes between steps, so the loop
cannot encode each caption once up front: it must encode the augmented captions per step.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

Encoding = TypeVar("Encoding")


@dataclass(frozen=True)
class CaptionAugment:
    caption_dropout: float = 0.0   # kohya --caption_dropout_rate: chance a caption becomes ""
    shuffle_tags: bool = False     # kohya --shuffle_caption
    keep_tokens: int = 0           # kohya --keep_tokens: leading comma-separated tags left in place
    tag_dropout: float = 0.0       # kohya --caption_tag_dropout_rate: chance each other tag is dropped

    def __post_init__(self):
        for name in ("caption_dropout", "tag_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {self.keep_tokens}")


def varies(settings: CaptionAugment) -> bool:
    """True when a picture's caption can differ between steps (so text embeddings cannot be cached once)."""
    return settings.caption_dropout > 0 or settings.tag_dropout > 0 or settings.shuffle_tags


def augment_caption(caption: str, settings: CaptionAugment, rng: random.Random) -> str:
    """One train-time version of ``caption``. Returns ``caption`` unchanged when nothing varies."""
    if not varies(settings):
        return caption
    # Draw the dropout decision first, always, so one draw per caption precedes the tag draws.
    if settings.caption_dropout > 0 and rng.random() < settings.caption_dropout:
        return ""
    if not (settings.shuffle_tags or settings.tag_dropout > 0):
        return caption
    tags = [tag.strip() for tag in caption.split(",")]
    tags = [tag for tag in tags if tag]
    fixed, flexible = tags[:settings.keep_tokens], tags[settings.keep_tokens:]
    if settings.shuffle_tags:
        rng.shuffle(flexible)
    if settings.tag_dropout > 0:
        flexible = [tag for tag in flexible if rng.random() >= settings.tag_dropout]
    return ", ".join(fixed + flexible)


def caption_rng(seed: int, step: int, micro_batch: int = 0, position: int = 0) -> random.Random:
    """The generator for caption ``position`` of micro-batch ``micro_batch`` in optimizer step ``step``.

    A string seed: Python hashes it with SHA-512, the same on every run and platform.
    """
    return random.Random(f"loralab-captions:{seed}:{step}:{micro_batch}:{position}")


def augment_batch(captions: Sequence[str], settings: CaptionAugment, seed: int, step: int,
                  micro_batch: int = 0) -> list[str]:
    """Train-time captions for one micro-batch: a fixed function of (seed, step, micro_batch, position)."""
    return [augment_caption(caption, settings, caption_rng(seed, step, micro_batch, position))
            for position, caption in enumerate(captions)]


class TextEncodingMemo(Generic[Encoding]):
    """``encode(caption)`` remembering the last ``max_entries`` results — for a frozen text encoder only.

    Varying captions defeat encoding each caption once, but "" (caption dropout) and, with dropout
    alone, the original captions recur; shuffled ones mostly do not, so the memo is small and LRU
    instead of growing by one embedding per step. With a text encoder being trained, call the encoder
    directly: its output changes every step and must keep its graph.
    """

    def __init__(self, encode: Callable[[str], Encoding], max_entries: int = 64):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.encode, self.max_entries = encode, max_entries
        self.hits = self.misses = 0
        self._entries: OrderedDict[str, Encoding] = OrderedDict()

    def __call__(self, caption: str) -> Encoding:
        if caption in self._entries:
            self.hits += 1
            self._entries.move_to_end(caption)
            return self._entries[caption]
        self.misses += 1
        encoding = self.encode(caption)
        self._entries[caption] = encoding
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return encoding

    def __len__(self) -> int:
        return len(self._entries)

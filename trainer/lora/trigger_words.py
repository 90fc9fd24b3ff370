"""The words that call up a LoRA: the ones its user wrote beside it (a ``<name>.txt`` sidecar, Civitai Helper's
``<name>.civitai.info``), then its metadata's (a stored trigger word, else its training tags)."""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Iterable

TRIGGER_TAGS_FROM_FREQUENCY = 3


def trigger_words(metadata: dict, max_tags: int = TRIGGER_TAGS_FROM_FREQUENCY) -> list[str]:
    """The words that call up a LoRA: its stored trigger word, else its most frequent training tags.

    ``loralab_trigger_word`` (ours) or ``modelspec.trigger_phrase`` when present; otherwise the
    ``max_tags`` most frequent tags of kohya's ``ss_tag_frequency`` summed over its folders.
    """
    for key in ("loralab_trigger_word", "modelspec.trigger_phrase"):
        value = (metadata.get(key) or "").strip()
        if value:
            return [value]
    return [tag for tag, _ in trained_tags(metadata, max_tags)]


def trained_tags(metadata: dict, limit: int = 50) -> list[tuple[str, int]]:
    """kohya's ``ss_tag_frequency`` summed over its folders, most frequent first: what A1111 and Civitai show
    as a LoRA's training tags. Ties keep the order the file lists them in."""
    try:
        by_folder = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except ValueError:
        return []
    counts: Counter = Counter()
    if isinstance(by_folder, dict):
        for tags in by_folder.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    if isinstance(count, (int, float)) and str(tag).strip():
                        counts[str(tag).strip()] += count
    return [(tag, int(count)) for tag, count in counts.most_common(limit)]


def join_words(words: Iterable[str]) -> str:
    seen, kept = set(), []
    for word in words:
        if word and word.lower() not in seen:
            seen.add(word.lower())
            kept.append(word)
    return ", ".join(kept)


SIDECAR_BYTES = 64 * 1024       # a trigger-word file is a line or two; anything bigger is not one


def sidecar_words(lora_path: str) -> list[str]:
    """The trigger words written beside a LoRA file, in the order written: ``<name>.txt`` (words separated by
    commas or lines, as LoRA managers and Civitai downloads leave them) and ``<name>.civitai.info``'s
    ``trainedWords`` (Civitai Helper). Missing, unreadable, oversized or malformed files give no words."""
    stem = os.path.splitext(lora_path)[0]
    words = [word.strip() for word in re.split(r"[,\n]", _small_text(stem + ".txt") or "") if word.strip()]
    try:
        info = json.loads(_small_text(stem + ".civitai.info") or "{}")
    except ValueError:
        info = {}
    trained = info.get("trainedWords") if isinstance(info, dict) else None
    if isinstance(trained, list):
        words += [word.strip() for entry in trained if isinstance(entry, str)
                  for word in entry.split(",") if word.strip()]
    return words


def _small_text(path: str) -> str | None:
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > SIDECAR_BYTES:
            return None
        with open(path, encoding="utf-8", errors="replace") as text:
            return text.read()
    except OSError:
        return None


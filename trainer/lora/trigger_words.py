"""The words that call up a LoRA, read from its metadata: a stored trigger word, else its training tags."""
from __future__ import annotations

import json
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

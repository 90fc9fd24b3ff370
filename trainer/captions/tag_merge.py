"""A picture's caption once a tagger has spoken: the existing caption (usually BLIP's sentence) and the
tags, combined one of three ways, then the tags that always go first (the trigger word)."""
from __future__ import annotations

from typing import Sequence

from .edits import join_tags, put_trigger_first, split_tags
from .wd14_labels import tag_key

SENTENCE_THEN_TAGS, TAGS_ONLY, SENTENCE_ONLY = "BLIP sentence, then tags", "tags only", "BLIP only"
MERGES = (SENTENCE_THEN_TAGS, TAGS_ONLY, SENTENCE_ONLY)


def merged_caption(existing: str, tags: Sequence[str], merge: str, first_tags: str = "") -> str:
    """- "BLIP sentence, then tags": the existing caption, then each tag it does not hold yet (so tagging
      twice adds nothing the second time);
    - "tags only": the tags; the existing caption is dropped;
    - "BLIP only": the existing caption as it is (the tags only feed the report).
    ``first_tags`` then go first, once, as the Caption node puts its trigger word."""
    if merge not in MERGES:
        raise ValueError(f"unknown merge {merge!r}; expected one of {', '.join(MERGES)}")
    kept = split_tags(existing)
    if merge == TAGS_ONLY:
        parts = _unique(tags)
    elif merge == SENTENCE_ONLY:
        parts = kept
    else:
        present = {tag_key(tag) for tag in kept}
        parts = kept + [tag for tag in _unique(tags) if tag_key(tag) not in present]
    return put_trigger_first(join_tags(parts), first_tags)


def _unique(tags: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    return [tag for tag in tags if not (tag_key(tag) in seen or seen.add(tag_key(tag)))]

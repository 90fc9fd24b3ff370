"""How many pictures carry each tag: the numbers kohya stores as ``ss_tag_frequency``, for the whole dataset.

The counting is kohya_metadata's own (``picture_folders`` + ``tag_frequency``, what Train LoRA writes into
the LoRA), summed over the folders. One difference, on purpose: a tag written twice in one caption counts
once here (kohya would count it twice), so every count is a number of pictures and a share never passes 100%.

Tags on nearly every picture are worth a look before training: whatever is always there gets learned as
part of the trigger word, so removing a tag like "1girl, blue eyes" from every caption makes the LoRA
produce it from the trigger word alone (and keeping it makes that trait promptable instead).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..training.kohya_metadata import picture_folders, tag_frequency
from .edits import join_tags
from .wd14_labels import tag_key

COMMON_SHARE = 0.9


@dataclass(frozen=True)
class TagCount:
    tag: str            # lower-cased and trimmed, as kohya keys it
    pictures: int
    share: float        # pictures / all pictures of the dataset


def count_tags(dataset) -> list[TagCount]:
    """Every tag of the dataset's captions, most frequent first (ties: alphabetical)."""
    by_folder = {folder: [_once_each(item.caption) for item in items]
                 for folder, items in picture_folders(dataset).items()}
    totals: Counter = Counter()
    for counts in tag_frequency(by_folder).values():
        totals.update(counts)
    pictures = len(dataset.items)
    return [TagCount(tag, count, count / pictures if pictures else 0.0)
            for tag, count in sorted(totals.items(), key=lambda pair: (-pair[1], pair[0]))]


def common_tags(counts: list[TagCount], share: float = COMMON_SHARE, trigger: str = "") -> list[TagCount]:
    """Tags on at least ``share`` of the pictures, the trigger word's own tags left out (they belong there)."""
    triggers = {tag_key(part) for part in trigger.split(",") if part.strip()}
    return [count for count in counts if count.share >= share and tag_key(count.tag) not in triggers]


def describe(counts: list[TagCount], pictures: int, share: float = COMMON_SHARE, trigger: str = "",
             listed: int = 30) -> str:
    lines = [f"{pictures} picture(s), {len(counts)} distinct tag(s)."]
    if not counts:
        return lines[0] + " No captions to count: caption or tag the dataset first."
    common = common_tags(counts, share, trigger)
    if common:
        lines.append(f"On {share:.0%} or more of the pictures ({len(common)}): "
                     f"{', '.join(count.tag for count in common)}.")
        lines.append("Prune these so they bind to the trigger word: a trait every caption names stays a "
                     "promptable tag; one no caption names is learned as part of the trigger word.")
    else:
        lines.append(f"No tag is on {share:.0%} or more of the pictures (trigger word aside).")
    lines.append("Most frequent (pictures, share):")
    lines += [f"  {count.tag}: {count.pictures} ({count.share:.0%})" for count in counts[:listed]]
    if len(counts) > listed:
        lines.append(f"  ... and {len(counts) - listed} more")
    return "\n".join(lines)


def _once_each(caption: str) -> str:
    """The caption with a repeated tag (same after kohya's strip and lower-case) written once."""
    seen: set[str] = set()
    kept = [tag for tag in caption.split(",")
            if tag.strip() and not (tag.strip().lower() in seen or seen.add(tag.strip().lower()))]
    return join_tags(kept)

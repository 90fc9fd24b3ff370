"""The tag frequency of a dataset as a horizontal bar chart: one bar per tag, most frequent on top, tags on
(nearly) every picture in orange, the trigger word's in a dark blue, everything else light blue."""
from __future__ import annotations

from PIL import Image, ImageDraw

from ..fonts import drawable, fit, label_font
from .tag_frequency import COMMON_SHARE, TagCount, common_tags
from .wd14_labels import tag_key

BACKGROUND, TEXT, MUTED = (255, 255, 255), (30, 30, 30), (110, 110, 110)
BAR, COMMON, TRIGGER = (150, 185, 230), (230, 120, 20), (20, 80, 180)   # orange vs blues: apart for colour-blind eyes
ROW, MARGIN = 22, 14


def tag_chart(counts: list[TagCount], pictures: int, share: float = COMMON_SHARE, trigger: str = "",
              max_tags: int = 40, width: int = 800) -> Image.Image:
    shown = counts[:max_tags]
    title_font, font = label_font(17), label_font(13)
    header = MARGIN + 24 + 20 + 10
    footer = 22 if len(counts) > len(shown) else 0
    height = header + max(1, len(shown)) * ROW + footer + MARGIN
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)

    title = f"Tag frequency - {pictures} picture(s), {len(counts)} distinct tag(s)"
    draw.text((MARGIN, MARGIN), fit(draw, title, title_font, width - 2 * MARGIN), font=title_font, fill=TEXT)
    _legend(draw, font, MARGIN, MARGIN + 26, width, share)
    if not shown:
        draw.text((MARGIN, header), drawable("No captions to count: caption or tag the dataset first.", font),
                  font=font, fill=MUTED)
        return image

    common = {count.tag for count in common_tags(counts, share, trigger)}
    triggers = {tag_key(part) for part in trigger.split(",") if part.strip()}
    label_width = int(width * 0.34)
    number_width = draw.textlength("9999 (100%)", font=font) + 8
    bar_left, bar_right = MARGIN + label_width + 8, width - MARGIN - number_width
    most = max(count.pictures for count in shown)
    for row, count in enumerate(shown):
        top = header + row * ROW
        color = TRIGGER if tag_key(count.tag) in triggers else COMMON if count.tag in common else BAR
        length = max(1, round((bar_right - bar_left) * count.pictures / most))
        draw.rectangle([bar_left, top + 3, bar_left + length, top + ROW - 4], fill=color)
        draw.text((MARGIN, top + 3), fit(draw, count.tag, font, label_width), font=font, fill=TEXT)
        draw.text((bar_left + length + 6, top + 3), f"{count.pictures} ({count.share:.0%})", font=font, fill=MUTED)
    if footer:
        more = f"... and {len(counts) - len(shown)} more tag(s), each on {shown[-1].pictures} picture(s) or fewer"
        draw.text((MARGIN, header + len(shown) * ROW + 4), fit(draw, more, font, width - 2 * MARGIN), font=font,
                  fill=MUTED)
    return image


def _legend(draw, font, left: int, top: int, width: int, share: float) -> None:
    entries = [(COMMON, f"on {share:.0%}+ of pictures: prune these so they bind to the trigger word"),
               (TRIGGER, "trigger word")]
    x = left
    for color, text in entries:
        draw.rectangle([x, top + 3, x + 12, top + 15], fill=color)
        label = fit(draw, text, font, width - MARGIN - x - 20)
        draw.text((x + 18, top + 1), label, font=font, fill=TEXT)
        x += 18 + int(draw.textlength(label, font=font)) + 18

"""The font the pack's pictures are labelled with (contact sheet, grids, loss curve), and text it can draw.

Pillow's built-in font (Aileron) has no accented letters: "pic é 1.png" would show a box. A font with
wide coverage found on the machine is used first (DejaVu/Noto/Liberation on Linux, Segoe UI/Arial on
Windows, Arial Unicode/Helvetica on macOS, DejaVu from an installed matplotlib); whatever the font, a
character it lacks is drawn as its base letter (é -> e) or "?", never as a box.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import unicodedata
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    os.path.join(os.environ.get("WINDIR", "C:\\Windows"), "Fonts", "segoeui.ttf"),
    os.path.join(os.environ.get("WINDIR", "C:\\Windows"), "Fonts", "arial.ttf"),
    "/System/Library/Fonts/Supplemental/Arial Unicode.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
    "/System/Library/Fonts/Helvetica.ttc",
)
# A private-use character no label font draws: what a missing glyph (the font's "notdef" box) looks like.
_NOT_A_GLYPH = "\U0010FFFD"


def font_files() -> list[str]:
    """Font files to try, best coverage first; matplotlib, when installed, ships DejaVu Sans."""
    files = list(_CANDIDATES)
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.origin:
        files.append(str(Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"))
    return files


@functools.lru_cache(maxsize=32)
def label_font(size: int):
    for path in font_files():
        if os.path.isfile(path):
            try:
                return ImageFont.truetype(path, size)
            except OSError:
                continue
    try:
        return ImageFont.load_default(size=size)   # Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


# Typographic characters Pillow's own font lacks, and what to draw instead.
_PLAIN = {"…": "...", "→": "->", "×": "x", "–": "-", "—": "-", "·": "-"}


def drawable(text: str, font) -> str:
    """`text` with each character the font cannot draw replaced by a plain one (é -> e, … -> ...), else "?"."""
    if not isinstance(font, ImageFont.FreeTypeFont):     # old Pillow's bitmap font: Latin-1, else it raises
        return "".join(_PLAIN.get(ch, ch) for ch in str(text)).encode("latin-1", "replace").decode("latin-1")
    return "".join(ch if ch.isspace() or has_glyph(font, ch) else _stand_in(ch, font) for ch in str(text))


def text_width(draw, text: str, font) -> float:
    return draw.textlength(drawable(text, font), font=font)


def fit(draw, text: str, font, width: float) -> str:
    """The text as drawable, cut with an ellipsis when it is wider than `width` pixels."""
    text = drawable(text, font)
    if draw.textlength(text, font=font) <= width:
        return text
    ellipsis = drawable("…", font)
    while text and draw.textlength(text + ellipsis, font=font) > width:
        text = text[:-1]
    return text.rstrip() + ellipsis


# Where a word too long for a line may break: after these, as file names and LoRA names are written.
_BREAK_AFTER = re.compile(r"[^_\-./,:]+[_\-./,:]*|[_\-./,:]+")


def wrap(draw, text: str, font, max_width: float, max_lines: int) -> list[str]:
    """Greedy word wrap, as drawable text. A word wider than a line ("my_first_lora.safetensors") breaks
    after '_', '-', '.', '/', ',' or ':' and is cut between letters only where it has none of them; the
    last line ends in an ellipsis when text is left over."""
    def fits(candidate: str) -> bool:
        return draw.textlength(candidate, font=font) <= max_width

    pieces: list[tuple[str, str]] = []       # (text, what joins it to the piece before: " " or "")
    for word in drawable(" ".join(str(text).split()), font).split(" "):
        for number, part in enumerate(_parts_that_fit(word, fits)):
            pieces.append((part, "" if number else " "))
    lines: list[str] = []
    current = ""
    for part, glue in pieces:
        candidate = f"{current}{glue}{part}" if current else part
        if fits(candidate):
            current = candidate
        else:
            lines.append(current)
            current = part
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines, ellipsis = lines[:max_lines], drawable("…", font)
        last = lines[-1]
        while last and not fits(last + ellipsis):
            last = last[:-1]
        lines[-1] = last.rstrip() + ellipsis
    return lines


def _parts_that_fit(word: str, fits) -> list[str]:
    if fits(word):
        return [word]
    parts = []
    for chunk in _BREAK_AFTER.findall(word) or [word]:
        while not fits(chunk) and len(chunk) > 1:       # no break point left: cut between letters
            cut = len(chunk) - 1
            while cut > 1 and not fits(chunk[:cut]):
                cut -= 1
            parts.append(chunk[:cut])
            chunk = chunk[cut:]
        parts.append(chunk)
    return parts


def has_glyph(font, ch: str) -> bool:
    return _rendered(font, ch) != _rendered(font, _NOT_A_GLYPH)


def _stand_in(ch: str, font) -> str:
    base = _PLAIN.get(ch) or "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
    return base if base and base != ch and all(has_glyph(font, c) for c in base) else "?"


@functools.lru_cache(maxsize=4096)
def _rendered(font, ch: str) -> bytes:
    size = getattr(font, "size", 12) or 12
    canvas = Image.new("L", (2 * size + 4, 2 * size + 4))
    ImageDraw.Draw(canvas).text((2, 2), ch, font=font, fill=255)
    return canvas.tobytes()

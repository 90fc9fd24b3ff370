"""Labels drawn on the pack's pictures: every character drawable (never the font's missing-glyph box),
and long names broken where they have a break point, not mid-word."""
import pytest
from PIL import Image, ImageDraw, ImageFont

from lora_lab.trainer import fonts

NAME = "pic é 1.png"


@pytest.fixture
def draw():
    return ImageDraw.Draw(Image.new("RGB", (8, 8)))


def pillows_own_font():
    try:
        return ImageFont.load_default(size=14)       # Aileron: no accented letters
    except TypeError:
        pytest.skip("this Pillow has no scalable built-in font")


def test_a_font_without_accents_draws_the_base_letter_not_a_box():
    font = pillows_own_font()
    assert not fonts.has_glyph(font, "é"), "the premise: Pillow's own font lacks é"
    assert fonts.drawable(NAME, font) == "pic e 1.png"
    assert fonts.drawable("a → b × c", font) == "a -> b x c"
    assert fonts.drawable("中", font) == "?"


def test_the_label_font_draws_every_character_of_a_unicode_file_name():
    font = fonts.label_font(14)
    shown = fonts.drawable(NAME, font)
    assert all(ch.isspace() or fonts.has_glyph(font, ch) for ch in shown), shown
    if fonts.has_glyph(font, "é"):       # a font with accents was found on this machine (DejaVu on Linux)
        assert shown == NAME


def test_long_names_break_after_separators_not_mid_word(draw):
    font = fonts.label_font(14)
    width = draw.textlength("my_first_lora.", font=font) + 1
    text = "pedal 1: my_first_lora.safetensors"
    lines = fonts.wrap(draw, text, font, width, 5)
    assert len(lines) > 2 and all(draw.textlength(line, font=font) <= width for line in lines), lines
    position = 0
    for line in lines[:-1]:       # each break is at a space or right after '_' '.' ':'
        position = text.index(line, position) + len(line)
        assert text[position] == " " or text[position - 1] in "_.:", (lines, position)


def test_a_word_without_break_points_is_cut_and_overflow_ends_in_an_ellipsis(draw):
    font = fonts.label_font(14)
    width = draw.textlength("abcdefgh", font=font)
    lines = fonts.wrap(draw, "abcdefghijklmnopqrstuvwxyz and more words", font, width, 2)
    assert len(lines) == 2 and lines[0] == "abcdefgh" and lines[1].endswith(fonts.drawable("…", font)), lines
    assert all(draw.textlength(line, font=font) <= width for line in lines), lines

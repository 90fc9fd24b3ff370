"""From probabilities to a picture's tags: thresholds, categories, order, MCut, exclusions, the written form.

The expected values follow SmilingWolf's reference Space (wd-tagger app.py, ``predict`` and
``mcut_threshold``), transcribed below where a test compares against it.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lora_lab.trainer.captions.wd14_labels import (CHARACTER, GENERAL, KAOMOJIS, RATING, TagListError,
                                                   caption_form, read_tag_list, tag_key)
from lora_lab.trainer.captions.wd14_select import PictureTags, TagOptions, mcut_threshold, select_tags
from tagger_models import write_tag_list

NAMES = ("general", "sensitive", "questionable", "explicit",            # 0-3 rating
         "1girl", "long_hair", "^_^", "star_(symbol)", "smile", "solo",  # 4-9 general
         "hatsune_miku", "saber_(fate)")                                 # 10-11 character
CATEGORIES = (RATING,) * 4 + (GENERAL,) * 6 + (CHARACTER,) * 2


@pytest.fixture(scope="module")
def tags(tmp_path_factory):
    path = tmp_path_factory.mktemp("tags") / "selected_tags.csv"
    write_tag_list(path, list(zip(NAMES, CATEGORIES)))
    return read_tag_list(str(path))


def probs(**values):
    row = np.zeros(len(NAMES), dtype=np.float32)
    for name, value in values.items():
        row[NAMES.index(name)] = value
    return row


def names(picture: PictureTags):
    return [name for name, _ in picture.character + picture.general] + ([picture.rating[0]] if picture.rating else [])


def reference_mcut_threshold(probs):
    """Transcribed from the reference Space's app.py."""
    sorted_probs = probs[probs.argsort()[::-1]]
    difs = sorted_probs[:-1] - sorted_probs[1:]
    t = difs.argmax()
    thresh = (sorted_probs[t] + sorted_probs[t + 1]) / 2
    return thresh


# --- the tag list -----------------------------------------------------------------------------------
def test_tag_list_reads_categories_from_the_real_columns(tags):
    assert tags.names == NAMES and len(tags) == len(NAMES)
    assert tags.rating.tolist() == [0, 1, 2, 3]
    assert tags.general.tolist() == [4, 5, 6, 7, 8, 9]
    assert tags.character.tolist() == [10, 11]


def test_tag_list_errors_name_the_file(tmp_path):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("id,label\n1,cat\n", encoding="utf-8")
    with pytest.raises(TagListError, match=r"wrong\.csv.*no name or category column"):
        read_tag_list(str(wrong))
    with pytest.raises(TagListError, match="Could not read"):
        read_tag_list(str(tmp_path / "absent.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("tag_id,name,category,count\n1,cat,x,3\n", encoding="utf-8")
    with pytest.raises(TagListError, match="not a number"):
        read_tag_list(str(bad))


# --- thresholds and categories -----------------------------------------------------------------------
def test_thresholds_are_strict_and_per_category(tags):
    row = probs(**{"1girl": 0.36, "long_hair": 0.34, "smile": 0.9, "hatsune_miku": 0.86, "saber_(fate)": 0.84})
    picture = select_tags(row, tags, TagOptions())
    assert names(picture) == ["hatsune_miku", "smile", "1girl"]
    assert picture.rating is None                                     # off by default
    # Strictly above, as the reference's `x[1] > thresh` (values exact in float32 here).
    row = probs(**{"1girl": 0.375, "smile": 0.5, "hatsune_miku": 0.875})
    assert names(select_tags(row, tags, TagOptions(general_threshold=0.375, character_threshold=0.875))) == ["smile"]


def test_character_tags_use_their_own_threshold(tags):
    row = probs(hatsune_miku=0.5, smile=0.5)
    assert names(select_tags(row, tags, TagOptions(character_threshold=0.4))) == ["hatsune_miku", "smile"]
    assert names(select_tags(row, tags, TagOptions(general_threshold=0.6, character_threshold=0.4))) == ["hatsune_miku"]


def test_rating_is_the_most_likely_one_and_goes_last(tags):
    row = probs(general=0.2, sensitive=0.7, questionable=0.1, smile=0.9, hatsune_miku=0.95)
    picture = select_tags(row, tags, TagOptions(rating=True))
    assert picture.rating == ("sensitive", pytest.approx(0.7))
    assert picture.caption_tags(TagOptions()) == ["hatsune miku", "smile", "sensitive"]


def test_tags_are_ordered_by_confidence_characters_first(tags):
    row = probs(**{"1girl": 0.5, "long_hair": 0.99, "smile": 0.7, "solo": 0.7, "saber_(fate)": 0.9,
                   "hatsune_miku": 0.95})
    picture = select_tags(row, tags, TagOptions())
    assert [name for name, _ in picture.general] == ["long_hair", "smile", "solo", "1girl"]   # ties: file order
    assert [name for name, _ in picture.character] == ["hatsune_miku", "saber_(fate)"]
    assert picture.caption_tags(TagOptions()) == ["hatsune miku", r"saber \(fate\)", "long hair", "smile", "solo",
                                                  "1girl"]


def test_probabilities_must_match_the_tag_list(tags):
    with pytest.raises(ValueError, match="expected 12 probabilities"):
        select_tags(np.zeros(5), tags, TagOptions())
    with pytest.raises(ValueError, match="mcut"):
        TagOptions(mcut="sometimes")


# --- MCut ------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1, width=32), min_size=2, max_size=40))
def test_mcut_equals_the_reference(values):
    array = np.array(values, dtype=np.float32)
    assert mcut_threshold(array) == pytest.approx(float(reference_mcut_threshold(array)), abs=0)


def test_mcut_cuts_at_the_widest_gap(tags):
    # general probabilities 0.95, 0.9, 0.3, 0.25, 0.2, 0: the widest gap is 0.9 -> 0.3, so the cut is 0.6.
    row = probs(**{"1girl": 0.95, "long_hair": 0.9, "^_^": 0.3, "star_(symbol)": 0.25, "smile": 0.2})
    assert names(select_tags(row, tags, TagOptions())) == ["1girl", "long_hair"]     # fixed 0.35 says the same
    row = probs(**{"1girl": 0.95, "long_hair": 0.9, "^_^": 0.85, "star_(symbol)": 0.8, "smile": 0.1})
    picture = select_tags(row, tags, TagOptions(general_threshold=0.99, mcut="general"))
    assert names(picture) == ["1girl", "long_hair", "^_^", "star_(symbol)"]        # cut at (0.8 + 0.1) / 2


def test_character_mcut_never_goes_below_the_reference_floor(tags):
    # Two characters at 0.12 and 0.02: MCut alone would cut at 0.07; the reference keeps 0.15 at least.
    row = probs(**{"hatsune_miku": 0.12, "saber_(fate)": 0.02})
    assert names(select_tags(row, tags, TagOptions(character_threshold=0.99, mcut="character"))) == []
    row = probs(**{"hatsune_miku": 0.6, "saber_(fate)": 0.02})
    assert names(select_tags(row, tags, TagOptions(character_threshold=0.99, mcut="both"))) == ["hatsune_miku"]


def test_mcut_choice_applies_to_its_category_only(tags):
    row = probs(**{"1girl": 0.3, "smile": 0.05, "hatsune_miku": 0.6})
    assert names(select_tags(row, tags, TagOptions(mcut="general"))) == ["1girl"]          # character: 0.85 fixed
    assert names(select_tags(row, tags, TagOptions(mcut="character"))) == ["hatsune_miku"]  # general: 0.35 fixed


# --- exclusions and the written form -------------------------------------------------------------------
def test_exclusions_ignore_case_underscores_and_escaping(tags):
    row = probs(**{"1girl": 0.9, "long_hair": 0.9, "star_(symbol)": 0.9, "saber_(fate)": 0.9, "general": 0.9})
    options = TagOptions(exclude=r"LONG HAIR, star \(symbol\), saber_(fate), General", rating=True)
    assert names(select_tags(row, tags, options)) == ["1girl"]


def test_underscores_become_spaces_except_in_faces():
    assert caption_form("long_hair", True, False) == "long hair"
    assert caption_form("long_hair", False, False) == "long_hair"
    for face in KAOMOJIS:
        assert caption_form(face, True, False) == face
    assert caption_form("^_^", True, False) == "^_^" and caption_form("x_x", True, False) == "x_x"


def test_parentheses_are_escaped_for_comfyui_prompts():
    assert caption_form("saber_(fate)", True, True) == r"saber \(fate\)"
    assert caption_form("saber_(fate)", False, True) == r"saber_\(fate\)"
    assert caption_form("saber_(fate)", True, False) == "saber (fate)"
    # As the reference's final .replace("(", r"\(").replace(")", r"\)"): faces with parentheses too.
    assert caption_form("(o)_(o)", True, True) == r"\(o\)_\(o\)"


def test_tag_key_treats_written_forms_alike():
    assert tag_key(r"Saber \(Fate\)") == tag_key("saber_(fate)") == tag_key(" saber  (fate) ") == "saber (fate)"

"""Tags merged with the existing (BLIP) caption: the three merges, first tags, and tagging twice."""
import pytest

from lora_lab.trainer.captions.tag_merge import MERGES, SENTENCE_ONLY, SENTENCE_THEN_TAGS, TAGS_ONLY, merged_caption

SENTENCE = "a woman in a red dress standing on a street"
TAGS = ["1girl", "red dress", r"saber \(fate\)", "outdoors"]


def test_sentence_then_tags_keeps_the_caption_first():
    assert merged_caption(SENTENCE, TAGS, SENTENCE_THEN_TAGS) == \
        f"{SENTENCE}, 1girl, red dress, saber \\(fate\\), outdoors"


def test_sentence_then_tags_adds_only_tags_the_caption_lacks():
    existing = "ohwx, a woman, Red_Dress, saber (fate)"
    assert merged_caption(existing, TAGS, SENTENCE_THEN_TAGS) == \
        "ohwx, a woman, Red_Dress, saber (fate), 1girl, outdoors"


def test_tagging_twice_adds_nothing_the_second_time():
    once = merged_caption(SENTENCE, TAGS, SENTENCE_THEN_TAGS, "ohwx")
    assert merged_caption(once, TAGS, SENTENCE_THEN_TAGS, "ohwx") == once


def test_tags_only_drops_the_caption():
    assert merged_caption(SENTENCE, TAGS, TAGS_ONLY) == r"1girl, red dress, saber \(fate\), outdoors"
    assert merged_caption(SENTENCE, [], TAGS_ONLY) == ""


def test_blip_only_keeps_the_caption():
    assert merged_caption(SENTENCE, TAGS, SENTENCE_ONLY) == SENTENCE
    assert merged_caption("", TAGS, SENTENCE_ONLY) == ""


@pytest.mark.parametrize("merge", MERGES)
def test_first_tags_go_first_once_in_every_merge(merge):
    caption = merged_caption("1girl, a woman, OHWX", TAGS, merge, first_tags="ohwx, sks style")
    parts = caption.split(", ")
    assert parts[:2] == ["ohwx", "sks style"]
    assert [part.lower() for part in parts].count("ohwx") == 1


def test_a_sentence_without_tags_stays_as_it_was():
    assert merged_caption(SENTENCE, [], SENTENCE_THEN_TAGS) == SENTENCE
    assert merged_caption("", TAGS, SENTENCE_THEN_TAGS) == r"1girl, red dress, saber \(fate\), outdoors"


def test_duplicate_tags_are_written_once():
    assert merged_caption("", ["smile", "Smile", "long_hair", "long hair"], TAGS_ONLY) == "smile, long_hair"


def test_unknown_merge_is_refused():
    with pytest.raises(ValueError, match="unknown merge"):
        merged_caption(SENTENCE, TAGS, "tags first")

"""trainer.caption_augment: kohya's caption dropout, tag shuffle with keep_tokens, tag dropout."""
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lora_lab.trainer.captions.augment import (CaptionAugment, TextEncodingMemo, augment_batch, augment_caption,
                                              caption_rng, varies)

CAPTION = "sks woman, red dress, smiling, outdoors, looking at viewer, sunlight"
TAGS = [t.strip() for t in CAPTION.split(",")]


def test_varies_only_when_captions_can_change():
    assert not varies(CaptionAugment())
    assert not varies(CaptionAugment(keep_tokens=2))
    assert varies(CaptionAugment(caption_dropout=0.1))
    assert varies(CaptionAugment(shuffle_tags=True))
    assert varies(CaptionAugment(tag_dropout=0.05))


def test_nothing_varies_means_the_caption_is_untouched():
    odd = " sks,  red dress ,, "
    assert augment_caption(odd, CaptionAugment(keep_tokens=1), random.Random(0)) is odd


def test_shuffle_keeps_the_first_n_tags_in_place_and_every_tag():
    settings = CaptionAugment(shuffle_tags=True, keep_tokens=1)
    orders = set()
    for seed in range(50):
        tags = augment_caption(CAPTION, settings, random.Random(seed)).split(", ")
        assert tags[0] == "sks woman" and sorted(tags) == sorted(TAGS)
        orders.add(tuple(tags))
    assert len(orders) > 20
    two = augment_caption(CAPTION, CaptionAugment(shuffle_tags=True, keep_tokens=2), random.Random(3)).split(", ")
    assert two[:2] == TAGS[:2]


def test_keep_tokens_zero_shuffles_everything_and_more_than_all_keeps_all():
    firsts = {augment_caption(CAPTION, CaptionAugment(shuffle_tags=True), random.Random(s)).split(", ")[0]
              for s in range(50)}
    assert len(firsts) > 1
    assert augment_caption(CAPTION, CaptionAugment(shuffle_tags=True, keep_tokens=10), random.Random(0)) == CAPTION


def test_caption_dropout_empties_about_that_share_of_captions():
    settings = CaptionAugment(caption_dropout=0.3)
    results = [augment_caption(CAPTION, settings, random.Random(s)) for s in range(2000)]
    empty = results.count("")
    assert 500 < empty < 700
    assert set(results) == {"", CAPTION}                # otherwise untouched: no shuffle asked for
    assert augment_caption(CAPTION, CaptionAugment(caption_dropout=1.0), random.Random(0)) == ""


def test_tag_dropout_never_drops_kept_tags():
    settings = CaptionAugment(tag_dropout=1.0, keep_tokens=1)
    assert augment_caption(CAPTION, settings, random.Random(0)) == "sks woman"
    settings = CaptionAugment(tag_dropout=0.5, keep_tokens=1)
    lengths = set()
    for seed in range(200):
        tags = augment_caption(CAPTION, settings, random.Random(seed)).split(", ")
        assert tags[0] == "sks woman"
        # Without shuffle the surviving tags keep their order.
        assert tags == [t for t in TAGS if t in tags]
        lengths.add(len(tags))
    assert min(lengths) == 1 and max(lengths) == len(TAGS)


def test_empty_tags_from_stray_commas_are_dropped_when_tags_are_processed():
    result = augment_caption("sks, , red dress,", CaptionAugment(shuffle_tags=True, keep_tokens=1), random.Random(0))
    assert result == "sks, red dress"


def test_batches_are_a_fixed_function_of_seed_step_and_position():
    settings = CaptionAugment(caption_dropout=0.1, shuffle_tags=True, keep_tokens=1, tag_dropout=0.1)
    captions = [CAPTION, CAPTION, "sks man, hat, beard"]
    first = augment_batch(captions, settings, seed=5, step=12, micro_batch=1)
    assert first == augment_batch(captions, settings, seed=5, step=12, micro_batch=1)
    assert first[0] != first[1] or first[0] == ""     # same caption, other position: another draw
    other_steps = {tuple(augment_batch(captions, settings, seed=5, step=s)) for s in range(20)}
    other_seeds = {tuple(augment_batch(captions, settings, seed=s, step=12)) for s in range(20)}
    assert len(other_steps) > 10 and len(other_seeds) > 10
    assert augment_batch(captions, CaptionAugment(), 5, 12) == captions


def test_caption_rng_is_the_same_in_another_process_with_another_hash_seed():
    module = Path(__file__).resolve().parents[3] / "trainer" / "captions" / "augment.py"
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('ca', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['ca'] = m; spec.loader.exec_module(m); "
            "print(m.caption_rng(9, 3, 1, 2).random())")
    runs = {subprocess.run([sys.executable, "-c", code, str(module)], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert runs == {repr(caption_rng(9, 3, 1, 2).random())}


@pytest.mark.parametrize("kwargs", [dict(caption_dropout=1.5), dict(tag_dropout=-0.1), dict(keep_tokens=-1)])
def test_settings_refuse_nonsense(kwargs):
    with pytest.raises(ValueError):
        CaptionAugment(**kwargs)


def test_text_encoding_memo_is_a_small_lru():
    calls = []

    def encode(caption):
        calls.append(caption)
        return f"<{caption}>"

    memo = TextEncodingMemo(encode, max_entries=2)
    assert [memo(c) for c in ("", "a", "", "b", "", "a")] == ["<>", "<a>", "<>", "<b>", "<>", "<a>"]
    # "" stays recent and is encoded once; "a" fell out when "b" came in and is encoded again.
    assert calls == ["", "a", "b", "a"] and (memo.hits, memo.misses) == (2, 4) and len(memo) == 2
    with pytest.raises(ValueError):
        TextEncodingMemo(encode, max_entries=0)

"""Caption edits (modes, trigger word, find/replace, tag removal) and writing .txt sidecars safely."""
import os
import stat

import pytest
from hypothesis import given, settings, strategies as st

from lora_lab.trainer.captions import edits as ce
from lora_lab.trainer.captions.edits import CaptionEdits
from lora_lab.trainer.data.folder_scan import scan_folder

# Caption-like text: words, commas, stray spaces and newlines.
words = st.sampled_from(["a", "cat", "Cat", "red car", "ohwx", "OHWX", "1,000", "on the grass", "", " ", ",", "\n"])
captions = st.lists(words, max_size=12).map(lambda parts: ", ".join(parts) if len(parts) % 2 else " ".join(parts))
tag_text = st.text(alphabet=st.characters(blacklist_characters=",", blacklist_categories=("Cs",)), max_size=12)


# --- normalisation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("a cat ,  dog,,\n grass, ", "a cat, dog, grass"),
    (" , ,", ""),
    ("a photo of 1,000 cats", "a photo of 1,000 cats"),   # a comma between digits is not a separator
    ("tag1,tag2", "tag1, tag2"),
])
def test_normalize(raw, expected):
    assert ce.normalize(raw) == expected


@given(captions)
def test_normalize_is_idempotent_and_clean(text):
    once = ce.normalize(text)
    assert ce.normalize(once) == once
    assert once == once.strip() and "  " not in once and ",," not in once and "\n" not in once


# --- modes ----------------------------------------------------------------------------------------
def test_needs_generation_per_mode():
    assert ce.needs_generation("", "fill-missing") and ce.needs_generation("  ", "fill-missing")
    assert not ce.needs_generation("a cat", "fill-missing")
    assert ce.needs_generation("a cat", "overwrite") and ce.needs_generation("a cat", "append")


def test_merge_modes():
    assert ce.merge("my caption", "blip text", "fill-missing") == "my caption"
    assert ce.merge("", "blip text", "fill-missing") == "blip text"
    assert ce.merge("my caption", "blip text", "overwrite") == "blip text"
    assert ce.merge("my caption", "blip text", "append") == "my caption, blip text"
    assert ce.merge("", "blip text", "append") == "blip text"
    assert ce.merge("my caption", "", "append") == "my caption"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="fill-missing"):
        ce.merge("a", "b", "replace-all")


# --- trigger word ---------------------------------------------------------------------------------
@pytest.mark.parametrize("caption, trigger, expected", [
    ("a cat on the grass", "ohwx", "ohwx, a cat on the grass"),
    ("ohwx, a cat", "ohwx", "ohwx, a cat"),                   # already first: not doubled
    ("a cat, ohwx, grass", "ohwx", "ohwx, a cat, grass"),     # elsewhere: moved to the front
    ("OHWX, a cat", "ohwx", "ohwx, a cat"),                   # case-insensitive match
    ("a cat", "ohwx, sks style", "ohwx, sks style, a cat"),   # several trigger tags keep their order
    ("sks style, a cat, ohwx", "ohwx, sks style", "ohwx, sks style, a cat"),
    ("a cat", "  ", "a cat"),
    ("", "ohwx", "ohwx"),
])
def test_put_trigger_first(caption, trigger, expected):
    assert ce.put_trigger_first(caption, trigger) == expected


@given(captions, tag_text.filter(lambda t: t.strip()))
def test_trigger_is_first_exactly_once(caption, trigger):
    result = ce.apply_edits(caption, CaptionEdits(trigger=trigger))
    tags = ce.split_tags(result)
    wanted = ce.normalize(trigger)
    assert tags[0] == wanted
    assert [tag.lower() for tag in tags].count(wanted.lower()) == 1


@given(captions, tag_text, st.text(max_size=8), st.text(max_size=8))
@settings(max_examples=200)
def test_no_edit_can_push_the_trigger_out_of_first_place(caption, remove, find, replace):
    edits = CaptionEdits(trigger="ohwx", find=find, replace=replace, remove_tags=f"ohwx, {remove}")
    assert ce.split_tags(ce.apply_edits(caption, edits))[0] == "ohwx"


# --- find/replace and tag removal -----------------------------------------------------------------
def test_find_replace_is_plain_text_on_the_final_caption():
    assert ce.find_replace("a cat. a cat", "a cat", "a dog") == "a dog. a dog"
    assert ce.find_replace("abc", "a.c", "x") == "abc"          # not a regular expression
    assert ce.find_replace("abc", "", "x") == "abc"             # empty find: no change
    edits = CaptionEdits(find="photo of", replace="painting of")
    assert ce.final_caption("", "a photo of a cat", "overwrite", edits) == "a painting of a cat"


def test_find_replace_result_is_normalised():
    assert ce.apply_edits("a cat, blurry, grass", CaptionEdits(find="blurry", replace="")) == "a cat, grass"


def test_remove_tags_matches_whole_tags_ignoring_case():
    caption = "a cat, Watermark, red car, blurry, red"
    assert ce.remove_tags(caption, "watermark,  BLURRY , red") == "a cat, red car"
    assert ce.remove_tags(caption, "") == ce.normalize(caption)
    assert ce.remove_tags("a red car", "red") == "a red car"    # part of a tag is not a tag


@given(captions, st.lists(st.sampled_from(["cat", "red car", "OHWX", "1,000"]), max_size=3))
def test_removed_tags_are_gone(caption, unwanted):
    result = ce.remove_tags(caption, ", ".join(unwanted))
    assert not {tag.lower() for tag in ce.split_tags(result)} & {tag.lower() for tag in unwanted}


def test_final_caption_applies_mode_then_edits():
    edits = CaptionEdits(trigger="ohwx", find="dog", replace="cat", remove_tags="blurry")
    assert ce.final_caption("blurry, my dog", "a dog on grass", "append", edits) == "ohwx, my cat, a cat on grass"
    assert ce.final_caption("blurry, my dog", None, "fill-missing", edits) == "ohwx, my cat"


# --- sidecar files --------------------------------------------------------------------------------
def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)


def test_write_sidecars_new_kept_unchanged_and_in_memory(tmp_path):
    (tmp_path / "kept.txt").write_text("my own caption", encoding="utf-8")
    (tmp_path / "same.txt").write_text("same words\n", encoding="utf-8")
    paths = [str(tmp_path / "new.txt"), str(tmp_path / "kept.txt"), str(tmp_path / "same.txt"), None]
    report = ce.write_sidecars(paths, ["ohwx, café ☕", "blip text", "same words", "x"], replace_existing=False,
                               backup_root=str(tmp_path))
    assert report.written == [paths[0]] and report.kept == [paths[1]] and report.unchanged == [paths[2]]
    assert report.replaced == [] and report.without_path == 1
    assert (tmp_path / "new.txt").read_bytes() == "ohwx, café ☕".encode("utf-8")
    assert (tmp_path / "kept.txt").read_text(encoding="utf-8") == "my own caption"
    assert _files(tmp_path) == ["kept.txt", "new.txt", "same.txt"]          # no temp files, no backups
    assert stat.S_IMODE(os.stat(paths[0]).st_mode) == 0o644                 # not mkstemp's 0600


def test_replacing_keeps_the_old_text_in_a_timestamped_backup(tmp_path):
    concept = tmp_path / "10_cat"
    concept.mkdir()
    target = concept / "a.txt"
    target.write_text("hand-written caption", encoding="utf-8")
    report = ce.write_sidecars([str(target)], ["blip caption"], replace_existing=True, backup_root=str(tmp_path))
    assert target.read_text(encoding="utf-8") == "blip caption"
    [(replaced, backup)] = report.replaced
    assert replaced == str(target)
    relative = os.path.relpath(backup, tmp_path).split(os.sep)
    assert relative[0] == ce.BACKUP_FOLDER and relative[2:] == ["10_cat", "a.txt"]
    assert open(backup, encoding="utf-8").read() == "hand-written caption"

    # A second run that changes it again keeps both old versions, in two run folders.
    second = ce.write_sidecars([str(target)], ["another caption"], replace_existing=True, backup_root=str(tmp_path))
    assert second.replaced[0][1] != backup
    assert open(second.replaced[0][1], encoding="utf-8").read() == "blip caption"
    assert open(backup, encoding="utf-8").read() == "hand-written caption"


def test_an_empty_caption_file_is_filled_even_in_fill_missing(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("  \n", encoding="utf-8")
    report = ce.write_sidecars([str(target)], ["a cat"], replace_existing=False, backup_root=str(tmp_path))
    assert target.read_text(encoding="utf-8") == "a cat" and len(report.replaced) == 1


def test_a_failed_write_leaves_the_old_caption_and_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    target.write_text("old caption", encoding="utf-8")

    def crash(*_, **__):
        raise OSError("disk full")

    monkeypatch.setattr(ce.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        ce.write_text_atomically(str(target), "new caption")
    monkeypatch.undo()
    assert target.read_text(encoding="utf-8") == "old caption"
    assert _files(tmp_path) == ["a.txt"]


def test_written_sidecars_are_what_the_dataset_scanner_reads_and_backups_stay_invisible(tmp_path):
    from PIL import Image
    for name in ("a", "b"):
        Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("old caption", encoding="utf-8")
    dataset = scan_folder(str(tmp_path))
    new = ["ohwx, a red square", "ohwx, another red square"]
    report = ce.write_sidecars([item.caption_path for item in dataset.items], new, replace_existing=True,
                               backup_root=dataset.root)
    assert len(report.replaced) == 1 and len(report.written) == 1
    rescanned = scan_folder(str(tmp_path))
    assert [item.caption for item in rescanned.items] == new
    assert rescanned.warnings == () and rescanned.skipped == ()

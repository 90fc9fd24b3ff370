"""Reviewed captions (trainer/captions/review.py): the workflow value's format, how a review applies to a
dataset, and which caption files a save may write; plus the JS editor's tag rules against Python's."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from lora_lab.trainer.captions import edits as ce
from lora_lab.trainer.captions.review import (MAX_REVIEWED_BYTES, ReviewError, apply_reviewed, checked_captions,
                                              parse_reviewed, save_plan, serialize_reviewed)
from lora_lab.trainer.data.folder_scan import scan_folder

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def folder(tmp_path):
    for stem in ("a", "b", "c"):
        Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / f"{stem}.png")
    (tmp_path / "a.txt").write_text("ohwx, red dress, smile", encoding="utf-8")
    (tmp_path / "b.txt").write_text("ohwx, blue dress", encoding="utf-8")
    return tmp_path


# --- the value ----------------------------------------------------------------------------------------
def test_value_round_trips_and_empty_means_no_review():
    captions = {"b.png": "two", "a.png": "one, tag"}
    text = serialize_reviewed(captions)
    assert json.loads(text) == {"version": 1, "captions": {"a.png": "one, tag", "b.png": "two"}}
    assert parse_reviewed(text) == captions
    for empty in ("", "  ", None):
        assert parse_reviewed(empty) == {}
    assert serialize_reviewed({}) == ""
    assert parse_reviewed('{"a.png": "plain object"}') == {"a.png": "plain object"}   # hand-written API value


def test_captions_are_read_as_one_line_like_sidecars():
    assert parse_reviewed(serialize_reviewed({"a.png": " ohwx,\n red  dress \n"})) == {"a.png": "ohwx, red dress"}


@pytest.mark.parametrize("text, words", [
    ("{not json", "not valid JSON"),
    ('["a"]', "must be an object"),
    ('{"version": 2, "captions": {}}', "newer LoRA Lab"),
    ('{"a.png": 3}', "hold a int"),
    (json.dumps({"a.png": "x" * (64 * 1024 + 1)}), "longer than 64 KB"),
])
def test_bad_values_say_what_is_wrong_and_how_to_fix(text, words):
    with pytest.raises(ReviewError) as caught:
        parse_reviewed(text)
    assert words in caught.value.problem and caught.value.fix


def test_a_huge_value_is_refused_before_parsing():
    with pytest.raises(ReviewError, match="larger than"):
        parse_reviewed(" " * 10 + "x" * MAX_REVIEWED_BYTES)


# --- applying -----------------------------------------------------------------------------------------
def test_review_wins_over_upstream_and_reports_each_kind(folder):
    dataset = scan_folder(str(folder))
    outcome = apply_reviewed(dataset, {"a.png": "ohwx, red dress", "b.png": "ohwx, blue dress", "gone.png": "x"})
    assert [item.caption for item in outcome.dataset.items] == ["ohwx, red dress", "ohwx, blue dress", ""]
    assert outcome.edited == ("a.png",)          # b: the review says what upstream says now (it was saved)
    assert outcome.unchanged == ("b.png",)
    assert outcome.unknown == ("gone.png",)
    assert outcome.dataset.items[0].has_caption and not outcome.dataset.items[2].has_caption
    assert [item.caption for item in dataset.items][0] == "ohwx, red dress, smile"    # the input is untouched


# --- saving -------------------------------------------------------------------------------------------
def test_save_plan_writes_sent_captions_and_refuses_a_shared_file_with_two_texts(folder):
    Image.new("RGB", (16, 16)).save(folder / "a.jpg")        # a.png and a.jpg share a.txt
    dataset = scan_folder(str(folder))
    keys = [item.key for item in dataset.items]
    assert keys == ["a.jpg", "a.png", "b.png", "c.png"]
    plan = save_plan(dataset, checked_captions({"a.png": "one", "a.jpg": "two", "b.png": "ohwx,  b", "z.png": "?"}, "x"))
    assert [(item.key, item.caption) for item in plan.dataset.items] == [("b.png", "ohwx, b")]
    assert plan.shared == ["a.jpg", "a.png"] and plan.unknown == ["z.png"] and plan.not_sent == ["c.png"]
    agreeing = save_plan(dataset, {"a.png": "same", "a.jpg": "same"})
    assert [item.key for item in agreeing.dataset.items] == ["a.jpg", "a.png"] and not agreeing.shared
    assert agreeing.dataset.root == dataset.root


def test_sent_captions_must_be_text():
    with pytest.raises(ReviewError, match="not list"):
        checked_captions(["a"], "captions to save")


# --- the editor's tag rules are Python's ----------------------------------------------------------------
CASES = ["ohwx, a cat ,  dog,,\n grass, ", "a photo of 1,000 cats, 2, 3", "OHWX, Red Dress, red dress, smile", "",
         " , ,", "saber \\(fate\\), long hair", "ohwx,ohwx, sks", "héllo, ÜBER, über"]
OPS = [("remove", "red dress, SMILE"), ("remove", "ohwx"), ("find", "dress|gown"), ("find", ", |;"),
       ("find", "1,000|many"), ("trigger", "ohwx"), ("trigger", "sks, OHWX, sks"), ("trigger", " , ")]


def python_side(caption: str, op: str, argument: str) -> str:
    if op == "remove":
        return ce.remove_tags(caption, argument)
    if op == "find":
        find, replace = argument.split("|")
        return ce.normalize(ce.find_replace(caption, find, replace))
    return ce.put_trigger_first(caption, argument)


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_js_editor_edits_captions_exactly_as_python_does():
    script = f"""
import {{ findReplace, normalize, putTriggerFirst, removeTags }} from "{(REPO / 'js' / 'caption_edits.js').as_uri()}";
const cases = {json.dumps(CASES)}, ops = {json.dumps(OPS)};
const out = [];
for (const c of cases) {{
  out.push(["normalize", c, normalize(c)]);
  for (const [op, arg] of ops) {{
    if (op === "remove") out.push([op, c, removeTags(c, arg)]);
    else if (op === "find") {{ const [f, r] = arg.split("|"); out.push([op, c, findReplace(c, f, r)]); }}
    else out.push([op, c, putTriggerFirst(c, arg)]);
  }}
}}
console.log(JSON.stringify(out));
"""
    result = subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    js = json.loads(result.stdout)
    expected = []
    for caption in CASES:
        expected.append(["normalize", caption, ce.normalize(caption)])
        expected += [[op, caption, python_side(caption, op, argument)] for op, argument in OPS]
    assert len(js) == len(expected) == len(CASES) * (1 + len(OPS))
    for got, want in zip(js, expected):
        assert got == want

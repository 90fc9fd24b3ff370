"""Review Captions inside a real ComfyUI (in-process): the node applies the reviewed captions, and the calls
its routes make (pictures, thumbnails, save) read and write only the dataset a run produced.

Datasets are real picture files under ComfyUI's input folder, read by the pack's own folder node.
"""
from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

NODE, FOLDER = "LoraLabReviewCaptions", "LoraLabDatasetFromFolder"
CAPTIONS = {"a": "ohwx, red dress, smile", "b": "ohwx, blue dress, smile"}


@pytest.fixture(scope="module")
def review(pack):
    return importlib.import_module(pack.__name__ + ".review")


@pytest.fixture
def dataset_dir(comfy):
    import folder_paths
    name = f"review_{uuid.uuid4().hex[:8]}"
    path = Path(folder_paths.get_input_directory()) / name
    (path / "2_sub").mkdir(parents=True)
    Image.new("RGB", (300, 200), (200, 30, 30)).save(path / "a.png")
    Image.new("RGB", (40, 60), (30, 30, 200)).save(path / "b.jpg")
    Image.new("RGB", (32, 32), (30, 200, 30)).save(path / "2_sub" / "c.png")
    for stem, text in CAPTIONS.items():
        (path / f"{stem}.txt").write_text(text, encoding="utf-8")
    yield name, path
    shutil.rmtree(path, ignore_errors=True)


def load_dataset(pack, name):
    with torch.inference_mode():
        return pack.NODE_CLASS_MAPPINGS[FOLDER]().load(name, ".txt", 1, 1, 0)["result"][0]


def run_review(pack, dataset, reviewed="", ready_to_train=True, unique_id=None):
    with torch.inference_mode():
        output = pack.NODE_CLASS_MAPPINGS[NODE]().review(dataset=dataset, reviewed=reviewed,
                                                         ready_to_train=ready_to_train, unique_id=unique_id)
    reviewed_dataset, report = output["result"]
    assert output["ui"]["text"] == [report]
    return reviewed_dataset, report, output["ui"]["review"][0]


def value(captions: dict) -> str:
    return json.dumps({"version": 1, "captions": captions})


def test_node_is_declared_for_comfyui(pack):
    cls = pack.NODE_CLASS_MAPPINGS[NODE]
    assert cls.CATEGORY == "LoRA Lab/Caption" and cls.OUTPUT_NODE
    assert cls.RETURN_TYPES == ("LORALAB_DATASET", "STRING")
    inputs = cls.INPUT_TYPES()["required"]
    assert list(inputs) == ["dataset", "reviewed", "ready_to_train"] and all(options.get("tooltip") for _, options in inputs.values())
    assert pack.NODE_DISPLAY_NAME_MAPPINGS[NODE] == "Review Captions (LoRA Lab)"


def test_reviewed_captions_replace_upstream_ones_and_the_report_says_so(pack, review, dataset_dir):
    name, path = dataset_dir
    dataset = load_dataset(pack, name)
    keys = [item.key for item in dataset.items]
    assert keys == ["2_sub/c.png", "a.png", "b.jpg"]
    out, report, ui = run_review(pack, dataset, value({"a.png": "ohwx,  red gown", "gone.png": "x"}))
    assert [item.caption for item in out.items] == ["", "ohwx, red gown", CAPTIONS["b"]]
    assert out.items[1].caption_path == dataset.items[1].caption_path and out.root == dataset.root
    assert "1 caption(s) come from your review" in report and "a.png" in report
    assert "no longer holds" in report and "gone.png" in report and "1 picture(s) have no caption" in report
    assert ui["count"] == 3
    listed = review.pictures(ui["session"])
    # The editor gets the captions as they arrived, so it can tell edits from upstream text.
    assert listed["pictures"] == [{"key": k, "caption": item.caption} for k, item in zip(keys, dataset.items)]
    assert listed["can_save"] and listed["folder"] == name
    assert (path / "a.txt").read_text(encoding="utf-8") == CAPTIONS["a"]     # running never writes files


def test_an_unreadable_value_names_the_node_input_and_fix(pack, errors_module, dataset_dir):
    dataset = load_dataset(pack, dataset_dir[0])
    with pytest.raises(errors_module.LoraLabError) as caught:
        run_review(pack, dataset, "{broken")
    message = str(caught.value)
    assert "Review Captions › reviewed" in message and "not valid JSON" in message and "Forget edits" in message


@pytest.fixture(scope="module")
def errors_module(pack):
    return importlib.import_module(pack.__name__ + ".messages")


def test_train_lora_waits_while_ready_to_train_is_off(pack, errors_module, dataset_dir, tiny_unet):
    checks = importlib.import_module(pack.__name__ + ".train_checks")
    waiting, report, _ = run_review(pack, load_dataset(pack, dataset_dir[0]), ready_to_train=False)
    assert "ready_to_train is off: Train LoRA waits" in report
    with pytest.raises(errors_module.LoraLabError) as caught:
        checks.check_inputs(tiny_unet, waiting, "name", 4, 4.0)
    message = str(caught.value)
    assert "Train LoRA › dataset" in message and "waiting for your review" in message
    assert "switch its ready_to_train on and queue again" in message
    # Later caption edits keep the hold; switched on, training goes ahead.
    assert waiting.with_captions(["x"] * len(waiting.items)).waiting_for_review
    ready, _, _ = run_review(pack, load_dataset(pack, dataset_dir[0]))
    checks.check_inputs(tiny_unet, ready, "name", 4, 4.0)


def test_thumbnails_are_small_jpegs_of_the_run_pictures_only(pack, review, dataset_dir):
    _, _, ui = run_review(pack, load_dataset(pack, dataset_dir[0]))
    picture = Image.open(io.BytesIO(review.thumbnail(ui["session"], "1")))
    assert picture.format == "JPEG" and picture.size == (192, 128)            # a.png, 300x200, long side 192
    assert picture.getpixel((96, 64))[0] > 150                                 # red, as drawn
    for token, index, status in ((ui["session"], 3, 404), (ui["session"], "-1", 404), (ui["session"], "x", 400),
                                 ("unknown", 0, 404), (None, 0, 404)):
        with pytest.raises(review.ReviewRequestError) as caught:
            review.thumbnail(token, index)
        assert caught.value.status == status


def test_save_writes_every_caption_atomically_with_backups_and_a_rescan_reads_them(pack, review, dataset_dir):
    name, path = dataset_dir
    folder_node = pack.NODE_CLASS_MAPPINGS[FOLDER]
    before = folder_node.IS_CHANGED(name)
    _, _, ui = run_review(pack, load_dataset(pack, name))
    sent = {"a.png": "ohwx, red gown, smile", "b.jpg": CAPTIONS["b"], "2_sub/c.png": "ohwx,\n green  square"}
    result = review.save(ui["session"], sent)
    assert (result["written"], result["replaced"], result["unchanged"], result["not_saved"]) == (1, 1, 1, 0)
    assert (path / "a.txt").read_text(encoding="utf-8") == "ohwx, red gown, smile"
    assert (path / "2_sub" / "c.txt").read_text(encoding="utf-8") == "ohwx, green square"
    backups = list((path / ".loralab_caption_backup").rglob("a.txt"))
    assert len(backups) == 1 and backups[0].read_text(encoding="utf-8") == CAPTIONS["a"]   # nothing lost
    assert not [p for p in path.rglob("*.tmp")]
    assert "1 replaced" in result["report"] and "a.txt" in result["report"]
    assert folder_node.IS_CHANGED(name) != before                  # the next queue re-scans the folder
    rescanned = load_dataset(pack, name)
    assert [item.caption for item in rescanned.items] == ["ohwx, green square", "ohwx, red gown, smile", CAPTIONS["b"]]


def test_save_never_writes_through_a_link_swapped_in_after_the_run(pack, review, dataset_dir, tmp_path):
    name, path = dataset_dir
    _, _, ui = run_review(pack, load_dataset(pack, name))
    outside = tmp_path / "outside.txt"
    outside.write_text("not a caption", encoding="utf-8")
    (path / "a.txt").unlink()
    os.symlink(outside, path / "a.txt")
    result = review.save(ui["session"], {"a.png": "ohwx, hacked", "b.jpg": "ohwx, blue"})
    assert outside.read_text(encoding="utf-8") == "not a caption"
    assert result["not_saved"] == 1 and "symbolic link" in result["report"]
    assert (path / "b.txt").read_text(encoding="utf-8") == "ohwx, blue"


def test_save_refusals_say_why(pack, review, dataset_dir, make_dataset):
    _, _, ui = run_review(pack, load_dataset(pack, dataset_dir[0]))
    cases = [("gone", {"a.png": "x"}, 404, "Queue the graph again"),
             (ui["session"], ["a.png"], 400, "must be an object"),
             (ui["session"], {"a.png": 5}, 400, "not text")]
    _, _, batch_ui = run_review(pack, make_dataset(2))
    cases.append((batch_ui["session"], {"image_0000": "x"}, 400, "IMAGE batch"))
    for token, sent, status, words in cases:
        with pytest.raises(review.ReviewRequestError) as caught:
            review.save(token, sent)
        assert caught.value.status == status and words in str(caught.value)
    assert not review.pictures(batch_ui["session"])["can_save"]


def test_only_the_latest_sessions_are_kept(pack, review, make_dataset):
    dataset = make_dataset(1)
    tokens = [run_review(pack, dataset)[2]["session"] for _ in range(review.KEPT_SESSIONS + 2)]
    assert review.session(tokens[0]) is None and review.session(tokens[1]) is None
    assert all(review.session(token) is not None for token in tokens[2:])
    with pytest.raises(review.ReviewRequestError, match="no longer on the server"):
        review.pictures(tokens[0])
    # A node's new run replaces its own session (each holds its dataset), not other nodes' sessions.
    first = run_review(pack, dataset, unique_id="12")[2]["session"]
    other = run_review(pack, dataset, unique_id="13")[2]["session"]
    second = run_review(pack, dataset, unique_id="12")[2]["session"]
    assert review.session(first) is None and review.session(second) and review.session(other)

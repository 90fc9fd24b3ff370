"""End to end through a real ComfyUI server: a folder tagged by WD14, reviewed on Review Captions through its
routes (the editor's own requests), saved, re-scanned and trained; the LoRA's tag counts are the reviewed ones.

The tagger is small and real (an ONNX export with SmilingWolf's signature, tests/support/tagger_models.py): a red
picture gets `red theme`, a green one `hatsune miku`, so the expected tags are known.
"""
from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import pytest
from PIL import Image
from safetensors import safe_open

import random_models
import tagger_models

pytestmark = pytest.mark.server
TAGGER = "tiny-test-tagger"
FOLDER = "review_e2e"


@pytest.fixture(scope="module")
def tag_server(server):
    pytest.importorskip("onnxruntime")
    tagger = server.overlay / "models" / "wd14_tagger" / TAGGER
    if not tagger.exists():
        tagger_models.build_tagger(tagger, size=64)
    root = server.overlay / "input" / FOLDER
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for name, colour in (("red1", (230, 20, 20)), ("red2", (210, 30, 30)), ("green", (20, 230, 20))):
        Image.new("RGB", (64, 64), colour).save(root / f"{name}.png")
    (root / "red1.txt").write_text("ohwx, a picture", encoding="utf-8")
    return server


def prompt(reviewed: str, ready: bool, name: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_models.CHECKPOINT_NAME}},
        "2": {"class_type": "LoraLabDatasetFromFolder", "inputs": {
            "folder": FOLDER, "caption_extension": ".txt", "default_repeats": 1, "batch_size": 1, "target_steps": 2}},
        "3": {"class_type": "LoraLabWd14Loader", "inputs": {"model": TAGGER, "device": "cpu"}},
        "4": {"class_type": "LoraLabTagImages", "inputs": {
            "dataset": ["2", 0], "tagger": ["3", 0], "merge": "BLIP sentence, then tags", "general_threshold": 0.35,
            "character_threshold": 0.85, "mcut": "off", "rating_tags": False, "replace_underscores": True,
            "escape_parentheses": True, "exclude_tags": "", "first_tags": "ohwx", "batch_size": 2,
            "write_sidecars": False, "sidecar_mode": "fill-missing"}},
        "5": {"class_type": "LoraLabReviewCaptions", "inputs": {
            "dataset": ["4", 0], "reviewed": reviewed, "ready_to_train": ready}},
        "6": {"class_type": "LoraLabTrainLora", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["5", 0], "output_name": name,
            "resolution": 64, "steps": 2, "epochs": 0, "batch_size": 1, "learning_rate": 1e-4,
            "rank": 4, "alpha": 4.0, "seed": 1, "trigger_word": ""}},
    }


def get(server, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_a_folder_tagged_reviewed_saved_and_trained(tag_server):
    from comfyui_server import ComfyExecutionError
    server, root = tag_server, tag_server.overlay / "input" / FOLDER

    # 1. First queue, training held: the review lists the tagged captions; Train LoRA says why it waits.
    events = []
    with pytest.raises(ComfyExecutionError) as held:
        server.run(prompt("", False, "review_e2e_held"), timeout=600, on_event=events.append)
    text = str(held.value) + json.dumps(held.value.details, ensure_ascii=False)
    assert "Train LoRA › dataset" in text and "waiting for your review" in text
    assert not (server.overlay / "models" / "loras" / "review_e2e_held.safetensors").exists()
    [shown] = [e["data"]["output"] for e in events if e.get("type") == "executed" and e["data"].get("node") == "5"]
    session = shown["review"][0]["session"]
    listed = server.get_json(f"/loralab/review/pictures?session={session}")
    captions = {p["key"]: p["caption"] for p in listed["pictures"]}
    assert list(captions) == ["green.png", "red1.png", "red2.png"] and listed["can_save"]
    assert captions["red1.png"].startswith("ohwx, a picture, ") and "red theme" in captions["red2.png"]
    assert "hatsune miku" in captions["green.png"]
    status, thumb = get(server, f"/loralab/review/thumb?session={session}&index=1")
    assert status == 200 and thumb[:2] == b"\xff\xd8"                          # a JPEG
    assert get(server, "/loralab/review/thumb?session=nope&index=1")[0] == 404

    # 2. The editor's edits: one caption by hand, `red theme` -> `crimson theme` everywhere; then Save.
    edited = {key: caption.replace("red theme", "crimson theme") for key, caption in captions.items()}
    edited["green.png"] = "ohwx, a green square"
    saved = server.post_json("/loralab/review/save", {"session": session, "captions": edited})
    assert (saved["written"], saved["replaced"], saved["not_saved"]) == (2, 1, 0), saved
    assert (root / "green.txt").read_text(encoding="utf-8") == "ohwx, a green square"
    assert "crimson theme" in (root / "red2.txt").read_text(encoding="utf-8")
    assert list((root / ".loralab_caption_backup").rglob("red1.txt"))[0].read_text(encoding="utf-8") == "ohwx, a picture"

    # 3. Queue again with the review in the workflow and training on: the folder is re-scanned (changed files)
    # and re-tagged -- the tagger would add `red theme` back -- yet the LoRA trains on the reviewed captions.
    reviewed = json.dumps({"version": 1, "captions": edited})
    history = server.run(prompt(reviewed, True, "review_e2e"), timeout=1200)
    report = history["outputs"]["5"]["text"][0]
    assert "come from your review" in report
    with safe_open(str(server.overlay / "models" / "loras" / "review_e2e.safetensors"), "pt") as f:
        frequency = json.loads(f.metadata()["ss_tag_frequency"])
    counts = {tag: count for folder in frequency.values() for tag, count in folder.items()}
    assert counts.get("crimson theme") == 2 and "red theme" not in counts
    assert counts.get("a green square") == 1 and "hatsune miku" not in counts

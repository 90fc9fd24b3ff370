"""Review Captions driven in each renderer as a user would: queue (training held), see every picture with its
caption, type one caption, replace a tag everywhere, filter by tag, save, switch ready_to_train on, queue again
(the folder is re-scanned) and train; the caption files and the LoRA's tag counts are the reviewed ones."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

import random_models

pytestmark = pytest.mark.server
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"

BUILD_JS = """([folder, checkpoint, output]) => {
  app.graph.clear();
  const add = (type, x, y) => { const n = LiteGraph.createNode(type); app.graph.add(n); n.pos = [x, y]; return n; };
  const set = (node, name, value) => { const w = node.widgets.find((w) => w.name === name); w.value = value; w.callback?.(value); };
  const ckpt = add("CheckpointLoaderSimple", 40, 40), data = add("LoraLabDatasetFromFolder", 40, 260);
  const review = add("LoraLabReviewCaptions", 500, 40), train = add("LoraLabTrainLora", 1200, 40);
  set(ckpt, "ckpt_name", checkpoint);
  set(data, "folder", folder); set(data, "target_steps", 2);
  set(review, "ready_to_train", false);
  for (const [name, value] of [["output_name", output], ["resolution", 64], ["steps", 2], ["batch_size", 1], ["rank", 4], ["alpha", 4]]) set(train, name, value);
  data.connect(0, review, review.findInputSlot("dataset"));
  ckpt.connect(0, train, train.findInputSlot("model")); ckpt.connect(1, train, train.findInputSlot("clip"));
  ckpt.connect(2, train, train.findInputSlot("vae")); review.connect(0, train, train.findInputSlot("dataset"));
  app.graph.setDirtyCanvas(true, true);
  return review.id;
}"""

EDITOR = ".loralab-review"
ROW = '.loralab-review-row[data-key="{}"]'


def run(page, server, expect_error: str | None = None) -> list[dict]:
    server.post_json("/free", {"free_memory": True})
    page.watch_events(["execution_start", "executing", "execution_success", "execution_error", "executed"])
    page.queue_with_keyboard()
    page.wait_idle(timeout=900)
    time.sleep(0.5)
    events = page.events()
    errors = [e["data"] for e in events if e["type"] == "execution_error"]
    if expect_error:
        assert errors and expect_error in errors[0]["exception_message"], errors
        page.dismiss_dialogs()
    else:
        assert not errors, errors
    return events


def status(page) -> str:
    return page.page.locator(f"{EDITOR} .loralab-review-status").inner_text()


@pytest.fixture
def review_folder(server, renderer):
    name = f"review_browser_{renderer}".replace("-", "_")
    root = server.overlay / "input" / name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for stem, colour, caption in (("a", (220, 30, 30), "ohwx, red theme, smile"),
                                  ("b", (30, 30, 220), "ohwx, blue theme"),
                                  ("c", (200, 40, 40), "ohwx, red theme, hat")):
        Image.new("RGB", (64, 64), colour).save(root / f"{stem}.png")
        (root / f"{stem}.txt").write_text(caption, encoding="utf-8")
    yield name, root
    shutil.rmtree(root, ignore_errors=True)


def test_edit_replace_save_rescan_and_train(renderer_page, server, renderer, review_folder):
    page, (folder, root) = renderer_page, review_folder
    output = f"review_{renderer}".replace("-", "_")
    (server.overlay / "models" / "loras" / f"{output}.safetensors").unlink(missing_ok=True)
    review = page.page.evaluate(BUILD_JS, [folder, random_models.CHECKPOINT_NAME, output])
    time.sleep(0.5)
    page.show(480, 0)

    # 1. First queue: training is held; the editor lists each picture, thumbnail and caption.
    run(page, server, expect_error="waiting for your review")
    page.show(480, 0)
    rows = page.page.locator(f"{EDITOR} .loralab-review-row")
    rows.first.wait_for(state="visible", timeout=30_000)
    assert rows.count() == 3
    page.page.wait_for_function(
        "() => [...document.querySelectorAll('.loralab-review-thumb')].filter((i) => i.complete && i.naturalWidth > 0)"
        ".length === 3", timeout=30_000)
    captions = page.page.eval_on_selector_all(f"{EDITOR} textarea", "(boxes) => boxes.map((b) => b.value)")
    assert captions == ["ohwx, red theme, smile", "ohwx, blue theme", "ohwx, red theme, hat"]
    assert "ready_to_train is off" in status(page)

    # 2. Type one caption (as a user: click, select all, type, leave the box).
    box = page.page.locator(f"{ROW.format('b.png')} textarea")
    box.click()
    page.page.keyboard.press("Control+A")
    page.page.keyboard.type("ohwx, a blue square, Delete me")
    page.page.keyboard.press("Tab")
    assert page.page.locator(f"{ROW.format('b.png')} .loralab-review-mark").is_visible()
    assert page.page.evaluate("(id) => app.graph.getNodeById(id) !== null", review), "typing Delete removed the node"

    # 3. Replace a tag everywhere, then remove one from the shown pictures after filtering.
    page.page.locator(f"{EDITOR} .loralab-review-find").fill("red theme")
    page.page.locator(f"{EDITOR} .loralab-review-replace").fill("crimson theme")
    page.page.locator(f'{EDITOR} [data-action="replace"]').click()
    assert "2 of 3 shown caption(s) changed" in status(page)
    page.page.locator(f"{EDITOR} .loralab-review-filter-mode").select_option("with")
    page.page.locator(f"{EDITOR} .loralab-review-filter").fill("a blue square")
    assert rows.count() == 1
    page.page.locator(f"{EDITOR} .loralab-review-tag").fill("delete me")
    page.page.locator(f'{EDITOR} [data-action="remove"]').click()
    assert "1 of 1 shown caption(s) changed" in status(page)
    page.page.locator(f"{EDITOR} .loralab-review-filter-mode").select_option("all")
    assert rows.count() == 3
    expected = {"a.png": "ohwx, crimson theme, smile", "b.png": "ohwx, a blue square", "c.png": "ohwx, crimson theme, hat"}
    # The edits are the node's value: saved with the workflow and sent with the prompt.
    [sent] = [node["inputs"]["reviewed"] for node in page.graph_to_prompt().values()
              if node["class_type"] == "LoraLabReviewCaptions"]
    assert json.loads(sent) == {"version": 1, "captions": expected}

    # 4. Save: every caption file holds the shown caption; the replaced ones are backed up.
    page.page.locator(f'{EDITOR} [data-action="save"]').click()
    page.page.wait_for_function("() => /Saved 3 caption file/.test(document.querySelector('.loralab-review-status')"
                                ".innerText)", timeout=30_000)
    assert {p.name: p.read_text(encoding="utf-8") for p in sorted(root.glob("*.txt"))} == {
        f"{key[0]}.txt": caption for key, caption in expected.items()}
    assert len(list((root / ".loralab_caption_backup").rglob("*.txt"))) == 3

    # 5. Training on, queue again: the folder is re-scanned and the LoRA learns the reviewed captions.
    page.set_widget(review, "ready_to_train", True)
    run(page, server)
    with safe_open(str(server.overlay / "models" / "loras" / f"{output}.safetensors"), "pt") as f:
        frequency = json.loads(f.metadata()["ss_tag_frequency"])
    counts = {tag: n for tags in frequency.values() for tag, n in tags.items()}
    assert counts == {"ohwx": 3, "crimson theme": 2, "smile": 1, "hat": 1, "a blue square": 1}
    page.show(480, 0)
    page.screenshot(SCREENSHOTS / renderer / "review_captions.png")
    # Saved and re-scanned, the captions arrive as reviewed: nothing shows as edited any more.
    page.page.wait_for_function("() => /0 edited/.test(document.querySelector('.loralab-review-count').innerText)",
                                timeout=30_000)


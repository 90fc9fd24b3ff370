"""The pedalboard's row editor in a real front end, in each renderer (the new front end's Vue nodes too):
add, edit, reorder, remove; save, reload, export; its status shows a whole report."""
from __future__ import annotations

import json

import pytest

from lora_files import full_size_lora

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def board_loras(server, tiny_unet, sd15_clip):
    style = full_size_lora(server.overlay, "browser_style.safetensors", tiny_unet, sd15_clip, 51, slice(0, 6),
                           {"loralab_trigger_word": "browserx", "ss_base_model_version": "sd_v1"})
    detail = full_size_lora(server.overlay, "browser_detail.safetensors", tiny_unet, sd15_clip, 52, slice(6, 12))
    return style, detail


def page_artifact(page, name: str):
    from pathlib import Path
    return Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots" / page.renderer / f"{name}.png"


def add_board(page) -> int:
    node = page.page.evaluate(
        # On an empty graph: in the Vue renderer the default graph's nodes lie over a board placed among them.
        """() => { app.graph.clear(); const n = LiteGraph.createNode('LoraLabPedalboard'); n.pos = [80, 80];
                   app.graph.add(n); app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0];
                   app.graph.setDirtyCanvas(true, true); return n.id; }""")
    page.page.wait_for_selector(".loralab-pedalboard", state="visible", timeout=10_000)
    return node


def pedals_value(page, node: int) -> list[dict]:
    return json.loads(page.page.evaluate(
        "(id) => app.graph.getNodeById(id).widgets.find((w) => w.name === 'pedals').value", node))


def row(page, index: int):
    return page.page.locator(f".loralab-pedal-row[data-index='{index}']")


def test_rows_edit_reorder_and_survive_reload_and_export(renderer_page, server, board_loras):
    page = renderer_page
    style, detail = board_loras
    node = add_board(page)
    inside = page.page.evaluate("() => document.querySelector('.loralab-pedalboard').closest('.lg-node')?.dataset.nodeId")
    if page.renderer == "new-vue":
        assert inside == str(node), "the pedalboard is not inside its Vue node"
    board = page.page.locator(".loralab-pedalboard")
    board.locator("[data-action='add']").click()
    board.locator("[data-action='add']").click()
    page.page.locator(".loralab-pedal-refresh, [data-action='refresh']").first.click()
    page.page.wait_for_function(
        "(name) => [...document.querySelectorAll('.loralab-pedal-lora option')].some((o) => o.value === name)",
        arg=style, timeout=10_000)

    row(page, 0).locator("[data-field='lora']").select_option(style)
    row(page, 1).locator("[data-field='lora']").select_option(detail)
    row(page, 0).locator("[data-field='strength_model']").fill("0.75")
    row(page, 0).locator("[data-field='strength_model']").dispatch_event("change")
    row(page, 1).locator("[data-field='strength_clip']").fill("42")       # clamped to 10
    row(page, 1).locator("[data-field='strength_clip']").dispatch_event("change")
    row(page, 1).locator("[data-field='on']").uncheck()
    row(page, 1).locator("[data-field='blocks']").fill(" MIDD ")        # block weights, trimmed
    row(page, 1).locator("[data-field='blocks']").dispatch_event("change")
    page.page.wait_for_function(
        "() => document.querySelector(\".loralab-pedal-row[data-index='0'] .loralab-pedal-trigger\")"
        "?.textContent.includes('browserx')", timeout=10_000)

    rows = pedals_value(page, node)
    assert [(r["lora"], r["on"], r["strength_model"], r["strength_clip"], r.get("blocks")) for r in rows] == [
        (style, True, 0.75, 1.0, None), (detail, False, 1.0, 10.0, "MIDD")]
    # the blocks box sits on the trigger-words line, inside its row, beside (not over) the words
    boxes = page.page.evaluate(
        """() => { const r = document.querySelector(".loralab-pedal-row[data-index='0']");
                   const box = (e) => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
                   return {row: box(r), blocks: box(r.querySelector('.loralab-pedal-blocks')),
                           words: box(r.querySelector('.loralab-pedal-trigger'))}; }""")
    row_box, blocks_box, words_box = boxes["row"], boxes["blocks"], boxes["words"]
    assert row_box[0] <= blocks_box[0] and blocks_box[2] <= row_box[2] + 0.5 and blocks_box[3] <= row_box[3] + 0.5, boxes
    assert words_box[2] <= blocks_box[0] and blocks_box[3] - blocks_box[1] >= 12, boxes

    row(page, 1).locator("[data-action='up']").click()          # reorder: detail first
    assert [r["lora"] for r in pedals_value(page, node)] == [detail, style]
    board.locator("[data-action='add']").click()
    row(page, 2).locator("[data-action='remove']").click()      # an added row can be removed again
    assert len(pedals_value(page, node)) == 2

    # The status holds the last run's report (a line per LoRA and the trigger words) without cutting it.
    status = page.page.evaluate(
        """() => { const s = document.querySelector('.loralab-pedal-status'); const r = s.getBoundingClientRect();
                   return {height: s.clientHeight, lines: Math.floor(s.clientHeight / 15), text: s.textContent}; }""")
    assert status["lines"] >= 4 and status["text"], status
    page.screenshot(page_artifact(page, "pedalboard"))

    exported = page.graph_to_prompt()[str(node)]["inputs"]["pedals"]
    assert json.loads(exported) == pedals_value(page, node)

    saved = page.serialize_graph()
    path = server.overlay / "temp" / "pedalboard_workflow.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved))
    page.page.reload(wait_until="domcontentloaded")
    page.open()
    page.load_workflow_file(path)
    page.page.evaluate("() => { app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0]; app.graph.setDirtyCanvas(true, true); }")
    page.page.wait_for_selector(".loralab-pedal-row[data-index='1']", timeout=10_000)
    assert [r["lora"] for r in pedals_value(page, node)] == [detail, style]
    shown = page.page.evaluate(
        """() => [...document.querySelectorAll('.loralab-pedal-row')].map((r) => [
             r.querySelector('[data-field=lora]').value, r.querySelector('[data-field=on]').checked,
             Number(r.querySelector('[data-field=strength_model]').value), r.querySelector('[data-field=blocks]').value])""")
    assert shown == [[detail, False, 1.0, "MIDD"], [style, True, 0.75, ""]]


def test_a_board_saved_under_a_name_loads_back_in_another_board(renderer_page, server, board_loras):
    """Save board… asks for a name and keeps the rows in ComfyUI's user folder; the board list loads them back
    (from the server: the save itself is in test_pedalboard.py's server test)."""
    page = renderer_page
    style, _ = board_loras
    name = f"browser board {page.renderer}"
    node = add_board(page)
    board = page.page.locator(".loralab-pedalboard")
    board.locator("[data-action='add']").click()
    page.page.wait_for_function(
        "(name) => [...document.querySelectorAll('.loralab-pedal-lora option')].some((o) => o.value === name)",
        arg=style, timeout=10_000)
    row(page, 0).locator("[data-field='lora']").select_option(style)
    row(page, 0).locator("[data-field='strength_model']").fill("0.6")
    row(page, 0).locator("[data-field='strength_model']").dispatch_event("change")
    row(page, 0).locator("[data-field='blocks']").fill("OUTALL")
    row(page, 0).locator("[data-field='blocks']").dispatch_event("change")
    page.page.once("dialog", lambda dialog: dialog.accept(name))
    board.locator("[data-action='save-board']").click()
    page.page.wait_for_function(
        "(name) => document.querySelector('.loralab-pedal-status').textContent.includes(`Saved the board '${name}'`)",
        arg=name, timeout=10_000)
    page.screenshot(page_artifact(page, "pedalboard_saved_board"))

    row(page, 0).locator("[data-action='remove']").click()       # an empty board: the rows now come from the save
    assert pedals_value(page, node) == []
    page.page.wait_for_function(
        "(name) => [...document.querySelectorAll('.loralab-board-list option')].some((o) => o.value === name)",
        arg=name, timeout=10_000)
    board.locator(".loralab-board-list").select_option(name)
    page.page.wait_for_function("() => document.querySelectorAll('.loralab-pedal-row').length === 1", timeout=10_000)
    assert [(r["lora"], r["strength_model"], r["blocks"]) for r in pedals_value(page, node)] == [(style, 0.6, "OUTALL")]
    assert f"Loaded the board '{name}' (1 row)." in board.locator(".loralab-pedal-status").text_content()


def test_a_run_reports_each_row_with_its_block_weights(renderer_page, server, board_loras):
    """A real queue: checkpoint -> pedalboard (a row with block weights MIDD) -> 1-step KSampler at 64 px; the
    board's status then shows what was applied, block weights included, readable in its box."""
    import random_models
    page = renderer_page
    style, _ = board_loras
    # Each renderer's run its own strength: the same prompt again would come from ComfyUI's cache, unexecuted.
    strength = {"legacy": 0.8, "new-canvas": 0.7, "new-vue": 0.6}[page.renderer]
    page.watch_events(["execution_start", "executing", "execution_success", "execution_error"])
    # The Vue renderer needs a frame after clear(), or new nodes take the cleared ones' places (test_layout.py).
    page.page.evaluate("() => { app.graph.clear(); return new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))); }")
    board = page.page.evaluate(
        """([checkpoint, rows]) => {
             const add = (type, x, y, values = {}) => {
               const n = LiteGraph.createNode(type); n.pos = [x, y]; app.graph.add(n);
               for (const [name, value] of Object.entries(values)) n.widgets.find((w) => w.name === name).value = value;
               return n; };
             // Apart enough for the Vue renderer's wider nodes: the board is pictured whole after the run.
             const loader = add('CheckpointLoaderSimple', 80, 640, {ckpt_name: checkpoint});
             const board = add('LoraLabPedalboard', 80, 60, {pedals: rows});
             const positive = add('CLIPTextEncode', 760, 60, {text: 'a lighthouse'});
             const negative = add('CLIPTextEncode', 760, 320, {text: ''});
             const latent = add('EmptyLatentImage', 760, 580, {width: 64, height: 64});
             const sampler = add('KSampler', 1160, 60, {steps: 1, seed: 1});
             const decode = add('VAEDecode', 1560, 60);
             const preview = add('PreviewImage', 1560, 220);
             loader.connect(0, board, board.findInputSlot('model'));
             loader.connect(1, board, board.findInputSlot('clip'));
             board.connect(board.findOutputSlot('model'), sampler, 0);
             board.connect(board.findOutputSlot('clip'), positive, 0);
             board.connect(board.findOutputSlot('clip'), negative, 0);
             positive.connect(0, sampler, 1); negative.connect(0, sampler, 2); latent.connect(0, sampler, 3);
             sampler.connect(0, decode, 0); loader.connect(2, decode, 1); decode.connect(0, preview, 0);
             app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0]; app.graph.setDirtyCanvas(true, true);
             return board.id; }""",
        [random_models.CHECKPOINT_NAME,
         json.dumps([{"on": True, "lora": style, "strength_model": strength, "strength_clip": 1.0, "blocks": "MIDD"}])])
    page.page.wait_for_selector(".loralab-pedal-row[data-index='0']", timeout=10_000)
    assert page.page.locator(".loralab-pedal-blocks").input_value() == "MIDD"
    page.queue_with_keyboard()
    page.wait_idle(timeout=300)
    assert not [e for e in page.events() if e["type"] == "execution_error"], page.events()
    status = page.page.locator(".loralab-pedal-status")
    page.page.wait_for_function(
        "() => document.querySelector('.loralab-pedal-status').textContent.includes('blocks MIDD')", timeout=10_000)
    assert f"{style}  {strength:g}/1 blocks MIDD" in status.text_content()
    fits = page.page.evaluate(
        "() => { const s = document.querySelector('.loralab-pedal-status'); return s.scrollWidth <= s.clientWidth + 1; }")
    assert fits, "the report's lines are cut at the status box's edge"
    x, y = page.page.evaluate("(id) => app.graph.getNodeById(id).pos", board)
    page.show(x - 20, y - 40)         # the queue shortcut's click may have moved the view
    page.screenshot(page_artifact(page, "pedalboard_after_run_blocks"))

"""kill -9 of a real ComfyUI server while it writes a save's resume state; restarted, the same workflow goes on
from the last whole save by itself and ends equal to a run that was never interrupted.

tools/crash_campaign.py does this 20+ times at four kinds of moments (mid-step, mid-save, mid-state-write,
mid-preview); its results are the hand-kept section at the end of docs/hardening.md. This is one kill of it,
with the campaign's own server session, moment watcher and checks.
"""
from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import comfyui_home
import demo_data
import random_models

AREA_SERVER = "Faults — a real ComfyUI server"
STEPS = 12          # saves at 2, 4, 6, 8, 10: the watcher has four chances to catch a state write after step 3
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def campaign():
    spec = importlib.util.spec_from_file_location("crash_campaign", REPO / "tools" / "crash_campaign.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("crash_campaign", module)        # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_kill_9_while_a_state_is_written_then_the_same_workflow_continues(tmp_path, comfyui_root, campaign,
                                                                          hardening):
    overlay = comfyui_home.build_overlay(tmp_path / "root", comfyui_root)
    checkpoint = random_models.link_slim_checkpoint(overlay)
    demo_data.write_demo_dataset(overlay / "input" / "crash_dataset", count=2, repeats=1, size=64)
    folders = campaign.Folders(overlay, "killed")

    first = campaign.Session(overlay, tmp_path / "first.log", "killed", STEPS, checkpoint)
    try:
        caught = campaign.wait_for_moment(first, folders, "mid-state-write", 3, 1.0, random.Random(0), timeout=600)
        assert caught, "the run ended before a resume state was caught being written"
        first.kill()
    finally:
        first.close()
    killed_at, pid = first.last_step, first.server.process.pid
    partial = folders.state_partials(pid)
    assert [p.name for p in partial] == [f"killed_step{killed_at}.loralab-state.pt.tmp-{pid}"], partial
    check = campaign.check_files(folders)
    assert not check.problems and check.loaded == check.loras and check.states_loaded == check.states
    assert check.expected_resume == killed_at - 2, "the newest whole save is the one before"
    assert (folders.loras / f"killed_step{killed_at}.safetensors").is_file(), "the LoRA was written before its state"

    second = campaign.Session(overlay, tmp_path / "second.log", "killed", STEPS, checkpoint)
    try:
        assert campaign.wait_until_known(second) == killed_at - 2
        assert second.finished.wait(timeout=600) and not second.failed, second.failed
        history = second.server.get_json(f"/history/{second.prompt_id}")[second.prompt_id]
        straight = second.server.run(campaign.prompt_for(second.server, "straight", STEPS, checkpoint), timeout=600)
    finally:
        second.close()
    report = history["outputs"]["4"]["text"][0]
    note = f"continued the interrupted run from step {killed_at - 2}: killed_step{killed_at - 2}.safetensors"
    assert f"note: {note}" in report, report
    assert history["outputs"]["4"]["text"] and "killed.safetensors" in report
    assert not partial[0].exists(), "the killed server's temporary file is cleaned up on the next run"
    assert not folders.state_partials() and not folders.lora_partials()
    assert straight["outputs"]["4"]["text"][0].count("continued") == 0
    resumed, uninterrupted = load_file(str(folders.loras / "killed.safetensors")), \
        load_file(str(folders.loras / "straight.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    difference = max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in resumed)
    assert difference == 0, f"the continued run differs from an uninterrupted one by {difference}"
    hardening.row(AREA_SERVER, f"kill -9 of a real `main.py --cpu --deterministic` server while it writes the resume "
                  f"state of step {killed_at} of {STEPS} (saves every 2 steps); restart, queue the same workflow",
                  f"after the kill every LoRA and resume state loads, killed_step{killed_at} has no state (its "
                  "temporary file is not a loadable name); the restarted Train LoRA says \"" + note + "\", removes "
                  "the temporary file and ends bitwise equal to an uninterrupted run (max abs difference 0)")

"""A run killed mid-way and queued again goes on from its last whole save, in plain torch.

A "kill" here is an exception that skips every clean-up (no partial save, as with kill -9); the next run is
a new TrainingRun over a new model, as after a restart. Runs are compared on one arithmetic path
(tests/conftest.py ``one_arithmetic_path``), so equal means bitwise equal.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_lab.trainer.data.dataset import dataset_from_pixels
from lora_lab.trainer.data.encoded_dataset import EncodedDataset, Epochs, Example
from lora_lab.trainer.lora.adapters import InjectedLora
from lora_lab.trainer.lora.files import load_lora_file
from lora_lab.trainer.lora.network import Network
from lora_lab.trainer.training import interrupted_runs, saves
from lora_lab.trainer.training.kohya_metadata import Description
from lora_lab.trainer.training.loop import TrainSettings, train
from lora_lab.trainer.training.run import TrainingRun
from lora_lab.trainer.training.saves import SaveFolders

STEPS = 8
IDENTITY = "identity-of-this-run"


class Killed(BaseException):
    """kill -9: nothing after it runs, not even the run's own 'keep what was trained'."""


class QuietHost:
    node_name = "Train LoRA"

    def __init__(self, root: Path):
        self.save_folders = SaveFolders(loras=root / "loras", rescue=root / "rescued", states=root / "states")
        self.save_folders.loras.mkdir(parents=True, exist_ok=True)

    def progress(self, step, total):
        pass

    def check_cancel(self):
        pass

    def is_cancel(self, error):
        return False

    def send(self, event, data):
        pass


class Options:
    save_every_n_steps, save_every_n_epochs, keep_last_saves = 2, 0, 0


class TinyDenoiser(nn.Module):
    """An eps model on 4x4 latents: x0 = x - sigma * eps(x, cond)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64 + 8, 32), nn.SiLU(), nn.Linear(32, 64))

    def training_sigmas(self, u):
        return 0.1 + 5 * u

    def noisy_latents(self, latents, noise, sigma):
        return latents + noise * sigma.view(-1, 1, 1, 1)

    def denoise(self, noisy, sigma, cond):
        features = torch.cat([noisy.flatten(1) / (1 + sigma.view(-1, 1) ** 2).sqrt(), cond.mean(dim=1)[:, :8]], 1)
        return noisy - self.net(features).view_as(noisy) * sigma.view(-1, 1, 1, 1)

    def output_error_scale(self, sigma):
        return sigma


def toy_data() -> EncodedDataset:
    g = torch.Generator().manual_seed(0)
    examples = [Example(latent=torch.randn(4, 4, 4, generator=g), caption=f"sks, {i}", bucket=(32, 32), repeats=1)
                for i in range(3)]
    return EncodedDataset(examples=examples, conds={e.caption: torch.randn(1, 5, 16, generator=g) for e in examples},
                          buckets={})


def settings() -> TrainSettings:
    return TrainSettings(steps=STEPS, batch_size=2, learning_rate=1e-2, seed=3, network=Network(rank=2, alpha=2.0))


def description(name: str) -> Description:
    with torch.inference_mode():
        dataset = dataset_from_pixels(torch.rand(3, 8, 8, 3), ["sks, 0", "sks, 1", "sks, 2"], 1)
    return Description(output_name=name, family="sd_v1", resolution=32, settings=settings(), dataset=dataset,
                       trigger_word="sks", epoch_plan=Epochs(batches=2), epochs=0)


def queue(host, name="run", identity=IDENTITY, kill_after=None, options=Options()):
    """Train LoRA queued once, as nodes/train.py runs it: free name, continue an interrupted run, train, save."""
    torch.manual_seed(0)
    model = TinyDenoiser()
    lora = InjectedLora(model, {"net.0": "lora_unet_a", "net.2": "lora_unet_b"}, rank=2, alpha=2.0, seed=1)
    run = TrainingRun(host, saves.free_base_name(host.save_folders.loras, name, False), "7", torch.float32, "AdamW")
    run.identity = identity
    resume, describe = run.continue_interrupted(saves.base_name(name), description(run.output_name))
    if resume:
        lora.load_kohya_state_dict(resume.tensors)
    on_step = run.step_callback(lora, describe, options)

    def step_then_maybe_die(report):
        on_step(report)
        if report.step == kill_after:
            raise Killed()
    try:
        state = train(model, toy_data(), lora.parameters(), settings(), torch.device("cpu"),
                      on_step=step_then_maybe_die, resume=resume.loop_state if resume else None)
    except Killed:
        return run, None
    return run, run.save_final(lora, describe, state, STEPS, overwrite=False)


@pytest.fixture
def host(tmp_path):
    return QuietHost(tmp_path)


def tensors(path):
    return load_lora_file(path)[0]


def state_of(host, lora_name):
    return saves.resume_state_path(host.save_folders.loras / lora_name, host.save_folders)


def test_a_killed_run_queued_again_ends_equal_to_an_uninterrupted_one(tmp_path, one_arithmetic_path):
    straight_run, straight = queue(QuietHost(tmp_path / "straight"))
    host = QuietHost(tmp_path / "killed")
    _, nothing = queue(host, kill_after=5)          # saves at steps 2 and 4; killed after step 5
    assert nothing is None and not (host.save_folders.loras / "run.safetensors").exists()
    run, final = queue(host)
    assert final.name == "run.safetensors", "the continued run saves under the interrupted run's name"
    assert "continued the interrupted run from step 4: run_step4.safetensors" in run.notes
    assert "note: continued the interrupted run from step 4" in run.report("run.safetensors", description("run"))
    a, b = tensors(straight), tensors(final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run.losses == straight_run.losses, "the loss history goes on from the interrupted run's"
    # and the continued run's own saves carry the same identity: a second kill continues again
    assert load_lora_file(host.save_folders.loras / "run_step6.safetensors")[1][interrupted_runs.UNFINISHED_RUN_KEY] \
        == IDENTITY


def test_a_second_kill_continues_from_the_newest_save(host, one_arithmetic_path):
    queue(host, kill_after=3)
    run, _ = queue(host, kill_after=7)
    assert run.notes == ["continued the interrupted run from step 2: run_step2.safetensors"]
    run, final = queue(host)
    assert run.notes == ["continued the interrupted run from step 6: run_step6.safetensors"]
    assert final.name == "run.safetensors"


def test_stopped_again_before_a_step_the_save_it_continued_holds_the_work(host):
    queue(host, kill_after=3)
    before = sorted(p.name for p in host.save_folders.loras.iterdir())
    run = TrainingRun(host, "run_2", "7", torch.float32, "AdamW")
    run.identity = IDENTITY
    _, describe = run.continue_interrupted("run", description("run_2"))
    lora = InjectedLora(TinyDenoiser(), {"net.0": "lora_unet_a", "net.2": "lora_unet_b"}, rank=2, alpha=2.0, seed=1)
    kept = run.save_partial(lora, describe, "cancelled")        # Cancel (or no memory) before the first step
    assert kept == str(host.save_folders.loras / "run_step2.safetensors")
    assert run.last_save_text() == f"The last good save is {kept}."
    assert sorted(p.name for p in host.save_folders.loras.iterdir()) == before, "nothing new was written"


def test_a_save_of_another_run_is_never_continued(host):
    queue(host, identity="another run", kill_after=5)
    (host.save_folders.loras / "run_step6.safetensors").write_bytes(b"not a LoRA at all")
    run, final = queue(host)
    assert run.notes == [] and final.name == "run_2.safetensors", "a fresh run under a free name"
    assert run.losses and len(run.losses) == STEPS


def test_a_torn_missing_or_foreign_state_falls_back_to_the_previous_save(host):
    queue(host, kill_after=7)                        # saves at 2, 4, 6
    torn = state_of(host, "run_step6.safetensors")
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    state_of(host, "run_step4.safetensors").unlink()
    run, _ = queue(host, kill_after=3)
    assert run.notes[0].startswith("skipped run_step6.safetensors of the interrupted run (step 6): its resume "
                                   "state cannot be read"), run.notes
    assert run.notes[1] == ("skipped run_step4.safetensors of the interrupted run (step 4): it has no resume state "
                            "(the process died before writing it)")
    assert run.notes[2] == "continued the interrupted run from step 2: run_step2.safetensors"

    # a state written by another run (same file name, overwrite on) is not this save's
    state = torch.load(state_of(host, "run_step2.safetensors"), weights_only=True)
    state["run_identity"] = "another run"
    torch.save(state, state_of(host, "run_step2.safetensors"))
    found, notes = interrupted_runs.find_interrupted(host.save_folders, "run", IDENTITY)
    assert found is None and len(notes) == 3
    assert "cannot be read" in notes[0] and "no resume state" in notes[1]
    assert notes[2].endswith("run_step2.safetensors of the interrupted run (step 2): its resume state belongs to "
                             "another run")
    run, final = queue(host)
    assert run.notes[-1] == "no save of the interrupted run could be continued: training starts fresh"
    assert final.name == "run_2.safetensors"


def test_continuing_counts_the_interrupted_runs_saves_for_keep_last_saves(host):
    class KeepTwo(Options):
        keep_last_saves = 2
    queue(host, kill_after=5, options=KeepTwo())     # saves 2 and 4: both kept
    assert sorted(p.name for p in host.save_folders.loras.iterdir()) == ["run_step2.safetensors",
                                                                         "run_step4.safetensors"]
    queue(host, options=KeepTwo())                   # continues from 4, saves 6: 2 is deleted, with its state
    assert sorted(p.name for p in host.save_folders.loras.iterdir()) == ["run.safetensors", "run_step4.safetensors",
                                                                         "run_step6.safetensors"]
    assert not state_of(host, "run_step2.safetensors").exists()


def test_temporary_files_of_dead_writers_are_removed_and_a_live_writers_kept(host):
    queue(host, kill_after=3)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    loras, states = host.save_folders.loras, state_of(host, "run_step2.safetensors").parent
    left = [loras / f"run_step4.safetensors.tmp-{dead.pid}", states / f"run_step4.loralab-state.pt.tmp-{dead.pid}",
            loras / f"run_step6.safetensors.tmp-{os.getpid()}"]   # restarted with the old pid (containers)
    writing = loras / f"run_step4.safetensors.tmp-{os.getppid()}"    # another live ComfyUI on the same folder
    foreign = loras / f"other_step4.safetensors.tmp-{dead.pid}"      # not this run's name
    for path in [*left, writing, foreign]:
        path.write_bytes(b"half a save")
    queue(host)
    assert not any(path.exists() for path in left)
    assert writing.exists() and foreign.exists()


def test_a_resume_state_write_that_fails_half_way_leaves_the_previous_state(host, monkeypatch):
    queue(host, kill_after=3)
    path = state_of(host, "run_step2.safetensors")
    before = path.read_bytes()
    real_save = torch.save

    def full_disk(state, out, *args, **kwargs):
        real_save(state, out, *args, **kwargs)
        out.truncate(100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    lora = InjectedLora(TinyDenoiser(), {"net.0": "lora_unet_a"}, rank=2, alpha=2.0, seed=1)
    with pytest.raises(OSError):
        saves.save_resume_state(host.save_folders.loras / "run_step2.safetensors", lora, None, 2, "AdamW",
                                host.save_folders, run={"run_identity": "x"})
    assert path.read_bytes() == before
    assert not [p.name for p in path.parent.iterdir() if ".tmp-" in p.name]

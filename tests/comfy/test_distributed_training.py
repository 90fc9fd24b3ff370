"""Train LoRA with a Distributed Training node, in a real ComfyUI: the controller (this process) prepares the run
and starts torchrun; two workers boot the same ComfyUI headless, build the model from the graph's loader with
ComfyUI's executor and train their shares (gloo, CPU). The LoRA is the one a single process trains, progress
comes back to ComfyUI's progress bar, only rank 0 writes, a save resumes on another number of workers, Cancel
stops the workers, a killed worker's error names its rank and the last good save, and a worker whose model
differs refuses.
(The engine's own equality, to 1.5e-8, and the faults: tests/unit/distributed.)"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open

import random_models
from lora_files import kohya_tensors, unet_shapes
from training import COMPARABLE_OPTIMIZER_ARGS, assert_trained_alike, options, run_train

pytestmark = pytest.mark.usefixtures("leave_models_unpatched")
LEARNING_RATE = 1e-3
WRITE_RECORDER = Path(__file__).resolve().parents[1] / "support" / "write_recorder"


@pytest.fixture(scope="module")
def slim_checkpoint(comfy):
    """SD1.5's real CLIP and VAE with a slim UNet (random_models.SD15_SLIM_UNET), as a file a loader node reads."""
    return random_models.link_slim_checkpoint(comfy.root)


@pytest.fixture(scope="module")
def loaded(slim_checkpoint):
    import nodes as comfy_nodes
    with torch.inference_mode():
        return comfy_nodes.CheckpointLoaderSimple().load_checkpoint(slim_checkpoint)[:3]


def graph(checkpoint: str) -> dict:
    """The API prompt the controller was queued with: a checkpoint loader feeding Train LoRA (node 7)."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
            "7": {"class_type": "LoraLabTrainLora", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2]}}}


def two_processes(timeout=120):
    from lora_lab.trainer.distributed.launcher import Topology
    return Topology(gpus=2, timeout=timeout)


def saved(loras_dir, name):
    with safe_open(str(loras_dir / name), "pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata()


@pytest.fixture
def recorded_writes(tmp_path, monkeypatch):
    """The workers' file-system writes, rank by rank (tests/support/write_recorder/sitecustomize.py: Python's
    audit hooks in each worker, started through PYTHONPATH, which torchrun passes on) -> rank -> [(event, path)]."""
    folder = tmp_path / "writes"
    folder.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(WRITE_RECORDER), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("LORALAB_RECORD_WRITES", str(folder))

    def by_rank() -> dict[int, list[tuple[str, str]]]:
        return {int(path.stem.removeprefix("writes-rank")): [tuple(line.split("\t", 1))
                                                             for line in path.read_text().splitlines()]
                for path in folder.glob("writes-rank*.txt")}
    return by_rank


class Progress:
    """ComfyUI's own global progress hook (what the server installs to drive the front end's bar)."""

    def __init__(self, on_update=None):
        self.updates, self.on_update = [], on_update

    def __enter__(self):
        import comfy.utils
        comfy.utils.set_progress_bar_global_hook(self.hook)
        return self

    def hook(self, value, total, preview=None, node_id=None):
        self.updates.append((value, total))
        if self.on_update:
            self.on_update(value, total)

    def __exit__(self, *exc):
        import comfy.utils
        comfy.utils.set_progress_bar_global_hook(None)


def test_two_workers_train_the_lora_one_process_trains(comfy, pack, loaded, slim_checkpoint, make_dataset, loras_dir,
                                                      recorded_writes):
    model, clip, vae = loaded
    dataset = make_dataset(4)
    one_preview = dict(preview_every_n_steps=3, preview_prompts="a cat", preview_steps=2)   # rank 0's, after step 3
    settings = dict(steps=3, batch_size=3, learning_rate=LEARNING_RATE,
                    options=options(save_precision="fp32", optimizer_args=COMPARABLE_OPTIMIZER_ARGS, **one_preview))
    alone = run_train(model, clip, vae, dataset, "dist_alone", **settings)
    with Progress() as progress:
        spread = run_train(model, clip, vae, dataset, "dist_two", **settings, prompt=graph(slim_checkpoint),
                           distributed=two_processes())
    assert (3, 3) in progress.updates, progress.updates          # the workers' steps reached ComfyUI's bar
    # The loss of every step, the global batch's on the workers: float32 sums in another order only.
    assert spread["ui"]["loss"] == pytest.approx(alone["ui"]["loss"], rel=1e-6)
    one, _ = saved(loras_dir, alone["result"][2])
    two, metadata = saved(loras_dir, spread["result"][2])
    assert metadata["ss_steps"] == "3"
    assert_trained_alike(one, two)
    for result in (alone, spread):         # the preview, its report line and its picture, wherever it was rendered
        assert "previews: 1 picture(s) at step(s) 3" in result["ui"]["text"][0], result["ui"]["text"][0]
        assert result["result"][4].shape[0] == 1
    assert_only_rank_0_wrote(recorded_writes(), loras_dir / spread["result"][2], comfy.root)


def assert_only_rank_0_wrote(writes: dict, lora: Path, comfyui_root: Path) -> None:
    """Rank 1 wrote its figures in the job folder, and nothing else: no LoRA, resume state, preview or event
    (rank 0's writes, which include the LoRA, show that the recorder sees a save). Only ComfyUI's own folders
    are looked at (models, user, output, temp): Python's bytecode cache, and libraries' caches elsewhere, are
    written by whichever process imports a module first."""
    from lora_lab.nodes import folders
    root = os.path.realpath(comfyui_root)

    def in_comfyui(path: str) -> bool:
        return os.path.realpath(path).startswith(root + os.sep) and "__pycache__" not in Path(path).parts

    files = {rank: {Path(path) for event, path in events if event != "os.mkdir" and in_comfyui(path)}
             for rank, events in writes.items()}
    assert sorted(files) == [0, 1]
    assert lora in files[0] and any(path.parent == folders.user_folder("train-state") for path in files[0])
    assert len(files[1]) == 1, f"rank 1 wrote {sorted(map(str, files[1]))}"
    [figures] = files[1]
    assert figures.name == "stats-rank1.json" and figures.parent.parent == folders.user_folder("distributed"), files[1]
    folders_made = {rank: {path for event, path in events if event == "os.mkdir" and in_comfyui(path)}
                    for rank, events in writes.items()}
    assert folders_made[1] <= folders_made[0], folders_made     # those every process makes as the pack loads


def test_a_save_made_on_two_workers_resumes_in_one_process_and_back(pack, loaded, slim_checkpoint, make_dataset,
                                                                    loras_dir):
    """Resume state does not depend on the world size: the step-2 save of a run on two workers goes on in this
    process, and the step-2 save of an in-process run goes on on two workers; both end where the uninterrupted
    runs end (to float32 rounding: the gradients were summed in another order, as above)."""
    model, clip, vae = loaded
    dataset = make_dataset(4)
    exact = dict(save_precision="fp32", save_every_n_steps=2, optimizer_args=COMPARABLE_OPTIMIZER_ARGS)
    settings = dict(steps=4, batch_size=3, learning_rate=LEARNING_RATE)
    two_workers = dict(prompt=graph(slim_checkpoint), distributed=two_processes())
    alone = run_train(model, clip, vae, dataset, "dist_r_alone", **settings, options=options(**exact))
    spread = run_train(model, clip, vae, dataset, "dist_r_two", **settings, options=options(**exact), **two_workers)
    two_then_one = run_train(model, clip, vae, dataset, "dist_r_two_then_one", **settings,
                             options=options(resume_from="dist_r_two_step2.safetensors", **exact))
    one_then_two = run_train(model, clip, vae, dataset, "dist_r_one_then_two", **settings,
                             options=options(resume_from="dist_r_alone_step2.safetensors", **exact), **two_workers)
    assert spread["ui"]["loss"] == pytest.approx(alone["ui"]["loss"], rel=1e-6)
    for resumed in (two_then_one, one_then_two):
        assert resumed["ui"]["loss"] == pytest.approx(alone["ui"]["loss"][2:], rel=1e-6)
        tensors, metadata = saved(loras_dir, resumed["result"][2])
        assert metadata["ss_steps"] == "4"
        assert_trained_alike(saved(loras_dir, alone["result"][2])[0], tensors)


def test_cancel_stops_the_workers_and_keeps_what_they_trained(pack, loaded, slim_checkpoint, make_dataset, loras_dir):
    import comfy.model_management
    model, clip, vae = loaded
    before = children_now()         # (a spawn's resource tracker...)

    def cancel_at_two(value, total):
        if total == 40 and value >= 2:          # the training's bar (encoding the pictures has its own)
            comfy.model_management.interrupt_current_processing(True)

    try:
        with Progress(cancel_at_two), pytest.raises(comfy.model_management.InterruptProcessingException):
            run_train(model, clip, vae, make_dataset(4), "dist_cancel", steps=40, batch_size=2,
                      options=options(save_precision="fp32"), prompt=graph(slim_checkpoint), distributed=two_processes())
    finally:
        comfy.model_management.interrupt_current_processing(False)
    [partial] = [path for path in loras_dir.glob("dist_cancel_step*.safetensors")]
    tensors, metadata = saved(loras_dir, partial.name)
    assert 2 <= int(metadata["ss_steps"]) < 40 and tensors
    left = started_since(before)
    assert not left, f"a worker or torchrun was left running: {left}"


def test_a_killed_worker_ends_the_run_naming_its_rank_and_the_last_good_save(pack, loaded, slim_checkpoint,
                                                                             make_dataset, loras_dir):
    """Rank 1 killed after step 2 (as the kernel's out-of-memory killer would): within 15 s the node's error names
    rank 1 and the last save rank 0 made, that file loads with its steps, and nothing is left running."""
    model, clip, vae = loaded
    before = children_now()
    killed = {}

    def kill_rank_1_after_two(value, total):
        if total == 40 and value >= 2 and not killed:
            ranks_1 = [child for child in started_since(before) if _rank_of(child) == "1"]
            [rank_1] = [child for child in ranks_1 if child.ppid() not in {other.pid for other in ranks_1}]
            rank_1.kill()
            killed["at"] = time.monotonic()

    with Progress(kill_rank_1_after_two), pytest.raises(Exception) as stopped:
        run_train(model, clip, vae, make_dataset(4), "dist_killed", steps=40, batch_size=2,
                  options=options(save_precision="fp32", save_every_n_steps=1),
                  prompt=graph(slim_checkpoint), distributed=two_processes())
    message = str(stopped.value)
    assert killed, f"the run ended before step 2: {message}"
    assert time.monotonic() - killed["at"] < 15
    assert "rank 1 ended abruptly (SIGKILL" in message, message
    [last] = re.findall(r"The last good save is (\S+\.safetensors)\.", message)
    assert Path(last).parent == loras_dir and Path(last).name.startswith("dist_killed")
    tensors, metadata = saved(loras_dir, Path(last).name)
    assert 2 <= int(metadata["ss_steps"]) < 40 and tensors
    left = started_since(before)
    assert not left, f"a worker or torchrun was left running: {left}"


def children_now() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def started_since(before: set[int]) -> list[psutil.Process]:
    """This process's descendants (torchrun, the workers) that were not there ``before``."""
    return [child for child in psutil.Process().children(recursive=True) if child.pid not in before]


def _rank_of(process: psutil.Process) -> str | None:
    try:
        return process.environ().get("RANK")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def test_a_worker_whose_model_differs_refuses(pack, loaded, slim_checkpoint, make_dataset, loras_dir):
    """The controller's model wears a LoRA the graph sent to the workers does not load: they must not train."""
    from lora_lab.nodes import comfy_bridge
    model, clip, vae = loaded
    with torch.inference_mode():
        patched, _ = comfy_bridge.apply_lora(model, None, kohya_tensors(unet_shapes(model, every=4), seed=3), 0.5, 0)
    with pytest.raises(Exception) as refused:
        run_train(patched, clip, vae, make_dataset(2), "dist_other", steps=2, batch_size=2,
                  prompt=graph(slim_checkpoint), distributed=two_processes())
    assert "built a different model" in str(refused.value) and "rank" in str(refused.value)
    assert not list(loras_dir.glob("dist_other*"))


def test_the_node_says_what_each_other_machine_runs(pack, tmp_path):
    """With several machines, rank 0 waits for the others: the report shows each one's exact torchrun command
    (the same worker and job, its own --node-rank) before the first step."""
    from lora_lab.nodes import train_distributed
    from lora_lab.trainer.distributed.job import JobFolder
    from lora_lab.trainer.distributed.launcher import Topology, torchrun_command
    topology = Topology(gpus=4, machines=3, address="10.0.0.5", port=29511)
    worker = [str(train_distributed.WORKER_SCRIPT), str(tmp_path)]
    text = train_distributed.starting_text(topology, worker, JobFolder(tmp_path))
    assert f"job folder {tmp_path}" in text and "Waiting for 2 other machine(s)" in text
    for machine in (1, 2):
        command = " ".join(torchrun_command(Topology(4, 3, machine, "10.0.0.5", 29511), worker, python="python"))
        assert f"machine {machine}: {command}" in text
        assert f"--node-rank={machine}" in command and "--master-addr=10.0.0.5" in command
    assert "Waiting" not in train_distributed.starting_text(Topology(gpus=2), worker, JobFolder(tmp_path))

"""Train LoRA with a Distributed Training node, in a real ComfyUI: the controller (this process) prepares the run
and starts torchrun; two workers boot the same ComfyUI headless, build the model from the graph's loader with
ComfyUI's executor and train their shares (gloo, CPU). The LoRA is the one a single process trains, progress
comes back to ComfyUI's progress bar, Cancel stops the workers, and a worker whose model differs refuses.
(The engine's own equality, to 2e-8, and the faults: tests/unit/distributed.)"""
from __future__ import annotations

import psutil
import pytest
import torch
from safetensors import safe_open

import random_models
from lora_files import kohya_tensors, unet_shapes
from training import assert_within_half_an_adamw_step, options, run_train

pytestmark = pytest.mark.usefixtures("leave_models_unpatched")
LEARNING_RATE = 1e-3


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


def test_two_workers_train_the_lora_one_process_trains(pack, loaded, slim_checkpoint, make_dataset, loras_dir):
    model, clip, vae = loaded
    dataset = make_dataset(4)
    one_preview = dict(preview_every_n_steps=3, preview_prompts="a cat", preview_steps=2)   # rank 0's, after step 3
    settings = dict(steps=3, batch_size=3, learning_rate=LEARNING_RATE,
                    options=options(save_precision="fp32", **one_preview))
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
    assert_within_half_an_adamw_step(one, two, LEARNING_RATE)      # the weights moved by up to 3 lr (below)
    assert max(float(one[key].abs().max()) for key in one if "lora_up" in key) >= 2 * LEARNING_RATE
    for result in (alone, spread):         # the preview, its report line and its picture, wherever it was rendered
        assert "previews: 1 picture(s) at step(s) 3" in result["ui"]["text"][0], result["ui"]["text"][0]
        assert result["result"][4].shape[0] == 1


def test_cancel_stops_the_workers_and_keeps_what_they_trained(pack, loaded, slim_checkpoint, make_dataset, loras_dir):
    import comfy.model_management
    model, clip, vae = loaded
    before = {child.pid for child in psutil.Process().children(recursive=True)}   # (a spawn's resource tracker...)

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
    left = [child for child in psutil.Process().children(recursive=True) if child.pid not in before]
    assert not left, f"a worker or torchrun was left running: {left}"


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

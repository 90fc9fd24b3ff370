"""Distributed Training through a real ComfyUI server: a graph queued with a Distributed Training node trains on two
worker processes and gives the LoRA the same graph gives without it; its progress reaches the front end's socket."""
from __future__ import annotations

import pytest
from safetensors import safe_open

import demo_data
import random_models
from training import COMPARABLE_OPTIMIZER_ARGS, assert_trained_alike

pytestmark = pytest.mark.server
LEARNING_RATE = 1e-3


@pytest.fixture(scope="module")
def slim(server):
    """The slim-UNet SD1.5 checkpoint beside the server's full one: two workers and the server each load it."""
    return random_models.link_slim_checkpoint(server.overlay)


@pytest.fixture(scope="module")
def folder(server):
    demo_data.fresh_demo_dataset(server.overlay / "input" / "distributed_dataset", count=3, repeats=1, size=64)
    return "distributed_dataset"


def option_node(server, class_type: str, **values) -> dict:
    """An option node as the front end queues it: every input at the default /object_info gives, ``values`` over."""
    required = server.get_json(f"/object_info/{class_type}")[class_type]["input"]["required"]
    defaults = {name: spec[1]["default"] if len(spec) > 1 and "default" in spec[1] else spec[0][0]
                for name, spec in required.items()}
    return {"class_type": class_type, "inputs": {**defaults, **values}}


def prompt(server, checkpoint: str, folder: str, name: str, gpus: int | None) -> dict:
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "LoraLabDatasetFromFolder", "inputs": {
            "folder": folder, "caption_extension": ".txt", "default_repeats": 1, "batch_size": 1, "target_steps": 3}},
        "3": {"class_type": "LoraLabTrainLora", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "output_name": name,
            "resolution": 64, "steps": 3, "epochs": 0, "batch_size": 3, "learning_rate": LEARNING_RATE,
            "rank": 4, "alpha": 4.0, "seed": 1, "trigger_word": "", "options": ["6", 0]}},
        "5": option_node(server, "LoraLabOptimizerOptions", optimizer_args=COMPARABLE_OPTIMIZER_ARGS),
        "6": option_node(server, "LoraLabSaveOptions", save_precision="fp32", options=["5", 0]),
    }
    if gpus:
        graph["4"] = {"class_type": "LoraLabDistributedTraining", "inputs": {
            "where": "this machine", "gpus": gpus, "machines": 1, "address": "", "port": 29500,
            "timeout_seconds": 120}}
        graph["3"]["inputs"]["distributed"] = ["4", 0]
    return graph


def weights(server, name: str) -> dict:
    with safe_open(str(server.overlay / "models" / "loras" / f"{name}.safetensors"), "pt") as file:
        return {key: file.get_tensor(key).float() for key in file.keys()}


def test_a_graph_with_distributed_training_trains_the_same_lora_and_reports_progress(server, slim, folder):
    events = []
    history = server.run(prompt(server, slim, folder, "server_two", gpus=2), timeout=900, on_event=events.append)
    progress = [e["data"] for e in events if e.get("type") == "loralab.train.progress"]
    assert [p["step"] for p in progress] == [1, 2, 3] and all(p["node"] == "3" for p in progress)
    assert any(e.get("type") == "progress" and e["data"].get("node") == "3" and e["data"]["value"] == 3
               for e in events), "the node's progress bar never reached the last step"
    assert "server_two.safetensors" in history["outputs"]["3"]["text"][0]
    server.run(prompt(server, slim, folder, "server_one", gpus=None), timeout=900)
    assert_trained_alike(weights(server, "server_one"), weights(server, "server_two"))

"""A training run's saves, resume state and early stops, in plain torch: a small module with real adapters,
a host of our own (trainer/training/run.py's Host protocol) and temporary folders."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lora_lab.trainer.data.dataset import dataset_from_pixels
from lora_lab.trainer.data.encoded_dataset import Epochs
from lora_lab.trainer.lora.adapters import InjectedLora
from lora_lab.trainer.lora.files import load_lora_file
from lora_lab.trainer.lora.network import Network
from lora_lab.trainer.messages import LoraLabError
from lora_lab.trainer.training import saves
from lora_lab.trainer.training.kohya_metadata import Description
from lora_lab.trainer.training.loop import LoopState, NonFiniteLoss, StepReport, TrainSettings
from lora_lab.trainer.training.run import SaveFailed, TrainingRun
from lora_lab.trainer.training.saves import SaveFolders


class Cancelled(Exception):
    """This host's Cancel."""


class RecordingHost:
    """A host that records what the run shows and sends, and cancels when told to."""
    node_name = "Train LoRA"

    def __init__(self, root: Path):
        self.save_folders = SaveFolders(loras=root / "loras", rescue=root / "rescued", states=root / "states")
        self.save_folders.loras.mkdir(parents=True)
        self.shown, self.events, self.cancel_at = [], [], None

    def progress(self, step, total):
        self.shown.append((step, total))

    def check_cancel(self):
        if self.shown and self.shown[-1][0] == self.cancel_at:
            raise Cancelled()

    def is_cancel(self, error):
        return isinstance(error, Cancelled)

    def send(self, event, data):
        self.events.append((event, data))


class Options:      # the three Training Options the step callback reads
    save_every_n_steps, save_every_n_epochs, keep_last_saves = 0, 0, 0


def small_lora(model: nn.Module | None = None) -> InjectedLora:
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))
    return InjectedLora(model, {"0": "lora_unet_first", "2": "lora_unet_second"}, rank=2, alpha=2.0, seed=1)


def description(steps=4) -> Description:
    with torch.inference_mode():
        dataset = dataset_from_pixels(torch.rand(2, 8, 8, 3), ["sks, red", "sks, blue"], 1)
    settings = TrainSettings(steps=steps, batch_size=1, network=Network(rank=2, alpha=2.0))
    return Description(output_name="run", family="sd_v1", resolution=512, settings=settings, dataset=dataset,
                       trigger_word="sks", epoch_plan=Epochs(batches=2), epochs=0)


def report(step, total=4, loss=0.5) -> StepReport:
    return StepReport(step, total, loss, 1e-4, 0.1, snapshot=lambda: LoopState(step, {"saved": step}))


@pytest.fixture
def host(tmp_path):
    return RecordingHost(tmp_path)


def test_each_step_shows_progress_sends_an_event_and_saves_every_n_steps(host):
    lora, options = small_lora(), Options()
    options.save_every_n_steps, options.keep_last_saves = 1, 2
    run = TrainingRun(host, "run", "7", torch.float32, "AdamW")
    on_step = run.step_callback(lora, description(), options)
    for step in range(1, 5):
        on_step(report(step))
    assert host.shown == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [data["step"] for event, data in host.events if event == "progress"] == [1, 2, 3, 4]
    loras = host.save_folders.loras
    # steps 1-3 were saved (step 4 is the final save's), and only the newest two are kept, with their states
    assert sorted(p.name for p in loras.glob("*.safetensors")) == ["run_step2.safetensors", "run_step3.safetensors"]
    assert saves.resume_state_path(loras / "run_step3.safetensors", host.save_folders).is_file()
    assert not saves.resume_state_path(loras / "run_step1.safetensors", host.save_folders).exists()
    tensors, metadata = load_lora_file(loras / "run_step3.safetensors")
    assert tensors.keys() == lora.kohya_state_dict().keys()
    assert metadata["ss_steps"] == "3" and metadata["ss_network_dim"] == "2"


def test_a_save_resumes_to_the_same_weights_optimizer_state_and_step(host):
    lora = small_lora()
    run = TrainingRun(host, "run", "7", torch.float32, "AdamW")
    path = run.save(lora, description(), LoopState(3, {"state": {}, "param_groups": []}), 3, final=False,
                    overwrite=False)
    point = saves.load_resume(path, path.name, "Train LoRA", host.save_folders)
    assert point.step == 3 and point.optimizer_name == "AdamW"
    assert point.loop_state.optimizer == {"state": {}, "param_groups": []}
    for key, value in lora.kohya_state_dict(dtype=torch.float32).items():
        assert torch.equal(point.tensors[key], value), key
    # another optimizer starts fresh; the weights still resume
    assert point.for_optimizer("Prodigy").loop_state.optimizer is None


def test_a_lora_without_its_state_resumes_its_weights_with_a_fresh_optimizer(host):
    lora = small_lora()
    path = TrainingRun(host, "run", "7", torch.float32, "AdamW").save(lora, description(), None, 2, final=False,
                                                                     overwrite=False)
    saves.resume_state_path(path, host.save_folders).unlink()
    point = saves.load_resume(path, path.name, "Train LoRA", host.save_folders)
    assert point.step == 2 and point.loop_state.optimizer is None and point.tensors.keys()


def test_free_names_skip_finished_runs_and_earlier_periodic_saves(tmp_path):
    (tmp_path / "char_epoch2.safetensors").write_bytes(b"x")
    (tmp_path / "char_2.safetensors").write_bytes(b"x")
    assert saves.free_base_name(tmp_path, "char", overwrite=False) == "char_3"
    assert saves.free_base_name(tmp_path, "char", overwrite=True) == "char"
    assert saves.free_base_name(tmp_path, "sub/new", overwrite=False) == "sub/new"


def test_a_written_save_is_deleted_only_while_unchanged(tmp_path):
    lora, state = tmp_path / "a.safetensors", tmp_path / "a.state"
    lora.write_bytes(b"lora"), state.write_bytes(b"state")
    written = saves.WrittenSave.of(lora, state)
    lora.write_bytes(b"the user's own edit")
    assert not written.remove() and lora.exists() and state.exists()
    assert saves.WrittenSave.of(lora, state).remove() and not lora.exists() and not state.exists()


def test_cancel_keeps_what_was_trained_and_removes_the_adapters(host):
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))
    lora, describe = small_lora(model), description()
    host.cancel_at = 2
    run = TrainingRun(host, "run", "7", torch.float32, "AdamW")
    on_step = run.step_callback(lora, describe, Options())
    with pytest.raises(Cancelled), run.kept_if_stopped(lora, describe):
        on_step(report(1))
        on_step(report(2))
        on_step(report(3))
    assert (host.save_folders.loras / "run_step2.safetensors").is_file()
    assert [data["reason"] for event, data in host.events if event == "stopped"] == ["cancelled"]
    assert [type(m) for m in model.modules()] == [nn.Sequential, nn.Linear, nn.GELU, nn.Linear], "adapters left in"


def test_a_nan_names_the_learning_rate_and_the_save_that_holds_the_work(host):
    lora, describe = small_lora(), description()
    run = TrainingRun(host, "run", "7", torch.float32, "AdamW")
    with pytest.raises(LoraLabError) as error, run.kept_if_stopped(lora, describe):
        run.step_callback(lora, describe, Options())(report(1))
        raise NonFiniteLoss(2, float("nan"))
    message = str(error.value)
    assert "Train LoRA › learning_rate" in message and "run_step1.safetensors" in message and "Fix:" in message


def test_a_final_save_the_loras_folder_refuses_goes_to_the_rescue_folder(host):
    lora, describe = small_lora(), description()
    run = TrainingRun(host, "run", "7", torch.float32, "AdamW")
    run.step = 4
    host.save_folders.loras.rmdir()
    host.save_folders.loras.write_bytes(b"not a folder")      # every write into it fails
    with pytest.raises(SaveFailed) as error:
        run.save_final(lora, describe, LoopState(4), 4, overwrite=False)
    rescued = host.save_folders.rescue / "run_step4.safetensors"
    assert rescued.is_file() and str(rescued) in str(error.value)
    assert load_lora_file(rescued)[0].keys() == lora.kohya_state_dict().keys()

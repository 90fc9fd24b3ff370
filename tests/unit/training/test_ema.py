"""The adapters' moving average (trainer/training/ema.py): diffusers' decay warm-up by hand, the loop keeping it
and resuming it exactly, the raw weights untouched by it, and what each save holds (replace / beside)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_lab.trainer.data.dataset import dataset_from_pixels
from lora_lab.trainer.data.encoded_dataset import Epochs
from lora_lab.trainer.lora.adapters import InjectedLora
from lora_lab.trainer.lora.files import load_lora_file
from lora_lab.trainer.lora.network import Network
from lora_lab.trainer.training import saves
from lora_lab.trainer.training.ema import AdapterEma
from lora_lab.trainer.training.kohya_metadata import Description
from lora_lab.trainer.training.loop import LoopState, TrainSettings, train
from lora_lab.trainer.training.run import TrainingRun
from lora_lab.trainer.training.saves import SaveFolders

from toy_training import TinyEpsDenoiser, interrupted_at, params_of, toy_data


def test_the_average_follows_diffusers_warm_up_by_hand():
    weight = nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = AdapterEma([weight], decay=0.5)
    expected = None
    for n, value in enumerate([1.0, 3.0, -1.0, 4.0, 0.5]):
        with torch.no_grad():
            weight.fill_(value)
        ema.update()
        # diffusers EMAModel.get_decay(optimization_step = n + 1): 0 at the first update, then
        # min(decay, (1 + n) / (10 + n)) with n = optimization_step - 1.
        decay = 0.0 if n == 0 else min(0.5, (1 + n) / (10 + n))
        expected = value if expected is None else decay * expected + (1 - decay) * value
        assert ema.shadow[0][0].item() == pytest.approx(expected, rel=1e-6), n
    assert ema.updates == 5


def test_applied_swaps_the_average_in_and_the_weights_back_bitwise():
    weight = nn.Parameter(torch.randn(3, 4))
    ema = AdapterEma([weight], decay=0.9)
    own = weight.detach().clone()
    ema.shadow[0].fill_(0.25)
    with ema.applied():
        assert torch.equal(weight.detach(), torch.full((3, 4), 0.25))
    assert torch.equal(weight.detach(), own)


def test_a_saved_average_must_fit_the_weights():
    ema = AdapterEma([nn.Parameter(torch.zeros(2, 2))], decay=0.9)
    with pytest.raises(ValueError, match="does not match"):
        ema.load_state_dict({"updates": 1, "shadow": [torch.zeros(3, 3)]})
    with pytest.raises(ValueError, match="ema_decay"):
        AdapterEma([], decay=1.0)


def trained(steps, ema_decay=None, resume=None, model=None, on_step=None):
    torch.manual_seed(0)
    model = model or TinyEpsDenoiser()
    ema = AdapterEma(params_of(model), ema_decay) if ema_decay else None
    train(model, toy_data(), params_of(model), TrainSettings(steps=steps, batch_size=2, learning_rate=3e-3),
          torch.device("cpu"), resume=resume, ema=ema, on_step=on_step)
    return model, ema


def test_the_average_never_feeds_back_into_the_training(one_arithmetic_path):
    plain, _ = trained(6)
    averaged, ema = trained(6, ema_decay=0.9)
    assert all(torch.equal(a, b) for a, b in zip(params_of(plain), params_of(averaged)))
    assert any(not torch.allclose(s, p) for s, p in zip(ema.shadow, params_of(averaged))), "the average is the weights"


def test_a_resumed_run_averages_exactly_as_an_uninterrupted_one(one_arithmetic_path):
    _, whole = trained(6, ema_decay=0.9)
    state, weights = interrupted_at(3, lambda model, on_step: trained(6, ema_decay=0.9, model=model, on_step=on_step))
    assert state.ema["updates"] == 3
    resumed_model = TinyEpsDenoiser()
    resumed_model.load_state_dict(weights)
    _, resumed = trained(6, ema_decay=0.9, resume=state, model=resumed_model)
    assert resumed.updates == 6
    for a, b in zip(whole.shadow, resumed.shadow):     # one arithmetic path: bitwise
        assert torch.equal(a, b), (a - b).abs().max()
    # The negative control: an average started afresh at the resume is another average.
    control = TinyEpsDenoiser()
    control.load_state_dict(weights)
    _, fresh = trained(6, ema_decay=0.9, resume=LoopState(**{**state.__dict__, "ema": None}), model=control)
    assert any(not torch.allclose(a, b) for a, b in zip(whole.shadow, fresh.shadow))


# --- what the saves hold ---------------------------------------------------------------------------------------
class Host:
    node_name = "Train LoRA"

    def __init__(self, root):
        self.save_folders = SaveFolders(loras=root / "loras", rescue=root / "rescued", states=root / "states")
        self.save_folders.loras.mkdir(parents=True)

    def progress(self, step, total): ...
    def check_cancel(self): ...
    def is_cancel(self, error): return False
    def send(self, event, data): ...


def averaged_run(tmp_path, beside):
    torch.manual_seed(0)
    lora = InjectedLora(nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4)),
                        {"0": "lora_unet_first", "2": "lora_unet_second"}, rank=2, alpha=2.0, seed=1)
    run = TrainingRun(Host(tmp_path), "run", "7", torch.float32, "AdamW")
    run.ema = AdapterEma(lora.parameters(), 0.9)
    run.ema_beside = beside
    for shadow in run.ema.shadow:                 # an average that differs from the weights, as after training
        shadow.add_(0.5)
    with torch.inference_mode():
        dataset = dataset_from_pixels(torch.rand(2, 8, 8, 3), ["sks, red", "sks, blue"], 1)
    describe = Description(output_name="run", family="sd_v1", resolution=512,
                           settings=TrainSettings(steps=4, network=Network(rank=2, alpha=2.0)), dataset=dataset,
                           trigger_word="sks", epoch_plan=Epochs(batches=2), epochs=0)
    with run.ema.applied():
        averaged = lora.kohya_state_dict(dtype=torch.float32)
    path = run.save_final(lora, describe, LoopState(4, ema=run.ema.state_dict()), 4, overwrite=False)
    return lora, run, path, averaged


def test_replace_saves_the_average_and_keeps_the_raw_weights_for_resume(tmp_path):
    lora, run, path, averaged = averaged_run(tmp_path, beside=False)
    tensors, metadata = load_lora_file(path)
    assert all(torch.equal(tensors[k], averaged[k]) for k in averaged)
    assert metadata["loralab_ema_decay"] == "0.9" and "moving average" in metadata["loralab_ema"]
    point = saves.load_resume(path, path.name, "Train LoRA", run.folders)
    raw = lora.kohya_state_dict(dtype=torch.float32)
    assert all(torch.equal(point.tensors[k], raw[k]) for k in raw)
    assert point.loop_state.ema["updates"] == 0 and len(point.loop_state.ema["shadow"]) == len(run.ema.shadow)
    assert not list(run.folders.loras.glob("*_ema*"))


def test_beside_saves_the_raw_weights_and_the_average_as_name_ema(tmp_path):
    lora, run, path, averaged = averaged_run(tmp_path, beside=True)
    raw = lora.kohya_state_dict(dtype=torch.float32)
    tensors, metadata = load_lora_file(path)
    assert all(torch.equal(tensors[k], raw[k]) for k in raw) and "beside" in metadata["loralab_ema"]
    ema_tensors, ema_metadata = load_lora_file(run.folders.loras / "run_ema.safetensors")
    assert all(torch.equal(ema_tensors[k], averaged[k]) for k in averaged)
    assert ema_metadata["ss_output_name"] == "run_ema" and ema_metadata["loralab_ema"] == "moving average of the weights"
    assert str(run.folders.loras / "run_ema.safetensors") in run.saves


def test_beside_names_the_average_after_the_file_written_and_a_failure_costs_only_that_file(tmp_path, monkeypatch):
    from lora_lab.trainer.training import run as run_module
    folders = SaveFolders(loras=tmp_path / "loras", rescue=tmp_path / "rescued", states=tmp_path / "states")
    folders.loras.mkdir(parents=True)
    (folders.loras / "run_ema.safetensors").write_bytes(b"someone else's")
    assert saves.free_base_name(folders.loras, "run", overwrite=False) == "run_2"      # a new run keeps clear of it
    _, run, path, _ = averaged_run(tmp_path / "second", beside=True)
    assert run.ema_path.endswith("run_ema.safetensors") and "as run_ema.safetensors" in run.ema_text()

    real = run_module.save_lora_file

    def refuses_the_average(folder, name, *args, **kwargs):
        if name.endswith("_ema"):
            raise OSError("disk full")
        return real(folder, name, *args, **kwargs)

    monkeypatch.setattr(run_module, "save_lora_file", refuses_the_average)
    _, run, path, _ = averaged_run(tmp_path / "third", beside=True)
    assert path.is_file() and run.ema_path is None
    assert any("could not be saved" in note for note in run.notes)
    assert "could not be saved beside it" in run.ema_text()
    assert saves.resume_state_path(path, run.folders).is_file()

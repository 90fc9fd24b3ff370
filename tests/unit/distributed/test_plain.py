"""A prepared run travels to the workers as plain containers: it comes back equal through
torch.load(weights_only=True), and a job file can name only the classes its reader expects."""
from __future__ import annotations

import pickle

import pytest
import torch

from lora_lab.trainer.data.encoded_dataset import EncodedDataset, Example, PictureSize, TextEncoding
from lora_lab.trainer.distributed import plain
from lora_lab.trainer.lora.network import Network
from lora_lab.trainer.training.loop import LoopState, TrainSettings
from lora_lab.trainer.training.noise import NoiseSettings
from lora_lab.trainer.captions.augment import CaptionAugment
from lora_lab.trainer.training.validation import HeldOut, ValidationHistory

CLASSES = (EncodedDataset, Example, PictureSize, TextEncoding, TrainSettings, Network, NoiseSettings, CaptionAugment,
           HeldOut, LoopState, ValidationHistory)


def encoded() -> EncodedDataset:
    example = Example(latent=torch.randn(4, 8, 8), caption="sks, a cat", bucket=(64, 64), repeats=3,
                      size=PictureSize((80, 64), (8, 0), (64, 64)), loss_weight=torch.rand(8, 8))
    return EncodedDataset(examples=[example], conds={"sks, a cat": TextEncoding(torch.randn(1, 77, 16), torch.randn(1, 8))},
                          buckets={(64, 64): 1})


def test_a_prepared_run_comes_back_equal_through_weights_only_load(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    run = {"split": HeldOut(encoded(), EncodedDataset(examples=[]), ()),
           "settings": TrainSettings(steps=10, network=Network(rank=4, alpha=2.0), noise=NoiseSettings(noise_offset=0.05),
                                     optimizer_args={"betas": (0.9, 0.99)}),
           "state": LoopState(step=3, optimizer=optimizer.state_dict(), rng={"cpu": torch.random.get_rng_state()}),
           "history": ValidationHistory("key", 2, [(1, 0.5, 10)]), "dtype": torch.bfloat16, "where": tmp_path}
    plain.save(run, tmp_path / "run.pt")
    back = plain.load(tmp_path / "run.pt", CLASSES)
    assert back["settings"] == run["settings"] and back["history"] == run["history"]
    assert back["dtype"] is torch.bfloat16 and back["where"] == tmp_path
    example, original = back["split"].training.examples[0], run["split"].training.examples[0]
    assert torch.equal(example.latent, original.latent) and torch.equal(example.loss_weight, original.loss_weight)
    assert example.size == original.size and back["split"].training.buckets == {(64, 64): 1}
    assert torch.equal(back["split"].training.conds["sks, a cat"].pooled, run["split"].training.conds["sks, a cat"].pooled)
    restored = torch.optim.AdamW(model.parameters())
    restored.load_state_dict(back["state"].optimizer)          # int keys, nested tensors: as the optimizer wants them
    assert restored.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_a_job_file_brings_back_only_the_classes_its_reader_names(tmp_path):
    plain.save({"settings": TrainSettings(steps=1)}, tmp_path / "run.pt")
    with pytest.raises(ValueError, match="a TrainSettings is not expected"):
        plain.load(tmp_path / "run.pt", classes=(Network,))
    with pytest.raises(TypeError, match="cannot travel"):
        plain.to_plain({"code": print})


def test_a_job_file_holding_code_is_refused_by_the_loader(tmp_path):
    """torch.save pickles a function by reference; loading it could call anything: weights_only refuses it."""
    torch.save({"payload": print}, tmp_path / "bad.pt")
    with pytest.raises(pickle.UnpicklingError):
        plain.load(tmp_path / "bad.pt")

"""Validation loss on held-out pictures, in plain torch: which pictures are held out, that they never train,
that measuring them changes nothing about the training, and that the numbers go into saves, reports and
resumed runs. Runs are compared on one arithmetic path (tests/conftest.py), so equal means bitwise equal."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lora_lab.trainer.data.dataset import dataset_from_pixels
from lora_lab.trainer.data.encoded_dataset import EncodedDataset, Example
from lora_lab.trainer.lora.adapters import InjectedLora
from lora_lab.trainer.lora.files import load_lora_file
from lora_lab.trainer.lora.network import Network
from lora_lab.trainer.loss_plot import VALIDATION, loss_curve_image
from lora_lab.trainer.training import saves
from lora_lab.trainer.training.kohya_metadata import Description
from lora_lab.trainer.training.loop import TrainSettings, denoising_loss, train
from lora_lab.trainer.training.noise import NoiseSettings, draw
from lora_lab.trainer.training.run import TrainingRun
from lora_lab.trainer.training.saves import SaveFolders
from lora_lab.trainer.training.validation import (DRAW_SEED_OFFSET, VALIDATION_KEY, NothingLeftToTrain,
                                                  ValidationHistory, hold_out, held_out_indices)

SEED = 3


class TinyDenoiser(nn.Module):
    """An eps model on 4x4 latents, x0 = x - sigma * eps(x, cond), that notes every clean latent it is shown
    and whether gradients were on."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64 + 8, 32), nn.SiLU(), nn.Linear(32, 64))
        self.shown: list[tuple[torch.Tensor, bool]] = []

    def training_sigmas(self, u):
        return 0.1 + 5 * u

    def noisy_latents(self, latents, noise, sigma):
        self.shown += [(latent.detach().clone(), torch.is_grad_enabled()) for latent in latents]
        return latents + noise * sigma.view(-1, 1, 1, 1)

    def denoise(self, noisy, sigma, cond):
        features = torch.cat([noisy.flatten(1) / (1 + sigma.view(-1, 1) ** 2).sqrt(), cond.mean(dim=1)[:, :8]], 1)
        return noisy - self.net(features).view_as(noisy) * sigma.view(-1, 1, 1, 1)

    def output_error_scale(self, sigma):
        return sigma


def toy_data(count=5, repeats=2) -> EncodedDataset:
    g = torch.Generator().manual_seed(0)
    examples = [Example(latent=torch.randn(4, 4, 4, generator=g), caption=f"sks, {i}", bucket=(32, 32),
                        repeats=repeats) for i in range(count)]
    return EncodedDataset(examples=examples, conds={e.caption: torch.randn(1, 5, 16, generator=g) for e in examples},
                          buckets={(32, 32): count})


def by_hand(data: EncodedDataset, removed) -> EncodedDataset:
    """The same dataset with some pictures removed by hand, as a user would before training."""
    return EncodedDataset(examples=[e for i, e in enumerate(data.examples) if i not in removed], conds=dict(data.conds),
                          buckets={})


def settings(validation_pictures=0, steps=12, **others) -> TrainSettings:
    values = dict(steps=steps, batch_size=2, learning_rate=1e-2, seed=SEED, network=Network(rank=2, alpha=2.0),
                  validation_pictures=validation_pictures)
    return TrainSettings(**{**values, **others})


def trained(data, train_settings, held_out=None, dropout=0.3, **kwargs):
    """A fresh model with LoRA adapters (dropout on: it draws from the global RNG) trained on ``data``;
    returns (model, adapter weights, step reports)."""
    torch.manual_seed(0)
    model = TinyDenoiser()
    lora = InjectedLora(model, {"net.0": "lora_unet_a", "net.2": "lora_unet_b"}, rank=2, alpha=2.0, seed=1,
                        dropout=dropout)
    lora.train(True)
    reports = []
    train(model, data, lora.parameters(), train_settings, torch.device("cpu"), on_step=reports.append,
          held_out=held_out, adapter_dropout=lora.train, **kwargs)
    return model, lora.kohya_state_dict(dtype=torch.float32), reports


# --- which pictures ------------------------------------------------------------------------------
def test_held_out_pictures_are_picked_from_the_seed_and_never_all_of_them():
    picked = held_out_indices(10, 3, seed=5)
    assert picked == held_out_indices(10, 3, seed=5) and list(picked) == sorted(set(picked)) and len(picked) == 3
    assert {held_out_indices(10, 3, seed) for seed in range(6)} != {picked}, "the seed does not decide"
    assert held_out_indices(10, 0, seed=5) == ()
    assert held_out_indices(2, 1, seed=5) in ((0,), (1,))
    for too_many in (2, 3):
        with pytest.raises(NothingLeftToTrain) as error:
            held_out_indices(2, too_many, seed=5)
        assert "at least one must be left to train" in error.value.problem and "at most 1" in error.value.fix


def test_a_held_out_picture_leaves_training_whole_with_all_its_repeats():
    data = toy_data(count=5, repeats=2)
    split = hold_out(data, 2, SEED)
    kept = [i for i in range(5) if i not in split.indices]
    assert [e.latent for e in split.training.examples] == [data.examples[i].latent for i in kept]   # order kept
    assert [e.latent for e in split.pictures.examples] == [data.examples[i].latent for i in split.indices]
    assert set(split.training.conds) == {data.examples[i].caption for i in kept}
    # epochs count the training pictures only: 3 pictures x 2 repeats / batch 2
    assert split.training.epochs(2).batches == 3
    off = hold_out(data, 0, SEED)
    assert off.training is data and not off.pictures.examples and off.indices == ()

    with torch.inference_mode():
        dataset = dataset_from_pixels(torch.rand(5, 8, 8, 3), [f"sks, {i}" for i in range(5)], 2)
    trained_items = split.trained_items(dataset)
    assert [item.caption for item in trained_items.items] == [f"sks, {i}" for i in kept]
    assert torch.equal(trained_items.pixels, dataset.pixels[kept])
    assert trained_items.load_image(0).tobytes() == dataset.load_image(kept[0]).tobytes()


def test_a_count_the_held_out_pictures_do_not_match_is_refused():
    data = toy_data()
    with pytest.raises(ValueError, match="validation.hold_out"):
        trained(data, settings(validation_pictures=1))
    with pytest.raises(ValueError, match="validation.hold_out"):
        trained(data, settings(), held_out=hold_out(data, 1, SEED).pictures)


# --- measuring ---------------------------------------------------------------------------------------
def test_held_out_pictures_never_train_and_measuring_them_changes_no_training_draw(one_arithmetic_path):
    """The same run with the held-out pictures removed by hand trains bitwise the same adapters (adapter
    dropout on, so the global RNG is part of it); the held-out latents only ever go through the model
    without gradients."""
    data = toy_data()
    split = hold_out(data, 2, SEED)
    model, with_validation, reports = trained(split.training, settings(2), held_out=split.pictures)
    plain_model, plain, plain_reports = trained(by_hand(data, split.indices), settings(0))

    assert with_validation.keys() == plain.keys()
    for key in plain:
        assert torch.equal(with_validation[key], plain[key]), key
    assert [r.loss for r in reports] == [r.loss for r in plain_reports]
    held = [example.latent for example in split.pictures.examples]

    def is_held_out(latent):
        return any(torch.equal(latent, other) for other in held)
    assert not any(is_held_out(latent) for latent, grad in model.shown if grad), "a held-out picture was trained on"
    measured = [latent for latent, grad in model.shown if not grad]
    assert measured and all(is_held_out(latent) for latent in measured)
    assert not any(is_held_out(latent) for latent, _ in plain_model.shown)


def test_validation_is_measured_when_an_epoch_ends_at_fixed_noise_and_timesteps(one_arithmetic_path):
    data = toy_data()
    split = hold_out(data, 2, SEED)
    # 3 pictures x 2 repeats, batch 2: 3 steps per epoch -> epochs end at steps 3, 6, 9, 12
    _, _, reports = trained(split.training, settings(2), held_out=split.pictures)
    assert [(r.step, r.epoch) for r in reports if r.validation_loss is not None] == [(3, 1), (6, 2), (9, 3), (12, 4)]
    numbers = [r.validation_loss for r in reports if r.validation_loss is not None]
    assert all(isinstance(value, float) and value == value and abs(value) != float("inf") for value in numbers)
    _, _, again = trained(split.training, settings(2), held_out=split.pictures)
    assert numbers == [r.validation_loss for r in again if r.validation_loss is not None]
    # Nothing learned (learning rate 0): every epoch measures the very same number, as the draws are fixed.
    _, _, frozen = trained(split.training, settings(2, learning_rate=0.0, weight_decay=0.0),
                           held_out=split.pictures)
    assert len({r.validation_loss for r in frozen if r.validation_loss is not None}) == 1
    # With gradient accumulation an epoch can end inside a step: 3 batches per epoch, 2 per step.
    _, _, accumulated = trained(split.training, settings(2, steps=6, gradient_accumulation=2), held_out=split.pictures)
    assert [(r.step, r.epoch) for r in accumulated if r.validation_loss is not None] == [(2, 1), (3, 2), (5, 3), (6, 4)]


def test_validation_loss_is_the_training_loss_on_the_held_out_pictures(one_arithmetic_path):
    """Min-SNR weighting, noise offset and the timestep range apply as in training (the same batch_loss):
    the number equals the training loss definition on each picture's fixed draw, averaged."""
    data = toy_data()
    split = hold_out(data, 2, SEED)
    noise = NoiseSettings(noise_offset=0.1, min_timestep=0.2, min_snr_gamma=0.05)   # weights < 1 at these sigmas
    model, _, reports = trained(split.training, settings(2, steps=3, noise=noise), held_out=split.pictures,
                                dropout=0.0)
    generator = torch.Generator().manual_seed(DRAW_SEED_OFFSET + SEED)
    weighted, unweighted = [], []
    with torch.no_grad():
        for example in split.pictures.examples:
            drawn_noise, u = draw(generator, (1, *example.latent.shape), noise)
            arguments = (model, example.latent[None], split.pictures.conds[example.caption], drawn_noise, u)
            weighted.append(denoising_loss(*arguments, noise).item())
            unweighted.append(denoising_loss(*arguments).item())
    assert reports[-1].validation_loss == sum(weighted) / len(weighted)
    assert reports[-1].validation_loss != sum(unweighted) / len(unweighted), "min-SNR weighting was not applied"


def test_a_resumed_loop_measures_the_same_numbers_as_an_uninterrupted_one(one_arithmetic_path):
    data = toy_data()
    split = hold_out(data, 2, SEED)
    _, straight, reports = trained(split.training, settings(2), held_out=split.pictures)
    captured = {}
    torch.manual_seed(0)
    model = TinyDenoiser()
    lora = InjectedLora(model, {"net.0": "lora_unet_a", "net.2": "lora_unet_b"}, rank=2, alpha=2.0, seed=1, dropout=0.3)
    lora.train(True)

    def stop_after_four(report):       # inside the second epoch
        if report.step == 4:
            captured["state"], captured["weights"] = report.snapshot(), lora.kohya_state_dict(dtype=torch.float32)
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(model, split.training, lora.parameters(), settings(2), torch.device("cpu"), on_step=stop_after_four,
              held_out=split.pictures, adapter_dropout=lora.train)
    lora.load_kohya_state_dict(captured["weights"])
    resumed = []
    train(model, split.training, lora.parameters(), settings(2), torch.device("cpu"), on_step=resumed.append,
          resume=captured["state"], held_out=split.pictures, adapter_dropout=lora.train)
    assert [(r.step, r.validation_loss) for r in resumed] == [(r.step, r.validation_loss) for r in reports[4:]]
    final = lora.kohya_state_dict(dtype=torch.float32)
    assert all(torch.equal(final[key], straight[key]) for key in straight)


# --- the history -----------------------------------------------------------------------------------
def test_the_history_survives_metadata_and_carries_on_only_where_it_measured_the_same():
    history = ValidationHistory("key-a", 2, [(1, 0.5, 3), (2, 0.25, 6), (3, float("nan"), 9), (4, 0.3, 12)])
    read = ValidationHistory.from_metadata({VALIDATION_KEY: history.metadata_text()})
    assert read.key == "key-a" and read.pictures == 2
    assert [entry[0::2] for entry in read.entries] == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert read.entries[1][1] == 0.25 and read.entries[2][1] != read.entries[2][1]     # NaN stays NaN
    assert read.best() == (2, 0.25, 6) and read.at_step(12) == 0.3 and read.at_step(5) is None
    assert read.chart_points()[2] == [3, None, 9]
    assert ValidationHistory.from_metadata({}) is None
    assert ValidationHistory.from_metadata({VALIDATION_KEY: "not json"}) is None
    metadata = {VALIDATION_KEY: history.metadata_text()}
    assert ValidationHistory("key-a", 2).continued_from(metadata).chart_points() == read.chart_points()
    assert ValidationHistory("key-b", 2).continued_from(metadata).entries == [], "another held-out set was carried"

    lines = history.report_lines(lambda step: f"run_step{step}.safetensors")
    assert lines[0] == ("validation loss (2 held-out pictures): epoch 1 0.5, epoch 2 0.25, epoch 3 not a number, "
                        "epoch 4 0.3")
    assert lines[1] == "lowest validation loss: epoch 2 (0.25, step 6): run_step6.safetensors"
    assert ValidationHistory().report_lines() == []
    assert "no epoch ended" in ValidationHistory("k", 1).report_lines()[0]


# --- a whole run: saves, report, chart and a run killed and queued again ------------------------------
STEPS = 9          # 3 training pictures, batch 1: 3 steps per epoch, 3 epochs
IDENTITY = "identity-of-this-run"


class QuietHost:
    node_name = "Train LoRA"

    def __init__(self, root: Path):
        self.save_folders = SaveFolders(loras=root / "loras", rescue=root / "rescued", states=root / "states")
        self.save_folders.loras.mkdir(parents=True, exist_ok=True)
        self.events = []

    def progress(self, step, total):
        pass

    def check_cancel(self):
        pass

    def is_cancel(self, error):
        return False

    def send(self, event, data):
        self.events.append((event, data))


class Options:
    save_every_n_steps, save_every_n_epochs, keep_last_saves = 0, 1, 0


class Killed(BaseException):
    """kill -9: nothing after it runs."""


def queue(host, kill_after=None):
    """Train LoRA queued once, as nodes/train.py runs it, with one of 4 pictures held out."""
    data = toy_data(count=4, repeats=1)
    split = hold_out(data, 1, SEED)
    run_settings = TrainSettings(steps=STEPS, batch_size=1, learning_rate=1e-2, seed=SEED,
                                 network=Network(rank=2, alpha=2.0), validation_pictures=1)
    with torch.inference_mode():
        dataset = dataset_from_pixels(torch.rand(4, 8, 8, 3), [f"sks, {i}" for i in range(4)], 1)
    torch.manual_seed(0)
    model = TinyDenoiser()
    lora = InjectedLora(model, {"net.0": "lora_unet_a", "net.2": "lora_unet_b"}, rank=2, alpha=2.0, seed=1, dropout=0.2)
    run = TrainingRun(host, saves.free_base_name(host.save_folders.loras, "run", False), "7", torch.float32, "AdamW")
    run.identity = IDENTITY
    run.validate_on(split, run_settings)
    describe = Description(output_name=run.output_name, family="sd_v1", resolution=32, settings=run_settings,
                           dataset=split.trained_items(dataset), trigger_word="sks",
                           epoch_plan=split.training.epochs(1), epochs=3)
    resume, describe = run.continue_interrupted("run", describe)
    if resume:
        lora.load_kohya_state_dict(resume.tensors)
    lora.train(True)
    on_step = run.step_callback(lora, describe, Options())

    def step_then_maybe_die(report):
        on_step(report)
        if report.step == kill_after:
            raise Killed()
    try:
        state = train(model, split.training, lora.parameters(), run_settings, torch.device("cpu"),
                      on_step=step_then_maybe_die, resume=resume.loop_state if resume else None,
                      held_out=split.pictures, adapter_dropout=lora.train)
    except Killed:
        return run, None
    final = run.save_final(lora, describe, state, STEPS, overwrite=False)
    return run, final


def test_every_save_keeps_the_history_and_the_report_names_the_lowest_epoch(tmp_path, one_arithmetic_path):
    host = QuietHost(tmp_path)
    run, final = queue(host)
    assert [entry[0::2] for entry in run.validation.entries] == [(1, 3), (2, 6), (3, 9)]
    for name, epochs in (("run_epoch1", [1]), ("run_epoch2", [1, 2]), ("run", [1, 2, 3])):
        _, metadata = load_lora_file(host.save_folders.loras / f"{name}.safetensors")
        saved = ValidationHistory.from_metadata(metadata)
        assert [entry[0] for entry in saved.entries] == epochs, name
        assert saved.key == run.validation.key and saved.pictures == 1
        assert metadata["ss_num_train_images"] == "3", "the held-out picture counts as trained"
    epoch, loss, step = run.validation.best()
    report = run.report("run.safetensors", _Described())
    expected_file = "run.safetensors" if step == STEPS else f"run_epoch{epoch}.safetensors"
    assert f"lowest validation loss: epoch {epoch} ({loss:.4g}, step {step}): {expected_file}" in report
    chart = run.chart()
    assert chart["loss_steps"] == [1, STEPS] and len(chart["loss"]) == STEPS
    assert chart["validation_loss"] == [[e, value, s] for e, value, s in run.validation.entries]
    sent = [data["validation_loss"] for event, data in host.events if "validation_loss" in data]
    assert sent == chart["validation_loss"]
    picture = run.loss_curve("run")
    assert picture.shape == (360, 640, 3)


class _Described:
    """The part of a Description the report reads."""
    def arithmetic(self):
        return "3 pictures"


def test_a_killed_run_queued_again_carries_its_validation_history_on(tmp_path, one_arithmetic_path):
    straight_run, straight = queue(QuietHost(tmp_path / "straight"))
    host = QuietHost(tmp_path / "killed")
    _, nothing = queue(host, kill_after=7)           # epoch saves at steps 3 and 6; killed after step 7
    assert nothing is None
    run, final = queue(host)
    assert run.validation.entries == straight_run.validation.entries
    assert ValidationHistory.from_metadata(load_lora_file(final)[1]).entries == straight_run.validation.entries
    a, b = load_lora_file(straight)[0], load_lora_file(final)[0]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_the_loss_curve_draws_each_validation_point_at_its_step():
    def orange(picture):
        return ((picture * 255).round().astype(np.uint8) == np.array(VALIDATION, dtype=np.uint8)).all(axis=-1)
    losses = [1.0, 0.8, 0.6, 0.5]
    assert not orange(loss_curve_image(losses)).any()
    drawn = orange(loss_curve_image(losses, validation=[(1, 0.9, 2), (2, 2.0, 4)]))
    assert drawn.any()
    columns = np.nonzero(drawn.any(axis=0))[0]
    assert columns.max() > 600, "the point of step 4 (the last) is not at the right edge"
    assert np.nonzero(drawn.any(axis=1))[0].min() < 40, "2.0, above every training loss, is not at the top"
    # a resumed run's curve spans steps 11..14: an epoch of the run before it (step 5) is not drawn
    assert not orange(loss_curve_image(losses, steps=(11, 14), validation=[(1, 0.9, 5)])).any()


def test_a_training_text_encoder_encodes_the_held_out_captions_as_it_is_now_without_gradients():
    data = toy_data()
    split = hold_out(data, 2, SEED)
    shift = nn.Parameter(torch.zeros(1, 5, 16))        # the text encoder's trainable part
    encoded = []

    def encode_caption(caption):
        encoded.append((caption, torch.is_grad_enabled()))
        return data.conds[caption] + shift
    torch.manual_seed(0)
    model = TinyDenoiser()
    reports = []
    train(model, split.training, {"unet": list(model.parameters()), "text_encoder": [shift]}, settings(2, steps=3),
          torch.device("cpu"), on_step=reports.append, encode_caption=encode_caption, text_encoder_trains=True,
          held_out=split.pictures)
    held_captions = {example.caption for example in split.pictures.examples}
    assert shift.abs().sum() > 0, "the text encoder did not train"
    assert {(caption, grad) for caption, grad in encoded if caption in held_captions} == {
        (caption, False) for caption in held_captions}
    assert reports[-1].validation_loss is not None and reports[-1].validation_loss == reports[-1].validation_loss


def test_the_history_key_is_unchanged_by_options_added_later_while_they_are_off():
    """A history saved before loss types, logit-normal timesteps and the flow shift existed keys the noise settings
    of that time only: at their defaults the new settings leave the key as it was, so that history continues."""
    import hashlib
    import json

    from lora_lab.trainer.training.run_reuse import data_fingerprint
    from lora_lab.trainer.training.validation import history_key
    pictures = hold_out(toy_data(), 2, SEED).pictures
    before = {"noise_offset": 0.0, "min_timestep": 0.0, "max_timestep": 1.0, "min_snr_gamma": 0.0,
              "scale_v_pred_loss": False}          # NoiseSettings as the first validation histories saved it
    text = json.dumps({"pictures": data_fingerprint(pictures), "seed": SEED, "noise": before, "precision": "fp32"},
                      sort_keys=True)
    assert history_key(pictures, SEED, NoiseSettings(), "fp32") == hashlib.sha256(text.encode()).hexdigest()[:32]
    changed = {history_key(pictures, SEED, NoiseSettings(loss_type="huber"), "fp32"),
               history_key(pictures, SEED, NoiseSettings(timestep_sampling="logit_normal"), "fp32"),
               history_key(pictures, SEED, NoiseSettings(), "fp32", {"ema_decay": 0.99}),
               history_key(pictures, SEED, NoiseSettings(), "fp32", {"flux_guidance": 1.0})}
    assert len(changed) == 4 and history_key(pictures, SEED, NoiseSettings(), "fp32") not in changed


@pytest.mark.parametrize("saved_instead", [True, False])
def test_validation_measures_the_weights_the_saves_hold(saved_instead, one_arithmetic_path):
    """With the moving average replacing the weights in the saves, the epoch's validation loss is the average's;
    with it beside them, the raw weights'."""
    from lora_lab.trainer.training.ema import AdapterEma
    from lora_lab.trainer.training.loop import validation_loss_of
    from lora_lab.trainer.training.validation import HeldOutLoss
    data = toy_data()
    split = hold_out(data, 2, SEED)
    torch.manual_seed(0)
    model = TinyDenoiser()
    lora = InjectedLora(model, {"net.0": "lora_unet_a", "net.2": "lora_unet_b"}, rank=2, alpha=2.0, seed=1)
    ema = AdapterEma(lora.parameters(), 0.5, saved_instead=saved_instead)
    reports = []
    run_settings = settings(2, steps=split.training.epochs(2, 1).steps_for(1))      # one epoch: measured at the end
    train(model, split.training, lora.parameters(), run_settings, torch.device("cpu"), on_step=reports.append,
          held_out=split.pictures, ema=ema)
    measure = HeldOutLoss(split.pictures, SEED, run_settings.noise)
    raw = validation_loss_of(model, measure, torch.device("cpu"), run_settings)
    with ema.applied():
        averaged = validation_loss_of(model, measure, torch.device("cpu"), run_settings)
    assert raw != averaged
    assert reports[-1].validation_loss == (averaged if saved_instead else raw)

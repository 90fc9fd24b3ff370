"""The training loop with plain torch: a tiny eps-prediction denoiser, no ComfyUI."""
import math

import pytest
import torch

from lora_lab.trainer.data.encoded_dataset import TextEncoding
from lora_lab.trainer.training.loop import NonFiniteLoss, TrainSettings, denoising_loss, measure_loss, train

from toy_training import TinyEpsDenoiser, interrupted_at, params_of, toy_data


def trained_copy(settings, data=None, model_seed=0, **kwargs):
    torch.manual_seed(model_seed)
    model = TinyEpsDenoiser()
    state = train(model, data or toy_data(), params_of(model), settings, torch.device("cpu"), **kwargs)
    return model, state


def test_training_reduces_the_loss_at_fixed_noise_and_timesteps():
    torch.manual_seed(0)
    model = TinyEpsDenoiser()
    data = toy_data()
    before = measure_loss(model, data, torch.device("cpu"))
    train(model, data, params_of(model), TrainSettings(steps=150, batch_size=2, learning_rate=3e-3),
          torch.device("cpu"))
    after = measure_loss(model, data, torch.device("cpu"))
    assert after < 0.7 * before, (before, after)


def test_same_seed_same_run_and_another_seed_differs(one_arithmetic_path):
    settings = TrainSettings(steps=5, batch_size=2, learning_rate=1e-3, seed=7)
    a, _ = trained_copy(settings)
    b, _ = trained_copy(settings)
    c, _ = trained_copy(TrainSettings(steps=5, batch_size=2, learning_rate=1e-3, seed=8))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_every_batch_comes_from_one_bucket():
    data = toy_data(n=8, buckets=((64, 64), (96, 48)))
    plan = data.batch_plan(batch_size=3, seed=0)
    seen = 0
    for _ in range(20):
        batch = next(plan)
        assert len({data.examples[i].bucket for i in batch}) == 1
        latents, texts, sizes = data.collate(batch, torch.device("cpu"))  # stacking only works within a bucket
        assert len(texts) == len(sizes) == len(batch) == latents.shape[0]
        seen += len(batch)
    assert seen > 0
    # kohya arithmetic: 8 pictures x 2 repeats; per bucket 8 -> batches of 3: ceil(8/3) = 3 each.
    assert data.steps_per_epoch(3) == 6


def test_resume_equals_an_uninterrupted_run(one_arithmetic_path):
    settings = TrainSettings(steps=8, batch_size=2, learning_rate=1e-3, lr_schedule="cosine", seed=3)
    full, _ = trained_copy(settings)
    state, weights = interrupted_at(3, lambda model, on_step: train(
        model, toy_data(), params_of(model), settings, torch.device("cpu"), on_step=on_step))
    resumed = TinyEpsDenoiser()
    resumed.load_state_dict(weights)
    assert state.step == 3
    train(resumed, toy_data(), params_of(resumed), settings, torch.device("cpu"), resume=state)
    for pa, pb in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb), (pa - pb).abs().max()      # one arithmetic path: bitwise


def test_gradient_accumulation_matches_the_bigger_batch_when_batches_repeat():
    # One picture, repeats 1: every micro-batch is that picture; accumulation of 2 batches of 1 uses
    # two different noise draws, so compare its loss trajectory is finite and steps count optimizer steps.
    reports = []
    trained_copy(TrainSettings(steps=4, batch_size=1, gradient_accumulation=3, learning_rate=1e-3),
                 on_step=reports.append)
    assert [r.step for r in reports] == [1, 2, 3, 4]
    assert all(math.isfinite(r.loss) for r in reports)


def test_nan_loss_stops_with_a_clear_error_and_leaves_weights_finite():
    torch.manual_seed(0)
    model = TinyEpsDenoiser()
    data = toy_data()
    data.examples[0].latent[0, 0, 0] = float("nan")
    for example in data.examples[1:]:
        example.latent[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLoss) as stopped:
        train(model, data, params_of(model), TrainSettings(steps=3), torch.device("cpu"))
    assert stopped.value.step == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_autocast_runs_on_cpu_and_learns_something():
    reports = []
    trained_copy(TrainSettings(steps=3, mixed_precision="bf16", learning_rate=1e-3), on_step=reports.append)
    assert len(reports) == 3 and all(math.isfinite(r.loss) for r in reports)


def test_loss_is_measured_in_the_models_own_output_space():
    model = TinyEpsDenoiser()
    latents = torch.randn(2, 4, 4, 4)
    noise = torch.randn_like(latents)
    u = torch.tensor([0.1, 0.9])
    sigma = model.training_sigmas(u)
    eps = (model.noisy_latents(latents, noise, sigma) - model.denoise(
        model.noisy_latents(latents, noise, sigma), sigma, torch.zeros(2, 7, 16))) / sigma.view(-1, 1, 1, 1)
    expected = (eps - noise).pow(2).mean()
    assert torch.allclose(denoising_loss(model, latents, torch.zeros(2, 7, 16), noise, u), expected, rtol=1e-4)


class SplittingDenoiser(TinyEpsDenoiser):
    """As SD3/Flux in ComfyUI: texts of other token lengths cannot share a batch (no concat_conds)."""

    def conditioning(self, texts, sizes, device):
        lengths = {text.cross_attn.shape[1] for text in texts}
        assert len(lengths) == 1, "texts of different lengths reached one batch"
        return torch.cat([text.cross_attn for text in texts]).to(device)

    def grouped_conditioning(self, texts, sizes, device):
        groups = {}
        for index, text in enumerate(texts):
            groups.setdefault(text.cross_attn.shape[1], []).append(index)
        return [(group, self.conditioning([texts[i] for i in group], [sizes[i] for i in group], device))
                for group in groups.values()]


def test_a_batch_whose_texts_cannot_share_a_pass_goes_in_sub_batches_with_the_same_mean_loss():
    from lora_lab.trainer.training.loop import batch_loss
    data = toy_data(n=4)
    long_caption = "sks, picture 0"
    data.conds[long_caption] = TextEncoding(torch.randn(1, 14, 16, generator=torch.Generator().manual_seed(3)))
    model = SplittingDenoiser()
    latents, texts, sizes = data.collate([0, 1, 2, 3], torch.device("cpu"))
    assert sorted(t.cross_attn.shape[1] for t in texts) == [7, 7, 14, 14]
    g = torch.Generator().manual_seed(0)
    noise, u = torch.randn(latents.shape, generator=g), torch.rand(4, generator=g)
    settings = TrainSettings(steps=1)
    together = batch_loss(model, latents, texts, sizes, noise, u, torch.device("cpu"), settings)
    one_by_one = [batch_loss(model, latents[[i]], [texts[i]], [sizes[i]], noise[[i]], u[[i]], torch.device("cpu"),
                             settings) for i in range(4)]
    assert together.item() == pytest.approx(sum(l.item() for l in one_by_one) / 4, rel=1e-5)
    # ...and a whole run with batch 4 trains (it would fail in conditioning if the lengths were mixed)
    trained = train(model, data, model.parameters(), TrainSettings(steps=3, batch_size=4, learning_rate=1e-3),
                    torch.device("cpu"))
    assert trained.step == 3


def test_a_resumed_run_learns_at_its_own_rate_from_the_saved_step_of_its_own_schedule(caplog):
    from lora_lab.trainer.training.schedules import lr_multiplier
    captured = {}

    def stop_after_three(report):
        if report.step == 3:
            captured["state"] = report.snapshot()
            raise KeyboardInterrupt

    torch.manual_seed(0)
    model = TinyEpsDenoiser()
    first = TrainSettings(steps=6, batch_size=2, learning_rate=1e-3, lr_schedule="linear", seed=3)
    with pytest.raises(KeyboardInterrupt):
        train(model, toy_data(), params_of(model), first, torch.device("cpu"), on_step=stop_after_three)
    again = TrainSettings(steps=10, batch_size=2, learning_rate=4e-4, lr_schedule="cosine", seed=3, weight_decay=0.2)
    rates, optimizers = [], []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        optimizers.append([(g["lr"], g["weight_decay"]) for g in self.param_groups])
        return real_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", spy)
        with caplog.at_level("WARNING", logger="LoRA Lab"):
            train(model, toy_data(), params_of(model), again, torch.device("cpu"), resume=captured["state"],
                  on_step=lambda report: rates.append(report.lr))
    expected = [4e-4 * lr_multiplier("cosine", step, 10) for step in range(3, 10)]
    assert rates == pytest.approx(expected, rel=1e-9)
    assert optimizers[0] == [(pytest.approx(expected[0]), 0.2)]
    assert "resuming with learning rate" in caplog.text


def test_epochs_with_gradient_accumulation_show_exactly_that_many_epochs_of_pictures():
    """5 pictures x 1 repeat, batch 2 -> 3 batches an epoch; accumulation 2: 10 epochs = 30 batches = 15 steps
    (not 10 x ceil(3/2) = 20 steps = 13.3 epochs)."""
    data = toy_data(n=5)
    for example in data.examples:
        example.repeats = 1
    plan = data.epochs(batch_size=2, gradient_accumulation=2)
    assert (plan.batches, plan.steps, plan.steps_for(10)) == (3, 2, 15)
    batches = data.batch_plan(2, seed=0)
    shown = [sum(len(next(batches)) for _ in range(2)) for _ in range(plan.steps_for(10))]
    assert sum(shown) == 10 * 5
    assert [plan.completed_at(step) for step in (1, 2, 3, 14, 15)] == [0, 1, 2, 9, 10]

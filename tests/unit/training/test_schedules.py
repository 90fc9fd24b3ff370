"""trainer.lr_schedules: kohya/HF schedule semantics, and the old three schedules unchanged."""
import pytest
import torch

from lora_lab.trainer.training.schedules import SCHEDULES, lr_multiplier, make_scheduler


@pytest.mark.parametrize("schedule", ["constant", "constant_with_warmup", "cosine"])
def test_schedules(schedule):
    # The assertions of tests/unit/test_loop.py::test_schedules, against the new module.
    values = [lr_multiplier(schedule, s, 100, warmup_steps=10) for s in range(100)]
    assert all(0 <= v <= 1 for v in values)
    if schedule == "constant":
        assert set(values) == {1.0}
    else:
        assert values[0] < values[9] <= 1.0
    if schedule == "cosine":
        assert values[-1] < 0.01 and values[50] < values[20]
    with pytest.raises(ValueError):
        lr_multiplier("bogus", 0, 10)


def test_all_schedules_are_offered_and_bounded():
    assert SCHEDULES == ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")
    for schedule in SCHEDULES:
        values = [lr_multiplier(schedule, s, 50, 5, cycles=3) for s in range(60)]
        assert all(0.0 <= v <= 1.0 for v in values), schedule


def _hf_multipliers(factory, total, **kwargs):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = factory(optimizer, **kwargs)
    values = []
    for _ in range(total):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return values


@pytest.mark.parametrize("warmup", [0, 7])
def test_decaying_schedules_match_hugging_face_after_warmup(warmup):
    from transformers.optimization import (get_cosine_schedule_with_warmup,
                                           get_cosine_with_hard_restarts_schedule_with_warmup,
                                           get_linear_schedule_with_warmup)
    total = 60
    cases = {
        ("linear", 1): _hf_multipliers(get_linear_schedule_with_warmup, total, num_warmup_steps=warmup,
                                       num_training_steps=total),
        ("cosine", 1): _hf_multipliers(get_cosine_schedule_with_warmup, total, num_warmup_steps=warmup,
                                       num_training_steps=total),
        ("cosine_with_restarts", 3): _hf_multipliers(get_cosine_with_hard_restarts_schedule_with_warmup, total,
                                                     num_warmup_steps=warmup, num_training_steps=total,
                                                     num_cycles=3),
    }
    for (schedule, cycles), expected in cases.items():
        ours = [lr_multiplier(schedule, s, total, warmup, cycles) for s in range(total)]
        assert ours[warmup:] == pytest.approx(expected[warmup:], abs=1e-12), schedule


def test_warmup_rises_linearly_from_near_zero_and_never_wastes_the_first_step():
    for schedule in ("constant_with_warmup", "linear", "cosine", "cosine_with_restarts"):
        values = [lr_multiplier(schedule, s, 100, 4) for s in range(5)]
        assert values[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and values[4] == 1.0, schedule


def test_cosine_with_restarts_restarts_hard_each_cycle():
    values = [lr_multiplier("cosine_with_restarts", s, 90, 0, cycles=3) for s in range(90)]
    assert values[0] == values[30] == values[60] == 1.0
    for start in (0, 30, 60):
        cycle = values[start:start + 30]
        assert all(a > b for a, b in zip(cycle, cycle[1:]))
    assert values[29] < 0.01 and values[89] < 0.01
    assert lr_multiplier("cosine_with_restarts", 90, 90, 0, cycles=3) == 0.0
    one_cycle = [lr_multiplier("cosine_with_restarts", s, 40, 5, cycles=1) for s in range(45)]
    assert one_cycle == pytest.approx([lr_multiplier("cosine", s, 40, 5) for s in range(45)])


def test_linear_decays_to_zero_at_the_end():
    values = [lr_multiplier("linear", s, 10, 0) for s in range(11)]
    assert values == pytest.approx([1.0 - s / 10 for s in range(11)])


@pytest.mark.parametrize("cycles", [0, -1, 1.5])
def test_bad_cycles_are_refused(cycles):
    with pytest.raises(ValueError):
        lr_multiplier("cosine_with_restarts", 0, 10, 0, cycles=cycles)


def test_make_scheduler_scales_each_group_by_the_same_factor_and_saves_no_lambdas():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 5e-5}])
    scheduler = make_scheduler(optimizer, "cosine_with_restarts", 20, 2, cycles=2)
    for step in range(7):
        factor = lr_multiplier("cosine_with_restarts", step, 20, 2, 2)
        assert scheduler.get_last_lr() == pytest.approx([1e-3 * factor, 5e-5 * factor])
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert state["lr_lambdas"] == [None, None] and state["last_epoch"] == 7
    fresh = make_scheduler(optimizer, "cosine_with_restarts", 20, 2, cycles=2)
    fresh.load_state_dict(state)
    assert fresh.last_epoch == 7
    with pytest.raises(ValueError):
        make_scheduler(optimizer, "polynomial", 20)


def test_schedule_notes_name_warm_up_that_does_nothing_or_everything():
    from lora_lab.trainer.training.schedules import schedule_notes
    assert "constant_with_warmup" in schedule_notes("constant", 10, 100)[0]
    assert "whole run is warm-up" in schedule_notes("cosine", 100, 100)[0]
    assert schedule_notes("cosine", 10, 100) == schedule_notes("constant", 0, 100) == []

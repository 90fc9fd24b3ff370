"""trainer.optimizers: names, param groups, optional packages and their install messages."""
import sys
import types

import pytest
import torch

from lora_lab.trainer.training import optimizers
from lora_lab.trainer.training.schedules import make_scheduler
from lora_lab.trainer.training.optimizers import (OPTIMIZERS, OptimizerUnavailable, lr_advice, make_optimizer,
                                         param_groups, parse_optimizer_args, trainable_parameters,
                                         unavailable_reason)


def _params(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(n)]


def _quadratic_steps(optimizer, params, steps=20):
    losses = []
    for _ in range(steps):
        loss = sum(p.pow(2).sum() for p in params)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def test_the_combo_lists_kohyas_names():
    assert OPTIMIZERS == ("AdamW", "AdamW8bit", "Adafactor", "Prodigy")
    with pytest.raises(ValueError, match="AdamW, AdamW8bit"):
        make_optimizer("Lion", _params(), 1e-4)
    with pytest.raises(ValueError):
        unavailable_reason("SGD")


def test_adamw_from_a_plain_parameter_list():
    params = _params()
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    optimizer = make_optimizer("AdamW", params + [frozen], 1e-2, weight_decay=0.05)
    assert isinstance(optimizer, torch.optim.AdamW)
    (group,) = optimizer.param_groups
    assert group["lr"] == 1e-2 and group["weight_decay"] == 0.05
    assert len(group["params"]) == 2 and all(p is q for p, q in zip(group["params"], params))
    losses = _quadratic_steps(optimizer, params)
    assert losses[-1] < losses[0]


def test_unet_and_text_encoder_groups_keep_their_own_rates():
    unet, te = _params(2, 0), _params(3, 1)
    groups = param_groups(unet, 1e-4, te, text_encoder_lr=5e-5)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("unet", 1e-4, 2), ("text_encoder", 5e-5, 3)]
    assert trainable_parameters(groups) == unet + te
    optimizer = make_optimizer("AdamW", groups, 1e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 5e-5]
    assert [g["name"] for g in optimizer.param_groups] == ["unet", "text_encoder"]
    # The schedule multiplies both rates; a saved state loads back into the same grouping.
    scheduler = make_scheduler(optimizer, "linear", 10)
    _quadratic_steps(optimizer, unet + te, steps=1)
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.9e-4, 0.9 * 5e-5])
    again = make_optimizer("AdamW", param_groups(unet, 1e-4, te, 5e-5), 1e-4)
    again.load_state_dict(optimizer.state_dict())


def test_text_encoder_lr_defaults_to_the_unet_rate_and_empty_groups_vanish():
    unet = _params()
    assert [g["lr"] for g in param_groups(unet, 3e-4, _params(1, 2))] == [3e-4, 3e-4]
    assert [g["name"] for g in param_groups(unet, 3e-4)] == ["unet"]
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer("AdamW", [torch.nn.Parameter(torch.zeros(1), requires_grad=False)], 1e-4)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups([], 1e-4)


def test_a_group_without_lr_gets_the_default():
    a, b = _params()
    optimizer = make_optimizer("AdamW", [{"params": [a]}, {"params": [b], "lr": 1e-5}], 2e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [2e-4, 1e-5]


def test_adafactor_uses_kohyas_fixed_lr_settings_and_learns():
    params = _params()
    optimizer = make_optimizer("Adafactor", param_groups(params, 1e-2), 1e-2, weight_decay=0.0)
    assert type(optimizer).__name__ == "Adafactor"
    assert optimizer.defaults["relative_step"] is False
    assert optimizer.defaults["scale_parameter"] is False
    assert optimizer.defaults["warmup_init"] is False
    assert optimizer.param_groups[0]["lr"] == 1e-2
    losses = _quadratic_steps(optimizer, params, steps=30)
    assert losses[-1] < losses[0] * 0.9
    assert unavailable_reason("Adafactor") is None and unavailable_reason("AdamW") is None


def test_adafactor_follows_the_lr_schedule():
    params = _params()
    optimizer = make_optimizer("Adafactor", params, 1e-2, beta1=0.9)
    assert optimizer.defaults["beta1"] == 0.9
    scheduler = make_scheduler(optimizer, "constant_with_warmup", 10, 3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    before = [p.detach().clone() for p in params]
    _quadratic_steps(optimizer, params, steps=1)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 2)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


@pytest.mark.parametrize("name,module,package", [("AdamW8bit", "bitsandbytes", "bitsandbytes"),
                                                 ("Prodigy", "prodigyopt", "prodigyopt")])
def test_a_missing_package_says_exactly_what_to_install(monkeypatch, name, module, package):
    monkeypatch.setitem(sys.modules, module, None)     # makes `import module` fail like a missing package
    with pytest.raises(OptimizerUnavailable) as raised:
        make_optimizer(name, _params(), 1e-4)
    message = str(raised.value)
    assert f"pip install {package}`" in message and name in message and "AdamW" in message
    assert raised.value.package == package
    assert unavailable_reason(name) == message


def test_a_package_that_fails_to_load_is_reported_with_its_error(monkeypatch):
    real = optimizers.importlib.import_module

    def broken(name, *args):
        if name == "bitsandbytes":
            raise RuntimeError("CUDA Setup failed despite GPU being available")
        return real(name, *args)

    monkeypatch.setattr(optimizers.importlib, "import_module", broken)
    reason = unavailable_reason("AdamW8bit")
    assert "CUDA Setup failed" in reason and "pip install bitsandbytes" in reason


class _Recorder(torch.optim.Optimizer):
    def __init__(self, params, lr, weight_decay=0.0, **extra):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.extra = extra

    def step(self, closure=None):
        return None


def test_adamw8bit_and_prodigy_are_built_when_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes",
                        types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=_Recorder)))
    monkeypatch.setitem(sys.modules, "prodigyopt", types.SimpleNamespace(Prodigy=_Recorder))
    unet, te = _params(1, 0), _params(1, 1)
    eight_bit = make_optimizer("AdamW8bit", param_groups(unet, 1e-4, te, 2e-5), 1e-4, weight_decay=0.1)
    assert [g["lr"] for g in eight_bit.param_groups] == [1e-4, 2e-5]
    assert eight_bit.defaults["weight_decay"] == 0.1
    prodigy = make_optimizer("Prodigy", unet, 1.0, d_coef=2, decouple=True)
    assert prodigy.extra == {"d_coef": 2, "decouple": True} and prodigy.defaults["lr"] == 1.0
    assert unavailable_reason("Prodigy") is None


def test_parse_optimizer_args_reads_kohya_style_pairs():
    assert parse_optimizer_args("") == {}
    assert parse_optimizer_args("d_coef=2 decouple=True use_bias_correction=false") == {
        "d_coef": 2, "decouple": True, "use_bias_correction": False}
    assert parse_optimizer_args("betas=(0.9, 0.99), eps = 1e-8\nweight_decay=0.01") == {
        "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}
    assert parse_optimizer_args("mode=fast") == {"mode": "fast"}
    for bad in ("d_coef", "=2", "x=", "2x=3"):
        with pytest.raises(ValueError, match="key=value"):
            parse_optimizer_args(bad)


def test_lr_advice_flags_the_usual_mistakes():
    assert "1.0" in lr_advice("Prodigy", 1e-4)
    assert lr_advice("Prodigy", 1.0) is None
    assert lr_advice("AdamW", 1e-4) is None
    assert "very high" in lr_advice("Adafactor", 0.5)


def test_optimizer_args_may_override_weight_decay_but_not_lr():
    args = parse_optimizer_args("weight_decay=0.2 eps=1e-6")
    optimizer = make_optimizer("AdamW", _params(), 1e-4, **{"weight_decay": 0.01, **args})
    assert optimizer.param_groups[0]["weight_decay"] == 0.2 and optimizer.param_groups[0]["eps"] == 1e-6
    for bad in ("lr=1e-3", "params=1"):
        with pytest.raises(ValueError, match="learning rate"):
            parse_optimizer_args(bad)

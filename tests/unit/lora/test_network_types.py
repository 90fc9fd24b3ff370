"""DoRA, LoHa and LoKr (trainer/lora/network_types.py) on plain torch modules: each starts as the base, learns,
computes the update its file describes (written out here by hand, as ComfyUI's loader computes it), loads back
bitwise, and leaves no trace. (The same files through ComfyUI's real LoraLoader: tests/comfy/test_network_types.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_lab.trainer.lora.adapters import InjectedLora
from lora_lab.trainer.lora.network import Network
from lora_lab.trainer.training.kohya_metadata import network_metadata

TYPES = ["LoRA", "DoRA", "LoHa", "LoKr"]


class Net(nn.Module):
    """A 3x3 conv, then two Linears of different widths (non-square: a magnitude on the wrong axis would not fit)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(12, 6)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)

    def forward(self, x):
        return self.b(torch.tanh(self.a(self.conv(x).flatten(2).transpose(1, 2))))


TARGETS = {"conv": "lora_unet_conv", "a": "lora_unet_a", "b": "lora_unet_b"}


def inject(net, network_type, alpha=2.0, rank=2, **kw):
    return InjectedLora(net, TARGETS, rank=rank, alpha=alpha, seed=3, network_type=network_type, **kw)


def learn(net, lora, steps=3):
    optimizer = torch.optim.SGD(lora.parameters(), lr=0.2)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        optimizer.zero_grad()
        net(x).square().mean().backward()
        optimizer.step()
    return x


@pytest.mark.parametrize("network_type", TYPES)
def test_each_type_starts_as_the_base_learns_and_leaves_no_trace(network_type, one_arithmetic_path):
    net = Net()
    x = torch.randn(2, 3, 4, 4)
    before, state = net(x), {k: v.clone() for k, v in net.state_dict().items()}
    with inject(net, network_type) as lora:
        # One factor starts at zero (DoRA's magnitude at the base's own norms, a scale of exactly 1).
        assert torch.equal(net(x), before)
        learn(net, lora)
        assert (net(x) - before).abs().max() > 1e-3
        assert all(p.requires_grad for p in lora.parameters())
    assert torch.equal(net(x), before)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert not any(m._forward_pre_hooks for m in net.modules()) and "loralab_dora_scale" not in str(net)


def merged_weight(tensors: dict, name: str, weight: torch.Tensor, network_type: str, rank: int) -> torch.Tensor:
    """The weight ComfyUI's loader makes from a file's tensors, written out by hand: W + scale · ΔW, DoRA then
    rescaling each input column to its magnitude."""
    alpha = tensors[f"{name}.alpha"].item()
    if network_type in ("LoRA", "DoRA"):
        up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * alpha / rank
        if network_type == "LoRA":
            return weight + delta
        merged = weight + delta
        column_norms = merged.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
        shape = (1, -1, *[1] * (weight.dim() - 2))
        return merged * (tensors[f"{name}.dora_scale"] / column_norms.reshape(shape))
    if network_type == "LoHa":
        t = {k: tensors[f"{name}.hada_{k}"] for k in ("w1_a", "w1_b", "w2_a", "w2_b")}
        delta = (t["w1_a"] @ t["w1_b"]) * (t["w2_a"] @ t["w2_b"])
        return weight + delta.reshape(weight.shape) * alpha / rank
    w1 = tensors.get(f"{name}.lokr_w1")
    w2 = tensors.get(f"{name}.lokr_w2")
    decomposed = w2 is None
    if decomposed:
        w2 = tensors[f"{name}.lokr_w2_a"] @ tensors[f"{name}.lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / rank if decomposed else 1.0        # ComfyUI: alpha applies only to a factored matrix
    return weight + torch.kron(w1, w2).reshape(weight.shape) * scale


@pytest.mark.parametrize("network_type", TYPES)
def test_each_layer_computes_the_weight_its_file_describes(network_type):
    """The adapted layer equals the plain layer with the hand-merged weight. Tolerance: weights and inputs of
    order 1 over at most 72 products per output; the two paths differ by float32 rounding (1e-7 relative)
    per product, so 1e-5 absolute is ample, and a wrong axis or scale is off by 1e-2 or more."""
    net = Net()
    with inject(net, network_type, alpha=3.0) as lora:
        learn(net, lora)
        with torch.no_grad():
            for p in lora.parameters():            # a magnitude away from the base norms, factors away from 0
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        tensors = lora.kohya_state_dict()
        x_conv = torch.randn(2, 3, 4, 4)
        x_a = torch.randn(5, 8)
        with torch.no_grad():
            conv_out, a_out = net.conv(x_conv), net.a(x_a)
    with torch.no_grad():
        conv_w = merged_weight(tensors, "lora_unet_conv", net.conv.weight, network_type, 2)
        a_w = merged_weight(tensors, "lora_unet_a", net.a.weight, network_type, 2)
        torch.testing.assert_close(conv_out, F.conv2d(x_conv, conv_w, net.conv.bias, padding=1), rtol=0, atol=1e-5)
        torch.testing.assert_close(a_out, F.linear(x_a, a_w, net.a.bias), rtol=0, atol=1e-5)
        assert (a_w - net.a.weight).abs().max() > 1e-3


def test_dora_keeps_a_magnitude_per_input_channel_and_learns_it():
    net = Net()
    with inject(net, "DoRA") as lora:
        tensors = lora.kohya_state_dict()
        assert tensors["lora_unet_a.dora_scale"].shape == (1, 8)
        assert tensors["lora_unet_conv.dora_scale"].shape == (1, 3, 1, 1)
        start = net.a.weight.norm(dim=0)
        torch.testing.assert_close(tensors["lora_unet_a.dora_scale"][0], start)
        learn(net, lora)
        assert not torch.allclose(lora.kohya_state_dict()["lora_unet_a.dora_scale"][0], start)


def test_lokr_trains_whole_factors_at_scale_1_and_factored_ones_at_alpha_over_rank():
    """As LyCORIS trains them and ComfyUI applies them (its loader ignores alpha when no matrix is factored)."""
    net = Net()
    # a (8 -> 12): a 4x4 second matrix, whole at rank 2; b (12 -> 6) at rank 1: its 3x4 one is factored.
    with inject(net, "LoKr", alpha=3.0, rank=2, ranks={"b": 1}) as lora:
        state = lora.kohya_state_dict()
        assert "lora_unet_a.lokr_w2" in state and "lora_unet_b.lokr_w2_a" in state
        assert net.a.scaling["loralab"] == 1.0 and net.b.scaling["loralab"] == 3.0


@pytest.mark.parametrize("network_type", TYPES)
def test_a_save_loads_back_bitwise_and_another_alpha_is_rescaled(network_type, one_arithmetic_path):
    net = Net()
    with inject(net, network_type) as lora:
        x = learn(net, lora)
        trained, state = net(x), lora.kohya_state_dict()
    with inject(net, network_type) as resumed:                  # as a resume loads it: every value bitwise
        resumed.load_kohya_state_dict(state)
        assert all(torch.equal(resumed.kohya_state_dict()[k], v) for k, v in state.items())
        assert torch.equal(net(x), trained)
    with inject(net, network_type, alpha=8.0) as other:         # 4x the alpha: the file's update, exactly
        other.load_kohya_state_dict(state)
        torch.testing.assert_close(net(x), trained, rtol=0, atol=1e-6)


def test_a_file_of_another_type_is_refused_before_anything_is_copied():
    net = Net()
    with inject(net, "LoHa") as loha:
        learn(net, loha)
        state = loha.kohya_state_dict()
    with inject(net, "LoKr") as lokr:
        untouched = lokr.kohya_state_dict()
        with pytest.raises(ValueError, match="missing keys.*unexpected keys"):
            lokr.load_kohya_state_dict(state)
        assert all(torch.equal(lokr.kohya_state_dict()[k], v) for k, v in untouched.items())


def test_bad_settings_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="LoHa has no input dropout"):
        Network(network_type="LoHa", dropout=0.1)
    with pytest.raises(ValueError, match="network type 'OFT'"):
        Network(network_type="OFT")
    with pytest.raises(ValueError, match="lokr_factor"):
        Network(network_type="LoKr", lokr_factor=0)
    with pytest.raises(ValueError, match="LoKr has no input dropout in peft"):
        InjectedLora(Net(), TARGETS, rank=2, alpha=1.0, dropout=0.1, network_type="LoKr")


def test_the_metadata_says_the_type_as_lycoris_does():
    assert "ss_network_args" not in network_metadata(Network())
    assert network_metadata(Network(network_type="LoHa"))["ss_network_args"] == '{"algo": "loha"}'
    dora = network_metadata(Network(network_type="DoRA", preset="LoCon (+conv)", conv_rank=4))
    assert dora["loralab_network_type"] == "DoRA"
    assert dora["ss_network_args"] == ('{"algo": "lora", "dora_wd": "True", "wd_on_out": "False", '
                                       '"conv_dim": "4", "conv_alpha": "8.0"}')
    assert '"factor": "8"' in network_metadata(Network(network_type="LoKr", lokr_factor=8))["ss_network_args"]


@pytest.mark.parametrize("network_type", ["DoRA", "LoHa", "LoKr"])
def test_each_type_trains_beside_an_fp8_base_and_dora_measures_the_fp8_weights(network_type, tmp_path,
                                                                               one_arithmetic_path):
    """DoRA's norms are those of the weights the layer computes with: fp8 times its row scale. Tolerance of the
    magnitude check: the same float32 sums over at most 32 rows, differently grouped: 1e-6 relative."""
    from lora_lab.trainer.training.fp8_base import dequantize, frozen_base_in_fp8
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    x, target = torch.randn(5, 16), torch.randn(5, 8)
    with frozen_base_in_fp8(model, str(tmp_path)):
        before = model(x)
        with InjectedLora(model, {"0": "l0", "2": "l2"}, rank=2, alpha=2, seed=1, network_type=network_type) as lora:
            assert torch.equal(model(x), before)
            if network_type == "DoRA":
                upcast = dequantize(model[0].base_layer.weight, model[0].base_layer.loralab_fp8_scale, torch.float32)
                torch.testing.assert_close(model[0].loralab_dora_scale[0], upcast.norm(dim=0), rtol=1e-6, atol=0)
            optimizer = torch.optim.SGD(lora.parameters(), lr=0.5)
            losses = []
            for _ in range(15):
                loss = (model(x) - target).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            # It learns: LoHa and LoKr start slowly (one factor is 0, the other small), but the fall is far above
            # float32 noise on a loss of order 1 (1e-7).
            assert losses[0] - losses[-1] > 1e-3 and losses == sorted(losses, reverse=True), losses


@pytest.mark.parametrize("network_type", ["DoRA", "LoHa", "LoKr"])
def test_a_resumed_run_equals_an_uninterrupted_one(network_type, one_arithmetic_path):
    """As Train LoRA resumes: the adapters saved as float32 kohya tensors, injected afresh and loaded, the loop's
    state restored; masked-loss weights in the data too. One arithmetic path, so bitwise."""
    from lora_lab.trainer.training.loop import TrainSettings, train
    from toy_training import TinyEpsDenoiser, toy_data
    targets = {"net.0": "lora_unet_net_0", "net.2": "lora_unet_net_2"}
    settings = TrainSettings(steps=4, batch_size=2, learning_rate=3e-3)

    def run(resume=None, tensors=None, stop_at=None):
        torch.manual_seed(0)
        model, data = TinyEpsDenoiser(), toy_data()
        for index, example in enumerate(data.examples):
            example.loss_weight = torch.full(example.latent.shape[1:], 0.5 + 0.1 * index)
        with InjectedLora(model, targets, rank=2, alpha=2.0, seed=5, network_type=network_type) as lora:
            if tensors is not None:
                lora.load_kohya_state_dict(tensors)

            def on_step(report):
                if report.step == stop_at:
                    raise Interrupted(report.snapshot(), lora.kohya_state_dict(torch.float32))
            train(model, data, lora.parameters(), settings, torch.device("cpu"), resume=resume, on_step=on_step)
            return lora.kohya_state_dict(torch.float32)

    class Interrupted(Exception):
        def __init__(self, state, tensors):
            super().__init__("stopped")
            self.state, self.tensors = state, tensors

    whole = run()
    with pytest.raises(Interrupted) as stopped:
        run(stop_at=2)
    resumed = run(resume=stopped.value.state, tensors=stopped.value.tensors)
    assert all(torch.equal(resumed[key], value) for key, value in whole.items())
    assert any(not torch.equal(stopped.value.tensors[key], value) for key, value in whole.items())

"""Half-precision frozen weights with the fp32 originals parked in a file and restored bitwise."""
import logging
import os

import pytest
import torch
from torch import nn

from lora_lab.trainer.training.half_precision_base import frozen_weights_in


def small_network(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def snapshot(network):
    return [(name, p, p.detach().clone(), p.requires_grad) for name, p in network.named_parameters()]


def assert_restored(network, before):
    after = dict(network.named_parameters())
    for name, _, values, flag in before:
        assert after[name].dtype == torch.float32 and torch.equal(after[name], values), name
        assert after[name].requires_grad == flag and isinstance(after[name], nn.Parameter), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inside_linear_and_conv_are_half_outside_everything_is_bitwise_back(tmp_path, dtype):
    network = small_network()
    network[4].weight.requires_grad_(False)          # flags come back as they were, mixed
    before = snapshot(network)
    with frozen_weights_in(network, dtype, str(tmp_path)) as count:
        assert count == 6                             # weight + bias of the conv and both linears
        assert {network[i].weight.dtype for i in (0, 4, 6)} == {dtype}
        assert network[1].weight.dtype == network[5].weight.dtype == torch.float32, "norms keep fp32"
        parked = list(tmp_path.iterdir())
        expected_bytes = sum(p.numel() * 4 for i in (0, 4, 6) for p in network[i].parameters())
        assert len(parked) == 1 and parked[0].stat().st_size == expected_bytes
        assert not any(p.requires_grad for i in (0, 4, 6) for p in network[i].parameters())
    assert_restored(network, before)
    assert list(tmp_path.iterdir()) == [], "the parking file is removed"


def test_an_adapter_trains_through_half_precision_weights_under_autocast(tmp_path):
    network = small_network()
    before = snapshot(network)
    adapter = nn.Parameter(torch.zeros(16))          # what a LoRA adds, kept in fp32
    x = torch.randn(2, 4, 6, 6)
    with frozen_weights_in(network, torch.bfloat16, str(tmp_path)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = network[:5](x) + adapter
            loss = network[5:](hidden).float().pow(2).mean()
        loss.backward()
    assert adapter.grad is not None and adapter.grad.abs().sum() > 0 and adapter.grad.dtype == torch.float32
    assert_restored(network, before)


def test_an_error_inside_still_restores(tmp_path):
    network = small_network()
    before = snapshot(network)
    with pytest.raises(KeyboardInterrupt):
        with frozen_weights_in(network, torch.bfloat16, str(tmp_path)):
            raise KeyboardInterrupt              # Cancel arrives as an exception too
    assert_restored(network, before)
    assert list(tmp_path.iterdir()) == []


def test_fp32_or_none_changes_nothing(tmp_path):
    network = small_network()
    objects = [p for p in network.parameters()]
    for dtype in (None, torch.float32):
        with frozen_weights_in(network, dtype, str(tmp_path)) as count:
            assert count == 0
            assert [p for p in network.parameters()] == objects
    assert list(tmp_path.iterdir()) == []


def test_no_room_to_park_trains_in_full_precision_and_says_so(tmp_path, caplog):
    network = small_network()
    before = snapshot(network)
    missing = os.path.join(tmp_path, "no", "such", "folder")
    with caplog.at_level(logging.WARNING), frozen_weights_in(network, torch.bfloat16, missing) as count:
        assert count == 0 and network[0].weight.dtype == torch.float32
    assert "keeps them in fp32" in caplog.text
    assert_restored(network, before)

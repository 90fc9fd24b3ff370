"""The fp8 frozen base (trainer/training/fp8_base.py): the rounding bound, a LoRA training beside fp8 weights,
no upcast copy kept for the backward pass, and the originals back bitwise on success and error."""
import pytest
import torch
from torch import nn

from lora_lab.trainer.lora.adapters import InjectedLora
from lora_lab.trainer.training.fp8_base import FP8, Fp8Report, dequantize, frozen_base_in_fp8, quantize

SUBNORMAL_STEP = 2.0 ** -9        # e4m3fn's smallest subnormal; rounding errs by at most half of it
RELATIVE_STEP = 2.0 ** -3         # 3 mantissa bits: neighbours differ by 2^-3 relative; rounding, half of it


def network(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 32, bias=False),
                         nn.GELU(), nn.Linear(32, 8)).to(dtype)


def snapshot(model):
    return {name: (p, p.detach().clone(), p.dtype, p.requires_grad) for name, p in model.named_parameters()}


def assert_bitwise_back(model, before):
    for name, param in model.named_parameters():
        _, values, dtype, flag = before[name]
        assert param.dtype == dtype and param.requires_grad == flag, name
        assert torch.equal(param.view(torch.uint8), values.view(torch.uint8)), name
    assert all("forward" not in vars(m) and "loralab_fp8_scale" not in vars(m) for m in model.modules())


def test_rounding_stays_within_e4m3s_bound_per_row():
    """Each row is scaled so its largest entry is 448: entries then round to 3 mantissa bits (relative error at
    most 2^-4) or, below e4m3's normal range, to the subnormal grid (absolute error at most 2^-10, times the
    row's scale). Rows of very different sizes keep the same relative precision."""
    torch.manual_seed(0)
    weight = torch.randn(64, 48) * torch.logspace(-4, 1, 64)[:, None]
    quantized, scale = quantize(weight)
    assert quantized.dtype == FP8 and scale.shape == (64,)
    error = (dequantize(quantized, scale, torch.float32) - weight).abs()
    bound = torch.maximum(weight.abs() * RELATIVE_STEP / 2, SUBNORMAL_STEP / 2 * scale[:, None])
    assert (error <= bound * (1 + 1e-6)).all()
    # Without per-row scales the small rows would sink into fp8's subnormals, or flush to zero:
    plain = weight.to(FP8).float()
    assert (plain[:8] == 0).float().mean() > 0.5 and (dequantize(quantized, scale, torch.float32)[:8] != 0).all()


@pytest.mark.parametrize("parking", ["file", "memory"])
def test_lora_trains_beside_fp8_weights_and_the_base_comes_back_bitwise(tmp_path, parking, monkeypatch,
                                                                       one_arithmetic_path):
    model = network()
    model[3].weight.requires_grad_(False)                # flags come back as they were
    before = snapshot(model)
    x = torch.randn(5, 16)
    # The same network with each weight rounded as fp8 stores it, computed the ordinary way: the fp8 layers
    # must give exactly its outputs (the same fp32 matmuls on the same values, on one thread).
    rounded = network()
    with torch.no_grad():
        for i in (0, 3, 5):
            rounded[i].weight.copy_(dequantize(*quantize(model[i].weight), torch.float32))
    reference = rounded(x)
    if parking == "memory":                              # as on a GPU: originals parked in CPU memory
        monkeypatch.setattr("lora_lab.trainer.training.fp8_base.park_parameters", _park_in_memory)
    with frozen_base_in_fp8(model, str(tmp_path)) as report:
        assert (report.converted, report.already_fp8, report.kept) == (3, 0, 0)
        assert {model[i].weight.dtype for i in (0, 3, 5)} == {FP8} and model[2].weight.dtype == torch.float32
        assert report.original_bytes == 4 * report.converted_fp8_bytes
        assert len(list(tmp_path.iterdir())) == (0 if parking == "memory" else 1)
        assert torch.equal(model(x), reference)
        with InjectedLora(model, {"0": "l0", "3": "l3", "5": "l5"}, rank=4, alpha=4, seed=1) as lora:
            optimizer = torch.optim.SGD(lora.parameters(), lr=0.5)
            target = torch.randn(5, 8)
            losses = []
            for _ in range(20):
                loss = (model(x) - target).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            assert losses[-1] < 0.7 * losses[0]
            assert all(p.dtype == torch.float32 for p in lora.parameters())
            assert all(model[i].weight.grad is None for i in (0, 3, 5))
    assert_bitwise_back(model, before)
    assert list(tmp_path.iterdir()) == []


def _park_in_memory(targets, folder):
    from lora_lab.trainer.training.half_precision_base import _Parked
    return [_Parked(module, name, getattr(module, name).requires_grad, tuple(getattr(module, name).shape),
                    getattr(module, name).dtype, copy=getattr(module, name).detach().clone())
            for module, name in targets], None


def test_backward_keeps_the_fp8_weight_not_an_upcast_copy():
    """What autograd saves between forward and backward: for each fp8 layer, the fp8 weight (1 byte a weight);
    never a float copy of a weight-shaped tensor (which would be a second copy of the base)."""
    model = network()
    saved = []
    with frozen_base_in_fp8(model, None):
        weight_shapes = {tuple(model[i].weight.shape) for i in (0, 3, 5)}
        with InjectedLora(model, {"0": "l0", "3": "l3", "5": "l5"}, rank=2, alpha=2, seed=0):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                loss = model(torch.randn(3, 16)).sum()
            loss.backward()
    weights = [t for t in saved if tuple(t.shape) in weight_shapes]
    assert weights and {t.dtype for t in weights} == {FP8}, [(t.shape, t.dtype) for t in weights]


def test_under_bf16_autocast_the_layer_computes_in_bf16():
    model = network()
    with frozen_base_in_fp8(model, None), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model[0](torch.randn(2, 16)).dtype == torch.bfloat16


def test_weights_that_already_are_fp8_are_used_as_they_are():
    model = network()
    model[3].weight = nn.Parameter(model[3].weight.detach().to(FP8), requires_grad=False)   # as ComfyUI loads them
    fp8_weight = model[3].weight
    before = snapshot(model)
    with frozen_base_in_fp8(model, None) as report:
        assert (report.converted, report.already_fp8) == (2, 1) and model[3].weight is fp8_weight
        expected = torch.nn.functional.linear(torch.ones(1, 32), fp8_weight.float())
        assert torch.equal(model[3](torch.ones(1, 32)), expected)
    assert_bitwise_back(model, before)
    assert model[3].weight is fp8_weight


def test_without_convert_only_weights_already_in_fp8_change_how_they_compute():
    from lora_lab.trainer.training.fp8_base import has_fp8_weights
    model = network()
    assert not has_fp8_weights(model)
    model[3].weight = nn.Parameter(model[3].weight.detach().to(FP8), requires_grad=False)
    assert has_fp8_weights(model)
    before = snapshot(model)
    saved = []
    with frozen_base_in_fp8(model, None, convert=False) as report:
        assert (report.converted, report.already_fp8) == (0, 1) and model[0].weight.dtype == torch.float32
        assert "forward" in vars(model[3]) and "forward" not in vars(model[0])
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            model(torch.randn(2, 16, requires_grad=True)).sum().backward()
    assert [t.dtype for t in saved if tuple(t.shape) == (32, 32)] == [FP8]    # no upcast copy of the fp8 weight
    assert_bitwise_back(model, before)


def test_layers_whose_op_computes_the_weight_keep_their_forward():
    model = network()
    model[5].weight_function = [lambda w: w * 2]        # ComfyUI's low-VRAM weight patches
    with frozen_base_in_fp8(model, None) as report:
        assert report.kept == 1 and model[5].weight.dtype == torch.float32 and "forward" not in vars(model[5])
    assert "kept their own precision" in report.describe()


def test_an_error_inside_still_puts_everything_back(tmp_path):
    model = network()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="simulated"):
        with frozen_base_in_fp8(model, str(tmp_path)):
            raise RuntimeError("simulated CUDA error")
    assert_bitwise_back(model, before)
    assert list(tmp_path.iterdir()) == []


def test_bf16_originals_come_back_bitwise(tmp_path):
    model = network(dtype=torch.bfloat16)
    before = snapshot(model)
    with frozen_base_in_fp8(model, str(tmp_path)) as report:
        assert report.original_bytes == 2 * report.converted_fp8_bytes
        model(torch.randn(2, 16, dtype=torch.bfloat16)).float().sum().backward()
    assert_bitwise_back(model, before)


def test_report_says_what_it_did():
    assert Fp8Report().describe() == "fp8 base: no Linear weight could be held in fp8"
    text = Fp8Report(converted=3, fp8_bytes=2**30, converted_fp8_bytes=2**30, original_bytes=2**31).describe()
    assert text == "fp8 base: 3 Linear weights in fp8 (1.00 GiB, 1.00 GiB less)"


def test_quantizing_a_big_layer_block_by_block_keeps_the_bound_and_never_touches_the_weight():
    torch.manual_seed(1)
    weight = torch.randn(2500, 40) * torch.logspace(-3, 0, 2500)[:, None]     # 3 blocks of rows
    before = weight.clone()
    quantized, scale = quantize(weight)
    assert torch.equal(weight, before), "quantize changed the weight it was given"
    error = (dequantize(quantized, scale, torch.float32) - weight).abs()
    bound = torch.maximum(weight.abs() * RELATIVE_STEP / 2, SUBNORMAL_STEP / 2 * scale[:, None])
    assert (error <= bound * (1 + 1e-6)).all()


def test_a_weight_that_cannot_come_back_keeps_its_fp8_layer_the_others_come_back(tmp_path, monkeypatch):
    """If an original cannot be put back (the GPU still out of memory after a failed step, say), that layer
    keeps its fp8 weight with the forward and scale that read it right, every other layer is restored, the
    parking file stays, and the error says to reload the model."""
    from lora_lab.trainer.training import half_precision_base as parking
    model = network()
    before = snapshot(model)
    real = parking._restore_one

    def failing_for_layer_3(entry, file_path):
        if entry.module is model[3]:
            raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")
        real(entry, file_path)
    monkeypatch.setattr(parking, "_restore_one", failing_for_layer_3)
    with pytest.raises(parking.RestoreFailed, match="Reload the model") as caught:
        with frozen_base_in_fp8(model, str(tmp_path)):
            pass
    assert len(caught.value.failed) == 1 and str(tmp_path) in str(caught.value)
    assert model[3].weight.dtype == FP8 and "forward" in vars(model[3]) and "loralab_fp8_scale" in vars(model[3])
    assert all(model[i].weight.dtype == torch.float32 and "forward" not in vars(model[i]) for i in (0, 5))
    for i in (0, 5):
        assert torch.equal(model[i].weight, before[f"{i}.weight"][1])
    h = torch.randn(3, 32)
    with torch.no_grad():
        reads_right = h @ dequantize(model[3].weight, model[3].loralab_fp8_scale, torch.float32).T
        assert torch.allclose(model[3](h), reads_right, rtol=1e-6, atol=1e-7), "the fp8 layer must read its weight right"
    assert len(list(tmp_path.iterdir())) == 1, "the originals stay on disk for the user"

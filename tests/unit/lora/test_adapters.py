"""InjectedLora: injection, training, kohya export/import and a trace-free removal, on plain torch modules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lora_lab.trainer.lora.adapters import InjectedLora


class NoInitLinear(nn.Linear):
    """Like ComfyUI's ``comfy.ops.disable_weight_init.Linear``: a subclass whose init is a no-op."""
    comfy_cast_weights = False

    def reset_parameters(self):
        return None


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.proj = NoInitLinear(6, 8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)))
        self.head = nn.Linear(8, 4)  # a Linear that is not a target
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)  # (batch, positions, 6)
        return self.head(self.blocks(self.proj(h)))


TARGETS = {
    "conv": "lora_unet_conv",
    "proj": "lora_unet_proj",
    "blocks.0": "lora_unet_blocks_0",
    "blocks.2.0": "lora_unet_blocks_2_0",
}
RANK, ALPHA = 2, 4.0


def sample_input(seed=1):
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def train_steps(net, injected, steps=3):
    optimizer = torch.optim.SGD(injected.parameters(), lr=0.5)
    for step in range(steps):
        loss = net(sample_input(step)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def module_fingerprint(net):
    """What remove() must restore: module objects, their attributes, hooks, flags."""
    return [(name, module, sorted(vars(module)), module.training,
             [len(getattr(module, hooks)) for hooks in ("_forward_hooks", "_forward_pre_hooks",
                                                         "_backward_hooks", "_state_dict_hooks",
                                                         "_load_state_dict_pre_hooks")])
            for name, module in net.named_modules()]


def test_injected_model_is_unchanged_at_init_and_learns():
    # Frozen first, as ComfyUI's model is: for non-contiguous inputs torch picks a different matmul
    # kernel when a Linear's weight requires grad, which differs in the last bit.
    net = TinyNet().requires_grad_(False)
    x = sample_input()
    with torch.no_grad():
        before = net(x)
    with InjectedLora(net, TARGETS, RANK, ALPHA, seed=0) as injected:
        with torch.no_grad():
            assert torch.equal(net(x), before)
        train_steps(net, injected)
        with torch.no_grad():
            assert not torch.allclose(net(x), before)
    with torch.no_grad():
        assert torch.equal(net(x), before)


def test_only_adapter_weights_train():
    net = TinyNet()
    with InjectedLora(net, TARGETS, RANK, ALPHA, seed=0) as injected:
        trainable = {id(p) for p in net.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in injected.parameters()}
        assert len(injected.parameters()) == 2 * len(TARGETS)
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in injected.parameters())


def test_kohya_state_dict_has_exactly_the_kohya_keys_and_shapes():
    net = TinyNet()
    with InjectedLora(net, TARGETS, RANK, ALPHA, seed=0) as injected:
        state = injected.kohya_state_dict()
        expected_shapes = {
            "lora_unet_conv.lora_down.weight": (RANK, 3, 3, 3), "lora_unet_conv.lora_up.weight": (6, RANK, 1, 1),
            "lora_unet_proj.lora_down.weight": (RANK, 6), "lora_unet_proj.lora_up.weight": (8, RANK),
            "lora_unet_blocks_0.lora_down.weight": (RANK, 8), "lora_unet_blocks_0.lora_up.weight": (8, RANK),
            "lora_unet_blocks_2_0.lora_down.weight": (RANK, 8), "lora_unet_blocks_2_0.lora_up.weight": (8, RANK),
        }
        expected_shapes.update({f"{name}.alpha": () for name in TARGETS.values()})
        assert {key: tuple(value.shape) for key, value in state.items()} == expected_shapes
        for key, value in state.items():
            assert value.device.type == "cpu" and value.is_contiguous() and not value.requires_grad, key
        assert all(state[f"{name}.alpha"].item() == ALPHA for name in TARGETS.values())
        assert all(state[f"{name}.lora_up.weight"].abs().sum() == 0 for name in TARGETS.values())
        # Copies, not views: changing the export leaves the adapter alone.
        state["lora_unet_proj.lora_down.weight"].add_(1.0)
        assert not torch.equal(injected.kohya_state_dict()["lora_unet_proj.lora_down.weight"],
                               state["lora_unet_proj.lora_down.weight"])


def test_export_dtype_casts_weights_but_keeps_alpha_exact():
    net = TinyNet()
    with InjectedLora(net, TARGETS, RANK, 0.1, seed=0) as injected:
        state = injected.kohya_state_dict(dtype=torch.float16)
    assert state["lora_unet_proj.lora_down.weight"].dtype == torch.float16
    assert state["lora_unet_proj.alpha"].dtype == torch.float32
    assert state["lora_unet_proj.alpha"].item() == torch.tensor(0.1, dtype=torch.float32).item()


def test_fresh_injection_loading_the_export_reproduces_the_trained_model_exactly():
    net = TinyNet()
    x = sample_input()
    with InjectedLora(net, TARGETS, RANK, ALPHA, seed=0) as injected:
        train_steps(net, injected)
        state = injected.kohya_state_dict()
        with torch.no_grad():
            trained = net(x)
    with InjectedLora(net, TARGETS, RANK, ALPHA, seed=123) as resumed:
        resumed.load_kohya_state_dict(state)
        with torch.no_grad():
            assert torch.equal(net(x), trained)
        assert all(torch.equal(resumed.kohya_state_dict()[key], value) for key, value in state.items())


def test_merged_kohya_weights_reproduce_the_adapted_layers():
    """The loaders' math (ComfyUI, A1111): W + (alpha / rank) * up @ down, for Linear and Conv2d."""
    net = TinyNet()
    originals = {path: (net.get_submodule(path).weight.detach().clone(), net.get_submodule(path).bias.detach().clone())
                 for path in TARGETS}
    with InjectedLora(net, TARGETS, RANK, ALPHA, seed=0) as injected:
        train_steps(net, injected)
        state = injected.kohya_state_dict()
        scale = ALPHA / RANK
        x_linear = torch.randn(5, 8)
        for path in ("blocks.0", "blocks.2.0"):
            name = TARGETS[path]
            weight, bias = originals[path]
            merged = weight + scale * state[f"{name}.lora_up.weight"] @ state[f"{name}.lora_down.weight"]
            with torch.no_grad():
                torch.testing.assert_close(net.get_submodule(path)(x_linear), F.linear(x_linear, merged, bias))
        x_image = sample_input()
        weight, bias = originals["conv"]
        up, down = state["lora_unet_conv.lora_up.weight"], state["lora_unet_conv.lora_down.weight"]
        merged = weight + scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        with torch.no_grad():
            torch.testing.assert_close(net.conv(x_image), F.conv2d(x_image, merged, bias, stride=2, padding=1))


def test_remove_restores_modules_state_and_flags_exactly():
    net = TinyNet()
    net.conv.weight.requires_grad_(False)
    net.head.bias.requires_grad_(False)
    net.blocks.eval()
    fingerprint = module_fingerprint(net)
    flags = [(name, p.requires_grad) for name, p in net.named_parameters()]
    state = {key: value.clone() for key, value in net.state_dict().items()}

    injected = InjectedLora(net, TARGETS, RANK, ALPHA, seed=0, dropout=0.1)
    train_steps(net, injected)
    net.train()  # the training loop may flip modes; remove() must undo that too
    injected.remove()

    assert module_fingerprint(net) == fingerprint
    assert [(name, p.requires_grad) for name, p in net.named_parameters()] == flags
    after = net.state_dict()
    assert list(after) == list(state)
    assert all(after[key].dtype == value.dtype and torch.equal(after[key], value) for key, value in state.items())
    assert not any(isinstance(module, BaseTunerLayer) for module in net.modules())
    assert not hasattr(net, "peft_config")


def test_remove_is_idempotent_and_runs_when_the_with_block_raises():
    net = TinyNet()
    fingerprint = module_fingerprint(net)
    with pytest.raises(RuntimeError, match="boom"):
        with InjectedLora(net, TARGETS, RANK, ALPHA, seed=0) as injected:
            train_steps(net, injected, steps=1)
            raise RuntimeError("boom")
    assert module_fingerprint(net) == fingerprint
    injected.remove()
    injected.remove()
    assert module_fingerprint(net) == fingerprint
    with pytest.raises(RuntimeError, match="removed"):
        injected.kohya_state_dict()


def test_failed_injection_leaves_the_model_untouched(monkeypatch):
    net = TinyNet()
    fingerprint = module_fingerprint(net)
    import peft
    real_inject = peft.inject_adapter_in_model      # lora.py imports peft on first use, from the package

    def inject_then_fail(*args, **kwargs):
        real_inject(*args, **kwargs)
        raise MemoryError("out of memory halfway")

    monkeypatch.setattr(peft, "inject_adapter_in_model", inject_then_fail)
    with pytest.raises(MemoryError):
        InjectedLora(net, TARGETS, RANK, ALPHA, seed=0)
    assert module_fingerprint(net) == fingerprint
    assert all(p.requires_grad for p in net.parameters())
    assert not hasattr(net, "peft_config")


def test_same_seed_same_init_and_global_rng_untouched():
    nets = [TinyNet() for _ in range(3)]  # torch's own layer init draws from the global RNG

    def init_of(net, seed):
        with InjectedLora(net, TARGETS, RANK, ALPHA, seed=seed) as injected:
            return injected.kohya_state_dict()

    rng_before = torch.get_rng_state()
    first, second, other = init_of(nets[0], 7), init_of(nets[1], 7), init_of(nets[2], 8)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not torch.equal(first["lora_unet_proj.lora_down.weight"], other["lora_unet_proj.lora_down.weight"])
    # same shape, different module: different init (modules must not start out correlated)
    assert not torch.equal(first["lora_unet_blocks_0.lora_down.weight"], first["lora_unet_blocks_2_0.lora_down.weight"])
    # kohya/peft init: kaiming-uniform with a = sqrt(5), i.e. within +-1/sqrt(fan_in) and not degenerate
    down = first["lora_unet_conv.lora_down.weight"]
    assert down.abs().max() <= 1 / (3 * 3 * 3) ** 0.5 and down.std() > 0.05


def test_init_of_a_module_does_not_depend_on_the_other_targets():
    alone = InjectedLora(TinyNet(), {"proj": "lora_unet_proj"}, RANK, ALPHA, seed=5)
    together = InjectedLora(TinyNet(), TARGETS, RANK, ALPHA, seed=5)
    key = "lora_unet_proj.lora_down.weight"
    assert torch.equal(alone.kohya_state_dict()[key], together.kohya_state_dict()[key])


def test_seed_none_draws_and_records_a_seed():
    torch.manual_seed(3)
    first = InjectedLora(TinyNet(), TARGETS, RANK, ALPHA)
    torch.manual_seed(3)
    second = InjectedLora(TinyNet(), TARGETS, RANK, ALPHA)
    assert first.seed == second.seed
    assert torch.equal(first.kohya_state_dict()["lora_unet_conv.lora_down.weight"],
                       second.kohya_state_dict()["lora_unet_conv.lora_down.weight"])


def test_per_target_rank_and_alpha_overrides():
    net = TinyNet().requires_grad_(False)  # see test_injected_model_is_unchanged_at_init_and_learns
    x = sample_input()
    with torch.no_grad():
        before = net(x)
    with InjectedLora(net, TARGETS, RANK, ALPHA, seed=0, ranks={"conv": 3}, alphas={"proj": 1.0}) as injected:
        state = injected.kohya_state_dict()
        assert state["lora_unet_conv.lora_down.weight"].shape == (3, 3, 3, 3)
        assert state["lora_unet_conv.alpha"].item() == ALPHA
        assert state["lora_unet_proj.lora_down.weight"].shape == (RANK, 6)
        assert state["lora_unet_proj.alpha"].item() == 1.0
        assert net.proj.scaling["loralab"] == 1.0 / RANK
        with torch.no_grad():
            assert torch.equal(net(x), before)
    assert not any(isinstance(module, BaseTunerLayer) for module in net.modules())


def test_adapter_dtype_and_injection_under_inference_mode():
    net = TinyNet()
    with torch.inference_mode():  # how ComfyUI runs nodes
        injected = InjectedLora(net, TARGETS, RANK, ALPHA, seed=0, dtype=torch.float64)
    try:
        assert all(p.dtype == torch.float64 and not p.is_inference() for p in injected.parameters())
        train_steps(net, injected, steps=1)
        assert injected.kohya_state_dict()["lora_unet_proj.lora_up.weight"].abs().sum() > 0
    finally:
        injected.remove()


def test_train_toggles_adapter_dropout_only():
    net = TinyNet().eval()
    x = sample_input()
    with InjectedLora(net, TARGETS, RANK, ALPHA, seed=0, dropout=0.5) as injected:
        train_steps(net, injected, steps=1)
        with torch.no_grad():
            injected.train(True)
            assert not torch.equal(net(x), net(x))
            injected.train(False)
            assert torch.equal(net(x), net(x))
        assert not net.training and not net.blocks.training
    assert all(not module.training for module in net.modules())


@pytest.mark.parametrize("targets, message", [
    ({"missing.layer": "lora_x"}, "'missing.layer' does not exist"),
    ({"blocks.2.1": "lora_x"}, "'blocks.2.1' is a LayerNorm"),
    ({"blocks": "lora_x"}, "'blocks' is a Sequential"),
    ({"": "lora_x"}, "root module itself"),
    ({"proj": "lora.proj"}, "letters, digits"),
    ({"proj": "lora_x", "head": "lora_x"}, "share the kohya name"),
    ({}, "no LoRA targets"),
])
def test_bad_targets_are_refused_before_anything_changes(targets, message):
    net = TinyNet()
    fingerprint = module_fingerprint(net)
    with pytest.raises(ValueError, match=message):
        InjectedLora(net, targets, RANK, ALPHA)
    assert module_fingerprint(net) == fingerprint


def test_unsupported_conv_and_bad_hyperparameters_are_refused():
    net = TinyNet()
    net.conv = nn.Conv2d(3, 6, 3, groups=3)
    with pytest.raises(ValueError, match="grouped, dilated"):
        InjectedLora(net, {"conv": "lora_conv"}, RANK, ALPHA)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        InjectedLora(TinyNet(), {"proj": "lora_proj"}, 0, ALPHA)
    with pytest.raises(ValueError, match="not targets"):
        InjectedLora(TinyNet(), {"proj": "lora_proj"}, RANK, ALPHA, ranks={"head": 4})
    with pytest.raises(ValueError, match="dropout"):
        InjectedLora(TinyNet(), {"proj": "lora_proj"}, RANK, ALPHA, dropout=1.0)


def test_a_second_injection_into_an_injected_model_is_refused():
    net = TinyNet()
    with InjectedLora(net, TARGETS, RANK, ALPHA, seed=0):
        with pytest.raises(ValueError, match="already contains peft adapter layers"):
            InjectedLora(net, {"head": "lora_head"}, RANK, ALPHA)
        assert isinstance(net.proj, BaseTunerLayer)
    assert isinstance(net.proj, NoInitLinear)


def trained_state(alpha=ALPHA):
    net = TinyNet()
    with InjectedLora(net, TARGETS, RANK, alpha, seed=0) as injected:
        train_steps(net, injected)
        return injected.kohya_state_dict()


def test_load_refuses_missing_unexpected_and_misshapen_keys_without_changing_anything():
    state = trained_state()
    net = TinyNet()
    with InjectedLora(net, TARGETS, RANK, ALPHA, seed=0) as injected:
        untouched = injected.kohya_state_dict()
        broken = dict(state)
        del broken["lora_unet_proj.lora_up.weight"]
        broken["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 4)
        broken["lora_unet_conv.lora_down.weight"] = torch.zeros(RANK, 3, 1, 1)
        with pytest.raises(ValueError) as refused:
            injected.load_kohya_state_dict(broken)
        message = str(refused.value)
        assert "missing keys: lora_unet_proj.lora_up.weight" in message
        assert "unexpected keys: lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in message
        assert "lora_unet_conv.lora_down.weight: file (2, 3, 1, 1), adapter (2, 3, 3, 3)" in message
        assert all(torch.equal(injected.kohya_state_dict()[key], value) for key, value in untouched.items())


def test_non_strict_load_skips_absent_modules_and_foreign_keys():
    state = trained_state()
    partial = {key: value for key, value in state.items() if key.startswith("lora_unet_proj.")}
    partial["lora_te_foo.lora_down.weight"] = torch.zeros(1, 1)
    with InjectedLora(TinyNet(), TARGETS, RANK, ALPHA, seed=0) as injected:
        untouched = injected.kohya_state_dict()
        with pytest.raises(ValueError, match="missing keys"):
            injected.load_kohya_state_dict(partial)
        injected.load_kohya_state_dict(partial, strict=False)
        loaded = injected.kohya_state_dict()
        assert torch.equal(loaded["lora_unet_proj.lora_up.weight"], state["lora_unet_proj.lora_up.weight"])
        assert torch.equal(loaded["lora_unet_conv.lora_down.weight"], untouched["lora_unet_conv.lora_down.weight"])
        half = {"lora_unet_proj.lora_down.weight": state["lora_unet_proj.lora_down.weight"]}
        with pytest.raises(ValueError, match="missing keys: lora_unet_proj.lora_up.weight"):
            injected.load_kohya_state_dict(half, strict=False)


def test_load_with_a_different_alpha_rescales_up_to_keep_the_files_output():
    state = trained_state(alpha=ALPHA)
    x = sample_input()
    net = TinyNet()
    with InjectedLora(net, TARGETS, RANK, ALPHA, seed=0) as same:
        same.load_kohya_state_dict(state)
        with torch.no_grad():
            expected = net(x)
    with InjectedLora(net, TARGETS, RANK, 2 * ALPHA, seed=0) as doubled:
        doubled.load_kohya_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(net(x), expected)
        exported = doubled.kohya_state_dict()
        assert exported["lora_unet_proj.alpha"].item() == 2 * ALPHA
        torch.testing.assert_close(exported["lora_unet_proj.lora_up.weight"],
                                   state["lora_unet_proj.lora_up.weight"] / 2)


def test_a_file_without_alpha_means_alpha_equals_rank():
    state = {key: value for key, value in trained_state().items() if not key.endswith(".alpha")}
    with InjectedLora(TinyNet(), TARGETS, RANK, ALPHA, seed=0) as injected:
        injected.load_kohya_state_dict(state)
        torch.testing.assert_close(injected.kohya_state_dict()["lora_unet_proj.lora_up.weight"],
                                   state["lora_unet_proj.lora_up.weight"] * RANK / ALPHA)


class HalfBlock(nn.Module):
    """q, k and v of one attention reading the same input, frozen weights in bf16 (as frozen_weights_in
    leaves them for bf16 training), adapters in fp32."""
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(16, 16).to(torch.bfloat16) for _ in range(3))

    def forward(self, x):
        return self.to_q(x) * self.to_k(x) + self.to_v(x)


def _half_block_run(block, injected, autocast: bool):
    """Output, adapter gradients and the bytes autograd keeps for backward (distinct storages)."""
    # An activation inside a network: it needs a gradient (frozen base layers keep only their weights).
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).requires_grad_(True)
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = block(x)
    out.float().pow(2).mean().backward()
    grads = [p.grad.clone() for p in injected.parameters()]
    for p in injected.parameters():
        p.grad = None
    return out.detach(), grads, sum(kept.values())


@pytest.mark.skipif(not hasattr(BaseTunerLayer, "_cast_input_dtype"), reason="this peft always casts the input")
def test_under_autocast_adapters_take_the_input_without_a_copy_and_compute_the_same():
    block = HalfBlock()
    injected = InjectedLora(block, {"to_q": "q", "to_k": "k", "to_v": "v"}, rank=4, alpha=4.0, seed=0)
    with torch.no_grad():
        for p in injected.parameters():
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))   # lora_up non-zero: the path counts
    out, grads, kept = _half_block_run(block, injected, autocast=True)
    assert out.dtype == torch.bfloat16

    # peft's own way: the input cast to the adapters' fp32 in every layer, then back by autocast.
    for hook in injected._hooks:
        hook.remove()
    for layer in (block.to_q, block.to_k, block.to_v):
        layer.cast_input_dtype_enabled = True
    peft_out, peft_grads, peft_kept = _half_block_run(block, injected, autocast=True)

    assert torch.equal(out, peft_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, peft_grads))
    x_bytes = 4 * 16 * 2
    assert peft_kept - kept >= 2 * x_bytes, (kept, peft_kept)   # q, k, v: one copy of x kept, not three
    injected.remove()


def test_outside_autocast_a_half_precision_input_still_reaches_fp32_adapters():
    """A bf16/fp16 text encoder running without autocast: peft's cast is what makes the dtypes match."""
    block = HalfBlock()
    with InjectedLora(block, {"to_q": "q", "to_k": "k", "to_v": "v"}, rank=4, alpha=4.0, seed=0) as injected:
        out, grads, _ = _half_block_run(block, injected, autocast=False)
        assert all(getattr(layer, "cast_input_dtype_enabled", True) for layer in (block.to_q, block.to_k, block.to_v))
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)

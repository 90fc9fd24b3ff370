"""Block swap (trainer/training/block_swap.py), rehearsed on the CPU: an evicted block's frozen weights are empty
tensors, so a block that computed without being fetched would fail, not pass by accident. The LoRA trained with
swapped blocks equals the one trained without; at most two swapped blocks are ever present; each comes over once
for its forward and once for its backward; everything is back as it was afterwards."""
import pytest
import torch
from torch import nn

from lora_lab.trainer.training.block_swap import BlockSwapper, blocks_swapped, chosen_blocks
from lora_lab.trainer.training.gradient_checkpointing import gradient_checkpointing

WIDTH = 24


class Block(nn.Module):
    """A frozen Linear and norm (with a buffer) and a trainable low-rank pair beside the Linear, adding into its
    input in place as ComfyUI's blocks do (the swap must hand it copies, as gradient checkpointing does)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.down = nn.Parameter(torch.randn(4, WIDTH) * 0.1)
        self.up = nn.Parameter(torch.randn(WIDTH, 4) * 0.1)
        self.register_buffer("gain", torch.rand(WIDTH) + 0.5)
        for p in (*self.norm.parameters(), *self.linear.parameters()):
            p.requires_grad_(False)

    def forward(self, x, skip=None):
        h = self.norm(x.clone())               # the norm keeps x for backward: it gets a copy (the bridge's fix)
        h = self.linear(h) * self.gain + (h @ self.down.t()) @ self.up.t()
        x += torch.nn.functional.gelu(h)       # in place, into the input
        return x if skip is None else x + skip


class Net(nn.Module):
    """Six blocks; the last three also take a skip from the first three, as a UNet's output blocks do."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(Block() for _ in range(6))

    def forward(self, x):
        x, skips = x.clone(), []       # the blocks add into their input; the caller's batch stays as it was
        for block in self.blocks[:3]:
            x = block(x)
            skips.append(x.clone())
        for block in self.blocks[3:]:
            x = block(x, skip=skips.pop())
        return x


def trainable(net):
    return [p for p in net.parameters() if p.requires_grad]


def train(net, steps=3, swap=0, checkpointing=False, leave=()):
    """``steps`` of SGD on a fixed batch; the trained parameters and the swap's report."""
    optimizer = torch.optim.SGD(trainable(net), lr=0.1)
    torch.manual_seed(1)
    batch, target = torch.randn(5, 7, WIDTH), torch.randn(5, 7, WIDTH)
    with gradient_checkpointing(net.blocks, enabled=checkpointing), \
            blocks_swapped(net.blocks, swap, "cpu", rehearsal=True, leave=leave) as report:
        for _ in range(steps):
            optimizer.zero_grad()
            loss = (net(batch) - target).pow(2).mean()
            loss.backward()
            optimizer.step()
    return [p.detach().clone() for p in trainable(net)], report


def frozen_state(net):
    return {name: t.detach().clone() for name, t in [*net.named_parameters(), *net.named_buffers()]
            if not (isinstance(t, nn.Parameter) and t.requires_grad)}


def test_chosen_blocks_spread_evenly():
    assert chosen_blocks(0, 57) == []
    assert chosen_blocks(3, 6) == [1, 3, 5]
    assert chosen_blocks(6, 6) == list(range(6))
    assert chosen_blocks(99, 4) == [0, 1, 2, 3]
    assert len(chosen_blocks(16, 57)) == 16


@pytest.mark.parametrize("swap", [1, 3, 6])
def test_the_lora_trained_with_swapped_blocks_equals_the_one_without(swap):
    """Same ops on the same values in the same order (a swapped block recomputes its forward in backward, on the
    same weights and inputs), so the result agrees to float rounding. Tolerance: the trained parameters are of
    order 0.1-1; 1e-6 absolute is a few float32 ulps of that, far below the 0.1 x gradient a step changes them by."""
    expected, _ = train(Net())
    got, report = train(Net(), swap=swap)
    assert report.swapped == swap and report.bytes_swapped > 0
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(expected, [p for p in trainable(Net())])), "training changed nothing"


def test_at_most_two_swapped_blocks_are_present_and_each_comes_over_twice_a_step():
    _, report = train(Net(), steps=2, swap=3)
    assert report.most_on_device == 2          # the computing block and the next one coming over
    assert report.fetches == 2 * 2 * 3          # steps x (forward + backward) x swapped blocks


def test_between_steps_no_swapped_block_is_present():
    net = Net()
    with blocks_swapped(net.blocks, 3, "cpu", rehearsal=True):
        net(torch.randn(2, 3, WIDTH)).sum().backward()
        swapped = [net.blocks[i] for i in chosen_blocks(3, 6)]
        assert all(block.linear.weight.numel() == 0 and block.gain.numel() == 0 for block in swapped)
        assert all(net.blocks[i].linear.weight.numel() == WIDTH * WIDTH for i in (0, 2, 4))
        with pytest.raises(RuntimeError):       # an evicted block cannot compute by mistake
            type(swapped[0]).forward(swapped[0], torch.randn(2, 3, WIDTH))


def test_without_gradients_blocks_come_and_go_and_give_the_same_output():
    net = Net()
    x = torch.randn(2, 3, WIDTH)
    with torch.no_grad():
        expected = net(x.clone())
    with blocks_swapped(net.blocks, 6, "cpu", rehearsal=True) as report, torch.inference_mode():
        got = net(x.clone())
        assert all(block.linear.weight.numel() == 0 for block in net.blocks)
    assert torch.equal(got, expected)
    assert report.fetches == 6
    # Fetched under inference mode, yet the weights train afterwards: nothing of inference mode was kept.
    _, report = train(net, steps=1, swap=2)


def test_everything_is_back_bitwise_after_success_and_error():
    net = Net()
    before = frozen_state(net)
    objects = [p for p in net.parameters()]
    train(net, steps=1, swap=4)
    after = frozen_state(net)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p for p in net.parameters()] == objects and all("forward" not in vars(b) for b in net.blocks)

    with pytest.raises(ValueError), blocks_swapped(net.blocks, 6, "cpu", rehearsal=True):
        net(torch.randn(2, 3, WIDTH)).sum().backward()
        raise ValueError("cancelled")
    assert all(torch.equal(before[k], v) for k, v in frozen_state(net).items())
    assert all("forward" not in vars(b) for b in net.blocks)


def test_gradient_checkpointing_on_the_same_blocks_is_bypassed_then_back():
    """A swapped block checkpoints itself: wrapping gradient checkpointing's wrapper would recompute it twice."""
    net = Net()
    calls = []
    original = Block.forward

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    Block.forward = counting
    try:
        with gradient_checkpointing(net.blocks) as wrapped:
            assert wrapped == 6
            gc_forwards = [vars(b)["forward"] for b in net.blocks]
            with blocks_swapped(net.blocks, 6, "cpu", rehearsal=True):
                net(torch.randn(2, 3, WIDTH)).sum().backward()
            assert [vars(b)["forward"] for b in net.blocks] == gc_forwards
    finally:
        Block.forward = original
    assert len(calls) == 12        # each block: its forward, and one recompute in backward


def test_on_the_cpu_nothing_moves_and_the_report_says_why():
    net = Net()
    with blocks_swapped(net.blocks, 3, "cpu") as report:
        assert all(block.linear.weight.numel() == WIDTH * WIDTH for block in net.blocks)
    assert report.swapped == 0 and "CPU" in report.describe()
    with blocks_swapped(net.blocks, 0, "cpu") as report:
        assert report.swapped == 0


def test_copies_back_are_bitwise_each_in_a_storage_of_its_own():
    """Outside a rehearsal the originals are let go; what comes back is a copy of the block's buffer, split so each
    weight owns its storage again (as the model had it)."""
    net = Net()
    before = frozen_state(net)
    swapper = BlockSwapper(net.blocks, 6, "cpu")
    swapper.send_home()
    assert all(block.linear.weight.numel() == 0 for block in net.blocks)
    swapper.put_back()
    assert all(torch.equal(before[k], v) for k, v in frozen_state(net).items())
    weight = net.blocks[0].linear.weight
    assert weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()
    assert all(block.home is None and not block.tensors for block in swapper.swapped.values())


def test_tensors_a_byte_copy_would_not_give_back_stay_where_they_are():
    net = Net()
    shared = net.blocks[1].linear.weight.data
    net.blocks[1].register_buffer("view", shared[:2])            # a view: evicting it would free nothing
    with blocks_swapped(net.blocks, 6, "cpu", rehearsal=True):
        assert net.blocks[1].view.numel() == 2 * WIDTH and net.blocks[1].linear.weight.numel() == 0


def test_a_weight_that_cannot_come_back_is_named(monkeypatch):
    from lora_lab.trainer.training import block_swap
    net = Net()
    swapper = BlockSwapper(net.blocks, 1, "cpu")
    swapper.send_home()

    class OutOfMemory:
        def to(self, *args, **kwargs):
            raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(block_swap._Frozen, "view", lambda self, buffer: OutOfMemory())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with pytest.raises(RuntimeError, match="reload the model"):
        swapper.put_back()


def test_layers_left_to_comfyui_stay_where_they_are_and_the_lora_is_the_same():
    """Layers ComfyUI keeps in CPU memory (its partial load) are moved by ComfyUI's op as they compute: the swap
    leaves their weights alone, moves the rest of their blocks, and trains the same LoRA (tolerance as above)."""
    net = Net()
    left = [net.blocks[i].linear for i in range(6)]
    kept_weights = [layer.weight for layer in left]
    frozen_bytes = sum(t.numel() * t.element_size() for t in frozen_state(net).values())
    left_bytes = sum(p.numel() * p.element_size() for layer in left for p in layer.parameters())
    with blocks_swapped(net.blocks, 6, "cpu", rehearsal=True, leave=left) as report:
        assert all(layer.weight is weight and weight.numel() == WIDTH * WIDTH
                   for layer, weight in zip(left, kept_weights))
        assert net.blocks[0].norm.weight.numel() == 0                  # the rest of the block did leave
    assert report.bytes_swapped == frozen_bytes - left_bytes
    expected, _ = train(Net())
    net = Net()
    got, report = train(net, swap=6, leave=[net.blocks[i].linear for i in range(6)])
    assert report.bytes_swapped == frozen_bytes - left_bytes
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)

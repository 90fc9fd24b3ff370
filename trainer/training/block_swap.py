"""Block swap: some of the model's blocks keep their frozen weights in CPU memory while a LoRA trains, and
come to the GPU only while they compute (kohya's and musubi's ``--blocks_to_swap``).

Each swapped block comes over twice a step: before its forward and again before its backward. It runs under
(non-reentrant) checkpointing, so autograd keeps nothing of it between the two, its weights least of all, and
its backward recomputes the block from its inputs, as gradient checkpointing does. The next swapped block is
copied over on a side stream from pinned memory while the current one computes, so the copy overlaps compute.
At most two swapped blocks are on the GPU at once, plus the one before while the GPU finishes with it: the host
runs ahead of the GPU, so a block let go may still be computing, and its memory is reused only once it is done
(each block is one buffer, copied in one go).

Why the order is safe: autograd runs a device's backward nodes latest-created first, so when a block's backward
begins (its recompute), every block after it has finished its own: those can leave.

Only frozen tensors move (the base's parameters without gradients, and buffers); the LoRA's parameters stay
where they are, so the optimizer's state never moves. On exit every tensor is back where it was, bitwise.

``rehearsal`` runs the same bookkeeping on the CPU (an evicted weight becomes an empty tensor, a fetched one a
copy), so tests see a block that computed without being fetched fail loudly rather than pass by accident.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .gradient_checkpointing import on_copies

log = logging.getLogger("LoRA Lab")


def chosen_blocks(count: int, total: int) -> list[int]:
    """Which of ``total`` blocks swap: ``count`` of them spread evenly, so each swapped block's copy overlaps the
    compute of the kept block before it (where there are enough kept blocks to go round)."""
    count = max(0, min(count, total))
    return sorted({min(total - 1, int((k + 0.5) * total / count)) for k in range(count)}) if count else []


@dataclass
class SwapReport:
    requested: int
    blocks: int = 0               # blocks that could swap
    swapped: int = 0
    bytes_swapped: int = 0        # frozen weights that left the device
    fetches: int = 0              # block copies to the device so far
    most_on_device: int = 0       # the most swapped blocks on the device at once
    pinned: bool = False
    skipped_reason: str = ""

    def describe(self) -> str:
        if self.skipped_reason:
            return f"block swap: {self.requested} requested, none swapped: {self.skipped_reason}"
        return (f"block swap: {self.swapped} of {self.blocks} blocks wait in CPU memory "
                f"({self.bytes_swapped / 2**30:.2f} GiB off the GPU{'' if self.pinned else ', not pinned'}); "
                "each comes over for its forward and again for its backward, which recomputes it")


ALIGN = 256          # bytes: each tensor's place in a block's buffer starts on this boundary (any dtype can view it)


@dataclass
class _Frozen:
    """One frozen tensor of a swapped block: its place in the block's buffer, and how to put a tensor in its
    place in the model."""
    module: nn.Module
    name: str
    is_parameter: bool
    offset: int                   # bytes into the block's buffer
    shape: tuple
    dtype: torch.dtype
    device: torch.device          # where it was, and is put back on exit
    original: torch.Tensor | None = None       # a rehearsal keeps it, to put the very tensor back

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        nbytes = math.prod(self.shape) * self.dtype.itemsize
        return buffer[self.offset:self.offset + nbytes].view(self.dtype).view(self.shape)

    def put(self, tensor: torch.Tensor):
        if self.is_parameter:
            self.module._parameters[self.name].data = tensor
        else:
            self.module._buffers[self.name] = tensor


@dataclass
class _Block:
    index: int
    tensors: list[_Frozen] = field(default_factory=list)
    home: torch.Tensor | None = None      # every frozen tensor's bytes in one CPU buffer (pinned where possible)
    on_device: bool = True
    ready: object = None          # a CUDA event recorded after the copy, waited on before use


class BlockSwapper:
    def __init__(self, blocks: Sequence[nn.Module], count: int, device: torch.device, rehearsal: bool = False,
                 leave: Sequence[nn.Module] = ()):
        self.device = torch.device(device)
        self.left = {id(module) for module in leave}     # layers whose weights someone else moves (ComfyUI)
        if self.device.type == "cuda" and self.device.index is None:     # "cuda" is cuda:N, which weights name
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rehearsal = rehearsal
        self.modules = list(blocks)
        self.report = SwapReport(requested=count, blocks=len(self.modules))
        self.swapped = {i: _Block(i) for i in chosen_blocks(count, len(self.modules))}
        self.order = sorted(self.swapped)
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._end_of_backward_queued = False
        self._still_computing: list = []   # events: evicted blocks the GPU may still be computing with

    # --- moving weights ---------------------------------------------------------------------------------
    def send_home(self):
        """Every swapped block's frozen tensors to one CPU buffer per block; their places on the device emptied."""
        with torch.no_grad(), torch.inference_mode(False):
            for block in self.swapped.values():
                found, seen, size = [], set(), 0
                for module in self.modules[block.index].modules():
                    if id(module) in self.left:
                        continue
                    for kind, tensors in ((True, module._parameters), (False, module._buffers)):
                        for name, tensor in tensors.items():
                            if self._swappable(tensor, kind) and id(tensor) not in seen:
                                seen.add(id(tensor))
                                found.append((module, name, kind, tensor.data if kind else tensor, size))
                                size += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
                block.home = self._buffer(size)
                for module, name, kind, tensor, offset in found:
                    frozen = _Frozen(module, name, kind, offset, tuple(tensor.shape), tensor.dtype, tensor.device,
                                     original=tensor if self.rehearsal else None)
                    frozen.view(block.home).copy_(tensor)
                    block.tensors.append(frozen)
                    self.report.bytes_swapped += tensor.numel() * tensor.element_size()
                self._evict(block)
                self.report.swapped += 1

    def _swappable(self, tensor, is_parameter: bool) -> bool:
        """Frozen, on the device, a plain tensor (ComfyUI's quantized and GGUF weights are subclasses that a byte
        copy would not give back), contiguous and owning its storage (evicting a view would free nothing)."""
        return (tensor is not None and not (is_parameter and tensor.requires_grad) and tensor.device == self.device
                and type(tensor) in (torch.Tensor, nn.Parameter) and tensor.is_contiguous()
                and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())

    def _buffer(self, nbytes: int) -> torch.Tensor:
        if self.rehearsal or self.device.type == "cpu":
            return torch.empty(nbytes, dtype=torch.uint8)
        try:
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self.report.pinned = True
            return buffer
        except RuntimeError:      # no pinned memory left: pageable memory works, the copies just overlap less
            return torch.empty(nbytes, dtype=torch.uint8)

    def _fetch(self, block: _Block, ahead: bool):
        """The block's buffer copied to the device in one go, its tensors views of it; on the side stream when
        ``ahead``."""
        if block.on_device:
            return
        with torch.no_grad(), torch.inference_mode(False):
            if self.side is None:
                copy = block.home.clone()
            else:
                compute = torch.cuda.current_stream(self.device)
                # Bound the memory: the GPU may still be computing with blocks already let go (the host runs
                # ahead), and their memory is only reused once it is done with them. Wait for all but the last.
                while len(self._still_computing) > 1:
                    self._still_computing.pop(0).synchronize()
                with torch.cuda.stream(self.side if ahead else compute):
                    copy = block.home.to(self.device, non_blocking=True)
                    if ahead:
                        block.ready = torch.cuda.Event()
                        block.ready.record(self.side)
                if ahead:     # made on the side stream, used and freed on the compute stream
                    copy.record_stream(compute)
            for frozen in block.tensors:
                frozen.put(frozen.view(copy))
        block.on_device = True
        self.report.fetches += 1
        self.report.most_on_device = max(self.report.most_on_device,
                                         sum(b.on_device for b in self.swapped.values()))

    def _evict(self, block: _Block):
        if not block.on_device:
            return
        with torch.no_grad(), torch.inference_mode(False):
            for frozen in block.tensors:      # an empty stand-in: a block computing without a fetch fails loudly
                frozen.put(torch.empty(0, dtype=frozen.dtype, device=self.device))
        if self.side is not None:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._still_computing.append(done)
        block.on_device, block.ready = False, None

    def put_back(self):
        """Every frozen tensor back on its device, each in a storage of its own as before (a rehearsal: the very
        tensor). Raises, naming a reload, if memory ran out. The CPU buffers are let go either way."""
        failed = 0
        with torch.no_grad(), torch.inference_mode(False):
            for block in self.swapped.values():
                for frozen in block.tensors:
                    if frozen.original is not None:
                        frozen.put(frozen.original)
                        continue
                    try:
                        frozen.put(frozen.view(block.home).to(frozen.device, copy=True))
                    except RuntimeError:          # out of memory: what the allocator holds back may be enough
                        torch.cuda.empty_cache()
                        try:
                            frozen.put(frozen.view(block.home).to(frozen.device, copy=True))
                        except RuntimeError:
                            failed += 1
                block.on_device, block.ready, block.home, block.tensors = True, None, None, []
        self._still_computing.clear()
        if self.report.pinned and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()           # pinned memory stays locked in a cache otherwise
        if failed:
            raise RuntimeError(f"block swap: {failed} frozen weight(s) could not come back to {self.device} (out "
                               "of memory); reload the model (its loader node) before using it again")

    # --- when --------------------------------------------------------------------------------------------
    def arrive(self, index: int, backward: bool):
        """Block ``index`` is about to compute: it is fetched (its prefetch waited for), every other swapped
        block but the next one leaves, and the next one starts coming over."""
        order = self.order
        position = order.index(index)
        following = position - 1 if backward else position + 1
        upcoming = self.swapped[order[following]] if 0 <= following < len(order) else None
        for block in self.swapped.values():
            if block.index != index and block is not upcoming:
                self._evict(block)
        block = self.swapped[index]
        self._fetch(block, ahead=False)
        if block.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(block.ready)
            block.ready = None
        if upcoming is not None:
            self._fetch(upcoming, ahead=True)
        if not backward:
            self._end_of_backward_queued = False      # a backward that failed never ran its callback
        elif not self._end_of_backward_queued:
            # Once this backward pass ends, no swapped block is needed until the next forward.
            self._end_of_backward_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)

    def _backward_ended(self):
        self._end_of_backward_queued = False
        for block in self.swapped.values():
            self._evict(block)

    def leave(self, index: int):
        self._evict(self.swapped[index])

    # --- the blocks' forward -----------------------------------------------------------------------------
    def wrap(self, index: int, module: nn.Module) -> Callable:
        previous = vars(module).get("forward")
        # A gradient_checkpointing wrapper is bypassed: the swap checkpoints this block itself.
        inner = getattr(previous, "unwrapped", None) or module.forward

        def forward(*args, **kwargs):
            if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
                return checkpoint(self._compute, index, inner, *args, use_reentrant=False, **kwargs)
            self.arrive(index, backward=False)      # previews, validation: no backward to come
            try:
                return inner(*args, **kwargs)
            finally:
                self.leave(index)
        return forward

    def _compute(self, index, inner, *args, **kwargs):
        backward = _in_backward()       # checkpoint's recompute runs inside the backward pass
        self.arrive(index, backward)
        out = on_copies(inner, *args, **kwargs)
        if not backward:
            self.leave(index)
        return out


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@contextlib.contextmanager
def blocks_swapped(blocks: Sequence[nn.Module], count: int, device: torch.device, rehearsal: bool = False,
                   leave: Sequence[nn.Module] = ()):
    """Inside: ``count`` of ``blocks`` (in forward order) keep their frozen weights in CPU memory except while
    they compute. Yields a SwapReport. On a CPU device (without ``rehearsal``) nothing moves: the report says
    why. On exit: each block's forward and every weight back as they were. ``leave``: layers inside the blocks
    whose weights stay where they are (those ComfyUI keeps in CPU memory and copies over itself)."""
    device = torch.device(device)
    if count <= 0:
        yield SwapReport(requested=count, skipped_reason="none requested")
        return
    if device.type != "cuda" and not rehearsal:
        yield SwapReport(requested=count, blocks=len(blocks),
                         skipped_reason=f"training runs on the {device.type.upper()}, where the weights already are")
        return
    swapper = BlockSwapper(blocks, count, device, rehearsal, leave)
    wrapped = {}
    try:
        swapper.send_home()
        for index in swapper.swapped:
            module = swapper.modules[index]
            wrapped[module] = vars(module).get("forward")
            module.forward = swapper.wrap(index, module)
        log.info("[LoRA Lab] %s", swapper.report.describe())
        yield swapper.report
    finally:
        for module, previous in wrapped.items():
            if previous is None:
                vars(module).pop("forward", None)
            else:
                module.forward = previous
        swapper.put_back()

"""Block swap: some of the model's blocks keep their frozen weights in CPU memory while a LoRA trains, and
come to the GPU only while they compute (kohya's and musubi's ``--blocks_to_swap``).

Each swapped block comes over twice a step: before its forward and again before its backward. It runs under
(non-reentrant) checkpointing, so autograd keeps nothing of it between the two, its weights least of all, and
its backward recomputes the block from its inputs, as gradient checkpointing does. The next swapped block is
copied over on a side stream from pinned memory while the current one computes, so the copy overlaps compute;
at most two swapped blocks are on the GPU at once.

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


@dataclass
class _Frozen:
    """One frozen tensor of a swapped block: where it lives between uses, and how to put a copy in its place."""
    module: nn.Module
    name: str
    is_parameter: bool
    home: torch.Tensor            # CPU (pinned where possible); the original itself in a rehearsal
    device: torch.device          # where it was, and is put back on exit

    def put(self, tensor: torch.Tensor):
        if self.is_parameter:
            self.module._parameters[self.name].data = tensor
        else:
            self.module._buffers[self.name] = tensor


@dataclass
class _Block:
    index: int
    tensors: list[_Frozen] = field(default_factory=list)
    on_device: bool = True
    ready: object = None          # a CUDA event recorded after the copy, waited on before use


class BlockSwapper:
    def __init__(self, blocks: Sequence[nn.Module], count: int, device: torch.device, rehearsal: bool = False):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:     # "cuda" is cuda:N, which weights name
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rehearsal = rehearsal
        self.modules = list(blocks)
        self.report = SwapReport(requested=count, blocks=len(self.modules))
        self.swapped = {i: _Block(i) for i in chosen_blocks(count, len(self.modules))}
        self.order = sorted(self.swapped)
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._end_of_backward_queued = False

    # --- moving weights ---------------------------------------------------------------------------------
    def send_home(self):
        """Every swapped block's frozen tensors to CPU memory; their places on the device emptied."""
        with torch.no_grad(), torch.inference_mode(False):
            for block in self.swapped.values():
                for module in self.modules[block.index].modules():
                    for name, param in module._parameters.items():
                        if param is not None and not param.requires_grad and param.device == self.device:
                            block.tensors.append(self._take_home(module, name, param, True))
                    for name, buffer in module._buffers.items():
                        if buffer is not None and buffer.device == self.device:
                            block.tensors.append(self._take_home(module, name, buffer, False))
                self._evict(block)
                self.report.swapped += 1

    def _take_home(self, module, name, tensor, is_parameter) -> _Frozen:
        tensor = tensor.data if is_parameter else tensor
        self.report.bytes_swapped += tensor.numel() * tensor.element_size()
        if self.rehearsal or self.device.type == "cpu":
            return _Frozen(module, name, is_parameter, tensor, self.device)
        try:
            home = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.report.pinned = True
        except RuntimeError:      # no pinned memory left: pageable memory works, the copies just overlap less
            home = torch.empty(tensor.shape, dtype=tensor.dtype)
        home.copy_(tensor)
        return _Frozen(module, name, is_parameter, home, tensor.device)

    def _fetch(self, block: _Block, ahead: bool):
        """A copy of the block's frozen tensors on the device; on the side stream when ``ahead``."""
        if block.on_device:
            return
        with torch.no_grad(), torch.inference_mode(False):
            if self.side is None:
                for frozen in block.tensors:
                    frozen.put(frozen.home.clone() if self.rehearsal else frozen.home)
            else:
                stream = self.side if ahead else torch.cuda.current_stream(self.device)
                with torch.cuda.stream(stream):
                    for frozen in block.tensors:
                        copy = frozen.home.to(self.device, non_blocking=True)
                        if ahead:         # made on the side stream, used and freed on the compute stream
                            copy.record_stream(torch.cuda.current_stream(self.device))
                        frozen.put(copy)
                    if ahead:
                        block.ready = torch.cuda.Event()
                        block.ready.record(stream)
        block.on_device = True
        self.report.fetches += 1
        self.report.most_on_device = max(self.report.most_on_device,
                                         sum(b.on_device for b in self.swapped.values()))

    def _evict(self, block: _Block):
        if not block.on_device:
            return
        with torch.no_grad(), torch.inference_mode(False):
            for frozen in block.tensors:      # an empty stand-in: a block computing without a fetch fails loudly
                frozen.put(torch.empty(0, dtype=frozen.home.dtype, device=self.device))
        block.on_device, block.ready = False, None

    def put_back(self):
        """Every frozen tensor back on its device, as it was. Raises (naming a reload) if memory ran out."""
        failed = 0
        with torch.no_grad(), torch.inference_mode(False):
            for block in self.swapped.values():
                for frozen in block.tensors:
                    try:
                        frozen.put(frozen.home.to(frozen.device, copy=not self.rehearsal))
                    except RuntimeError:          # out of memory: what the allocator holds back may be enough
                        torch.cuda.empty_cache()
                        try:
                            frozen.put(frozen.home.to(frozen.device))
                        except RuntimeError:
                            failed += 1
                block.on_device = True
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
        if backward and not self._end_of_backward_queued:
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
def blocks_swapped(blocks: Sequence[nn.Module], count: int, device: torch.device, rehearsal: bool = False):
    """Inside: ``count`` of ``blocks`` (in forward order) keep their frozen weights in CPU memory except while
    they compute. Yields a SwapReport. On a CPU device (without ``rehearsal``) nothing moves: the report says
    why. On exit: each block's forward and every weight back as they were."""
    device = torch.device(device)
    if count <= 0:
        yield SwapReport(requested=count, skipped_reason="none requested")
        return
    if device.type != "cuda" and not rehearsal:
        yield SwapReport(requested=count, blocks=len(blocks),
                         skipped_reason=f"training runs on the {device.type.upper()}, where the weights already are")
        return
    swapper = BlockSwapper(blocks, count, device, rehearsal)
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

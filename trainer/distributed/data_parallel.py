"""One training run on several processes (GPUs, machines) with torch.distributed: the same LoRA as one process.

Every rank walks the same global batch plan and makes the same noise, timestep and caption draws (one
generator, one seed), then keeps its contiguous share of each global batch. DDP wraps only the adapters'
parameters (the frozen base never crosses the network) and averages their gradients over the ranks; each
rank's loss is weighted by its share so that the average is the global batch's mean, also when the batch
does not split evenly:

    rank r's loss = (mean over its n_r pictures) * n_r / N * world     =>     DDP's average = global mean.

A rank whose share is empty still runs one picture at weight 0, so every rank takes part in every
gradient exchange. ``batch_size`` stays the global batch: any world size trains the same LoRA, with the
same steps and schedule.

Once per optimizer step one all-reduce carries [loss, cancel, non-finite per rank], so a NaN on one rank or a Cancel
reaching one rank stops every rank at the same step; nothing else is exchanged outside DDP. (A rank that
raised on its own would leave the others waiting in the next exchange until the timeout.)

``SingleProcess`` is the same interface for one process: the loop has one path, and with it the loop
computes exactly what it computed before this module existed.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch


@dataclass(frozen=True)
class StepOutcome:
    loss: float            # the step's loss over the global batch (mean of its micro-batches)
    non_finite: bool       # some rank's loss was NaN or infinite
    cancel: bool           # some rank was asked to stop
    non_finite_ranks: tuple = ()     # which ranks saw it (several processes only: messages name them)


class RunStopped(RuntimeError):
    """A Cancel that reached any rank: every rank raises this after the same step (``step`` steps done)."""

    def __init__(self, step: int):
        super().__init__(f"training was cancelled after step {step}")
        self.step = step


def contiguous_share(count: int, rank: int, world: int) -> range:
    """The positions of rank's contiguous part of a global batch of ``count`` pictures: shares differ by one at
    most, the lower ranks taking the extra ones (torch.tensor_split's rule)."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


class SingleProcess:
    """The whole batch here; nothing to exchange."""
    rank, world = 0, 1
    is_main = True

    def attach(self, parameters) -> None:
        pass

    def share(self, count: int) -> range:
        return range(count)

    def weight(self, mine: int, count: int) -> float:
        return 1.0

    def accumulating(self, last: bool):
        return contextlib.nullcontext()

    def forward(self, loss_of: Callable[[], torch.Tensor]) -> torch.Tensor:
        return loss_of()

    def step_outcome(self, loss: float, non_finite: bool) -> StepOutcome:
        return StepOutcome(loss, non_finite, False)


class _Adapters(torch.nn.Module):
    """The trainable parameters as one module for DDP. Its forward runs the loss computation it is given:
    the adapters live inside the denoiser, DDP only needs to see the forward and the parameters' gradients."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter]):
        super().__init__()
        self.adapters = torch.nn.ParameterList(parameters)   # the same Parameter objects, not copies

    def forward(self, loss_of: Callable[[], torch.Tensor]) -> torch.Tensor:
        return loss_of()


class DataParallel:
    """This rank's part of a run on ``torch.distributed``'s default process group (already initialised)."""

    def __init__(self, device: torch.device, cancel_requested: Callable[[], bool] = lambda: False):
        import torch.distributed as dist
        self.dist = dist
        self.device = device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.cancel_requested = cancel_requested
        # nccl exchanges tensors on the GPU, gloo on the CPU.
        self.exchange_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.ddp = None
        self.exchange_seconds = 0.0     # time the gradient all-reduces took, summed (overlapped with backward)
        self.steps = 0

    def attach(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Wrap the trainable parameters (the loop's optimizer's) in DDP. Rank 0's values are broadcast here:
        every rank starts from the same weights, whatever each loaded."""
        from torch.nn.parallel import DistributedDataParallel
        self.ddp = DistributedDataParallel(_Adapters(parameters),
                                           device_ids=[self.device] if self.device.type == "cuda" else None)
        self.ddp.register_comm_hook(None, self._timed_allreduce)

    def _timed_allreduce(self, state, bucket):
        """DDP's own average (all-reduce, divided by the world), timed from the call to the result, for the report
        and tools/bench_distributed.py."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        started = time.perf_counter()
        future = allreduce_hook(None, bucket)

        def done(result):
            self.exchange_seconds += time.perf_counter() - started
            return result.value()

        return future.then(done)

    def share(self, count: int) -> range:
        return contiguous_share(count, self.rank, self.world)

    def weight(self, mine: int, count: int) -> float:
        """What this rank's mean loss is multiplied by so that DDP's average over the ranks is the global mean."""
        return mine / count * self.world

    def accumulating(self, last: bool):
        """Around a micro-batch's forward and backward: gradients are exchanged after the last one only."""
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def forward(self, loss_of: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self.ddp(loss_of)

    def step_outcome(self, loss: float, non_finite: bool) -> StepOutcome:
        """The one exchange per step: the global loss, whether any rank was asked to stop, and which ranks saw
        a non-finite loss (one slot per rank, so the message can name them)."""
        values = torch.zeros(2 + self.world, dtype=torch.float64)
        values[0] = 0.0 if non_finite else loss
        values[1] = float(bool(self.cancel_requested()))
        values[2 + self.rank] = float(non_finite)
        values = values.to(self.exchange_device)
        self.dist.all_reduce(values)
        total, stop, *bad = values.tolist()
        self.steps += 1
        ranks = tuple(rank for rank, flag in enumerate(bad) if flag > 0)
        return StepOutcome(float("nan") if ranks else total, bool(ranks), stop > 0, ranks)


def leave_process_group() -> None:
    """Every rank leaves together, then the group is torn down. Rank 0 hosts the rendezvous store: when it
    tore down while another rank still used the store, the process aborted at exit now and then (gloo, torch
    2.14: "terminate called without an active exception", 1 run in 4 here; none in 16 with the barrier)."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

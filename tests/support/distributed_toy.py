"""The training loop on several processes (gloo, loopback), for tests/unit/training/test_distributed.py.

A rank runs in a process of its own (torch.multiprocessing spawn from the test, never inside ComfyUI): it joins
the process group, trains the toy denoiser's adapter (its last convolution; the first is the frozen base) on
its share of every global batch, and writes what the test compares into ``folder``.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _pack_importable() -> None:
    """As tests/conftest.py does, in a spawned process: lora_lab names the repository, its __init__ unrun."""
    sys.path.insert(0, str(REPO / "tests" / "support"))
    if "lora_lab" not in sys.modules:
        pack = types.ModuleType("lora_lab")
        pack.__path__ = [str(REPO)]
        sys.modules["lora_lab"] = pack


RUN_SEED = 3        # the toy run's batch order, noise and timesteps


def toy_dataset(case: dict):
    """The pictures ``case`` trains on (``pictures``, ``buckets``), before any fault is put in."""
    from toy_training import toy_data
    return toy_data(case.get("pictures", 6), seed=1, buckets=tuple(case.get("buckets", ((64, 64),))))


def toy_run(case: dict, parallel=None, on_step=None, resume=None, holder: dict | None = None) -> dict:
    """Train the toy adapter as ``case`` says (batch_size, accumulation, steps, n pictures, buckets) -> the
    adapter's weights and the step losses. ``parallel``: this rank's DataParallel, or None for one process.
    ``resume``: (the loop's snapshot, the adapter's weights) of an earlier run, to go on from. ``holder`` gets
    the adapter's parameters as "adapter" before training (for saves from on_step)."""
    _pack_importable()
    from lora_lab.trainer.training.loop import TrainSettings, train
    from lora_lab.trainer.training.optimizers import parse_optimizer_args
    from toy_training import TinyEpsDenoiser
    from training import COMPARABLE_OPTIMIZER_ARGS

    torch.manual_seed(0)
    model = TinyEpsDenoiser()
    adapter = list(model.net[2].parameters())
    if holder is not None:
        holder["adapter"] = adapter
    if resume is not None:
        with torch.no_grad():
            for parameter, saved in zip(adapter, resume[1]):
                parameter.copy_(saved)
    for parameter in model.net[0].parameters():
        parameter.requires_grad_(False)          # the frozen base: never handed to DDP
    data = toy_dataset(case)
    if case.get("nan_picture") is not None:
        data.examples[case["nan_picture"]].latent[0, 0, 0] = float("nan")
    settings = TrainSettings(steps=case.get("steps", 4), batch_size=case["batch_size"], learning_rate=1e-2,
                             gradient_accumulation=case.get("accumulation", 1), seed=RUN_SEED, max_grad_norm=0,
                             optimizer_args=parse_optimizer_args(COMPARABLE_OPTIMIZER_ARGS))
    losses = []

    def record(report):
        losses.append(report.loss)
        if on_step:
            on_step(report)

    train(model, data, adapter, settings, torch.device("cpu"), on_step=record, parallel=parallel,
          resume=resume[0] if resume is not None else None)
    return {"weights": [p.detach().clone() for p in adapter], "losses": losses}


class PerRankMean:
    """A wrong DataParallel for the negative control: each rank's plain mean, as naive DDP averages it."""

    def __init__(self, parallel):
        self.inner = parallel

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def weight(self, mine: int, count: int) -> float:
        return 1.0 if mine else 0.0


def rank_main(rank: int, world: int, port: int, folder: str, case: dict) -> None:
    """One rank (torch.multiprocessing.spawn's entry): join, train, write ``rank<r>.pt`` with the outcome."""
    _pack_importable()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from lora_lab.trainer.distributed.data_parallel import DataParallel, RunStopped, leave_process_group
    from lora_lab.trainer.distributed.worker import end_process
    from lora_lab.trainer.training.loop import NonFiniteLoss
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    steps_seen = []
    cancel_rank, cancel_at = case.get("cancel", (None, None))
    parallel = DataParallel(torch.device("cpu"),
                            cancel_requested=lambda: rank == cancel_rank and len(steps_seen) + 1 >= cancel_at)
    if case.get("per_rank_mean"):
        parallel = PerRankMean(parallel)
    outcome, holder = {"rank": rank}, {}
    try:
        outcome.update(toy_run(case, parallel, on_step=lambda report: steps_seen.append(report.step), holder=holder))
        wrapped = list(parallel.ddp.module.parameters())        # what DDP exchanges: the adapter's own Parameters
        outcome["ddp_holds_the_adapter_only"] = (len(wrapped) == len(holder["adapter"])
                                                 and all(a is b for a, b in zip(wrapped, holder["adapter"])))
    except NonFiniteLoss as error:
        outcome["non_finite_at"] = error.step
    except RunStopped as error:
        outcome["stopped_after"] = error.step
    finally:
        outcome["steps_seen"] = steps_seen
        torch.save(outcome, Path(folder) / f"rank{rank}.pt")
        leave_process_group()
    end_process(0)       # as the launcher's workers end (trainer/distributed/worker.py says why)

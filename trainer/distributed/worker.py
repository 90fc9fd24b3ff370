"""A rank's side of a distributed run, whatever it trains: join the process group from torchrun's
environment, report through the job folder (rank 0 only), see Cancel, and leave.

torchrun, ``accelerate launch`` and ``srun torchrun`` all set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; nothing else is read, so any of them can start a worker.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
import time
import traceback
from typing import Callable, NoReturn

import torch

from ..training.loop import NonFiniteLoss
from .data_parallel import RunStopped, leave_process_group
from .job import JobFolder

# Raised by every rank at the same step (the loop's one exchange decided them together): the ranks can
# leave together. Anything else may be one rank's alone, and a farewell barrier would wait for the others.
STOPPED_TOGETHER = (RunStopped, NonFiniteLoss)


class WorkerProcess:
    """``with WorkerProcess(job, timeout) as worker:`` around a rank's whole run. A Cancel (RunStopped) is best
    caught inside, reported, and left as an orderly end."""

    def __init__(self, job: JobFolder, timeout_seconds: float):
        self.job = job
        self.timeout = datetime.timedelta(seconds=timeout_seconds)
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.is_main = self.rank == 0
        self.started = time.time()
        self.parallel = None        # the run's DataParallel, for the figures written on leaving

    def device(self) -> torch.device:
        """This rank's GPU (LOCAL_RANK-th of the machine), or the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def __enter__(self) -> "WorkerProcess":
        import torch.distributed as dist
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        # The timeout bounds every exchange: a rank that hangs ends the run after it, not never.
        dist.init_process_group(backend, timeout=self.timeout)
        return self

    def report(self, kind: str, **data) -> None:
        """An event for the controller (progress, a save, the end): rank 0's alone, the others' are the same."""
        if self.is_main:
            self.job.append_event(kind, **data)

    def cancel_requested(self) -> bool:
        return self.job.cancel_requested()

    def figures(self) -> dict:
        """Peak memory (the GPU's allocations, or the process's resident size on a CPU) and exchange time."""
        if torch.cuda.is_available():
            peak, kind = torch.cuda.max_memory_allocated(self.device()), "cuda max_memory_allocated"
        else:
            peak, kind = _peak_resident_bytes(), "process peak RSS"
        parallel = self.parallel
        return {"peak_memory_bytes": peak, "memory": kind, "seconds": time.time() - self.started,
                "steps": parallel.steps if parallel else 0,
                "exchange_seconds": parallel.exchange_seconds if parallel else 0.0}

    def __exit__(self, kind, error, traceback) -> bool:
        import torch.distributed as dist
        try:
            self.job.write_stats(self.rank, self.figures())
        except OSError:
            pass
        if error is not None:
            self.job.write_error(self.rank, type(error).__name__, str(error), getattr(error, "step", None))
        if error is None or isinstance(error, STOPPED_TOGETHER):
            leave_process_group()
        elif dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:      # the group may be broken already (that is why we are here)
                pass
        return False


def _peak_resident_bytes() -> int:
    try:
        import resource         # POSIX; Linux counts kilobytes
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:         # Windows
        import psutil
        return psutil.Process().memory_info().peak_wset


def run_to_the_end(main: Callable[..., None], *args) -> NoReturn:
    """A rank's whole life: ``main(*args)``, then end_process (an error's traceback printed first, exit code 1)."""
    try:
        main(*args)
    except BaseException:       # WorkerProcess has written the error file; the log gets the traceback
        traceback.print_exc()
        end_process(1)
    end_process(0)


def end_process(code: int = 0) -> NoReturn:
    """End a rank's process once its work (or its error) is written, without running C++ static destructors.
    One of gloo's (torch 2.14) aborts the process now and then after all the work is done ("terminate called
    without an active exception", SIGABRT, no Python frame left: 1 run in 30 to 120 with two torchrun agents
    here). torchrun then reports the rank as failed (or, after an error, as ended by a signal), and the other
    machine's agent waits out its exit barrier (300 s) before it ends."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)

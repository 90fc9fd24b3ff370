"""A torchrun worker that trains the toy adapter (distributed_toy.py) as a job folder says, with faults on order:
for the launcher's tests (tests/unit/distributed/test_launcher.py). Run as
``python -m torch.distributed.run --nproc-per-node=2 --standalone tests/support/toy_worker.py <job folder>``.

Rank 0 writes a save after every step: ``saves/step<N>.safetensors`` (the adapter, with the writer's rank in its
metadata) and ``saves/step<N>.state.pt`` (the loop's snapshot, to resume from), each written aside and renamed.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_toy  # noqa: E402

distributed_toy._pack_importable()

import safetensors.torch  # noqa: E402
import torch  # noqa: E402

from lora_lab.trainer.distributed.data_parallel import DataParallel, RunStopped  # noqa: E402
from lora_lab.trainer.distributed.job import JobFolder  # noqa: E402
from lora_lab.trainer.distributed.worker import WorkerProcess, run_to_the_end  # noqa: E402


def fault(rank: int, step: int, case: dict) -> None:
    if case.get("kill") == [rank, step]:
        os.kill(os.getpid(), signal.SIGKILL)
    if case.get("hang") == [rank, step]:
        time.sleep(3600)


def save(job: JobFolder, step: int, adapter, report) -> str:
    folder = job.path / "saves"
    folder.mkdir(exist_ok=True)
    weights = {f"adapter.{i}": parameter.detach().clone().contiguous() for i, parameter in enumerate(adapter)}
    target = folder / f"step{step}.safetensors"
    safetensors.torch.save_file(weights, str(target) + ".partial", metadata={"step": str(step), "writer_rank":
                                                                                 os.environ["RANK"]})
    os.replace(str(target) + ".partial", target)
    torch.save({"snapshot": report.snapshot(), "weights": list(weights.values())}, folder / f"step{step}.state.pt.partial")
    os.replace(folder / f"step{step}.state.pt.partial", folder / f"step{step}.state.pt")
    return str(target)


def main(job_dir: str) -> None:
    job = JobFolder(Path(job_dir))
    case = job.job()["case"]
    torch.set_num_threads(1)
    resume = None
    if case.get("resume_from"):
        state = torch.load(case["resume_from"], weights_only=False)
        resume = (state["snapshot"], state["weights"])
    with WorkerProcess(job, case.get("timeout", 30)) as worker:
        holder, done = {}, []

        def cancel_requested():     # "stop_after": N acts as a Cancel pressed during step N
            return worker.cancel_requested() or len(done) + 1 >= case.get("stop_after", float("inf"))

        def on_step(report):
            done.append(report.step)
            fault(worker.rank, report.step, case)
            saved = save(job, report.step, holder["adapter"], report) if worker.is_main else None
            worker.report("progress", step=report.step, total=report.total, loss=report.loss, saved=saved)

        try:
            worker.parallel = DataParallel(worker.device(), cancel_requested)
            result = distributed_toy.toy_run(case, worker.parallel,
                                             on_step=on_step, resume=resume, holder=holder)
        except RunStopped as stopped:
            worker.report("stopped", step=stopped.step)
            return
        if worker.is_main:
            torch.save(result, job.path / "result.pt")
        worker.report("finished", step=case.get("steps", 4))


if __name__ == "__main__":
    run_to_the_end(main, sys.argv[1])

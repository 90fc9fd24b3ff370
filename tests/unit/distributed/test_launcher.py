"""torchrun started, followed and stopped by the controller's launcher, on this machine's CPU (gloo): the toy
worker (tests/support/toy_worker.py) on two ranks trains what one process trains, only rank 0 writes, a killed,
hung or NaN rank and a Cancel each end the run within 15 s with a message naming the rank, the last save loads,
nothing is left running; a run resumes on another number of ranks; two "machines" meet on loopback."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import distributed_toy
from lora_lab.trainer.distributed.job import JobFolder
from lora_lab.trainer.distributed.launcher import (Launched, Outcome, Topology, commands_for_other_machines,
                                                   exit_codes, root_cause, torchrun_command)

REPO = Path(__file__).resolve().parents[3]
WORKER = [str(REPO / "tests" / "support" / "toy_worker.py")]
TOLERANCE = 1e-6            # as test_data_parallel.py: float32 roundings of about 1.5e-8 measured there
ENDS_WITHIN = 15.0          # seconds from the fault (or the Cancel) to every process gone


def launch(folder: Path, case: dict, topology: Topology = Topology(gpus=2)) -> tuple[JobFolder, Launched]:
    job = JobFolder(folder)
    job.write_job({"case": case})
    return job, Launched(torchrun_command(topology, WORKER + [str(folder)]), job, threads_per_rank=1)


class Clock:
    """Events as they arrive, with the time each arrived."""

    def __init__(self):
        self.events, self.times = [], []

    def __call__(self, event):
        self.events.append(event)
        self.times.append(time.monotonic())

    def at_step(self, step: int) -> float:
        return next(t for e, t in zip(self.events, self.times) if e.get("step") == step)

    def steps(self, kind="progress") -> list[int]:
        return [e["step"] for e in self.events if e["event"] == kind]


def last_save(job: JobFolder) -> tuple[int, dict]:
    saves = sorted(job.path.glob("saves/step*.safetensors"), key=lambda p: int(p.stem[4:]))
    tensors = safetensors.torch.load_file(str(saves[-1]))          # loads: a whole file, never a cut one
    return int(saves[-1].stem[4:]), tensors


def largest_difference(first, second) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(first, second))


def one_process(case: dict, **kwargs) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return distributed_toy.toy_run(case, **kwargs)
    finally:
        torch.set_num_threads(threads)


def test_two_ranks_train_what_one_process_trains_and_only_rank_0_writes(tmp_path):
    case = {"batch_size": 3, "steps": 3}
    job, launched = launch(tmp_path / "job", case)
    clock = Clock()
    outcome = launched.follow(clock)
    assert outcome.ok, job.log_path.read_text()
    assert not launched.running()
    assert clock.steps() == [1, 2, 3] and clock.steps("finished") == [3]      # one rank reports
    figures = job.stats()                     # each rank's own, as it left
    assert [f["rank"] for f in figures] == [0, 1] and all(f["steps"] == 3 and f["peak_memory_bytes"] > 0
                                                          and f["exchange_seconds"] > 0 for f in figures)
    result = torch.load(job.path / "result.pt", weights_only=False)
    assert largest_difference(result["weights"], one_process(case)["weights"]) <= TOLERANCE
    written = sorted(str(p.relative_to(job.path)) for p in job.path.rglob("*") if p.is_file())
    assert written == sorted(["job.json", "events.jsonl", "torchrun.log", "result.pt", "stats-rank0.json",
                              "stats-rank1.json"]
                             + [f"saves/step{s}.{kind}" for s in (1, 2, 3) for kind in ("safetensors", "state.pt")])
    for step in (1, 2, 3):
        with safe_open(str(job.path / "saves" / f"step{step}.safetensors"), "pt") as saved:
            assert saved.metadata()["writer_rank"] == "0"


@pytest.mark.parametrize("fault, expected", [
    ({"kill": [1, 2]}, "rank 1 ended abruptly (SIGKILL"),
    ({"hang": [1, 2], "timeout": 6}, "rank 1 stopped responding: rank 0 waited 6 s"),
], ids=["killed", "hung"])
def test_a_killed_or_hung_rank_ends_the_run_naming_it(tmp_path, fault, expected):
    job, launched = launch(tmp_path / "job", {"batch_size": 2, "steps": 6, **fault})
    clock = Clock()
    outcome = launched.follow(clock)
    ended = time.monotonic()
    assert not outcome.ok and not launched.running()
    assert expected in outcome.failure(world=2, timeout=fault.get("timeout", 30)), (outcome, job.log_path.read_text())
    assert ended - clock.at_step(2) < ENDS_WITHIN
    step, tensors = last_save(job)
    assert step >= 2 and set(tensors) == {"adapter.0", "adapter.1"}


def test_a_nan_on_one_rank_stops_all_naming_the_rank_and_step(tmp_path):
    case = {"batch_size": 2, "steps": 6, "nan_picture": 3}        # step 3, rank 1's share: rank 0 saved step 2
    job, launched = launch(tmp_path / "job", case)
    clock = Clock()
    outcome = launched.follow(clock)
    assert not outcome.ok and not launched.running()
    [bad] = {e["message"] for e in outcome.errors}             # every rank stopped with the same words
    step = outcome.errors[0]["step"]
    assert rank_with(case, 3, step) == 1         # the message names the rank that met it, not the one reporting
    assert outcome.failure(world=2, timeout=30) == bad == f"the loss (on rank 1) became nan at step {step}"
    assert clock.steps() == list(range(1, step)) and time.monotonic() - clock.times[-1] < ENDS_WITHIN
    saved_at, tensors = last_save(job)              # the weights before the bad step, whole, all finite
    assert saved_at == step - 1 and all(bool(torch.isfinite(t).all()) for t in tensors.values())
    with pytest.raises(Exception) as alone:             # one process meets the NaN at the same step
        one_process(case)
    assert alone.value.step == step


def rank_with(case: dict, picture: int, step: int, world: int = 2) -> int:
    """The rank whose share of step ``step``'s global batch holds ``picture`` (the loop's plan, torch.tensor_split's
    shares), found independently of the run under test."""
    from lora_lab.trainer.distributed.data_parallel import contiguous_share
    plan = distributed_toy.toy_dataset(case).batch_plan(case["batch_size"], distributed_toy.RUN_SEED)
    batch = [next(plan) for _ in range(step)][-1]
    [rank] = [rank for rank in range(world) if picture in [batch[p] for p in contiguous_share(len(batch), rank, world)]]
    return rank


def test_cancel_stops_every_rank_after_the_same_step(tmp_path):
    job, launched = launch(tmp_path / "job", {"batch_size": 2, "steps": 50})
    clock = Clock()
    asked = {}

    def cancel_requested():
        if 2 in clock.steps() and "at" not in asked:
            asked["at"] = time.monotonic()
        return "at" in asked

    outcome = launched.follow(clock, cancel_requested)
    assert outcome.ok and outcome.cancelled and not launched.running(), job.log_path.read_text()
    [stopped] = clock.steps("stopped")
    assert stopped >= 2 and clock.steps() == list(range(1, stopped + 1))
    assert time.monotonic() - asked["at"] < ENDS_WITHIN
    assert last_save(job)[0] == stopped


def resume_state(job: JobFolder, step: int) -> Path:
    return job.path / "saves" / f"step{step}.state.pt"


def test_a_run_saved_on_two_ranks_resumes_on_one_and_one_on_two(tmp_path):
    case = {"batch_size": 3, "steps": 4}
    whole = one_process(case)
    # 2 -> 1: two ranks stopped after step 2, one process goes on
    job, launched = launch(tmp_path / "two", {**case, "stop_after": 2})
    clock = Clock()
    assert launched.follow(clock).ok and clock.steps("stopped") == [2], job.log_path.read_text()
    state = torch.load(resume_state(job, 2), weights_only=False)
    resumed = one_process(case, resume=(state["snapshot"], state["weights"]))
    assert largest_difference(resumed["weights"], whole["weights"]) <= TOLERANCE
    # 1 -> 2: one process stopped after step 2, two ranks go on
    captured = {}

    def stop_at_two(report):
        if report.step == 2:
            captured["state"] = {"snapshot": report.snapshot(),
                                 "weights": [p.detach().clone() for p in captured["holder"]["adapter"]]}
            raise KeyboardInterrupt

    captured["holder"] = {}
    with pytest.raises(KeyboardInterrupt):
        one_process(case, on_step=stop_at_two, holder=captured["holder"])
    torch.save(captured["state"], tmp_path / "one.state.pt")
    job, launched = launch(tmp_path / "then-two", {**case, "resume_from": str(tmp_path / "one.state.pt")})
    assert launched.follow(Clock()).ok, job.log_path.read_text()
    result = torch.load(job.path / "result.pt", weights_only=False)
    assert largest_difference(result["weights"], whole["weights"]) <= TOLERANCE


def test_two_machines_meet_at_machine_0_on_loopback(tmp_path):
    """Two torchrun processes, one rank each, as the node's printed command would start them elsewhere."""
    case = {"batch_size": 3, "steps": 3}
    port = distributed_toy.free_port()
    machines = [Topology(gpus=1, machines=2, machine=m, address="127.0.0.1", port=port) for m in (0, 1)]
    job = JobFolder(tmp_path / "job")
    job.write_job({"case": case})
    here = Launched(torchrun_command(machines[0], WORKER + [str(job.path)]), job, threads_per_rank=1)
    printed = commands_for_other_machines(machines[0], WORKER + [str(job.path)])
    assert printed == [" ".join(torchrun_command(machines[1], WORKER + [str(job.path)], python="python"))]
    other_job = JobFolder(tmp_path / "other")      # the other machine's own log; the job files are shared
    other_job.path.mkdir()
    there = Launched(torchrun_command(machines[1], WORKER + [str(job.path)]), other_job, threads_per_rank=1)
    finished = {}
    thread = threading.Thread(target=lambda: finished.setdefault("there", there.follow(lambda e: None)))
    thread.start()
    outcome = here.follow(lambda e: None)
    thread.join(60)
    assert outcome.ok and finished["there"].returncode == 0, job.log_path.read_text()
    result = torch.load(job.path / "result.pt", weights_only=False)
    assert largest_difference(result["weights"], one_process(case)["weights"]) <= TOLERANCE


def test_torchrun_s_root_cause_is_read_from_its_log():
    log = ("Failures:\n[1]:\n  rank      : 0 (local_rank: 0)\n  exitcode  : -15 (pid: 1)\n"
           "Root Cause (first observed failure):\n[0]:\n  time      : now\n  host      : localhost\n"
           "  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 2)  (SIGKILL)\n")
    assert root_cause(log) == {"rank": 1, "exitcode": -9}
    assert root_cause("all fine") is None


def test_the_rank_that_ended_without_a_word_is_named_not_torchruns_first_to_the_second():
    """Seen here: rank 1 SIGKILLed; rank 0 lost it, wrote its error and figures, and ended by SIGABRT in the same
    second; torchrun, whose times are whole seconds and whose ties go to the lower rank, named rank 0."""
    log = ("Failures:\n[1]:\n  time      : now\n  host      : localhost\n  rank      : 1 (local_rank: 1)\n"
           "  exitcode  : -9 (pid: 2)\n  error_file: <N/A>\n------\nRoot Cause (first observed failure):\n[0]:\n"
           "  time      : now\n  host      : localhost\n  rank      : 0 (local_rank: 0)\n  exitcode  : -6 (pid: 1)\n")
    assert exit_codes(log) == {1: -9, 0: -6}
    peer_lost = [{"rank": 0, "kind": "DistBackendError", "message": "Connection closed by peer", "step": None}]
    outcome = Outcome(1, errors=peer_lost, root_cause=root_cause(log), exit_codes=exit_codes(log),
                      stats=[{"rank": 0}])
    assert outcome.failure(world=2, timeout=30).startswith("rank 1 ended abruptly (SIGKILL")
    # Not in torchrun's list at all (its agent had not seen it yet): still the one that said nothing.
    alone = Outcome(1, errors=peer_lost, root_cause={"rank": 0, "exitcode": -6}, exit_codes={0: -6},
                    stats=[{"rank": 0}])
    assert alone.failure(world=2, timeout=30).startswith("rank 1 ended abruptly")
    # Neither said anything (torchrun stopped rank 0 once rank 1 was gone): torchrun's root cause.
    assert Outcome(1, root_cause={"rank": 1, "exitcode": -9}, exit_codes={0: -15, 1: -9}).failure(
        world=2, timeout=30).startswith("rank 1 ended abruptly (SIGKILL")
    # Every rank said why: the signal is the root cause's.
    assert Outcome(1, root_cause={"rank": 1, "exitcode": -9}, exit_codes={1: -9},
                   stats=[{"rank": 0}, {"rank": 1}]).failure(world=2, timeout=30).startswith("rank 1 ended abruptly")

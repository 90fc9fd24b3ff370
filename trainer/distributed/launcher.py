"""The controller's side: start the workers with torchrun as a child process in a process group of its own,
relay their events, pass Cancel on, and make sure nothing is left running -- whatever happens.

Never ``torch.multiprocessing.spawn`` inside ComfyUI: each child would start as a copy of the server
(kijai's FluxTrainer dropped multi-GPU over exactly that). torchrun starts fresh interpreters on a worker
module instead, and ``python -m torch.distributed.run`` is the same program on every machine.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from .job import JobFolder

STOP_GRACE_SECONDS = 5.0       # after SIGTERM, before SIGKILL
KILL = getattr(signal, "SIGKILL", signal.SIGTERM)     # Windows has no SIGKILL (nor process groups: see _signal)


@dataclass(frozen=True)
class Topology:
    """Where the ranks run: ``gpus`` processes on each of ``machines`` machines, this one being ``machine``
    (0 = the one that hosts the rendezvous at ``address``:``port``)."""
    gpus: int = 1
    machines: int = 1
    machine: int = 0
    address: str = "127.0.0.1"
    port: int = 29500
    timeout: float = 600.0         # seconds any rank may wait for the others at an exchange

    def __post_init__(self):
        if self.gpus < 1 or self.machines < 1 or not 0 <= self.machine < self.machines:
            raise ValueError(f"a topology of {self.gpus} GPU(s) on {self.machines} machine(s), this one "
                             f"number {self.machine}, cannot run")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is not a TCP port")

    @property
    def world(self) -> int:
        return self.gpus * self.machines


def torchrun_command(topology: Topology, worker: list[str], python: str = sys.executable) -> list[str]:
    """The command that starts this machine's ranks of ``worker`` (a module or script and its arguments).

    One machine: ``--standalone`` (torchrun picks a free port on localhost). Several: a static rendezvous
    at machine 0's address and port, the same command on each machine but for ``--node-rank``."""
    command = [python, "-m", "torch.distributed.run", f"--nproc-per-node={topology.gpus}"]
    if topology.machines == 1:
        command.append("--standalone")
    else:
        command += [f"--nnodes={topology.machines}", f"--node-rank={topology.machine}",
                    f"--master-addr={topology.address}", f"--master-port={topology.port}"]
    return command + list(worker)


def commands_for_other_machines(topology: Topology, worker: list[str], python: str = "python") -> list[str]:
    """What to run on machines 1.. (printed by the node): the same worker, this machine as the rendezvous."""
    return [shlex.join(torchrun_command(Topology(topology.gpus, topology.machines, machine, topology.address,
                                                 topology.port, topology.timeout), worker, python))
            for machine in range(1, topology.machines)]


@dataclass
class Outcome:
    returncode: int
    events: list = field(default_factory=list)
    errors: list = field(default_factory=list)        # the ranks' own error files
    root_cause: dict | None = None                    # torchrun's "first observed failure": rank, exitcode
    exit_codes: dict = field(default_factory=dict)    # every rank torchrun saw fail: rank -> exit code
    stats: list = field(default_factory=list)         # the figures each rank wrote on leaving
    cancelled: bool = False
    unresponsive: bool = False                        # stopped by the controller: no word from the workers

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.unresponsive

    def failure(self, world: int, timeout: float) -> str:
        """What went wrong, naming the rank, in a sentence for the user."""
        for error in self.errors:
            if error.get("kind") == "NonFiniteLoss":    # every rank says so; the words name the rank at fault
                return error["message"]
        timed_out = [e for e in self.errors if "timeout" in e.get("message", "").lower()
                     or "timed out" in e.get("message", "").lower()]
        abrupt = self.ended_abruptly(world)
        if abrupt is not None and not timed_out:
            rank, code = abrupt
            return (f"rank {rank} ended abruptly ({_signal_name(code) if code < 0 else 'without a word'}: "
                    "killed, or out of memory on its machine)")
        if timed_out:
            waiting = {e["rank"] for e in timed_out}
            silent = sorted(set(range(world)) - waiting - {e["rank"] for e in self.errors})
            who = f"rank {', '.join(map(str, silent))}" if silent else "a rank"
            return (f"{who} stopped responding: rank {min(waiting)} waited {timeout:g} s for it at an exchange "
                    "(a hung GPU, a lost network connection, or a machine that went away)")
        if self.unresponsive:
            return f"the workers sent nothing for {timeout:g} s and were stopped"
        if self.errors:
            first = self.errors[0]
            return f"rank {first['rank']}: {first['kind']}: {first['message']}"
        if self.root_cause:
            return f"rank {self.root_cause['rank']} failed (exit code {self.root_cause['exitcode']})"
        return f"torchrun ended with exit code {self.returncode} before any rank started (see its log)"

    def ended_abruptly(self, world: int) -> tuple[int, int] | None:
        """The rank a signal ended before it could say why. torchrun's "first observed failure" is that rank
        unless it left an error file or its figures (a rank leaving through WorkerProcess writes them): torchrun
        times failures to the second and breaks ties by rank, so it may name a peer that lost the rank and ended
        after it. Then the one that said nothing is named, one ended by SIGKILL or SIGABRT before one torchrun
        stopped with SIGTERM. -> (rank, its exit code, 0 where torchrun had not seen it end)."""
        codes = dict(self.exit_codes)
        if self.root_cause:
            codes.setdefault(self.root_cause["rank"], self.root_cause["exitcode"])
        if not any(code < 0 for code in codes.values()):
            return None
        said = {entry.get("rank") for entry in (*self.errors, *self.stats)}
        root = self.root_cause if self.root_cause and self.root_cause["exitcode"] < 0 else None
        if root and root["rank"] not in said:
            return root["rank"], root["exitcode"]
        silent = [rank for rank in range(world) if rank not in said]
        if silent:      # first one a signal ended, not torchrun's SIGTERM; then SIGTERM; then one not seen to end
            rank = min(silent, key=lambda r: (codes.get(r, 0) >= 0, codes.get(r, 0) == -signal.SIGTERM, r))
            return rank, codes.get(rank, 0)
        return (root["rank"], root["exitcode"]) if root else None


def _signal_name(exitcode: int) -> str:
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def root_cause(log_text: str) -> dict | None:
    """torchrun's "Root Cause (first observed failure)" block -> {"rank", "exitcode"}."""
    match = _ROOT_CAUSE.search(log_text)
    return {"rank": int(match.group(1)), "exitcode": int(match.group(2))} if match else None


_FAILED_RANK = re.compile(r"^\s*rank\s*:\s*(\d+).*?^\s*exitcode\s*:\s*(-?\d+)", re.S | re.M)


def exit_codes(log_text: str) -> dict[int, int]:
    """Every rank in torchrun's failure report ("Failures:" and "Root Cause") -> its exit code."""
    start = log_text.rfind("Failures:")
    return {int(rank): int(code) for rank, code in _FAILED_RANK.findall(log_text[start:])} if start >= 0 else {}


class Launched:
    """torchrun running as this process's child, in a process group (session) of its own."""

    def __init__(self, command: list[str], job: JobFolder, env: dict | None = None, threads_per_rank: int = 0):
        self.job = job
        environment = dict(os.environ if env is None else env)
        environment.setdefault("PYTHONUNBUFFERED", "1")
        if threads_per_rank:
            environment.setdefault("OMP_NUM_THREADS", str(threads_per_rank))   # torchrun would set 1
        self.log = open(job.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=environment,
                                        start_new_session=os.name == "posix")

    def follow(self, on_event: Callable[[dict], None], cancel_requested: Callable[[], bool] = lambda: False,
               silence_limit: float | None = None, cancel_grace: float = 60.0, poll: float = 0.1) -> Outcome:
        """Relay events until the workers end. Cancel is passed on through the job folder (the ranks stop
        together after the step they are in); workers that do not stop within ``cancel_grace`` seconds, or
        say nothing for ``silence_limit`` seconds, are stopped. Leaving this method, none are running."""
        offset, events = 0, []
        cancelled_at = None
        last_heard = time.monotonic()
        unresponsive = False
        try:
            while True:
                returncode = self.process.poll()
                new, offset = self.job.events_from(offset)
                for event in new:
                    events.append(event)
                    on_event(event)
                if new:
                    last_heard = time.monotonic()
                if returncode is not None:
                    break
                now = time.monotonic()
                if cancelled_at is None and cancel_requested():
                    self.job.request_cancel()
                    cancelled_at = now
                if cancelled_at is not None and now - cancelled_at > cancel_grace:
                    self.stop()
                elif silence_limit is not None and now - last_heard > silence_limit:
                    unresponsive = True
                    self.stop()
                time.sleep(poll)
        finally:
            self.stop()
        log_text = self.job.log_path.read_text(errors="replace") if self.job.log_path.exists() else ""
        return Outcome(self.process.returncode, events, self.job.errors(), root_cause(log_text),
                       cancelled=cancelled_at is not None, unresponsive=unresponsive, exit_codes=exit_codes(log_text),
                       stats=self.job.stats())

    def stop(self) -> None:
        """End torchrun and every worker it started (its whole process group): SIGTERM, then SIGKILL."""
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                pass
        self._signal(KILL)      # workers torchrun left behind, if any
        self.process.wait()
        self.log.close()

    def _signal(self, which) -> None:
        if os.name != "posix":
            self.process.kill() if which == KILL else self.process.terminate()
            return
        try:
            os.killpg(self.process.pid, which)
        except ProcessLookupError:
            pass

    def running(self) -> bool:
        """Whether anything of the process group is still alive."""
        if os.name != "posix":
            return self.process.poll() is None
        try:
            os.killpg(self.process.pid, 0)
            return True
        except ProcessLookupError:
            return False

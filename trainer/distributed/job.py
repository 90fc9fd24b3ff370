"""The folder one distributed run's controller and workers share (under ComfyUI's user folder).

  job.json          what to run: written once by the controller before the workers start
  events.jsonl      rank 0's progress, saves and end, one JSON object per line, appended; the controller tails
                    it and re-emits each event to the front end (the workers have no ComfyUI server)
  cancel            present = Cancel was pressed: every rank reads it at each step's exchange, so all stop
                    after the same step
  error-rank<r>.json  what stopped rank r, written by that rank as it fails (the controller names the rank)
  stats-rank<r>.json  rank r's peak memory and exchange time, written as it leaves (tools/bench_distributed.py)
  torchrun.log      torchrun's and the workers' output (the controller reads the root cause of a crash here)

Only plain JSON crosses this folder; tensors travel as safetensors files next to it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

JOB_FILE = "job.json"
EVENTS_FILE = "events.jsonl"
CANCEL_FILE = "cancel"
LOG_FILE = "torchrun.log"


@dataclass(frozen=True)
class JobFolder:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    # --- the job -------------------------------------------------------------------------------------
    def write_job(self, job: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        partial = self.path / (JOB_FILE + ".partial")
        partial.write_text(json.dumps(job, indent=1))
        os.replace(partial, self.path / JOB_FILE)

    def job(self) -> dict:
        return json.loads((self.path / JOB_FILE).read_text())

    # --- events: rank 0 appends, the controller reads ------------------------------------------------
    def append_event(self, kind: str, **data) -> None:
        line = json.dumps({"event": kind, "time": time.time(), **data}) + "\n"
        # One write of one line in append mode: a reader sees whole lines or none of a line's end.
        with open(self.path / EVENTS_FILE, "a", encoding="utf-8") as events:
            events.write(line)
            events.flush()

    def events_from(self, offset: int) -> tuple[list[dict], int]:
        """The whole events written after byte ``offset`` -> (events, the offset to read from next time)."""
        try:
            with open(self.path / EVENTS_FILE, "rb") as events:
                events.seek(offset)
                chunk = events.read()
        except FileNotFoundError:
            return [], offset
        complete = chunk[: chunk.rfind(b"\n") + 1]          # a line still being written waits for next time
        return [json.loads(line) for line in complete.splitlines() if line.strip()], offset + len(complete)

    # --- cancel --------------------------------------------------------------------------------------
    def request_cancel(self) -> None:
        (self.path / CANCEL_FILE).touch()

    def cancel_requested(self) -> bool:
        return (self.path / CANCEL_FILE).exists()

    # --- errors --------------------------------------------------------------------------------------
    def write_error(self, rank: int, kind: str, message: str, step: int | None = None) -> None:
        (self.path / f"error-rank{rank}.json").write_text(
            json.dumps({"rank": rank, "kind": kind, "message": message, "step": step}))

    def errors(self) -> list[dict]:
        found = []
        for path in sorted(self.path.glob("error-rank*.json")):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return sorted(found, key=lambda error: error.get("rank", 0))

    # --- each rank's figures ---------------------------------------------------------------------------
    def write_stats(self, rank: int, stats: dict) -> None:
        (self.path / f"stats-rank{rank}.json").write_text(json.dumps({"rank": rank, **stats}))

    def stats(self) -> list[dict]:
        found = []
        for path in self.path.glob("stats-rank*.json"):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):      # a rank that ended while writing it
                continue
        return sorted(found, key=lambda figures: figures.get("rank", 0))

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

"""Crash campaign: kill -9 a real ComfyUI server at chosen moments of a training run; check that nothing is lost.

    .venv/bin/python tools/crash_campaign.py [--kills 20] [--seed 1] [--steps 120] [--work DIR] [--no-docs]

A private ComfyUI root (tests/support/comfyui_home.py) with a random-weight SD1.5 checkpoint (the slim UNet
of tests/support/random_models.py, about 1 s a step on a CPU; --full-unet for the full one, about 5 s) and
a small picture folder runs one Train LoRA workflow with periodic saves (every 2 steps, the newest 4 kept),
previews (every 3 steps) and fp32 files. A run of --kills 24 takes about 15 minutes. First an uninterrupted run
("reference"); then the same workflow under another name ("crash") is killed with SIGKILL --kills times,
at a moment drawn (with --seed) from:

- mid-step        during an optimizer step (after a step with no save or preview due)
- mid-save        while the LoRA's temporary file (<name>_stepN.safetensors.tmp-<pid>) exists
- mid-state-write while the resume state's temporary file exists
- mid-preview     after a preview step's save is complete, before its preview arrives

After each kill: every .safetensors in the loras folder loads (all tensors, with safetensors); every resume
state loads (torch.load weights_only) and matches its LoRA (step, run identity); a LoRA may lack its state
only when it is the newest (killed between the two writes); temporary files never carry a name a loader
lists. The server is restarted, the same workflow queued, and the step it continues from (its log line
"continued the interrupted run from step N") must be the newest save with a whole state. After the last
kill the run is left to finish, and its final LoRA is compared with the reference's.

Both runs take one arithmetic path: the server runs with OMP_NUM_THREADS=1 and ComfyUI's own
--deterministic (torch.use_deterministic_algorithms), so "equal" means a max abs difference of 0.

Prints a table and writes it to docs/crash_campaign.md, which tests/hardening/conftest.py includes
verbatim in docs/hardening.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))  # the test harness
import comfyui_home  # noqa: E402
import demo_data  # noqa: E402
import random_models  # noqa: E402
from comfyui_server import ComfyServer  # noqa: E402

MOMENTS = ("mid-step", "mid-save", "mid-state-write", "mid-preview")
SAVE_EVERY, PREVIEW_EVERY, KEEP_LAST = 2, 3, 4
CONTINUED = re.compile(r"continued the interrupted run from step (\d+): (\S+)")
UNFINISHED_RUN_KEY = "loralab_unfinished_run"      # trainer/training/interrupted_runs.py
STATE_SUFFIX = ".loralab-state.pt"                 # trainer/training/saves.py


def workflow(name: str, steps: int, checkpoint: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "LoraLabDatasetFromFolder", "inputs": {
            "folder": "crash_dataset", "caption_extension": ".txt", "default_repeats": 1, "batch_size": 1,
            "target_steps": steps}},
        "3": {"class_type": "LoraLabTrainingOptions", "inputs": {
            "lr_schedule": "cosine", "warmup_steps": 4, "gradient_accumulation": 1, "max_grad_norm": 1.0,
            "gradient_checkpointing": False, "precision": "fp32", "dropout": 0.0, "save_every_n_steps": SAVE_EVERY,
            "save_precision": "fp32", "overwrite_existing": False, "resume_from": "", "keep_last_saves": KEEP_LAST,
            "latent_disk_cache": True, "preview_every_n_steps": PREVIEW_EVERY, "preview_steps": 2,
            "preview_prompts": "{trigger}, a red circle", "preview_cfg": 4.0}},
        "4": {"class_type": "LoraLabTrainLora", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "output_name": name,
            "resolution": 64, "steps": steps, "epochs": 0, "batch_size": 1, "learning_rate": 1e-3, "rank": 8,
            "alpha": 8.0, "seed": 7, "trigger_word": "", "options": ["3", 0]}},
    }


def prompt_for(server: ComfyServer, name: str, steps: int, checkpoint: str) -> dict:
    """The workflow with resume_from empty as this server's Training Options spells it: "" for a text box,
    its first choice ("none") for a list of resume points."""
    prompt = workflow(name, steps, checkpoint)
    spec = server.get_json("/object_info/LoraLabTrainingOptions")["LoraLabTrainingOptions"]["input"]
    choices = (spec["required"].get("resume_from") or spec.get("optional", {}).get("resume_from"))[0]
    if isinstance(choices, list):
        prompt["3"]["inputs"]["resume_from"] = choices[0]
    return prompt


# --- one server, its events and its files ---------------------------------------------------------------------
class Session:
    """A started server with the campaign's workflow queued, its websocket events read on a thread."""

    def __init__(self, overlay: Path, log_path: Path, name: str, steps: int,
                 checkpoint: str = random_models.SLIM_CHECKPOINT_NAME):
        self.started_at = time.time()
        self.server = ComfyServer(overlay, log_path=log_path, extra_args=["--deterministic"]).start(timeout=300)
        self.progress: list[tuple[float, dict]] = []      # (time, data) of every progress event
        self.previews: dict[int, float] = {}               # step -> time its preview arrived
        self.finished = threading.Event()
        self.closed = threading.Event()
        self.failed: str | None = None
        client = uuid.uuid4().hex
        import websocket
        self.socket = websocket.create_connection(f"ws://127.0.0.1:{self.server.port}/ws?clientId={client}",
                                                  timeout=30)
        self.socket.settimeout(0.5)
        self.prompt_id = self.server.queue(prompt_for(self.server, name, steps, checkpoint), client)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        import websocket
        while not self.closed.is_set():
            try:
                message = self.socket.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:          # the server died (that is the point)
                return
            if not message:            # the socket closed
                return
            if isinstance(message, bytes):
                continue
            event = json.loads(message)
            kind, data = event.get("type"), event.get("data") or {}
            now = time.monotonic()
            if kind == "loralab.train.progress":
                self.progress.append((now, data))
            elif kind == "loralab.train.preview":
                self.previews[data["step"]] = now
            elif kind == "execution_error" and data.get("prompt_id") == self.prompt_id:
                self.failed = f"{data.get('node_type')}: {data.get('exception_message')}"
                self.finished.set()
            elif kind == "executing" and data.get("node") is None and data.get("prompt_id") == self.prompt_id:
                self.finished.set()

    @property
    def last_step(self) -> int:
        return self.progress[-1][1]["step"] if self.progress else 0

    def kill(self) -> None:
        """SIGKILL: no handler, no finally, no flush runs in the server."""
        os.kill(self.server.process.pid, signal.SIGKILL)
        self.server.process.wait(timeout=60)
        self.close()

    def close(self) -> None:
        self.closed.set()
        self.finished.set()
        try:
            self.socket.close()
        except Exception:
            pass
        self.server.stop()

    def continued_from(self) -> int | None:
        """The step the node said it continued from (its log line), 0 for a fresh start, None: not yet known."""
        found = CONTINUED.search(self.server.log_text())
        if found:
            return int(found.group(1))
        return 0 if self.progress else None


class Folders:
    def __init__(self, overlay: Path, name: str):
        self.loras = overlay / "models" / "loras"
        self.states = overlay / "user" / "loralab" / "train-state"
        self.name = name
        self.save = re.compile(re.escape(name) + r"(?:_\d+)?_step(\d+)\.safetensors")

    def temporary(self, where: Path, suffix: str, pid: int | None) -> list[Path]:
        """The ``<periodic save><suffix>.tmp-<pid>`` files of this run (of process ``pid``, or any)."""
        found = []
        for path in _listing(where):
            save, _, writer = path.name.partition(".tmp-")
            if writer and save.endswith(suffix) and (pid is None or writer == str(pid)) and \
                    self.save.fullmatch(save[: len(save) - len(suffix)] + ".safetensors"):
                found.append(path)
        return found

    def lora_partials(self, pid: int | None = None) -> list[Path]:
        return self.temporary(self.loras, ".safetensors", pid)

    def state_partials(self, pid: int | None = None) -> list[Path]:
        return self.temporary(self.states, STATE_SUFFIX, pid)

    def state_of(self, lora: Path) -> Path:
        return self.states / (lora.name[: -len(".safetensors")] + STATE_SUFFIX)


def _listing(folder: Path) -> list[Path]:
    try:
        return [Path(entry.path) for entry in os.scandir(folder)]
    except FileNotFoundError:
        return []


# --- choosing the moment ----------------------------------------------------------------------------------------
def wait_for_moment(session: Session, folders: Folders, moment: str, not_before: int, preview_seconds: float,
                    pick: random.Random, timeout: float = 900) -> bool:
    """Poll (about every millisecond) until ``moment`` comes at or after step ``not_before``; False when the
    run finished first."""
    deadline = time.monotonic() + timeout
    pid = session.server.process.pid          # partial files of this server only, not a killed one's
    aimed_step = None
    while time.monotonic() < deadline:
        if session.finished.is_set():
            return False
        step = session.last_step
        if step >= not_before:
            if moment == "mid-save" and folders.lora_partials(pid):
                return True
            if moment == "mid-state-write" and folders.state_partials(pid):
                return True
            if moment == "mid-step" and step % SAVE_EVERY and step % PREVIEW_EVERY:
                arrived, data = session.progress[-1]      # step+1 started when step's event was sent
                time.sleep(max(0.0, arrived + pick.uniform(0.2, 0.7) * data["seconds_per_step"] - time.monotonic()))
                return True
            if moment == "mid-preview" and step % PREVIEW_EVERY == 0 and step != aimed_step:
                aimed_step = step
                saved = step % SAVE_EVERY != 0
                while not saved and not session.finished.is_set():   # its save first: then only the preview runs
                    state = folders.states / f"{folders.name}_step{step}{STATE_SUFFIX}"
                    saved = (state.exists() and state.stat().st_mtime >= session.started_at
                             and not folders.state_partials(pid))
                    time.sleep(0.001)
                time.sleep(pick.uniform(0.15, 0.6) * preview_seconds)
                if step not in session.previews and session.last_step == step:
                    return True
        time.sleep(0.001)
    raise TimeoutError(f"{moment} did not come within {timeout:.0f}s")


def observed_moment(session: Session, lora_partials, state_partials) -> str:
    """What the server was really doing when it died, from what it left behind."""
    if lora_partials:
        return "writing the LoRA"
    if state_partials:
        return "writing the state"
    step = session.last_step
    if step % PREVIEW_EVERY == 0 and step not in session.previews:
        return "rendering a preview"
    return f"training step {step + 1}"


# --- the checks after a kill ------------------------------------------------------------------------------------
@dataclass
class Check:
    loras: int = 0
    loaded: int = 0
    states: int = 0
    states_loaded: int = 0
    partials: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    expected_resume: int = 0
    run_saves: list = field(default_factory=list)     # steps of this run's saves (name_stepN) in the loras folder
    run_states: int = 0                               # of those with a resume state that matches

    def files(self) -> str:
        steps = ",".join(map(str, sorted(self.run_saves)))
        return (f"saves at steps {steps or 'none'} ({self.run_states} with their state); "
                f"{len(self.partials)} tmp; {self.loras} LoRAs and {self.states} states in all")


def check_files(folders: Folders) -> Check:
    import safetensors
    import safetensors.torch
    import torch
    check = Check()
    run_saves = {}
    for path in sorted(folders.loras.rglob("*")):
        if ".tmp-" in path.name:
            check.partials.append(path.name)
            if path.name.endswith(".safetensors"):
                check.problems.append(f"{path.name}: a temporary file under a loadable name")
            continue
        if not path.name.endswith(".safetensors"):
            continue
        check.loras += 1
        try:
            tensors = safetensors.torch.load_file(str(path))
            with safetensors.safe_open(str(path), "pt") as opened:
                metadata = opened.metadata() or {}
            assert tensors, "no tensors"
            check.loaded += 1
        except Exception as bad:
            check.problems.append(f"{path.name} does not load: {type(bad).__name__}: {bad}")
            continue
        if folders.save.fullmatch(path.name):
            run_saves[path] = metadata
    newest = max((int(m.get("ss_steps", -1)) for m in run_saves.values()), default=-1)
    for path in sorted(_listing(folders.states)):
        if ".tmp-" in path.name:
            check.partials.append(path.name)
            continue
        check.states += 1
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            int(state["step"]), dict(state["adapters"])
            check.states_loaded += 1
        except Exception as bad:
            check.problems.append(f"{path.name} (resume state) does not load: {type(bad).__name__}: {bad}")
    for path, metadata in sorted(run_saves.items(), key=lambda item: int(item[1].get("ss_steps", -1))):
        step, state_path = int(metadata.get("ss_steps", -1)), folders.state_of(path)
        if not state_path.exists():
            if step != newest:
                check.problems.append(f"{path.name} lost its resume state (not the newest save)")
            continue
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception:
            continue            # already a problem above
        if int(state["step"]) != step or state.get("run_identity") != metadata.get(UNFINISHED_RUN_KEY):
            check.problems.append(f"{state_path.name} is of step {state['step']}, its LoRA of step {step}")
            continue
        check.expected_resume = max(check.expected_resume, step)
        check.run_states += 1
    check.run_saves = [int(metadata.get("ss_steps", -1)) for metadata in run_saves.values()]
    return check


def max_difference(a: Path, b: Path) -> float:
    import safetensors.torch
    first, second = safetensors.torch.load_file(str(a)), safetensors.torch.load_file(str(b))
    if first.keys() != second.keys():
        return float("inf")
    return max(float((first[k].double() - second[k].double()).abs().max()) for k in first)


# --- the campaign -----------------------------------------------------------------------------------------------
@dataclass
class Row:
    number: int
    moment: str
    observed: str
    step: int
    files: str
    loaded: str
    expected: int
    resumed: int | None = None
    problems: list = field(default_factory=list)


def prepare(work: Path, pictures: int, full_unet: bool = False) -> tuple[Path, str]:
    """A private ComfyUI root with the checkpoint and the pictures, its loras and states folders empty ->
    (root, the checkpoint's name)."""
    overlay = comfyui_home.build_overlay(work / "root")
    name = random_models.CHECKPOINT_NAME if full_unet else random_models.SLIM_CHECKPOINT_NAME
    random_models.link_checkpoint(random_models.full_sd15_checkpoint_built_aside(slim=not full_unet), overlay, name)
    dataset = overlay / "input" / "crash_dataset"
    if not dataset.exists():
        demo_data.write_demo_dataset(dataset, count=pictures, repeats=1, size=64)
    for folder in (overlay / "models" / "loras", overlay / "user" / "loralab" / "train-state"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    return overlay, name


def reference_run(overlay: Path, logs: Path, steps: int, checkpoint: str) -> tuple[Path, float, float]:
    """The uninterrupted run -> (its final LoRA, seconds it trained, seconds a preview takes)."""
    session = Session(overlay, logs / "reference.log", "reference", steps, checkpoint)
    try:
        if not session.finished.wait(timeout=3600) or session.failed:
            raise RuntimeError(f"the reference run failed: {session.failed}\n{session.server.log_tail()}")
    finally:
        session.close()
    first = session.progress[0][0]
    # How long a preview takes: from its step's progress event to its preview event (steps without a save).
    by_step = {data["step"]: when for when, data in session.progress}
    waits = [session.previews[s] - by_step[s] for s in session.previews if s in by_step and s % SAVE_EVERY]
    return (overlay / "models" / "loras" / "reference.safetensors", session.progress[-1][0] - first,
            sorted(waits)[len(waits) // 2] if waits else 1.0)


def campaign(args) -> tuple[list[Row], dict]:
    pick = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="loralab-crash-"))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")    # the server inherits one arithmetic path
    overlay, checkpoint = prepare(work, args.pictures, args.full_unet)
    print(f"work folder: {work}", flush=True)
    reference, trained_seconds, preview_seconds = reference_run(overlay, logs, args.steps, checkpoint)
    print(f"reference run: {args.steps} steps in {trained_seconds:.0f}s (a preview: {preview_seconds:.2f}s)",
          flush=True)

    folders = Folders(overlay, "crash")
    moments = [MOMENTS[i % len(MOMENTS)] for i in range(args.kills)]
    pick.shuffle(moments)
    rows: list[Row] = []
    for number, moment in enumerate(moments, 1):
        session = Session(overlay, logs / f"crash-{number:02}.log", "crash", args.steps, checkpoint)
        try:
            if rows:
                rows[-1].resumed = wait_until_known(session)
            start = max(session.last_step, rows[-1].resumed if rows else 0)
            if not wait_for_moment(session, folders, moment, start + 1 + pick.randint(0, 3), preview_seconds, pick):
                raise RuntimeError(f"the run finished before kill {number}: use more --steps")
            session.kill()
        finally:
            session.close()
        pid = session.server.process.pid
        lora_partials, state_partials = folders.lora_partials(pid), folders.state_partials(pid)
        check = check_files(folders)
        rows.append(Row(number, moment, observed_moment(session, lora_partials, state_partials),
                        session.last_step,
                        check.files(),
                        "yes" if check.loaded == check.loras and check.states_loaded == check.states
                        and not check.problems else "NO", check.expected_resume, problems=check.problems))
        print(format_row(rows[-1]), flush=True)

    session = Session(overlay, logs / "crash-final.log", "crash", args.steps, checkpoint)
    try:
        rows[-1].resumed = wait_until_known(session)
        if not session.finished.wait(timeout=3600) or session.failed:
            raise RuntimeError(f"the continued run failed: {session.failed}\n{session.server.log_tail()}")
        history = session.server.get_json(f"/history/{session.prompt_id}")[session.prompt_id]
    finally:
        session.close()
    print(format_row(rows[-1]), flush=True)
    report = history["outputs"]["4"]["text"][0]
    final = folders.loras / "crash.safetensors"
    unet = ("the full SD1.5 UNet" if args.full_unet else "the slim SD1.5 UNet of tests/support/random_models.py: "
            "320 channels, two levels, which ComfyUI loads as SD1.5")
    summary = {"seed": args.seed, "steps": args.steps, "kills": len(rows), "trained_seconds": trained_seconds,
               "unet": unet,
               "difference": max_difference(reference, final), "report": report, "work": str(work),
               "final_check": check_files(folders)}
    return rows, summary


def wait_until_known(session: Session, timeout: float = 900) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = session.continued_from()
        if step is not None:
            return step
        if session.finished.is_set():
            raise RuntimeError(f"the run ended before training: {session.failed}\n{session.server.log_tail()}")
        time.sleep(0.05)
    raise TimeoutError("the restarted run never started training")


# --- the report ---------------------------------------------------------------------------------------------------
HEADER = ("| Kill | Aimed at | Observed at the kill | Step at kill | Files found | All loaded? | Newest whole save "
          "| Resumed from step |")


def format_row(row: Row) -> str:
    resumed = "—" if row.resumed is None else str(row.resumed)
    ok = "" if row.resumed is None or row.resumed == row.expected else " **≠ expected**"
    problems = f" ({'; '.join(row.problems)})" if row.problems else ""
    return (f"| {row.number} | {row.moment} | {row.observed} | {row.step} | {row.files} | {row.loaded}{problems} "
            f"| {row.expected} | {resumed}{ok} |")


def markdown(rows: list[Row], summary: dict, command: str) -> str:
    counts = {moment: sum(row.moment == moment for row in rows) for moment in MOMENTS}
    observed = {}
    for row in rows:
        kind = "training a step" if row.observed.startswith("training step") else row.observed
        observed[kind] = observed.get(kind, 0) + 1
    torn = sum(row.loaded != "yes" for row in rows)
    right = sum(row.resumed == row.expected for row in rows)
    difference = summary["difference"]
    notes = [line for line in summary["report"].splitlines() if line.startswith("note: continued")]
    lines = [
        "## Crash campaign: kill -9 during training (hand-kept section)",
        "",
        "Written by `tools/crash_campaign.py`, not by the hardening suite; the suite includes this file",
        "(`docs/crash_campaign.md`) verbatim. Rerun with",
        "",
        "```bash",
        command,
        "```",
        "",
        "A real `main.py --cpu --deterministic` server (OMP_NUM_THREADS=1) loads a random-weight SD1.5 checkpoint",
        f"({summary['unet']}; full-size CLIP and VAE) and trains one workflow: {summary['steps']} steps at 64 px, "
        f"rank 8, cosine schedule with warm-up, saves every {SAVE_EVERY} steps (newest {KEEP_LAST} kept), previews "
        f"every {PREVIEW_EVERY} steps, fp32 files. An uninterrupted run of it (\"reference\", "
        f"{summary['trained_seconds']:.0f} s of training) is compared with the same workflow killed "
        f"{summary['kills']} times with SIGKILL (seed {summary['seed']}): "
        + ", ".join(f"{n} × {m}" for m, n in counts.items()) + ". After each kill the server",
        "is restarted and the same workflow queued; it continues from its newest whole save by itself.",
        "",
        "Checked after every kill: every `.safetensors` in the loras folder loads (all tensors); every resume",
        "state loads (`torch.load(weights_only=True)`) and matches its LoRA's step and run identity; only the",
        "newest save may lack its state (killed between the two writes); temporary files never carry a name a",
        "loader lists. After the restart: the step the node says it continued from is the newest save with a",
        "whole state.",
        "",
        "**Result:** "
        + f"{summary['kills']} kills ({', '.join(f'{n} {k}' for k, n in observed.items())} when the process died); "
        + f"{torn} torn or unloadable files; {right} of {len(rows)} restarts continued from the newest whole save; "
        + f"the final LoRA differs from the uninterrupted run's by a max abs difference of **{difference:.3g}**"
        + (" (bitwise equal)." if difference == 0 else "."),
        "",
        "The continued run's report: " + (notes[-1][len("note: "):] if notes else "(no continuation note)") + ".",
        "",
        "Found and fixed with this campaign: queued again after a kill, a run started over under a new name",
        "(`crash_2`), leaving the killed run's saves behind; now it continues the same run (same identity) from",
        "its newest whole save, counts that run's saves for keep_last_saves and removes the temporary files the",
        "kill left. Resume states were written without fsync, and a failed write left its temporary file; now",
        "temporary file, fsync, `os.replace`, folder fsync — as the LoRA files already were.",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|---|",
        *[format_row(row) for row in rows],
        "",
        "*Observed at the kill* is read from what the server left behind (a LoRA or state `.tmp-<pid>` file, a",
        "preview step whose preview had not arrived); *Newest whole save* is what the checks found, *Resumed from",
        "step* what the restarted server's Train LoRA logged (0 = a fresh start).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=120, help="of the training run (it must outlast the kills)")
    parser.add_argument("--pictures", type=int, default=3)
    parser.add_argument("--full-unet", action="store_true",
                        help="the full SD1.5 UNet (about 5 s a step on a CPU) instead of the slim one")
    parser.add_argument("--work", help="folder for the private ComfyUI (default: a new temporary folder)")
    parser.add_argument("--docs", default=str(REPO / "docs" / "crash_campaign.md"))
    parser.add_argument("--no-docs", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    rows, summary = campaign(args)
    command = (f".venv/bin/python tools/crash_campaign.py --kills {args.kills} --seed {args.seed} --steps {args.steps}"
               + (" --full-unet" if args.full_unet else ""))
    text = markdown(rows, summary, command)
    print()
    print(text)
    final = summary["final_check"]
    print(f"after the final run: {final.loras} LoRAs, {final.states} states, partials {final.partials}, "
          f"problems {final.problems}")
    if not args.no_docs:
        Path(args.docs).write_text(text, encoding="utf-8")
        print(f"written: {args.docs}")
    failures = [row for row in rows if row.loaded != "yes" or row.resumed != row.expected]
    return 1 if failures or summary["difference"] != 0 else 0


if __name__ == "__main__":
    sys.exit(main())

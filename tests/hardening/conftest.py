"""Hardening suite plumbing: a file-access audit, a tree that must stay untouched, and the report.

- ``FileAudit``: a ``sys.addaudithook`` hook (installed once; hooks cannot be removed) records every
  ``open``, listing, rename, removal, mkdir, link and copy event while a ``with audit.watch():`` block
  runs, plus the reads Python's audit events cannot see (safetensors opens files from Rust; torch.load
  is recorded too). ``assert_clean`` then checks that nothing touched the outside tree and that every
  write landed in a folder LoRA Lab may write to.
- ``outside``: a sentinel tree next to the private ComfyUI (a valid LoRA, pictures, captions, a folder);
  attacks aim at it, and it is compared byte for byte (listing, sizes, mtimes, contents) afterwards.
- ``hardening``: each test records ``(area, attack, outcome)`` rows; at the end of a session that ran
  the whole hardening suite with ``LORALAB_WRITE_HARDENING_REPORT=1``, ``docs/hardening.md`` is rewritten
  from them (a failing test's rows are marked FAILED); without it a test run leaves the repository alone.
  Paths are redacted to placeholders so the file only changes when results change.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
REPORT = REPO / "docs" / "hardening.md"
# Regenerating the report is asked for, never a side effect of a test run: "1" writes REPORT, a path writes
# there instead (to compare a run with the committed report without touching the repository).
WRITE_REPORT = "LORALAB_WRITE_HARDENING_REPORT"
# Hand-kept sections the report includes verbatim at its end, each written by its own tool, so that
# regenerating the report keeps them (tools/crash_campaign.py writes docs/crash_campaign.md).
HAND_KEPT_SECTIONS = (REPO / "docs" / "crash_campaign.md",)


# --- the report -------------------------------------------------------------------------------------------
@dataclass
class Row:
    area: str
    attack: str
    outcome: str = ""
    test: str = ""
    status: str = "pass"


@dataclass
class Report:
    rows: list = field(default_factory=list)
    redactions: dict = field(default_factory=dict)     # real text -> placeholder
    comfyui: str = ""
    results: dict = field(default_factory=dict)         # nodeid -> "passed"/"failed"/"skipped"
    expected: set = field(default_factory=set)          # hardening nodeids selected to run
    partial: bool = False

    def redact(self, text: str) -> str:
        text = str(text)
        for real, placeholder in sorted(self.redactions.items(), key=lambda item: -len(item[0])):
            if real:
                text = text.replace(real, placeholder)
        text = re.sub(r"\.tmp-\d+", ".tmp-<pid>", text)        # temporary names carry the process id
        text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", lambda found: repr(found.group())[1:-1], text)
        return " ".join(text.split())


REPORT_STATE = Report()


class Recorder:
    """What a test hands in: ``hardening.row(area, attack, outcome)``."""

    def __init__(self, test: str):
        self.test = test

    def row(self, area: str, attack: str, outcome: str) -> None:
        text = REPORT_STATE.redact(outcome)
        if len(text) > 520:
            text = text[:517] + "…"
        REPORT_STATE.rows.append(Row(area, REPORT_STATE.redact(attack), text, self.test))


@pytest.fixture
def hardening(request):
    return Recorder(request.node.nodeid)


def pytest_collection_finish(session):
    hardening_files = {path.resolve() for path in HERE.glob("test_*.py")}
    selected = [item for item in session.items if Path(str(item.fspath)).resolve().parent == HERE]
    REPORT_STATE.expected = {item.nodeid for item in selected}
    collected_files = {Path(str(item.fspath)).resolve() for item in selected}
    if collected_files != hardening_files:
        REPORT_STATE.partial = True


def pytest_deselected(items):
    if any(Path(str(item.fspath)).resolve().parent == HERE for item in items):
        REPORT_STATE.partial = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or not report.passed:
        if REPORT_STATE.results.get(item.nodeid) != "failed":
            REPORT_STATE.results[item.nodeid] = report.outcome
        if not report.passed:
            for row in REPORT_STATE.rows:
                if row.test == item.nodeid:
                    row.status = "FAILED" if report.failed else report.outcome


def pytest_sessionfinish(session, exitstatus):
    state = REPORT_STATE
    requested = os.environ.get(WRITE_REPORT, "").strip()
    if requested in ("", "0"):
        return      # a test run leaves the repository as it found it
    if not state.expected or state.partial or set(state.results) != state.expected:
        return      # a partial run (-k, one file, -x stop) must not replace the full report
    failed = sorted(nodeid for nodeid, result in state.results.items() if result == "failed")
    target = REPORT if requested == "1" else Path(requested)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_report(state, failed), encoding="utf-8")


ALLOWED_ROOTS = """\
| What | May read | May write |
|---|---|---|
| Dataset from Folder `folder` | a subfolder of ComfyUI's `input/`, or of a root registered as `lora_datasets` in `extra_model_paths.yaml` (typed `lora_datasets/<sub>`); an absolute path is accepted only when it lies inside one of those roots | nothing (the preview writes its contact sheet to ComfyUI's `temp/`) |
| pictures and captions inside a dataset | files under the dataset folder; symbolic links are followed only while they stay inside it | — |
| Caption `write_sidecars` | — | `.txt` sidecars next to the pictures and `.loralab_caption_backup/` inside the dataset folder, re-checked at write time, then opened without following links (O_NOFOLLOW, relative to folder descriptors; on Windows the re-check alone): a sidecar, folder or backup folder swapped for a link is skipped |
| Train LoRA `output_name` | — | the first `loras` folder (subfolders allowed, never through a link leading out of it); resume state and latent cache under `user/loralab/`; if the loras folder cannot be written, a rescue copy under `user/loralab/rescued/` |
| Training Options `resume_from` | a name from its list: the `.safetensors` files ComfyUI lists for `loras` that have a resume state in `user/loralab/train-state/` (a name not on the list is refused at validation); resume state only via `torch.load(weights_only=True)` | — |
| LoRA Pedal / Apply LoRA Stack names, `/loralab/lora_info?name=` | files ComfyUI lists for `loras`; absolute paths only when inside a loras folder; `.safetensors` only | — |
| links a server owner puts inside `models/loras` | followed for reading, as ComfyUI's own LoRA loaders do (the owner chose them) | never written through when they lead out |
| BLIP Loader `model` | a plain folder name under `models/blip/`; weights only from `model.safetensors`, transformers' own BLIP classes (no remote code) | a download into `models/blip/<name>/` when online (never during tests) |
"""


# Hand-written, not generated: what writing the suite found and fixed. Keep it current by hand.
FIXED = """\
- Dataset from Folder refused an absolute path even when it named a folder inside `input/` (a local user pasting
  the full path); now accepted when it resolves inside `input/` or a `lora_datasets` root, refused elsewhere.
- Caption `write_sidecars` trusted paths decided at scan time: a sidecar (or its folder) swapped for a symbolic
  link before captioning made the node read the file outside (and, in overwrite mode, copy it into the backup
  folder) or create a file outside. Each sidecar is now re-checked right before writing; skipped ones are named.
  A picture that moved out of the dataset since the scan now fails with Caption's own message instead of a bare
  DatasetError.
- Train LoRA `output_name` through a subfolder of `models/loras` that is a link leading out was written outside
  the loras folder; a folder part that is an existing file failed only at the save, after training. Both are
  refused before training, and `save_lora_file` itself refuses to write or create folders through such a link.
- `resume_from` naming a pickle, a damaged `.safetensors` or a resume state replaced by a crafted pickle raised a
  bare ValueError / UnpicklingError; now a message naming Train LoRA › resume_from and the fix. Training Options
  refuses a non-`.safetensors` `resume_from` at validation.
- A failing final save (full disk, permissions) lost the trained weights: the partial save hit the same error
  inside the error handler. Now the weights are written to `user/loralab/rescued/` and the error names that
  file; a failing periodic save is logged and training goes on; the previous file of that name stays intact.
- UTF-32 caption files (with BOM) were reported as binary data; they are read now.
- The test network guard could be swallowed by code that catches every exception (the BLIP download fallback)
  and did not cover `connect_ex` or name lookups; this suite's guard records every attempt and fails the test
  at teardown. It now covers the whole test session and every ComfyUI server the tests start
  (tests/support/network_guard.py).
- Caption's write-time re-check left a window: a link swapped in after it (or a backup folder swapped for a
  link) was still followed. Sidecars and backups are now opened with O_NOFOLLOW relative to folder descriptors
  reached from the dataset root; the old bytes are backed up from the descriptor that read them.
"""


def render_report(state: Report, failed: list[str]) -> str:
    total = len(state.results)
    passed = sum(result == "passed" for result in state.results.values())
    lines = [
        "# Hardening report",
        "",
        "Generated by the hardening suite — do not edit by hand. Regenerate with",
        "",
        "```bash",
        f"{WRITE_REPORT}=1 .venv/bin/python -m pytest -c tests/pytest.ini tests/hardening -q",
        "```",
        "",
        f"(the file is rewritten only when asked for with `{WRITE_REPORT}=1` and the whole suite ran;",
        "a plain test run, `-k`, a single file or `-x` leave it alone).",
        "",
        f"Last run against **{state.comfyui or 'ComfyUI'}**: {passed} of {total} tests passed"
        + (f"; failed: {', '.join(failed)}" if failed else "") + ".",
        "",
        "After every path attack the suite checks that nothing outside the allowed roots was opened, listed,",
        "created, renamed or removed (Python audit hooks plus spies on safetensors/torch reads) and that a",
        "sentinel tree next to ComfyUI is byte-for-byte unchanged. `<ComfyUI>` is the private ComfyUI root",
        "the tests run in, `<outside>` the sentinel tree, `<tmp>` a scratch folder.",
        "",
        "## Allowed roots",
        "",
        ALLOWED_ROOTS,
        "## Fixes made when the suite was written (hand-kept list)",
        "",
        "Written by hand in `tests/hardening/conftest.py` (`FIXED`), not produced by a test run; the tables",
        "below are.",
        "",
        FIXED,
    ]
    areas: dict[str, list[Row]] = {}
    for row in state.rows:
        areas.setdefault(row.area, []).append(row)
    order = ("Paths", "Files", "Faults", "Loading")
    for area, rows in sorted(areas.items(), key=lambda item: order.index(item[0].split(" ")[0])
                             if item[0].split(" ")[0] in order else len(order)):
        lines += [f"## {area}", "", "| Attack | Outcome | Result |", "|---|---|---|"]
        for row in rows:
            lines.append(f"| {_cell(row.attack)} | {_cell(row.outcome)} | {row.status} |")
        lines.append("")
    lines += [section.read_text(encoding="utf-8").strip() + "\n" for section in HAND_KEPT_SECTIONS if section.is_file()]
    return "\n".join(lines).rstrip() + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --- the private ComfyUI, the outside tree, redaction ---------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _report_comfyui_version(comfyui_root):
    import comfyui_home
    REPORT_STATE.comfyui = comfyui_home.comfyui_version_label(comfyui_root)
    REPORT_STATE.redactions[str(REPO)] = "<pack>"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """These tests train tiny models: on a busy 2-core machine, two spinning OpenMP threads make a step
    10-20x slower than one. A server started from here inherits the setting through the environment."""
    import torch
    threads, variable = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if variable is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = variable


@pytest.fixture(scope="session")
def roots(comfy):
    """Where LoRA Lab may read and write in this ComfyUI (see ALLOWED_ROOTS)."""
    import folder_paths
    user = getattr(folder_paths, "get_user_directory", None)
    user_dir = user() if user else folder_paths.user_directory
    REPORT_STATE.redactions[str(comfy.root)] = "<ComfyUI>"
    REPORT_STATE.redactions[os.path.realpath(comfy.root)] = "<ComfyUI>"
    loras = [os.path.realpath(path) for path in folder_paths.get_folder_paths("loras")]
    writable = loras + [os.path.realpath(folder_paths.get_input_directory()), os.path.realpath(user_dir),
                        os.path.realpath(folder_paths.get_temp_directory())]
    return {"loras": loras, "input": os.path.realpath(folder_paths.get_input_directory()),
            "user": os.path.realpath(user_dir), "writable": writable}


@pytest.fixture(scope="session")
def outside(tmp_path_factory, comfy):
    """A sentinel tree outside every allowed root: the thing every path attack aims at."""
    import safetensors.torch
    import torch
    from PIL import Image
    root = tmp_path_factory.mktemp("outside")
    (root / "pictures").mkdir()
    for index in range(2):
        Image.new("RGB", (32, 32), (index * 100, 50, 50)).save(root / "pictures" / f"p{index}.png")
        (root / "pictures" / f"p{index}.txt").write_text("a secret caption", encoding="utf-8")
    safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, str(root / "secret.safetensors"))
    (root / "secret.txt").write_text("do not read me", encoding="utf-8")
    (root / "secret.png").write_bytes((root / "pictures" / "p0.png").read_bytes())
    (root / "notes").mkdir()
    REPORT_STATE.redactions[str(root)] = "<outside>"
    REPORT_STATE.redactions[os.path.realpath(root)] = "<outside>"
    return root


def tree_state(root: Path) -> dict:
    """Listing, kinds, sizes, mtimes and content hashes: any read-modify-write or new file shows up."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            state[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            state[rel] = ("dir", path.stat().st_mtime_ns)
        else:
            stat = path.stat()
            state[rel] = ("file", stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    state["."] = ("dir", root.stat().st_mtime_ns)
    return state


# --- the audit ------------------------------------------------------------------------------------------------
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_ACTIVE: list = []
_HOOK_LOCK = threading.Lock()
_HOOK_INSTALLED = False


def _as_path(value):
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return value if isinstance(value, str) else None


# Where an event's path is relative to a folder descriptor (os.mkdir(name, dir_fd=...)), the descriptor's index
# in the event's arguments, one per path. The "open" event carries none: the audit fixture's os.open spy
# hands the folder over in _OPEN_FOLDER instead.
_DIR_FD_ARGS = {"os.mkdir": (2,), "os.remove": (1,), "os.rmdir": (1,), "os.chmod": (2,), "os.chown": (3,),
                "os.utime": (3,), "os.rename": (2, 3), "os.replace": (2, 3), "os.link": (2, 3), "os.symlink": (None, 2)}
_OPEN_FOLDER = threading.local()


def _folder_of(fd) -> str | None:
    """The folder an open descriptor refers to (Linux /proc, macOS F_GETPATH); None when unknown."""
    if not isinstance(fd, int) or fd < 0:
        return None
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        pass
    try:
        import fcntl
        return os.fsdecode(fcntl.fcntl(fd, fcntl.F_GETPATH, b"\0" * 1024).rstrip(b"\0"))
    except (ImportError, AttributeError, OSError):
        return None


def _audit_hook(event, args):
    if not _ACTIVE:
        return
    kind = None
    paths = []
    folders = [None, None]
    follows = event not in _NOT_FOLLOWING
    if event == "open":
        path, mode, flags = (list(args) + [None, None, None])[:3]
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                 (isinstance(flags, int) and flags & _WRITE_FLAGS)
        kind, paths = ("write" if writes else "read"), [path]
        folders = [getattr(_OPEN_FOLDER, "path", None)]
        follows = not (isinstance(flags, int) and flags & getattr(os, "O_NOFOLLOW", 0))
    elif event in ("os.listdir", "os.scandir"):
        kind, paths = "list", [args[0] if args else "."]
    elif event in ("os.rename", "os.replace", "os.link", "os.symlink", "shutil.copyfile", "shutil.copytree",
                   "shutil.move"):
        kind, paths = "write", list(args[:2])
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.chown", "os.utime",
                   "shutil.rmtree", "os.chflags"):
        kind, paths = "write", [args[0]] if args else []
    if kind is None:
        return
    if event in _DIR_FD_ARGS:
        folders = [_folder_of(args[index]) if index is not None and index < len(args) else None
                   for index in _DIR_FD_ARGS[event]]
    for value, folder in zip(paths, folders + [None] * len(paths)):
        path = _as_path(value)
        if path is None or not path:
            continue
        if folder and not os.path.isabs(path):
            path = os.path.join(folder, path)
        path = os.path.abspath(path)
        real = _real_path(path, follows)
        for watcher in list(_ACTIVE):
            watcher.events.append((kind, event, path))
            watcher.real_paths.append(real)


# Events that act on a link itself, not on what it leads to (and opens with O_NOFOLLOW).
_NOT_FOLLOWING = {"os.remove", "os.rmdir", "os.rename", "os.replace", "os.mkdir", "os.symlink", "os.link",
                  "shutil.rmtree", "shutil.move"}


def _real_path(path: str, follows: bool) -> str:
    """Resolved when the event happens (a link swapped in later must not turn an earlier read inside into
    one outside); the last part is resolved only when the operation follows it."""
    if follows:
        return os.path.realpath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


class FileAudit:
    def __init__(self, outside: Path, writable: list[str]):
        self.outside = [str(outside), os.path.realpath(outside)]
        self.writable = writable
        self.events: list = []          # (kind, event, absolute path as named)
        self.real_paths: list = []      # each event's path resolved at the time (see _real_path)

    @contextmanager
    def watch(self):
        global _HOOK_INSTALLED
        with _HOOK_LOCK:
            if not _HOOK_INSTALLED:
                sys.addaudithook(_audit_hook)
                _HOOK_INSTALLED = True
        _ACTIVE.append(self)
        try:
            yield self
        finally:
            _ACTIVE.remove(self)

    @contextmanager
    def paused(self):
        """What the test itself does mid-watch (swapping links in, as an attacker would) is not the node's."""
        _ACTIVE.remove(self)
        try:
            yield self
        finally:
            _ACTIVE.append(self)

    def record(self, kind: str, event: str, path) -> None:
        if _ACTIVE and self in _ACTIVE:
            self.events.append((kind, event, os.path.abspath(os.fspath(path))))
            self.real_paths.append(os.path.realpath(path))

    def touching_outside(self) -> list:
        return [event for event, real in zip(self.events, self.real_paths)
                if any(_inside(event[2], root) or _inside(real, root) for root in self.outside)]

    def writes_outside_allowed(self) -> list:
        bad = []
        for (kind, event, path), real in zip(self.events, self.real_paths):
            if kind != "write" or "__pycache__" in path or path.startswith("/dev/"):
                continue
            real_parent = os.path.dirname(real)
            if not any(_inside(real_parent, root) for root in self.writable):
                bad.append((kind, event, path))
        return bad

    def assert_clean(self):
        assert not self.touching_outside(), f"the outside tree was touched: {self.touching_outside()}"
        assert not self.writes_outside_allowed(), f"writes outside the allowed roots: {self.writes_outside_allowed()}"


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


@pytest.fixture
def audit(outside, roots, monkeypatch):
    """Watch one attack: ``with audit.watch(): ...`` then ``audit.assert_clean()``; the outside tree
    is also compared before/after this test."""
    import safetensors
    import safetensors.torch
    import torch
    watcher = FileAudit(outside, roots["writable"])
    real_safe_open, real_load_file, real_torch_load = safetensors.safe_open, safetensors.torch.load_file, torch.load

    def spying_safe_open(path, *args, **kwargs):
        watcher.record("read", "safetensors.safe_open", path)
        return real_safe_open(path, *args, **kwargs)

    def spying_load_file(path, *args, **kwargs):
        watcher.record("read", "safetensors.load_file", path)
        return real_load_file(path, *args, **kwargs)

    def spying_torch_load(source, *args, **kwargs):
        if isinstance(source, (str, os.PathLike)):
            watcher.record("read", "torch.load", source)
        return real_torch_load(source, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", spying_safe_open)
    monkeypatch.setattr(safetensors.torch, "load_file", spying_load_file)
    monkeypatch.setattr(torch, "load", spying_torch_load)
    real_open = os.open

    def open_telling_the_audit_its_folder(path, flags, mode=0o777, *, dir_fd=None):
        # Python's "open" audit event leaves out dir_fd: without this, a name opened relative to a folder
        # descriptor (the caption writer's O_NOFOLLOW opens) would be taken as relative to the working folder.
        _OPEN_FOLDER.path = _folder_of(dir_fd)
        try:
            return real_open(path, flags, mode, dir_fd=dir_fd)
        finally:
            _OPEN_FOLDER.path = None

    monkeypatch.setattr(os, "open", open_telling_the_audit_its_folder)
    before = tree_state(outside)
    yield watcher
    assert tree_state(outside) == before, "the outside tree changed"


# --- the network guard ------------------------------------------------------------------------------------------
# This suite used its own, stricter guard (connect_ex and name lookups too, every attempt recorded and failing the
# test at teardown, even when swallowed); that guard is now tests/support/network_guard.py, installed for the whole
# session and in every test server, and tests/conftest.py's ``no_network`` fixture is the one used here.

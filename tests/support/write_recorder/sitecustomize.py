"""Imported by every Python process whose PYTHONPATH starts with this folder (Python imports ``sitecustomize``
at start-up): in a torchrun worker (RANK set) with LORALAB_RECORD_WRITES naming a folder, every write the process
asks of the file system -- an open for writing, a rename or replace, a hard link, a removal, a new folder -- is
appended to <folder>/writes-rank<RANK>.txt as "<event>\\t<path>". Python's audit hooks (PEP 578) see these calls
wherever they come from; bytes written by C++ or Rust (safetensors, torch.save to a path) are not seen, but the pack
publishes every file through Python's open and os.replace/os.link, which are.

Used by tests/comfy/test_distributed_training.py to show that only rank 0 writes. Never installed for users.
"""
import os
import sys
import threading


def _install(folder: str, rank: str) -> None:
    log = os.open(os.path.join(folder, f"writes-rank{rank}.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    writing_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    inside = threading.local()          # the hook's own write must not be recorded (nor recurse)

    def record(event: str, path) -> None:
        if getattr(inside, "busy", False) or isinstance(path, int):
            return
        inside.busy = True
        try:
            os.write(log, f"{event}\t{os.fsdecode(path)}\n".encode("utf-8", "replace"))
        finally:
            inside.busy = False

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if path is None:
                return
            writes = any(letter in mode for letter in "wax+") if isinstance(mode, str) else bool(flags & writing_flags)
            if writes:
                record("open", path)
        elif event in ("os.rename", "os.link"):
            record(event, args[1])
        elif event in ("os.remove", "os.mkdir", "os.rmdir"):
            record(event, args[0])

    sys.addaudithook(hook)


if os.environ.get("LORALAB_RECORD_WRITES") and os.environ.get("RANK") is not None:
    _install(os.environ["LORALAB_RECORD_WRITES"], os.environ["RANK"])

"""One rank of a distributed Train LoRA run, started by torchrun (trainer/distributed/launcher.py):

    python -m torch.distributed.run --nproc-per-node=N ... nodes/distributed_worker.py <job folder>

It brings up the controller's ComfyUI without its server -- the same code, command-line settings, folders and
custom nodes -- then hands over to nodes/train_distributed.py's worker_main. Not imported by the pack (it runs
before the pack exists in this process), so only the standard library and torch here.
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import sys
from pathlib import Path


def boot_comfyui(setup: dict):
    """ComfyUI as the controller runs it, minus the listening server -> the pack's module, as ComfyUI loaded it."""
    # ComfyUI's root first, as when main.py runs: its packages (utils/, app/) before any module of the same name
    # a later entry holds (ComfyUI 2025 puts comfy/ itself on the path, whose utils.py is not the utils package).
    for entry in reversed([setup["root"], *(path for path in setup["sys_path"] if path != setup["root"])]):
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)
    if (Path(setup["root"]) / "utils" / "__init__.py").exists():
        # ComfyUI's utils package, now: importing nodes.py puts comfy/ first on the path, and comfy/utils.py would
        # then stand for it (main.py imports utils.extra_config at its top for the same reason).
        importlib.import_module("utils")
    import torch
    if torch.cuda.is_available():       # before comfy is imported: it reads the current device at import
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args
    for name, value in setup["args"].items():
        if hasattr(args, name):
            setattr(args, name, value)
    args.cuda_device = None             # each rank has its own GPU (set above), not the controller's
    import folder_paths
    folder_paths.folder_names_and_paths.clear()
    for name, (paths, extensions) in setup["folders"].items():
        folder_paths.folder_names_and_paths[name] = (list(paths), set(extensions))
    directories = setup["directories"]
    folder_paths.set_output_directory(directories["output"])
    folder_paths.set_temp_directory(directories["temp"])
    folder_paths.set_input_directory(directories["input"])
    if directories.get("user") and hasattr(folder_paths, "set_user_directory"):
        folder_paths.set_user_directory(directories["user"])
    import nodes
    import server
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server.PromptServer(loop)           # custom nodes register their routes on it; it never listens here
    if hasattr(nodes, "init_extra_nodes"):          # ComfyUI mid-2024 on (2025: a coroutine)
        started = nodes.init_extra_nodes(init_custom_nodes=True)
        if inspect.isawaitable(started):
            loop.run_until_complete(started)
    else:                                           # ComfyUI 2024-03
        nodes.init_custom_nodes()
    pack_init = (Path(setup["pack_root"]) / "__init__.py").resolve()
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) and Path(module.__file__).resolve() == pack_init:
            return module
    raise RuntimeError(f"ComfyUI did not load LoRA Lab from {setup['pack_root']} in this worker "
                       "(is it in the custom_nodes folder?)")


def main(job_folder: str) -> None:
    setup = json.loads((Path(job_folder) / "job.json").read_text())["comfyui"]
    try:
        pack = boot_comfyui(setup)
    except Exception as error:      # the controller names the rank and this reason (trainer/distributed/job.py)
        rank = int(os.environ.get("RANK", 0))
        (Path(job_folder) / f"error-rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "kind": type(error).__name__, "step": None,
             "message": f"ComfyUI could not start in the worker: {type(error).__name__}: {error}"}))
        raise
    import importlib
    worker = importlib.import_module(f"{pack.__name__}.trainer.distributed.worker")
    worker.run_to_the_end(importlib.import_module(f"{pack.__name__}.nodes.train_distributed").worker_main,
                          Path(job_folder))


if __name__ == "__main__":
    main(sys.argv[1])

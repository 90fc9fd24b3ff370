"""A training run's saves by name: ``<name>_epoch<E>.safetensors`` (save_every_n_epochs) and the final
``<name>.safetensors`` (run.py names them), found in a LoRA list as ComfyUI gives it, to compare epochs.

No ComfyUI here: the node layer passes in what ``folder_paths`` lists.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from ..lora.files import SUFFIX
from ..lora.stack import name_key
from .interrupted_runs import UNFINISHED_RUN_KEY
from .run_reuse import RUN_IDENTITY_KEY

EPOCH_SAVE = re.compile(r"(?P<base>.+)_epoch(?P<epoch>\d+)\.safetensors")
_PERIODIC_SUFFIX = re.compile(r"_(?:epoch|step)\d+$")


@dataclass(frozen=True)
class RunSaves:
    base: str                                  # "sub/char": the run's name, "/"-separated, no suffix
    epochs: tuple[tuple[int, str], ...]        # (epoch, name as listed), by epoch
    final: str | None                          # the final file's name as listed, if there is one


def run_saves(name: str, listed: Iterable[str]) -> RunSaves:
    """The saves of the run ``name`` names: its final file (``char`` or ``char.safetensors``) or one of its
    saves (``char_epoch2``, ``char_step40``). Separators do not matter (a workflow saved on Windows)."""
    by_key = {name_key(entry): entry for entry in listed}
    given = name_key(name)
    given = given[: -len(SUFFIX)] if given.lower().endswith(SUFFIX) else given
    candidates = [given] + ([_PERIODIC_SUFFIX.sub("", given)] if _PERIODIC_SUFFIX.search(given) else [])
    for base in candidates:
        epochs = sorted((int(found["epoch"]), entry) for key, entry in by_key.items()
                        if (found := EPOCH_SAVE.fullmatch(key)) and found["base"] == base)
        if epochs:
            return RunSaves(base, tuple(epochs), by_key.get(base + SUFFIX))
    found_final = next((base for base in candidates if base + SUFFIX in by_key), candidates[0])
    return RunSaves(found_final, (), by_key.get(found_final + SUFFIX))


def same_run(final_metadata: Mapping[str, str] | None, save_metadata: Mapping[str, str]) -> bool:
    """Whether an epoch save belongs to the run that wrote the final file: not when both name their run
    and the names differ (a run trained again over the same name with overwrite left older saves)."""
    final_run = (final_metadata or {}).get(RUN_IDENTITY_KEY)
    save_run = save_metadata.get(UNFINISHED_RUN_KEY)
    return not final_run or not save_run or final_run == save_run

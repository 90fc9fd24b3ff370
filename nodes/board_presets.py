"""Named pedalboards: a Pedalboard's rows saved under a name in ComfyUI's user folder
(``user/loralab/pedalboards/<name>.json``), to recall in any workflow (rgthree's saved LoRA sets, #539).

The rows are the node's own ``pedals`` rows (pedalboard.py parses them), so a recalled board is exactly the
board that was saved. Names are plain (letters, digits, spaces, ``-``, ``_``, ``.``; no path), so a request
can never read or write outside that folder.
"""
from __future__ import annotations

import json
import os
import re
import time

from .folders import user_folder
from .pedalboard import parse_pedals

MAX_NAME = 64
_NAME = re.compile(r"^[\w][\w .-]*$", re.UNICODE)


class BoardError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def boards_folder():
    return user_folder("pedalboards")


def board_names() -> list[str]:
    folder = boards_folder()
    if not folder.is_dir():
        return []
    return sorted((path.stem for path in folder.glob("*.json") if _NAME.match(path.stem)), key=str.casefold)


def checked_name(name) -> str:
    text = name.strip() if isinstance(name, str) else ""
    if not text or len(text) > MAX_NAME or not _NAME.match(text) or text.endswith("."):
        raise BoardError(f"{name!r} cannot name a board: use up to {MAX_NAME} letters, digits, spaces, '-', '_' "
                         "and '.' (not first or last).")
    return text


def save_board(name, rows) -> dict:
    """Write the rows under ``name`` (replacing a board of that name); {"name", "replaced", "rows"}."""
    name = checked_name(name)
    if not isinstance(rows, list):
        raise BoardError("rows must be the board's list of rows.")
    text = json.dumps(rows, ensure_ascii=False)
    try:
        parse_pedals(text)           # the same rules as the node: a board that saves is a board that plays
    except ValueError as error:
        raise BoardError(str(error)) from None
    folder = boards_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    replaced = path.exists()
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps({"rows": rows, "saved_at": time.time()}, ensure_ascii=False, indent=1),
                         encoding="utf-8")
    os.replace(temporary, path)
    return {"name": name, "replaced": replaced, "rows": len(rows)}


def load_board(name) -> dict:
    """{"name", "rows"} of a saved board."""
    name = checked_name(name)
    path = boards_folder() / f"{name}.json"
    if not path.is_file():
        raise BoardError(f"there is no saved board named {name!r}.", status=404)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
        parse_pedals(json.dumps(rows))
    except (ValueError, KeyError, TypeError) as error:
        raise BoardError(f"the saved board {name!r} cannot be read ({error}); save it again.", status=422) from None
    return {"name": name, "rows": rows}

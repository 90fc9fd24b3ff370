"""HTTP routes the pedalboard's front end asks: which LoRAs exist, and what one of them is.

``GET /loralab/loras``            -> ["style.safetensors", "chars/hero.safetensors", ...]
``GET /loralab/lora_info?name=N`` -> {"name", "trigger_words", "trained_tags", "base_model", "network_dim", ...}
``GET /loralab/presets``          -> {"SD1.5": {"character": {"8 GB": {"widgets", "options", "notes"}}}, ...}
  (Train LoRA's preset choice writes a preset's widget values into the node: js/presets.js)
``GET /loralab/review/pictures?session=T``     -> {"pictures": [{"key", "caption"}], "can_save", "folder"}
``GET /loralab/review/thumb?session=T&index=I`` -> a JPEG of picture I of a Review Captions run
``POST /loralab/review/save`` {"session": T, "captions": {key: caption}} -> {"written", "replaced", ..., "report"}
  (the review editor, js/caption_review.js; sessions and the rules are in review.py)
``GET /loralab/boards``                 -> ["portraits", "style mix", ...]   (named pedalboards: board_presets.py)
``GET /loralab/boards/load?name=N``     -> {"name", "rows"}
``POST /loralab/boards/save`` {"name": N, "rows": [...]} -> {"name", "replaced", "rows"}

The info route reads the file's safetensors header only (8-byte length + JSON), and the trigger-word files beside
it (trainer/lora/trigger_words.py): no tensor is loaded,
nothing is unpickled, and names go through the same resolution as the pedals, so a request cannot
read a file outside the loras folders or a pickle. (Newer ComfyUI serves every route under /api/ too.)
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import sys

from ..trainer.lora import stack as stacks
from ..trainer.lora import trigger_words as lora_words
from ..trainer.lora.stack import LoraNotFoundError, LoraStackError
from . import pedals as pedal_nodes
from . import board_presets, review, train_preset

LORAS_ROUTE = "/loralab/loras"
INFO_ROUTE = "/loralab/lora_info"
PRESETS_ROUTE = "/loralab/presets"
REVIEW_PICTURES_ROUTE = "/loralab/review/pictures"
REVIEW_THUMB_ROUTE = "/loralab/review/thumb"
REVIEW_SAVE_ROUTE = "/loralab/review/save"
BOARDS_ROUTE = "/loralab/boards"
BOARD_LOAD_ROUTE = "/loralab/boards/load"
BOARD_SAVE_ROUTE = "/loralab/boards/save"
log = logging.getLogger("LoRA Lab")


def lora_names() -> list[str]:
    """The names a pedal offers: ComfyUI's LoRA list, without resume states an older LoRA Lab left beside
    the LoRAs (Train LoRA now keeps them in ComfyUI's user/loralab/train-state/)."""
    return [name for name in pedal_nodes.lora_choices() if name != stacks.NONE_NAME]


def _number(text, kind):
    try:
        return kind(text) if text not in (None, "", "None") else None
    except (TypeError, ValueError):
        return None


def _without_server_folders(text: str) -> str:
    """An error text for the HTTP client: each loras folder's absolute path becomes the kind ``<loras>``
    (anyone who can reach the server may ask; only its log, and the nodes' own errors, show the paths)."""
    folders = set()
    for folder in pedal_nodes.loras_folders():
        folders |= {folder, os.path.normpath(os.path.abspath(folder)), os.path.realpath(folder)}
    for folder in sorted(filter(None, folders), key=len, reverse=True):
        text = text.replace(folder, "<loras>")
    return re.sub(r"<loras>(, <loras>)+", "<loras>", text)


def _refusal(status: int, error: LoraStackError, name: str) -> tuple[int, dict]:
    log.info("LoRA Lab: %s?name=%r answered %d: %s", INFO_ROUTE, name, status, error)
    return status, {"error": _without_server_folders(str(error)), "name": name}


def lora_info(name) -> tuple[int, dict]:
    """(HTTP status, JSON body) for one LoRA name: 200 with what its header says, else an error text."""
    if not isinstance(name, str) or not name.strip():
        return 400, {"error": "Give the LoRA as ?name=<a name from /loralab/loras>."}
    try:
        resolved = pedal_nodes.resolve_name(name)
        header = stacks.read_header(resolved.path)
        size_bytes = os.path.getsize(resolved.path)
    except LoraNotFoundError as error:
        return _refusal(404, error, name)
    except LoraStackError as error:      # outside the folders, a pickle, not .safetensors, damaged
        return _refusal(400, error, name)
    except Exception:      # the file vanished mid-request, a name ComfyUI's own lookup cannot take ("C:x")...
        log.exception("LoRA Lab: %s?name=%r failed", INFO_ROUTE, name)
        return 400, {"error": f"The LoRA {name[:200]!r} could not be read. Fix: pick it again from the list "
                              "(press Refresh); the ComfyUI console says more.", "name": name}
    metadata = stacks.header_metadata(header)
    return 200, {
        "name": resolved.name,
        "trigger_words": lora_words.sidecar_words(resolved.path) + lora_words.trigger_words(metadata),
        "base_model": metadata.get("ss_base_model_version") or None,
        "network_dim": _number(metadata.get("ss_network_dim"), int),
        "network_alpha": _number(metadata.get("ss_network_alpha"), float),
        "network_module": metadata.get("ss_network_module") or None,
        "output_name": metadata.get("ss_output_name") or None,
        "resolution": metadata.get("ss_resolution") or None,
        "steps": _number(metadata.get("ss_steps"), int),
        "title": metadata.get("modelspec.title") or None,
        "trained_tags": [[tag, count] for tag, count in lora_words.trained_tags(metadata)],
        "base_model_file": metadata.get("ss_sd_model_name") or None,
        "epochs": _number(metadata.get("ss_epoch"), int),
        "tensor_count": sum(1 for key in header if key != "__metadata__"),
        "size_bytes": size_bytes,
    }


def add_routes(routes) -> None:
    """Register the routes on an aiohttp RouteTableDef (ComfyUI's PromptServer.instance.routes)."""
    from aiohttp import web

    @routes.get(LORAS_ROUTE)
    async def loralab_loras(request):
        return web.json_response(lora_names())

    @routes.get(PRESETS_ROUTE)
    async def loralab_presets(request):
        return web.json_response(train_preset.presets_table())

    @routes.get(INFO_ROUTE)
    async def loralab_lora_info(request):
        # File reads stay off the server's event loop (a slow network share must not stall the UI).
        status, body = await asyncio.get_running_loop().run_in_executor(
            None, lora_info, request.query.get("name"))
        return web.json_response(body, status=status)

    @routes.get(REVIEW_PICTURES_ROUTE)
    async def loralab_review_pictures(request):
        try:
            return web.json_response(review.pictures(request.query.get("session")))
        except review.ReviewRequestError as error:
            return web.json_response({"error": str(error)}, status=error.status)

    @routes.get(REVIEW_THUMB_ROUTE)
    async def loralab_review_thumb(request):
        try:
            data = await asyncio.get_running_loop().run_in_executor(
                None, review.thumbnail, request.query.get("session"), request.query.get("index"))
        except review.ReviewRequestError as error:
            return web.json_response({"error": str(error)}, status=error.status)
        # A token names one run's dataset, so its pictures never change: the browser may keep them.
        return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @routes.post(REVIEW_SAVE_ROUTE)
    async def loralab_review_save(request):
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "Send JSON: {\"session\": ..., \"captions\": {...}}."}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "Send a JSON object."}, status=400)
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                None, review.save, body.get("session"), body.get("captions"))
        except review.ReviewRequestError as error:
            return web.json_response({"error": str(error)}, status=error.status)
        return web.json_response(result)

    @routes.get(BOARDS_ROUTE)
    async def loralab_boards(request):
        return web.json_response(board_presets.board_names())

    @routes.get(BOARD_LOAD_ROUTE)
    async def loralab_board_load(request):
        return _board_answer(web, board_presets.load_board, request.query.get("name"))

    @routes.post(BOARD_SAVE_ROUTE)
    async def loralab_board_save(request):
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response({"error": "Send JSON: {\"name\": ..., \"rows\": [...]}."}, status=400)
        return _board_answer(web, board_presets.save_board, body.get("name"), body.get("rows"))


def _board_answer(web, action, *args):
    try:
        return web.json_response(action(*args))
    except board_presets.BoardError as error:
        return web.json_response({"error": str(error)}, status=error.status)


def register_with_server() -> bool:
    """Add the routes to the running ComfyUI server, once; False when there is none (in-process tests).

    ComfyUI imports its ``server`` module and creates PromptServer.instance before it loads custom
    nodes, and adds ``routes`` to the web app after, so registering at import time is in time. Looked up
    in sys.modules rather than imported, so using the nodes without a server starts none.
    """
    prompt_server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    routes = getattr(prompt_server, "routes", None)
    if routes is None or getattr(prompt_server, "_loralab_routes", False):
        return False
    try:
        add_routes(routes)
    except Exception:      # the nodes still work without the row editor's lists; say why it is empty
        logging.exception("LoRA Lab: could not register its routes (%s ...)", LORAS_ROUTE)
        return False
    prompt_server._loralab_routes = True
    return True

"""Review Captions: every picture of a dataset beside its caption, editable on the node (js/caption_review.js).

The user's edits live in the node's ``reviewed`` value (saved with the workflow) and are applied each run,
so training uses them whether or not they were saved as files. Saving writes .txt sidecars through the
same writer as the Caption node (atomic, backups, confined to the dataset folder).

The front end never names a file: a run registers its dataset as a *review session* under a random token,
and the routes (``/loralab/review/...`` in routes.py) take that token plus picture keys or indices. So a
request can only read the pictures, and write the caption files, of a dataset a graph produced here.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from ..trainer.captions.review import ReviewError, apply_reviewed, checked_captions, parse_reviewed, save_plan
from ..trainer.data.dataset import Dataset, DatasetError
from .caption import _sidecar_lines, write_sidecars_for
from .dataset import expect_dataset
from .messages import LoraLabError, user_error

CATEGORY = "LoRA Lab/Caption"
LOG = logging.getLogger("lora_lab.review")
THUMBNAIL_SIDE = 192          # px; shown at 96 px, sharp on a 2x display
KEPT_SESSIONS = 16            # runs whose pictures the front end can still ask for; a node's new run replaces its own
THUMBNAIL_CACHE_BYTES = 32 * 2**20     # per session: about 2,000 thumbnails; past that they are made again
LISTED = 12                   # names per list in a report


@dataclass
class ReviewSession:
    dataset: Dataset
    owner: str | None = None              # the node's id: its next run replaces this session
    thumbnails: dict[int, bytes] = field(default_factory=dict)

    def keep_thumbnail(self, index: int, data: bytes) -> None:
        if sum(map(len, self.thumbnails.values())) + len(data) <= THUMBNAIL_CACHE_BYTES:
            self.thumbnails[index] = data


_sessions: OrderedDict[str, ReviewSession] = OrderedDict()
_lock = threading.Lock()      # routes run in the server's thread pool; runs in the prompt worker


def open_session(dataset: Dataset, owner: str | None = None) -> str:
    """A new session for a run of the node ``owner``; its earlier ones end (each holds a dataset, and an IMAGE
    batch's dataset holds its pixels)."""
    token = secrets.token_urlsafe(16)
    with _lock:
        if owner is not None:
            for old in [key for key, value in _sessions.items() if value.owner == owner]:
                del _sessions[old]
        _sessions[token] = ReviewSession(dataset, owner)
        while len(_sessions) > KEPT_SESSIONS:
            _sessions.popitem(last=False)
    return token


def session(token) -> ReviewSession | None:
    with _lock:
        return _sessions.get(token) if isinstance(token, str) else None


class LoraLabReviewCaptions:
    TITLE = "Review Captions"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": ("LORALAB_DATASET", {"tooltip": "The captioned or tagged dataset to read and correct."}),
            "reviewed": ("STRING", {"default": "", "tooltip":
                "Your edited captions, kept in the workflow (the node's editor writes this; it is hidden there). "
                "They replace what arrives from upstream for those pictures."}),
            "ready_to_train": ("BOOLEAN", {"default": True, "tooltip":
                "Off: a Train LoRA after this node waits (it stops with a note saying so) while you read and fix "
                "the captions here. Switch on and queue again to train."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("LORALAB_DATASET", "STRING")
    RETURN_NAMES = ("dataset", "report")
    OUTPUT_NODE = True       # the pictures must show on the node even before anything is connected after it
    FUNCTION = "review"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Shows every picture with its caption, editable in place: find/replace, add or remove a tag "
                   "everywhere, trigger word first, filter by tag. Training uses the edited captions; Save writes "
                   "them as .txt files.")

    def review(self, dataset, reviewed, ready_to_train=True, unique_id=None):
        expect_dataset(self.TITLE, dataset, "Connect the output of a Dataset, Caption or Tag Images node.")
        try:
            outcome = apply_reviewed(dataset, parse_reviewed(reviewed))
        except ReviewError as error:
            raise user_error(self.TITLE, "reviewed", error.problem, error.fix) from None
        token = open_session(dataset, None if unique_id is None else str(unique_id))
        report = describe(dataset, outcome, ready_to_train)
        result = outcome.dataset
        if not ready_to_train:
            result = dataclasses.replace(result, waiting_for_review="The captions are waiting for your review: "
                                         "ready_to_train is off on Review Captions.")
        # Only the token travels in the message (and in the saved workflow): the editor asks for the pictures.
        return {"ui": {"review": [{"session": token, "count": len(dataset.items)}], "text": [report]},
                "result": (result, report)}


def describe(dataset: Dataset, outcome, ready_to_train: bool = True) -> str:
    total = len(dataset.items)
    lines = [f"{total} picture(s) to review"
             + (f" from {os.path.basename(dataset.root)}." if dataset.root else " (an IMAGE batch: nothing to save).")]
    if outcome.edited:
        lines.append(f"{len(outcome.edited)} caption(s) come from your review (kept in the workflow): "
                     f"{_names(outcome.edited)}.")
    if outcome.unchanged:
        lines.append(f"{len(outcome.unchanged)} reviewed caption(s) arrive from upstream as you reviewed them "
                     f"(saved as files).")
    if not outcome.edited and not outcome.unchanged:
        lines.append("No caption edited here yet: the captions go on as they arrived.")
    if outcome.unknown:
        lines.append(f"{len(outcome.unknown)} reviewed caption(s) are for pictures this dataset no longer holds "
                     f"(kept in the workflow, unused): {_names(outcome.unknown)}.")
    uncaptioned = sum(not item.caption for item in outcome.dataset.items)
    if uncaptioned:
        lines.append(f"{uncaptioned} picture(s) have no caption; they train on the empty prompt.")
    if not ready_to_train:
        lines.append("ready_to_train is off: Train LoRA waits. Read and fix the captions, then switch it on and "
                     "queue again.")
    return "\n".join(lines)


def _names(keys) -> str:
    keys = list(keys)
    return ", ".join(keys[:LISTED]) + (f" … and {len(keys) - LISTED} more" if len(keys) > LISTED else "")


# --- what the routes call ---------------------------------------------------------------------------
class ReviewRequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


SESSION_GONE = ("This review's pictures are no longer on the server (it restarted, or more than "
                f"{KEPT_SESSIONS} reviews ran since). Queue the graph again to review.")


def pictures(token) -> dict:
    """What the editor lists: each picture's key and the caption it arrived with (before the review)."""
    found = session(token)
    if found is None:
        raise ReviewRequestError(404, SESSION_GONE)
    dataset = found.dataset
    return {"pictures": [{"key": item.key, "caption": item.caption} for item in dataset.items],
            "can_save": dataset.root is not None, "folder": os.path.basename(dataset.root) if dataset.root else None}


def thumbnail(token, index) -> bytes:
    """A JPEG of picture ``index`` of the session, at most THUMBNAIL_SIDE px on its long side."""
    found = session(token)
    if found is None:
        raise ReviewRequestError(404, SESSION_GONE)
    try:
        index = int(index)
    except (TypeError, ValueError):
        raise ReviewRequestError(400, "Give the picture as ?index=<number>.") from None
    if not 0 <= index < len(found.dataset.items):
        raise ReviewRequestError(404, f"This review has no picture {index}.")
    cached = found.thumbnails.get(index)
    if cached is not None:
        return cached
    try:
        image = found.dataset.load_image(index, max_side=THUMBNAIL_SIDE)
    except DatasetError as error:     # changed, vanished or became a link leading out since the scan
        raise ReviewRequestError(410, error.problem) from None
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=85)
    found.keep_thumbnail(index, buffer.getvalue())
    return buffer.getvalue()


def save(token, sent) -> dict:
    """Write the sent captions ({key: caption}) as caption files of the session's dataset. Returns the
    counts and a report; every caption file replaced keeps its old text in the dataset's backup folder."""
    found = session(token)
    if found is None:
        raise ReviewRequestError(404, SESSION_GONE)
    dataset = found.dataset
    if dataset.root is None:
        raise ReviewRequestError(400, "This dataset came from an IMAGE batch: there are no picture files to save "
                                 "caption files next to. Your edits are kept in the workflow and used when it runs.")
    try:
        plan = save_plan(dataset, checked_captions(sent, "captions to save"))
    except ReviewError as error:
        raise ReviewRequestError(400, f"{error.problem} Fix: {error.fix}") from None
    try:
        report = write_sidecars_for(plan.dataset, [item.caption for item in plan.dataset.items], "overwrite",
                                    node=LoraLabReviewCaptions.TITLE, input_name=None)
    except LoraLabError as error:
        raise ReviewRequestError(500, str(error)) from None
    lines = _sidecar_lines(plan.dataset, report)
    if plan.shared:
        lines.append(f"Not saved: {_names(plan.shared)} share one caption file but have different captions. "
                     f"Give them the same caption, or rename one picture so each has its own caption file.")
    if plan.unknown:
        lines.append(f"Not saved: {_names(plan.unknown)} (not in this dataset).")
    LOG.info("LoRA Lab review save in %s: %s", dataset.root, " ".join(lines))
    return {"written": len(report.written), "replaced": len(report.replaced), "unchanged": len(report.unchanged),
            "not_saved": len(plan.shared) + len(plan.unknown) + len(report.moved) + len(report.too_long)
                         + report.without_path,
            "report": "\n".join(lines) or "Nothing to save."}


NODE_CLASS_MAPPINGS = {"LoraLabReviewCaptions": LoraLabReviewCaptions}
NODE_DISPLAY_NAME_MAPPINGS = {name: f"{cls.TITLE} (LoRA Lab)" for name, cls in NODE_CLASS_MAPPINGS.items()}

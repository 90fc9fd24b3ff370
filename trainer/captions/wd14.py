"""WD14 taggers (SmilingWolf's booru-tag models) through onnxruntime, from local files only.

A tagger is ``model.onnx`` (input: pictures as float32 BGR 0-255, NHWC ``[batch, size, size, 3]``;
output: one sigmoid probability per tag) and ``selected_tags.csv`` (the tag of each output). Downloading
is the caller's job (nodes/tagger.py); this module says which files a tagger needs.

onnxruntime is optional for the pack: it is imported only when a tagger is built, and its absence is an
``OnnxRuntimeMissing`` that says how to install it. Pictures go through the model a batch at a time (the
batch dimension of SmilingWolf's exports is dynamic), which is where the speed-up over one picture at a
time comes from.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .wd14_labels import read_tag_list
from .wd14_preprocess import prepare_batch

KNOWN_MODELS = {        # the combo's names -> Hugging Face repositories; the v3 ones first (newer tag set)
    "wd-swinv2-tagger-v3": "SmilingWolf/wd-swinv2-tagger-v3",
    "wd-vit-tagger-v3": "SmilingWolf/wd-vit-tagger-v3",
    "wd-convnext-tagger-v3": "SmilingWolf/wd-convnext-tagger-v3",
    "wd-eva02-large-tagger-v3": "SmilingWolf/wd-eva02-large-tagger-v3",
    "wd-v1-4-moat-tagger-v2": "SmilingWolf/wd-v1-4-moat-tagger-v2",
}
MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
MODEL_FILES = (MODEL_FILE, TAGS_FILE)
DEFAULT_INPUT_SIZE = 448        # every SmilingWolf tagger; used only when the file leaves the size open
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
INSTALL_HINT = ("Install onnxruntime into the Python that runs ComfyUI: `pip install onnxruntime` (CPU), or "
                "`pip install onnxruntime-gpu` to tag on an NVIDIA GPU (one of the two, not both), then restart "
                "ComfyUI. The rest of LoRA Lab works without it.")

ProgressCallback = Callable[[int, int], None]


class OnnxRuntimeMissing(ImportError):
    """onnxruntime cannot be imported; the message says how to install it."""


class TaggerModelError(ValueError):
    """model.onnx does not load or does not look like a WD14 tagger; the message names the file."""


def load_onnxruntime():
    """The onnxruntime module, imported on first use only: ComfyUI imports every pack at start-up, and a
    machine without onnxruntime must still load the pack."""
    try:
        import onnxruntime
    except ImportError as error:
        raise OnnxRuntimeMissing(f"onnxruntime is not installed ({error}). {INSTALL_HINT}") from error
    return onnxruntime


@dataclass(frozen=True)
class TaggerFiles:
    model: str          # model.onnx
    tags: str           # selected_tags.csv


def files_in(folder: str | os.PathLike) -> TaggerFiles:
    folder = os.fspath(folder)
    return TaggerFiles(os.path.join(folder, MODEL_FILE), os.path.join(folder, TAGS_FILE))


def missing_files(folder: str | os.PathLike) -> list[str]:
    """The files ``folder`` lacks to load as a tagger; [] when complete."""
    return [name for name in MODEL_FILES if not os.path.isfile(os.path.join(folder, name))]


def hub_url(repo_id: str) -> str:
    return f"https://huggingface.co/{repo_id}/tree/main"


def providers_for(device: str) -> list[str]:
    """onnxruntime's execution providers for ``device`` ("cpu" or "cuda"); CPU stays as the fallback for
    operators the CUDA provider lacks."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
    return [CUDA, CPU] if device == "cuda" else [CPU]


class Wd14Tagger:
    """A loaded tagger: its tag list, its input size and an onnxruntime session.

    On the CPU the session is kept. On a GPU it is made for each run and dropped after it, so a tagger kept
    in ComfyUI's output cache does not hold the memory that training needs next (onnxruntime's memory is
    invisible to ComfyUI's model management).
    """

    def __init__(self, files: TaggerFiles, device: str = "cpu", name: str | None = None):
        self.ort = load_onnxruntime()
        self.files = files
        self.name = name or os.path.basename(os.path.dirname(files.model))
        self.tags = read_tag_list(files.tags)
        self.requested = providers_for(device)
        session = self._new_session()
        self.providers = tuple(session.get_providers())  # onnxruntime falls back to the CPU without raising
        self.input_name, self.output_name, self.input_size, self.max_batch = self._signature(session)
        self._session = None if self.on_gpu else session

    @property
    def on_gpu(self) -> bool:
        return CUDA in self.providers

    @property
    def device(self) -> str:
        return "cuda" if self.on_gpu else "cpu"

    def __repr__(self) -> str:
        return f"Wd14Tagger({self.name!r}, {len(self.tags)} tags, {self.input_size}px, {self.device})"

    def weight_bytes(self) -> int:
        return os.path.getsize(self.files.model)

    def probabilities(self, images: Sequence[Image.Image], batch_size: int = 8,
                      on_batch_done: ProgressCallback | None = None, prepare_ahead: bool = True) -> np.ndarray:
        """(len(images), number of tags) probabilities, in order.

        ``images`` needs only ``len`` and integer indexing, so a lazy view keeps one batch of pictures in
        memory. ``on_batch_done(done, total)`` runs after every batch; an exception there (Cancel) stops.
        ``prepare_ahead`` False prepares each batch in turn (tools/bench_tagging.py compares the two).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if self.max_batch is not None:       # an export with a fixed batch size takes no more than that
            batch_size = min(batch_size, self.max_batch)
        total = len(images)
        rows: list[np.ndarray] = []
        if not total:
            return np.zeros((0, len(self.tags)), dtype=np.float32)
        session = self._session or self._new_session()
        starts = list(range(0, total, batch_size))

        def prepared(start: int) -> np.ndarray:
            end = min(start + batch_size, total)
            return prepare_batch([images[index] for index in range(start, end)], self.input_size)

        # The next batch is decoded and resized while the model runs this one: both release the GIL, and
        # preparing pictures costs as much as the model on a CPU (more than the model on a GPU).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loralab-wd14-prepare") as preparer:
            upcoming = preparer.submit(prepared, starts[0]) if prepare_ahead else None
            for position, start in enumerate(starts):
                pixels = upcoming.result() if upcoming is not None else prepared(start)
                upcoming = None
                if prepare_ahead and position + 1 < len(starts):
                    upcoming = preparer.submit(prepared, starts[position + 1])
                end = min(start + batch_size, total)
                output = np.asarray(session.run([self.output_name], {self.input_name: pixels})[0])
                if output.shape != (end - start, len(self.tags)):
                    raise TaggerModelError(f"{self.files.model} returned shape {output.shape} for {end - start} "
                                           f"picture(s); {self.files.tags} lists {len(self.tags)} tags.")
                rows.append(output.astype(np.float32, copy=False))
                if on_batch_done is not None:
                    on_batch_done(end, total)
        return np.concatenate(rows)

    def _new_session(self):
        try:
            return self.ort.InferenceSession(self.files.model, providers=self.requested)
        except Exception as error:     # onnxruntime raises its own classes (Fail, InvalidProtobuf, ...)
            raise TaggerModelError(f"onnxruntime could not load {self.files.model} ({error}).") from error

    def _signature(self, session) -> tuple[str, str, int, int | None]:
        """Input and output names, the square input size (the reference reads it from the input shape) and
        the batch size when the file fixes it."""
        inputs, outputs = session.get_inputs(), session.get_outputs()
        shape = list(inputs[0].shape) if inputs else []
        if len(inputs) != 1 or len(outputs) < 1 or len(shape) != 4 or shape[3] != 3:
            raise TaggerModelError(
                f"{self.files.model} is not a WD14 tagger: it takes {[(i.name, i.shape) for i in inputs]}, where "
                f"a tagger takes one picture batch [batch, size, size, 3] (NHWC, BGR).")
        out_width = outputs[0].shape[-1] if outputs[0].shape else None
        if isinstance(out_width, int) and out_width != len(self.tags):
            raise TaggerModelError(f"{self.files.model} has {out_width} outputs but {self.files.tags} lists "
                                   f"{len(self.tags)} tags: the two files come from different taggers.")
        size = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else DEFAULT_INPUT_SIZE
        batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        return inputs[0].name, outputs[0].name, size, batch


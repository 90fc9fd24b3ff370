"""Has this very training run finished before? Then its file is reused instead of training again.

ComfyUI's own cache skips an unchanged Train LoRA node only while nothing upstream re-ran. Upstream
nodes re-run with equal results all the time: the Caption node wrote its sidecar .txt files, so the
folder's signature changed; ComfyUI was restarted; a picture was touched but not changed. A run's
identity hashes everything that decides its weights: the data exactly as trained (every latent,
every caption's encoding, captions, repeats, picture sizes), the base model's fingerprint, and every
setting that shapes training. The final save carries it in its metadata, and a later run with the
same identity finds that file and reuses it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Mapping

import safetensors
import torch

from ..data.encoded_dataset import EncodedDataset, as_text_encoding

RUN_IDENTITY_KEY = "loralab_run_identity"
LOSS_HISTORY_KEY = "loralab_loss_history"
IDENTITY_VERSION = 1       # raise when training code changes what the same inputs produce
MAX_LOSS_POINTS = 2000     # of the loss history kept in the file, for the reused run's chart


def data_fingerprint(data: EncodedDataset) -> str:
    """Every byte the loop trains on: latents, caption encodings, captions, repeats, sizes."""
    digest = hashlib.sha256(b"loralab-encoded-data:1")
    for example in data.examples:
        size = example.picture_size()
        digest.update(json.dumps([example.caption, example.repeats, list(example.bucket), list(size.original),
                                  list(size.crop), list(size.target)], ensure_ascii=False).encode(
            "utf-8", "surrogatepass"))
        _update(digest, example.latent)
        if example.loss_weight is not None:      # masked loss; without masks the fingerprint is as it was
            _update(digest, example.loss_weight)
    for caption in sorted(data.conds):
        encoding = as_text_encoding(data.conds[caption])
        digest.update(caption.encode("utf-8", "surrogatepass"))
        _update(digest, encoding.cross_attn)
        if encoding.pooled is not None:
            _update(digest, encoding.pooled)
    return digest.hexdigest()


def _update(digest, tensor: torch.Tensor) -> None:
    values = tensor.detach().to("cpu").contiguous()
    digest.update(f"|{tuple(values.shape)}:{values.dtype}|".encode())
    digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())


def run_identity(data: str, model: str, settings: Mapping) -> str:
    """One hash of the data fingerprint, the model fingerprint and the settings (JSON-able values;
    anything else by its str())."""
    text = json.dumps({"version": IDENTITY_VERSION, "data": data, "model": model, "settings": settings},
                      sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def find_finished(folder: str | Path, base_name: str, identity: str) -> Path | None:
    """The final save of a run with this identity among ``<base_name>.safetensors`` and its numbered
    siblings ``<base_name>_2.safetensors``...; None when there is none. Reads file headers only."""
    base = Path(folder) / base_name
    numbered = re.compile(re.escape(base.name) + r"_\d+\.safetensors")
    candidates = [base.with_name(base.name + ".safetensors")]
    if base.parent.is_dir():
        candidates += sorted(p for p in base.parent.iterdir() if numbered.fullmatch(p.name))
    for path in candidates:
        if path.is_file() and file_metadata(path).get(RUN_IDENTITY_KEY) == identity:
            return path
    return None


def file_metadata(path: Path) -> dict:
    """A safetensors file's metadata; {} for a file that cannot be read (not a match, not ours)."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as opened:
            return dict(opened.metadata() or {})
    except Exception:              # an unreadable or foreign file is simply not a match
        return {}


def loss_history_text(losses: list[float]) -> str:
    """The losses for the file's metadata: at most MAX_LOSS_POINTS, evenly picked, 5 significant digits."""
    picked = losses
    if len(losses) > MAX_LOSS_POINTS:
        stride = len(losses) / MAX_LOSS_POINTS
        picked = [losses[int(i * stride)] for i in range(MAX_LOSS_POINTS)] + [losses[-1]]
    return json.dumps([float(f"{value:.5g}") if math.isfinite(value) else None for value in picked])


def loss_history(metadata: Mapping[str, str]) -> list[float]:
    try:
        values = json.loads(metadata.get(LOSS_HISTORY_KEY, "[]"))
    except ValueError:
        return []
    return [float(v) if isinstance(v, (int, float)) else float("nan") for v in values] if isinstance(values, list) else []


def settings_of(options, excluded: tuple[str, ...]) -> dict:
    """A dataclass's fields minus those that cannot change the trained weights or the file."""
    return {k: v for k, v in dataclasses.asdict(options).items() if k not in excluded}


def reused_chart(losses: list[float], metadata: Mapping[str, str], validation) -> dict:
    """Train LoRA's chart data for a reused file, as TrainingRun.chart gives it for a trained one: the loss
    history kept in the file, the steps it spans, and the validation history (validation.ValidationHistory)."""
    try:
        last = int(metadata.get("ss_steps", len(losses)))
    except ValueError:
        last = len(losses)
    # A history of up to MAX_LOSS_POINTS losses is every step up to the last; a longer run's was thinned out
    # evenly, over the whole run as far as the file can tell.
    first = max(1, last - len(losses) + 1) if len(losses) <= MAX_LOSS_POINTS else 1
    return {"loss": losses[-5000:], "loss_steps": [first, last], "validation_loss": validation.chart_points()}

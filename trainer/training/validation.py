"""Validation loss on held-out pictures: which epoch fits pictures it never trained on best.

The guides judge over- and underfitting by sampling each epoch's LoRA; a number helps pick the epoch too.
``validation_pictures`` pictures of the dataset (whole items, all their repeats, picked from the run's
seed) are kept out of training, and at the end of every epoch the loop measures the training loss on them
without gradients. Their noise and timesteps are drawn once, from a generator of their own:
- every epoch is measured at the same noise and timesteps, so a change between epochs is the LoRA's;
- the training's own random stream is never touched, so a run with validation trains exactly what the
  same run trains with those pictures removed by hand.

The history (epoch, loss, step) goes into every save's metadata, with a key naming what it was measured
on (pictures, draws, loss settings): a resumed run carries it on only when it measures the same thing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from ..data.encoded_dataset import EncodedDataset, TextEncoding, as_text_encoding
from .noise import ADDED_AFTER_FIRST_RELEASE, NoiseSettings, draw
from .run_reuse import data_fingerprint

VALIDATION_KEY = "loralab_validation_loss"     # a save's metadata: ValidationHistory.metadata_text()
# Seeds past the seed widget's range (0..2**32-1): these generators never replay any run's training stream.
PICK_SEED_OFFSET = 1 << 32
DRAW_SEED_OFFSET = 2 << 32


class NothingLeftToTrain(ValueError):
    """Every picture would be held out; ``problem`` and ``fix`` are worded for the user."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem} Fix: {fix}")
        self.problem, self.fix = problem, fix


# --- which pictures --------------------------------------------------------------------------------
def held_out_indices(total: int, count: int, seed: int) -> tuple[int, ...]:
    """``count`` of ``total`` picture positions, picked from ``seed``, in dataset order."""
    if count <= 0:
        return ()
    if count >= total:
        raise NothingLeftToTrain(
            f"validation_pictures is {count}, but the dataset has {total} picture(s): at least one must be "
            "left to train on.", f"set validation_pictures to at most {total - 1} (0 turns validation off), "
            "or add pictures to the dataset.")
    generator = torch.Generator().manual_seed(PICK_SEED_OFFSET + int(seed))
    return tuple(sorted(torch.randperm(total, generator=generator)[:count].tolist()))


@dataclass(frozen=True)
class HeldOut:
    """The encoded dataset split in two: the pictures that train, in their order, and the held-out ones."""
    training: EncodedDataset
    pictures: EncodedDataset
    indices: tuple[int, ...]       # the held-out pictures' positions in the dataset

    def trained_items(self, dataset):
        """The dataset (LORALAB_DATASET) without the held-out pictures: what the saved file describes."""
        if not self.indices:
            return dataset
        kept = [index for index in range(len(dataset.items)) if index not in set(self.indices)]
        pixels = dataset.pixels[kept] if getattr(dataset, "pixels", None) is not None else None
        return dataclasses.replace(dataset, items=tuple(dataset.items[index] for index in kept), pixels=pixels)


def hold_out(data: EncodedDataset, count: int, seed: int) -> HeldOut:
    """Keep ``count`` pictures (picked from ``seed``) out of ``data``; 0 keeps every picture in training."""
    indices = held_out_indices(len(data.examples), count, seed)
    if not indices:
        return HeldOut(data, EncodedDataset(examples=[]), ())
    kept = [index for index in range(len(data.examples)) if index not in set(indices)]
    return HeldOut(_part(data, kept), _part(data, indices), indices)


def _part(data: EncodedDataset, indices) -> EncodedDataset:
    examples = [data.examples[index] for index in indices]
    buckets: dict = {}
    for example in examples:
        buckets[example.bucket] = buckets.get(example.bucket, 0) + 1
    captions = {example.caption for example in examples}
    return EncodedDataset(examples=examples, conds={text: data.conds[text] for text in captions if text in data.conds},
                          buckets=buckets)


# --- measuring ---------------------------------------------------------------------------------------
class HeldOutLoss:
    """The held-out pictures with their noise and timesteps, drawn once: one draw per picture, in the same
    way training draws (noise offset, timestep range), from the run's seed on a stream of its own."""

    def __init__(self, pictures: EncodedDataset, seed: int, noise: NoiseSettings = NoiseSettings()):
        self.pictures = pictures
        generator = torch.Generator().manual_seed(DRAW_SEED_OFFSET + int(seed))
        self.draws = [draw(generator, (1, *example.latent.shape), noise) for example in pictures.examples]

    def measure(self, loss_of: Callable, device: torch.device, encode_caption: Callable | None = None) -> float:
        """The mean over the pictures of ``loss_of(latents, texts, sizes, noise, u, pixel_weights)`` (the training
        loss of one batch, masked as training masks it). ``encode_caption``: a text encoder that trains encodes the
        captions as it is now."""
        total = 0.0
        for index, (noise, u) in enumerate(self.draws):
            latents, texts, sizes = self.pictures.collate([index], device)
            if encode_caption is not None:      # a training text encoder encodes with gradients on: keep no graph
                encoding = as_text_encoding(encode_caption(self.pictures.examples[index].caption))
                texts = [TextEncoding(encoding.cross_attn.detach(),
                                      None if encoding.pooled is None else encoding.pooled.detach())]
            total += float(loss_of(latents, texts, sizes, noise.to(device), u.to(device),
                                   self.pictures.loss_weights([index], device)))
        return total / max(1, len(self.draws))


def history_key(pictures: EncodedDataset, seed: int, noise: NoiseSettings, precision: str,
                measured_with: dict | None = None) -> str:
    """What a validation number depends on besides the LoRA: the pictures, their draws (seed, noise
    settings) and the loss (weights, precision), and ``measured_with`` (what else changes the numbers: Flux's
    guidance, the moving average measured instead of the weights). Equal keys: the numbers of two runs compare."""
    # Settings added later are left out at their defaults: a history saved before them still continues.
    defaults = NoiseSettings()
    settings = {name: value for name, value in dataclasses.asdict(noise).items()
                if name not in ADDED_AFTER_FIRST_RELEASE or getattr(defaults, name) != value}
    fields = {"pictures": data_fingerprint(pictures), "seed": int(seed), "noise": settings, "precision": precision}
    if measured_with:
        fields["measured_with"] = measured_with
    text = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# --- the history -----------------------------------------------------------------------------------
@dataclass
class ValidationHistory:
    """The validation loss at each epoch's end, as (epoch, loss, step), oldest first."""
    key: str = ""                # history_key of what was measured; "" = validation off
    pictures: int = 0            # how many pictures were held out
    entries: list = field(default_factory=list)

    @property
    def on(self) -> bool:
        return self.pictures > 0

    def add(self, epoch: int, loss: float, step: int) -> None:
        self.entries.append((int(epoch), float(loss), int(step)))

    def best(self) -> tuple[int, float, int] | None:
        """The entry with the lowest finite loss (the earliest of equal ones), or None."""
        finite = [entry for entry in self.entries if math.isfinite(entry[1])]
        return min(finite, key=lambda entry: entry[1]) if finite else None

    def at_step(self, step: int) -> float | None:
        return next((loss for _, loss, at in self.entries if at == step), None)

    def chart_points(self) -> list[list]:
        """[[epoch, loss, step], ...] for the front end's chart (a non-finite loss becomes None)."""
        return [[epoch, loss if math.isfinite(loss) else None, step] for epoch, loss, step in self.entries]

    def continued_from(self, metadata: Mapping[str, str]) -> "ValidationHistory":
        """This (empty) history with the entries a save recorded (each save records those up to its step),
        when the save measured the same thing (same key); otherwise unchanged."""
        saved = ValidationHistory.from_metadata(metadata)
        if saved is None or not self.key or saved.key != self.key:
            return self
        return dataclasses.replace(self, entries=list(saved.entries))

    def metadata_text(self) -> str:
        # Full precision (JSON floats round-trip): a run continued from a save carries on the very numbers.
        return json.dumps({"key": self.key, "pictures": self.pictures, "history": self.chart_points()})

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> "ValidationHistory | None":
        """The history a save recorded; None when it has none or it cannot be read (a foreign file)."""
        try:
            saved = json.loads(metadata.get(VALIDATION_KEY, ""))
            entries = [(int(epoch), float("nan") if loss is None else float(loss), int(step))
                       for epoch, loss, step in saved["history"]]
            return cls(str(saved.get("key", "")), int(saved.get("pictures", 0)), entries)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def report_lines(self, file_of_step: Callable[[int], str | None] = lambda step: None) -> list[str]:
        """The run report's lines: every epoch's validation loss and the lowest one, with its file."""
        if not self.on:
            return []
        held = f"{self.pictures} held-out picture{'s' if self.pictures != 1 else ''}"
        if not self.entries:
            return [f"validation loss ({held}): no epoch ended, so none was measured"]
        shown = [f"epoch {epoch} {_loss_text(loss)}" for epoch, loss, _ in self.entries]
        if len(shown) > 12:           # a long run: the first and the last epochs
            shown = shown[:4] + ["…"] + shown[-7:]
        lines = [f"validation loss ({held}): {', '.join(shown)}"]
        best = self.best()
        if best is None:
            lines.append("validation loss: no epoch had a finite value")
        else:
            epoch, loss, step = best
            where = file_of_step(step)
            lines.append(f"lowest validation loss: epoch {epoch} ({_loss_text(loss)}, step {step})"
                         + (f": {where}" if where else ""))
        return lines


def _loss_text(loss: float) -> str:
    return f"{loss:.4g}" if math.isfinite(loss) else "not a number"

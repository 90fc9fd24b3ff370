"""Prior preservation: regularization pictures (kohya's ``reg`` folders) trained beside the training pictures.

Each epoch shows as many regularization pictures as training pictures (pictures x repeats), the way kohya's
DreamBooth dataset counts them: the regularization pictures are taken in order with their own repeats until
there are enough, then one more repeat each, in order, until the counts match. They share the buckets and
batches with the training pictures, so an epoch has about twice the steps, and their loss is multiplied by
``prior_loss_weight`` (kohya's ``--prior_loss_weight``). A regularization picture without a caption takes
its folder's class, as kohya's class tokens: ``1_woman/x.png`` -> "woman".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .dataset import Dataset, DatasetError, _KOHYA_FOLDER
from .encoded_dataset import EncodedDataset


def with_class_captions(dataset: Dataset) -> Dataset:
    """The regularization pictures, each with a caption: its own, else its folder's class."""
    items, missing = [], []
    for item in dataset.items:
        if item.has_caption:
            items.append(item)
            continue
        match = _KOHYA_FOLDER.fullmatch(item.concept.rsplit("/", 1)[-1]) if item.concept else None
        if match is None:
            missing.append(item.key)
            continue
        items.append(dataclasses.replace(item, caption=match.group(2).replace("_", " "), has_caption=True))
    if missing:
        shown = ", ".join(missing[:5]) + (f" … and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DatasetError(f"{len(missing)} regularization picture(s) have no caption and no class folder: {shown}.",
                           "Put them in a folder named like 1_woman (its class becomes their caption, as in kohya), "
                           "or write a caption file next to each.")
    return dataclasses.replace(dataset, items=tuple(items))


def kohya_repeats(train_count: int, own_repeats: list[int]) -> list[int]:
    """How often each regularization picture is shown per epoch (0: not used), for ``train_count`` training
    pictures x repeats: kohya's DreamBoothDataset loop (see the module doc)."""
    repeats = [0] * len(own_repeats)
    shown, first_pass = 0, True
    while shown < train_count and own_repeats:
        for index, own in enumerate(own_repeats):
            if first_pass:
                repeats[index] = own
                shown += own
            else:
                repeats[index] += 1
                shown += 1
            if shown >= train_count:
                break
        first_pass = False
    return repeats


@dataclass(frozen=True)
class Regularization:
    pictures: int        # regularization pictures given
    used: int            # of them shown at least once per epoch
    shown: int           # regularization pictures shown per epoch (with repeats)
    trained: int         # training pictures shown per epoch (with repeats)
    prior_loss_weight: float

    def description(self) -> str:
        unused = f" ({self.pictures - self.used} not needed)" if self.used < self.pictures else ""
        return (f"prior preservation: {self.used} regularization picture(s){unused} shown {self.shown} times per "
                f"epoch beside {self.trained} training pictures x repeats, their loss x {self.prior_loss_weight:g}; "
                f"an epoch has {self.shown + self.trained} pictures (as kohya counts with reg images)")


def with_regularization(training: EncodedDataset, regularization: EncodedDataset,
                        prior_loss_weight: float) -> tuple[EncodedDataset, Regularization]:
    """The training pictures and, beside them, the regularization pictures with kohya's repeats and their loss
    weighted by ``prior_loss_weight`` (a per-picture loss weight, as a mask is; loss_masks.py)."""
    if prior_loss_weight <= 0:
        raise ValueError(f"prior_loss_weight is {prior_loss_weight}; it must be above 0")
    trained = sum(example.repeats for example in training.examples)
    repeats = kohya_repeats(trained, [example.repeats for example in regularization.examples])
    added = []
    for example, count in zip(regularization.examples, repeats):
        if count:
            weight = torch.full(example.latent.shape[1:], float(prior_loss_weight))
            added.append(dataclasses.replace(example, repeats=count, loss_weight=weight))
    examples = list(training.examples) + added
    buckets: dict = {}
    for example in examples:
        buckets[example.bucket] = buckets.get(example.bucket, 0) + 1
    merged = EncodedDataset(examples=examples, conds={**regularization.conds, **training.conds}, buckets=buckets)
    return merged, Regularization(len(regularization.examples), len(added), sum(repeats), trained,
                                  float(prior_loss_weight))

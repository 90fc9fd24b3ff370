"""The kohya ``ss_*`` metadata of a trained LoRA, built in one place from the run's objects.

A1111/Forge show these keys, Civitai reads them on upload, kohya's scripts resume and merge from them;
they are formatted as kohya's sd-scripts writes them. ``Description`` holds what a run was (the network,
the settings with every learning rate, the dataset and its buckets) and turns it into the keys at each save.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..data.encoded_dataset import Epochs
from ..lora.network import Network
from .loop import TrainSettings


def kohya_metadata(*, output_name: str, base_model_version: str, network_dim: int, network_alpha: float,
                   resolution: tuple[int, int], num_train_images: int,
                   tag_frequency: dict[str, dict[str, int]], steps: int, learning_rate: float,
                   started_at: float, finished_at: float, trigger_word: str | None = None,
                   max_train_steps: int | None = None, v_parameterization: bool = False,
                   extra: dict | None = None) -> dict[str, str]:
    """The ``ss_*`` keys A1111/Forge read (Civitai shows them too), formatted as kohya's sd-scripts does.

    ``base_model_version`` is kohya's: ``"sd_v1"``, ``"sd_v2"``, ``"sd_v2_v"``, ``"sdxl_base_v1-0"``…;
    A1111 picks the SD version filter from its ``sdxl_`` prefix or from ``ss_v2``. ``resolution`` is
    (width, height). ``max_train_steps`` defaults to ``steps``. ``v_parameterization``: the model predicts v
(kohya ``--v_parameterization``; A1111 then needs the v-pred config). The trigger word is stored as
    ``loralab_trigger_word`` and ``modelspec.trigger_phrase``. ``extra`` adds keys (non-str values are
    JSON-encoded) but may not replace the ones above.
    """
    metadata = {
        "ss_output_name": str(output_name),
        "ss_base_model_version": str(base_model_version),
        "ss_v2": str(str(base_model_version).startswith("sd_v2")),
        "ss_v_parameterization": str(bool(v_parameterization)),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(network_dim)),
        "ss_network_alpha": str(float(network_alpha)),
        "ss_resolution": str((int(resolution[0]), int(resolution[1]))),
        "ss_num_train_images": str(int(num_train_images)),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_steps": str(int(steps)),
        "ss_max_train_steps": str(int(steps if max_train_steps is None else max_train_steps)),
        "ss_learning_rate": str(float(learning_rate)),
        "ss_training_started_at": str(float(started_at)),
        "ss_training_finished_at": str(float(finished_at)),
    }
    if trigger_word:
        metadata["loralab_trigger_word"] = trigger_word
        metadata["modelspec.trigger_phrase"] = trigger_word
    for key, value in (extra or {}).items():
        if key in metadata:
            raise ValueError(f"extra metadata may not replace {key!r}; pass it as an argument instead")
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return metadata


def tag_frequency(captions_by_folder: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per dataset folder (``"10_cat"``), how many captions contain each tag.

    Like kohya: captions split at commas, tags stripped and lower-cased, empty tags skipped, counted once
    per caption occurrence (repeats are not multiplied in).
    """
    frequency = {}
    for folder, captions in captions_by_folder.items():
        counts = Counter(tag.strip().lower() for caption in captions for tag in caption.split(","))
        counts.pop("", None)
        frequency[folder] = dict(counts)
    return frequency



def network_metadata(network: Network) -> dict[str, str]:
    """kohya's ss_network_args / ss_network_dropout (and the preset, for LoRA Lab's resume checks)."""
    data = {"ss_network_dropout": str(float(network.dropout)), "loralab_network_preset": network.preset}
    if network.trains_convs:
        conv_rank, conv_alpha = network.rank_alpha("conv")
        # kohya stores network_args as given on its command line: strings.
        data["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)})
    return data


def learning_rate_metadata(settings: TrainSettings) -> dict[str, str]:
    """kohya's keys for what was trained at which rate."""
    data = {"ss_network_train_unet_only": str(not settings.train_text_encoder),
            "ss_unet_lr": str(float(settings.learning_rate))}
    if settings.train_text_encoder:
        first, second = settings.text_encoder_rates()
        # kohya writes one rate, or SDXL's two as a list when they differ (its --text_encoder_lr a b).
        data["ss_text_encoder_lr"] = str(first) if second == first else str([first, second])
    return data


@dataclass
class Description:
    """Everything the saved file says about how it was trained (kohya's ss_* keys and ours)."""
    output_name: str
    family: str
    resolution: int
    settings: TrainSettings
    dataset: object
    buckets: dict
    trigger_word: str
    epoch_plan: Epochs
    epochs: int
    v_parameterization: bool = False

    def metadata(self, step: int, started_at: float, finished_at: float) -> dict[str, str]:
        by_folder: dict[str, list[str]] = {}
        for item in self.dataset.items:
            by_folder.setdefault(item.concept or "images", []).append(item.caption)
        extra = {
            "ss_bucket_info": json.dumps({"buckets": {f"{w}x{h}": n for (w, h), n in sorted(self.buckets.items())}}),
            "ss_batch_size_per_device": str(self.settings.batch_size),
            "ss_lr_scheduler": self.settings.lr_schedule,
            "ss_seed": str(self.settings.seed),
            "ss_mixed_precision": self.settings.mixed_precision,
            # kohya: the epochs the run was set to (from steps: the epochs those steps start), and those done
            "ss_num_epochs": str(self.epochs or -(-self.settings.steps * self.epoch_plan.accumulation
                                                 // max(1, self.epoch_plan.batches))),
            "ss_epoch": str(self.epoch_plan.completed_at(step)),
            "loralab_total_steps": str(self.settings.steps),
            "loralab_dataset_fingerprint": self.dataset.fingerprint(),
            **network_metadata(self.settings.network),
            **learning_rate_metadata(self.settings),
        }
        return kohya_metadata(
            output_name=Path(self.output_name).name, base_model_version=self.family,
            network_dim=self.settings.network.rank, network_alpha=self.settings.network.alpha,
            resolution=(self.resolution, self.resolution),
            num_train_images=sum(item.repeats for item in self.dataset.items),
            tag_frequency=tag_frequency(by_folder), steps=step, learning_rate=self.settings.learning_rate,
            started_at=started_at, finished_at=finished_at, trigger_word=self.trigger_word or None,
            v_parameterization=self.v_parameterization, extra=extra)

    def arithmetic(self) -> str:
        images = len(self.dataset.items)
        shown = sum(item.repeats for item in self.dataset.items)
        plan = self.epoch_plan
        text = f"{images} pictures x repeats = {shown} per epoch; batch {self.settings.batch_size} -> "
        if plan.accumulation > 1:
            text += (f"{plan.batches} batches per epoch (one bucket each) / gradient accumulation {plan.accumulation}"
                     f" = {plan.batches / plan.accumulation:.2f} steps per epoch")
        else:
            text += f"{plan.batches} steps per epoch (batches fill one bucket each)"
        if self.epochs:
            return text + f"; {self.epochs} epochs = {self.settings.steps} steps"
        shown_epochs = self.settings.steps * plan.accumulation / max(1, plan.batches)
        return text + f"; {self.settings.steps} steps = {shown_epochs:.1f} epochs"

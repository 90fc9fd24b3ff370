"""The metadata of a trained LoRA, as kohya's sd-scripts writes it, built in one place from the run's objects.

A1111/Forge show these keys, Civitai reads them on upload, kohya's scripts resume and merge from them.
``Description`` holds what a run was (the network, the settings with every learning rate, the dataset,
the base model's files) and turns it into every key kohya's ``train_network.py`` writes for an equivalent
run, with kohya's value conventions (every value ``str()`` of the Python value: ``"None"``, ``"True"``,
``"0.0001"``, tuples as ``"(512, 512)"``, dicts as JSON), plus the ModelSpec 1.0.1 ``modelspec.*`` keys.
``tests/fixtures/kohya/`` holds what kohya wrote in real runs; ``tests/unit/training/test_kohya_metadata.py``
compares against it.

Keys for features LoRA Lab does not have (validation, regularisation images, multires noise, Huber
loss…) carry the value kohya writes when the feature is off, so readers see "off", not "unknown". Left
out, because they describe kohya's own command line and mean nothing for a LoRA Lab run:
``ss_sd_scripts_commit_hash`` (the git revision of sd-scripts; ``modelspec.implementation_version`` says
which LoRA Lab wrote the file) and ``ss_datasets`` (written by kohya only for ``--dataset_config`` TOML
files). Ours beside kohya's: ``loralab_*``, ``ss_v_parameterization``, ``ss_network_train_unet_only``.
"""
from __future__ import annotations

import datetime
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..data.buckets import bucket_side_range, make_buckets, nearest_bucket
from ..data.encoded_dataset import Epochs
from ..file_hashes import FileHashes
from ..lora.network import Network
from ..lora.network_types import DORA, LOKR, LORA, LYCORIS_ALGOS, NETWORK_MODULES
from .loop import TrainSettings
from .optimizers import optimizer_description


def kohya_metadata(*, output_name: str, base_model_version: str, network_dim: int, network_alpha: float,
                   resolution: tuple[int, int], num_train_images: int,
                   tag_frequency: dict[str, dict[str, int]], steps: int, learning_rate: float,
                   started_at: float, finished_at: float, trigger_word: str | None = None,
                   max_train_steps: int | None = None, v_parameterization: bool = False,
                   network_module: str = "networks.lora", extra: dict | None = None) -> dict[str, str]:
    """The ``ss_*`` keys A1111/Forge read (Civitai shows them too), formatted as kohya's sd-scripts does.

    ``base_model_version`` is kohya's: ``"sd_v1"``, ``"sd_v2"``, ``"sd_v2_v"``, ``"sdxl_base_v1-0"``…;
    A1111 picks the SD version filter from its ``sdxl_`` prefix or from ``ss_v2``. ``resolution`` is
    (width, height). ``max_train_steps`` defaults to ``steps``. ``v_parameterization``: the model predicts v
(kohya ``--v_parameterization``; A1111 then needs the v-pred config). ``network_module`` is kohya's
    ``networks.lora`` or, for DoRA, LoHa and LoKr, LyCORIS' ``lycoris.kohya``. The trigger word is stored as
    ``loralab_trigger_word`` and ``modelspec.trigger_phrase``. ``extra`` adds keys (non-str values are
    JSON-encoded) but may not replace the ones above.
    """
    metadata = {
        "ss_output_name": str(output_name),
        "ss_base_model_version": str(base_model_version),
        "ss_v2": str(str(base_model_version).startswith("sd_v2")),
        "ss_v_parameterization": str(bool(v_parameterization)),
        "ss_network_module": str(network_module),
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
    """kohya's ss_network_args / ss_network_dropout (and the preset and type, for LoRA Lab's resume checks).

    DoRA, LoHa and LoKr are written as LyCORIS writes them: ``algo`` (DoRA: lora with ``dora_wd``, its
    magnitude on the input axis, ``wd_on_out`` False), LoKr's ``factor``."""
    data = {"ss_network_dropout": str(float(network.dropout)), "loralab_network_preset": network.preset}
    args = {}
    if network.network_type != LORA:
        data["loralab_network_type"] = network.network_type
        args["algo"] = LYCORIS_ALGOS[network.network_type]
        if network.network_type == DORA:
            args.update(dora_wd="True", wd_on_out="False")
        if network.network_type == LOKR:
            args["factor"] = str(network.lokr_factor)
    if network.trains_convs:
        conv_rank, conv_alpha = network.rank_alpha("conv")
        args.update(conv_dim=str(conv_rank), conv_alpha=str(conv_alpha))
    if args:
        # kohya stores network_args as given on its command line: strings.
        data["ss_network_args"] = json.dumps(args)
    return data


def learning_rate_metadata(settings: TrainSettings) -> dict[str, str]:
    """kohya's keys for what was trained at which rate, and how."""
    data = {"ss_network_train_unet_only": str(not settings.train_text_encoder),
            "ss_unet_lr": str(float(settings.learning_rate)),
            "ss_text_encoder_lr": "None",
            "ss_lr_scheduler": settings.lr_schedule,
            "ss_lr_warmup_steps": str(int(settings.warmup_steps)),
            "ss_optimizer": optimizer_description(settings.optimizer, settings.weight_decay, settings.optimizer_args),
            "ss_max_grad_norm": str(float(settings.max_grad_norm)),
            "ss_gradient_accumulation_steps": str(int(settings.gradient_accumulation)),
            "ss_mixed_precision": KOHYA_PRECISION.get(settings.mixed_precision, settings.mixed_precision),
            "ss_seed": str(int(settings.seed))}
    if settings.train_text_encoder:
        first, second = settings.text_encoder_rates()
        # kohya writes one rate, or SDXL's two as a list when they differ (its --text_encoder_lr a b).
        data["ss_text_encoder_lr"] = str(first) if second == first else str([first, second])
    return data


KOHYA_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}     # its --mixed_precision choices


def noise_and_caption_metadata(settings: TrainSettings) -> dict[str, str]:
    """Noise offset, min-SNR, the timestep range and caption augmentation, as kohya names them.

    kohya's options default to None (off); LoRA Lab's 0 means the same and is written as kohya's None.
    """
    noise, captions = settings.noise, settings.captions
    data = {"ss_noise_offset": _off_is_none(noise.noise_offset),
            "ss_min_snr_gamma": _off_is_none(noise.min_snr_gamma),
            "ss_loss_type": noise.loss_type, "ss_huber_schedule": noise.huber_schedule,
            "ss_huber_c": str(float(noise.huber_c)), "ss_huber_scale": str(float(noise.huber_scale)),
            "ss_shuffle_caption": str(bool(captions.shuffle_tags)),
            "ss_keep_tokens": str(int(captions.keep_tokens)),
            "ss_caption_dropout_rate": str(float(captions.caption_dropout)),
            "ss_caption_tag_dropout_rate": str(float(captions.tag_dropout)),
            "ss_caption_dropout_every_n_epochs": "0"}
    # LoRA Lab's own names where kohya's mean something slightly different for some models (loss_shapes.py).
    if noise.timestep_sampling != "uniform":
        data.update(loralab_timestep_sampling=noise.timestep_sampling, loralab_logit_mean=str(float(noise.logit_mean)),
                    loralab_logit_std=str(float(noise.logit_std)))
    if noise.flow_shift:
        data["loralab_flow_shift"] = str(float(noise.flow_shift))
    return data


def kohya_max_token_length(encoded_lengths) -> int | None:
    """kohya's --max_token_length that keeps every caption whole: None (75 tokens), else 75 per CLIP chunk.

    ComfyUI encodes a long caption in chunks of 77 tokens (75 plus start and end) instead of cutting it,
    as kohya does with --max_token_length 150 or 225; ``encoded_lengths`` are the encodings' token counts.
    """
    chunks = max((length // 77 for length in encoded_lengths), default=1)
    return 75 * chunks if chunks > 1 else None


def _off_is_none(value: float) -> str:
    return str(float(value)) if value else "None"


# What kohya writes for features LoRA Lab does not have, when they are off: readers see "off".
KOHYA_FEATURES_OFF = {
    "ss_num_validation_images": "0", "ss_validation_seed": "None", "ss_validation_split": "0.0",
    "ss_max_validation_steps": "None", "ss_validate_every_n_epochs": "None", "ss_validate_every_n_steps": "None",
    "ss_num_reg_images": "0", "ss_reg_dataset_dirs": "{}", "ss_prior_loss_weight": "1.0",
    "ss_multires_noise_iterations": "None", "ss_multires_noise_discount": "0.3", "ss_adaptive_noise_scale": "None",
    "ss_noise_offset_random_strength": "False", "ss_ip_noise_gamma": "None",
    "ss_ip_noise_gamma_random_strength": "False", "ss_zero_terminal_snr": "False", "ss_debiased_estimation": "False",
    "ss_scale_weight_norms": "None", "ss_full_fp16": "False", "ss_fp8_base": "False", "ss_fp8_base_unet": "False",
    "ss_lowram": "False", "ss_face_crop_aug_range": "None", "ss_color_aug": "False", "ss_flip_aug": "False",
    "ss_random_crop": "False", "ss_resize_interpolation": "None", "ss_training_comment": "None",
}


@dataclass(frozen=True)
class BaseModel:
    """The model the LoRA was trained on, as far as the graph tells (nodes/model_sources.py)."""
    name: str | None = None               # the checkpoint / diffusion model file as its loader lists it
    hashes: FileHashes | None = None
    vae_name: str | None = None           # a separate VAE file; None: the checkpoint's own VAE
    vae_hashes: FileHashes | None = None
    variant: str | None = None            # Flux "dev"/"schnell", SD3 "medium"/"5-medium"/"5-large"
    clip_skip: int | None = None          # kohya --clip_skip (ComfyUI's CLIP Set Last Layer)

    def metadata(self) -> dict[str, str]:
        data = {"ss_clip_skip": str(self.clip_skip)}
        for prefix, name, hashes in (("sd_model", self.name, self.hashes), ("vae", self.vae_name, self.vae_hashes)):
            if name:
                data[f"ss_{prefix}_name"] = Path(name).name
            if hashes:
                data[f"ss_{prefix}_hash"], data[f"ss_new_{prefix}_hash"] = hashes.legacy, hashes.sha256
        return data


def picture_folders(dataset) -> dict[str, list]:
    """The dataset's pictures by folder, named as kohya names them: the folder's base name ("10_sks person").

    Pictures outside "N_name" folders count under the dataset folder's own name (an IMAGE batch: "images");
    a name met twice gets " (2)", as kohya numbers them.
    """
    by_folder: dict[tuple[str, int], list] = {}
    for item in dataset.items:
        by_folder.setdefault((item.concept, item.repeats), []).append(item)
    named = {}
    for (concept, _), items in by_folder.items():
        name = concept.rsplit("/", 1)[-1] if concept else (Path(dataset.root).name if dataset.root else "images")
        unique, number = name, 2
        while unique in named:
            unique, number = f"{name} ({number})", number + 1
        named[unique] = items
    return named


def dataset_dirs(dataset) -> dict[str, dict[str, int]]:
    """kohya's ss_dataset_dirs: per picture folder, its repeats and pictures."""
    return {name: {"n_repeats": items[0].repeats, "img_count": len(items)}
            for name, items in picture_folders(dataset).items()}


def bucket_info(dataset, resolution: int) -> dict:
    """kohya's ss_bucket_info: each bucket in use (numbered by its place among all buckets of the
    resolution) with its size and picture count including repeats, and the mean aspect-ratio error of
    the pictures (bucket width/height minus picture width/height, without repeats)."""
    buckets = make_buckets(resolution)
    counts: dict[int, int] = {}
    errors = []
    for item in dataset.items:
        bucket = nearest_bucket(item.width, item.height, buckets)
        index = buckets.index(bucket)
        counts[index] = counts.get(index, 0) + item.repeats
        errors.append(abs(bucket[0] / bucket[1] - item.width / item.height))
    return {"buckets": {index: {"resolution": list(buckets[index]), "count": count}
                        for index, count in sorted(counts.items())},
            "mean_img_ar_error": sum(errors) / len(errors) if errors else 0}


def modelspec(*, title: str, family: str, variant: str | None, v_parameterization: bool, resolution: int,
              saved_at: float, trigger_word: str | None, clip_skip: int | None, timestep_range) -> dict[str, str]:
    """The ModelSpec 1.0.1 keys kohya writes for a LoRA (sd-scripts library/sai_model_spec.py)."""
    flux = family.startswith("flux")
    if family.startswith("sdxl"):
        architecture, implementation = "stable-diffusion-xl-v1-base", STABILITY_AI
    elif family.startswith("sd3"):
        architecture, implementation = "stable-diffusion-3" + (f"-{variant}" if variant else ""), "diffusers"
    elif flux:
        architecture = {"dev": "flux-1-dev", "schnell": "flux-1-schnell"}.get(variant or "", "flux-1")
        implementation = "https://github.com/black-forest-labs/flux"
    elif family.startswith("sd_v2"):
        architecture, implementation = ("stable-diffusion-v2-768-v" if v_parameterization
                                        else "stable-diffusion-v2-512"), "diffusers"
    else:
        architecture, implementation = "stable-diffusion-v1", "diffusers"
    data = {"modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": f"{architecture}/lora",
            "modelspec.implementation": implementation,
            "modelspec.title": title,
            "modelspec.resolution": f"{resolution}x{resolution}",
            # kohya: local time, whole seconds
            "modelspec.date": datetime.datetime.fromtimestamp(int(saved_at)).isoformat(),
            "modelspec.implementation_version": f"LoRA Lab/{LORALAB_VERSION}"}
    if not flux:      # kohya writes no prediction type for Flux; SD3 gets "epsilon" from it too
        data["modelspec.prediction_type"] = "v" if v_parameterization else "epsilon"
    if clip_skip is not None:
        data["modelspec.encoder_layer"] = str(clip_skip)
    if trigger_word:
        data["modelspec.trigger_phrase"] = trigger_word
    if timestep_range:
        data["modelspec.timestep_range"] = f"{timestep_range[0]},{timestep_range[1]}"
    return data


STABILITY_AI = "https://github.com/Stability-AI/generative-models"


def _read_version() -> str:
    try:
        text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return found.group(1) if found else "unknown"


LORALAB_VERSION = _read_version()


@dataclass
class Description:
    """Everything the saved file says about how it was trained (kohya's ss_* keys, modelspec.* and ours)."""
    output_name: str
    family: str
    resolution: int
    settings: TrainSettings
    dataset: object
    trigger_word: str
    epoch_plan: Epochs
    epochs: int
    v_parameterization: bool = False
    base_model: BaseModel = field(default_factory=BaseModel)
    gradient_checkpointing: bool = False
    fp8_base: bool = False
    flux_guidance: float | None = None      # the guidance input Flux.1 dev trained with
    masked_loss: str | None = None           # which pictures had a mask, and the weight outside (loss_masks.py)
    regularization: tuple | None = None      # (Regularization, its dataset): prior preservation (regularization.py)
    max_token_length: int | None = None      # kohya's: None = 75 tokens; 150, 225 for longer captions
    session_id: int = field(default_factory=lambda: random.randint(0, 2 ** 32))   # kohya: one per run

    def metadata(self, step: int, started_at: float, finished_at: float) -> dict[str, str]:
        settings, plan = self.settings, self.epoch_plan
        captions = {name: [item.caption for item in items] for name, items in picture_folders(self.dataset).items()}
        min_side, max_side = bucket_side_range(self.resolution)
        noise = settings.noise
        timesteps = ((round(noise.min_timestep * 1000), round(noise.max_timestep * 1000))
                     if (noise.min_timestep, noise.max_timestep) != (0.0, 1.0) else None)
        extra = {
            **KOHYA_FEATURES_OFF,
            "ss_session_id": str(self.session_id),
            "ss_num_batches_per_epoch": str(plan.batches),
            # kohya: the epochs the run was set to (from steps: the epochs those steps start), and those done
            "ss_num_epochs": str(self.epochs or -(-settings.steps * plan.accumulation // max(1, plan.batches))),
            "ss_epoch": str(plan.completed_at(step)),
            "ss_batch_size_per_device": str(settings.batch_size),
            "ss_total_batch_size": str(settings.batch_size * settings.gradient_accumulation),
            "ss_gradient_checkpointing": str(bool(self.gradient_checkpointing)),
            "ss_fp8_base": str(bool(self.fp8_base)),
            "ss_cache_latents": "True",          # every picture is encoded once before the first step
            "ss_max_token_length": str(self.max_token_length),
            "ss_enable_bucket": "True", "ss_bucket_no_upscale": "False",   # small pictures are scaled up
            "ss_min_bucket_reso": str(min_side), "ss_max_bucket_reso": str(max_side),
            "ss_bucket_info": json.dumps(bucket_info(self.dataset, self.resolution)),
            "ss_dataset_dirs": json.dumps(dataset_dirs(self.dataset)),
            "loralab_total_steps": str(settings.steps),
            "loralab_dataset_fingerprint": self.dataset.fingerprint(),
            **self.flow_model_metadata(),
            **({"loralab_masked_loss": self.masked_loss} if self.masked_loss else {}),
            **self.regularization_metadata(),
            **noise_and_caption_metadata(settings),
            **network_metadata(settings.network),
            **learning_rate_metadata(settings),
            **self.base_model.metadata(),
            **modelspec(title=Path(self.output_name).name, family=self.family, variant=self.base_model.variant,
                        v_parameterization=self.v_parameterization, resolution=self.resolution,
                        saved_at=finished_at, trigger_word=None, clip_skip=self.base_model.clip_skip,
                        timestep_range=timesteps),
        }
        return kohya_metadata(
            output_name=Path(self.output_name).name, base_model_version=self.family,
            network_dim=settings.network.rank, network_alpha=settings.network.alpha,
            resolution=(self.resolution, self.resolution),
            num_train_images=sum(item.repeats for item in self.dataset.items),
            tag_frequency=tag_frequency(captions), steps=step, max_train_steps=settings.steps,
            learning_rate=settings.learning_rate,
            started_at=started_at, finished_at=finished_at, trigger_word=self.trigger_word or None,
            v_parameterization=self.v_parameterization,
            network_module=NETWORK_MODULES[settings.network.network_type], extra=extra)

    def regularization_metadata(self) -> dict[str, str]:
        """kohya's keys for prior preservation: the regularization pictures (with their own repeats, as kohya
        counts ss_num_reg_images), their folders and prior_loss_weight."""
        if not self.regularization:
            return {}
        prior, pictures = self.regularization
        return {"ss_num_reg_images": str(sum(item.repeats for item in pictures.items)),
                "ss_reg_dataset_dirs": json.dumps(dataset_dirs(pictures)),
                "ss_prior_loss_weight": str(float(prior.prior_loss_weight))}

    def flow_model_metadata(self) -> dict[str, str]:
        """kohya's keys for what Flux trained with, where their meaning is the same: its guidance input
        (--guidance_scale). The timestep settings stay under LoRA Lab's own names (noise_and_caption_metadata):
        kohya's SD3 and Flux samplers read their logit mean against another direction of the schedule."""
        data = {}
        if self.family.startswith("flux") and self.flux_guidance is not None:
            data["ss_guidance_scale"] = str(float(self.flux_guidance))
        return data

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

"""The metadata LoRA Lab writes, compared with what kohya sd-scripts wrote for the same run.

tests/fixtures/kohya/kohya_sd15_metadata.json comes from a real sd-scripts run (its README gives the
command line): 3 pictures in "10_sks person", rank 4 / alpha 1, dropout 0.1, AdamW weight_decay=0.01,
cosine with 1 warm-up step, noise offset 0.05, min-SNR 5, clip skip 1, shuffled captions keeping 1 tag,
caption dropout 0.05, batch 1, 2 epochs, gradient checkpointing, 128 px. The same run described to
LoRA Lab must give the same keys, each value in kohya's format, and the same value wherever the value
does not depend on the machine, the moment or the picture files.
"""
from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import pytest
import torch

from lora_lab.trainer.captions.augment import CaptionAugment
from lora_lab.trainer.data.dataset import Dataset, DatasetItem
from lora_lab.trainer.data.encoded_dataset import Epochs
from lora_lab.trainer.file_hashes import FileHashes, HashCache, hash_file
from lora_lab.trainer.lora.files import load_lora_file, save_lora_file
from lora_lab.trainer.lora.network import Network
from lora_lab.trainer.training.kohya_metadata import (BaseModel, Description, KOHYA_FEATURES_OFF, dataset_dirs,
                                                      kohya_max_token_length, modelspec)
from lora_lab.trainer.training.loop import TrainSettings
from lora_lab.trainer.training.noise import NoiseSettings
from lora_lab.trainer.training.optimizers import optimizer_description

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "kohya"
KOHYA_RUN = json.loads((FIXTURES / "kohya_sd15_metadata.json").read_text(encoding="utf-8"))
KOHYA_FINAL, KOHYA_EPOCH_1 = KOHYA_RUN["refrun.safetensors"], KOHYA_RUN["refrun-000001.safetensors"]

# kohya's keys we do not write (trainer/training/kohya_metadata.py's docstring says why).
LEFT_OUT = {"ss_sd_scripts_commit_hash"}
# Ours beside kohya's.
OURS_ONLY = {"ss_v_parameterization", "ss_network_train_unet_only", "loralab_trigger_word", "loralab_total_steps",
             "loralab_dataset_fingerprint", "loralab_network_preset", "modelspec.trigger_phrase"}
# Values that differ by machine, moment or picture files (the fixture README's list, plus the text of
# --training_comment, which LoRA Lab has no input for, and the bucket numbering).
NOT_COMPARED = {"ss_session_id", "ss_training_started_at", "ss_training_finished_at", "modelspec.date",
                "ss_sd_model_hash", "ss_new_sd_model_hash", "sshs_model_hash", "sshs_legacy_hash",
                "modelspec.implementation_version", "ss_training_comment", "ss_bucket_info"}

CAPTIONS = ["sks person, red shirt, smile", "sks person, red shirt, smile, outdoors",
            "sks person, blue shirt, looking at viewer"]


def kohya_like_run(steps_done: int, base_model: BaseModel | None = None) -> dict[str, str]:
    items = tuple(DatasetItem(key=f"10_sks person/{index}.png", caption=caption, repeats=10, concept="10_sks person",
                              width=128, height=128, content_hash=f"{index:064x}", has_caption=True)
                  for index, caption in enumerate(CAPTIONS))
    dataset = Dataset(items=items, root="/data/img")
    settings = TrainSettings(
        steps=60, batch_size=1, learning_rate=1e-4, text_encoder_lr=5e-5, train_text_encoder=True,
        network=Network(rank=4, alpha=1.0, dropout=0.1), lr_schedule="cosine", warmup_steps=1, seed=42,
        mixed_precision="fp32", optimizer="AdamW", weight_decay=0.01,
        noise=NoiseSettings(noise_offset=0.05, min_snr_gamma=5.0),
        captions=CaptionAugment(caption_dropout=0.05, shuffle_tags=True, keep_tokens=1))
    describe = Description(output_name="refrun", family="sd_v1", resolution=128, settings=settings, dataset=dataset,
                           trigger_word="", epoch_plan=Epochs(batches=30), epochs=2,
                           base_model=base_model or BaseModel(name="sd15_random.safetensors",
                                                              hashes=FileHashes("c6406a4c", "3b" * 32), clip_skip=1),
                           gradient_checkpointing=True)
    return describe.metadata(step=steps_done, started_at=1796358563.349528, finished_at=1796358973.4700427)


def saved(tmp_path, metadata) -> dict[str, str]:
    """Through the real save: sshs_* hashes are added on the way to disk."""
    tensors = {"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 4),
               "lora_unet_x.alpha": torch.tensor(1.0)}
    return load_lora_file(save_lora_file(tmp_path, "refrun", tensors, metadata, dtype=torch.float16))[1]


def kind(value: str) -> str:
    """The format of a kohya metadata value: what a reader has to parse."""
    patterns = [("None", r"None"), ("bool", r"True|False"), ("int", r"-?\d+"),
                ("float", r"-?\d+\.\d*(e-?\d+)?|-?\d+e-?\d+"), ("size", r"\(\d+, \d+\)"),
                ("hex8", r"[0-9a-f]{8}"), ("hex64", r"[0-9a-f]{64}"), ("date", r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"),
                ("WxH", r"\d+x\d+")]
    for name, pattern in patterns:
        if re.fullmatch(pattern, value):
            return name
    if value[:1] in "{[":
        return "json " + type(json.loads(value)).__name__
    return "text"


@pytest.mark.parametrize("ours_step, kohya", [(60, KOHYA_FINAL), (30, KOHYA_EPOCH_1)], ids=["final", "epoch 1"])
def test_every_kohya_key_in_kohyas_format(tmp_path, ours_step, kohya):
    ours = saved(tmp_path, kohya_like_run(ours_step))
    assert set(kohya) - set(ours) == LEFT_OUT
    assert set(ours) - set(kohya) <= OURS_ONLY, set(ours) - set(kohya) - OURS_ONLY
    formats = {key: (kind(ours[key]), kind(kohya[key])) for key in set(kohya) & set(ours)
               if key != "ss_training_comment"}        # kohya's holds the text given on its command line
    assert {key: pair for key, pair in formats.items() if pair[0] != pair[1]} == {}
    different = {key: (ours[key], kohya[key]) for key in set(kohya) & set(ours) - NOT_COMPARED
                 if _parsed(ours[key]) != _parsed(kohya[key])}
    assert different == {}


def _parsed(value: str):
    return json.loads(value) if value[:1] in "{[" else value


def test_bucket_info_has_kohyas_shape():
    ours, kohya = (json.loads(meta["ss_bucket_info"]) for meta in (kohya_like_run(60), KOHYA_FINAL))
    assert list(ours["buckets"].values()) == list(kohya["buckets"].values()) == [{"resolution": [128, 128], "count": 30}]
    assert all(key.isdigit() for key in ours["buckets"])
    assert ours["mean_img_ar_error"] == 0        # square pictures in a square bucket (kohya's were not square)


def test_a_picture_folder_without_repeats_is_listed_under_the_dataset_folder():
    items = [DatasetItem(key=key, caption="x", repeats=repeats, concept=concept, width=64, height=64,
                         content_hash="0", has_caption=True)
             for key, repeats, concept in [("a.png", 1, ""), ("b.png", 1, ""), ("5_cat/c.png", 5, "5_cat"),
                                           ("x/5_cat/d.png", 5, "x/5_cat")]]
    assert dataset_dirs(Dataset(items=tuple(items), root="/data/mychar")) == {
        "mychar": {"n_repeats": 1, "img_count": 2}, "5_cat": {"n_repeats": 5, "img_count": 1},
        "5_cat (2)": {"n_repeats": 5, "img_count": 1}}
    assert list(dataset_dirs(Dataset(items=tuple(items[:1])))) == ["images"]      # an IMAGE batch


def test_unknown_files_and_default_clip_write_what_kohya_writes_without_those_options():
    metadata = kohya_like_run(60, BaseModel())
    assert not {"ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_vae_name"} & set(metadata)
    assert metadata["ss_clip_skip"] == "None" and "modelspec.encoder_layer" not in metadata
    with_vae = kohya_like_run(60, BaseModel(name="sub/base.safetensors", vae_name="vae/ft-mse.safetensors",
                                            vae_hashes=FileHashes("0123abcd", "ef" * 32)))
    assert with_vae["ss_sd_model_name"] == "base.safetensors" and with_vae["ss_vae_name"] == "ft-mse.safetensors"
    assert (with_vae["ss_vae_hash"], with_vae["ss_new_vae_hash"]) == ("0123abcd", "ef" * 32)


def test_modelspec_names_each_family_as_kohya_does():
    def spec(family, variant=None, v=False):
        return modelspec(title="t", family=family, variant=variant, v_parameterization=v, resolution=1024,
                         saved_at=0.0, trigger_word="sks", clip_skip=None, timestep_range=(100, 900))
    assert spec("sdxl_base_v1-0")["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert spec("sdxl_base_v1-0")["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert spec("sd_v2_v", v=True)["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert spec("sd_v2_v", v=True)["modelspec.prediction_type"] == "v"
    assert spec("sd3", "5-large")["modelspec.architecture"] == "stable-diffusion-3-5-large/lora"
    flux = spec("flux1", "schnell")
    assert flux["modelspec.architecture"] == "flux-1-schnell/lora" and "modelspec.prediction_type" not in flux
    assert flux["modelspec.trigger_phrase"] == "sks" and flux["modelspec.timestep_range"] == "100,900"
    assert flux["modelspec.date"] == datetime.datetime.fromtimestamp(0).isoformat()


def test_optimizer_is_named_by_class_and_arguments_as_kohya_does():
    assert optimizer_description("AdamW", 0.01, {}) == KOHYA_FINAL["ss_optimizer"]
    assert optimizer_description("AdamW", 0.01, {"betas": (0.9, 0.99)}) == \
        "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99))"     # the variant fixture's format
    assert optimizer_description("Prodigy", 0.0, {"weight_decay": 0.1, "d_coef": 2}) == \
        "prodigyopt.prodigy.Prodigy(weight_decay=0.1,d_coef=2)"


def test_max_token_length_keeps_long_captions_whole():
    assert kohya_max_token_length([77, 77]) is None and kohya_max_token_length([]) is None
    assert kohya_max_token_length([77, 154, 231]) == 225


def test_off_features_are_written_as_kohya_writes_them_off():
    assert {key: KOHYA_FINAL[key] for key in KOHYA_FEATURES_OFF if key != "ss_training_comment"} == \
        {key: value for key, value in KOHYA_FEATURES_OFF.items() if key != "ss_training_comment"}


def test_model_file_hashes_are_kohyas_and_computed_once(tmp_path, monkeypatch):
    import hashlib
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(bytes(range(256)) * 8192)          # 2 MiB: the legacy window is inside
    data = checkpoint.read_bytes()
    expected = FileHashes(hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8], hashlib.sha256(data).hexdigest())
    assert hash_file(checkpoint) == expected

    calls = []
    from lora_lab.trainer import file_hashes
    monkeypatch.setattr(file_hashes, "hash_file", lambda path: calls.append(path) or expected)
    cache = HashCache(tmp_path / "user" / "hashes.json")
    assert cache.hashes(checkpoint) == cache.hashes(checkpoint) == expected and len(calls) == 1
    assert HashCache(tmp_path / "user" / "hashes.json").hashes(checkpoint) == expected and len(calls) == 1
    checkpoint.write_bytes(data[:-1] + b"x")                  # replaced in place: same size, new time
    HashCache(tmp_path / "user" / "hashes.json").hashes(checkpoint)
    assert len(calls) == 2

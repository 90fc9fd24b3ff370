"""A finished run's identity: what changes it, where it is found, the loss history it carries."""
import json

import pytest
import torch
from safetensors.torch import save_file

from lora_lab.trainer.data.encoded_dataset import EncodedDataset, Example, PictureSize, TextEncoding
from lora_lab.trainer.training.run_reuse import (MAX_LOSS_POINTS, RUN_IDENTITY_KEY, data_fingerprint, find_finished,
                                             loss_history, loss_history_text, run_identity)


def encoded(seed=0, caption="sks, a cat", repeats=2, pooled=True, size=None):
    g = torch.Generator().manual_seed(seed)
    examples = [Example(latent=torch.randn(4, 8, 8, generator=g), caption=caption, bucket=(64, 64), repeats=repeats,
                        size=size),
                Example(latent=torch.randn(4, 8, 12, generator=g), caption="sks, a dog", bucket=(96, 64), repeats=1)]
    conds = {c: TextEncoding(torch.randn(1, 77, 16, generator=g), torch.randn(1, 8, generator=g) if pooled else None)
             for c in (caption, "sks, a dog")}
    return EncodedDataset(examples=examples, conds=conds)


def test_equal_data_gives_equal_fingerprints_and_every_trained_byte_counts():
    base = data_fingerprint(encoded())
    assert data_fingerprint(encoded()) == base
    changed_latent = encoded()
    changed_latent.examples[1].latent[0, 0, 0] += 1e-6
    changed_cond = encoded()
    changed_cond.conds["sks, a dog"].pooled[0, 0] += 1e-6
    variants = [changed_latent, changed_cond, encoded(caption="sks, a cat, smiling"), encoded(repeats=3),
                encoded(pooled=False), encoded(size=PictureSize((80, 64), (8, 0), (64, 64)))]
    fingerprints = [data_fingerprint(v) for v in variants]
    assert base not in fingerprints and len(set(fingerprints)) == len(variants)


def test_identity_covers_model_and_settings():
    one = run_identity("d", "m", {"learning_rate": 1e-4, "rank": 16})
    assert one == run_identity("d", "m", {"rank": 16, "learning_rate": 1e-4})       # key order is not identity
    others = {run_identity("d2", "m", {"learning_rate": 1e-4, "rank": 16}),
              run_identity("d", "m2", {"learning_rate": 1e-4, "rank": 16}),
              run_identity("d", "m", {"learning_rate": 2e-4, "rank": 16})}
    assert one not in others and len(others) == 3


def write_lora(path, identity=None):
    metadata = {"ss_output_name": path.stem}
    if identity:
        metadata[RUN_IDENTITY_KEY] = identity
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path), metadata=metadata)


def test_found_among_the_name_and_its_numbered_siblings_only(tmp_path):
    (tmp_path / "char").mkdir()
    write_lora(tmp_path / "char" / "v1.safetensors", "other-run")
    write_lora(tmp_path / "char" / "v1_3.safetensors", "this-run")
    write_lora(tmp_path / "char" / "v1_step5.safetensors", "step-save")      # not a final save's name
    write_lora(tmp_path / "char" / "v1b.safetensors", "this-run-lookalike")
    (tmp_path / "char" / "v1_2.safetensors").write_bytes(b"not a safetensors file")
    assert find_finished(tmp_path, "char/v1", "this-run") == tmp_path / "char" / "v1_3.safetensors"
    assert find_finished(tmp_path, "char/v1", "other-run") == tmp_path / "char" / "v1.safetensors"
    assert find_finished(tmp_path, "char/v1", "step-save") is None
    assert find_finished(tmp_path, "char/v1", "this-run-lookalike") is None
    assert find_finished(tmp_path, "char/v1", "never") is None
    assert find_finished(tmp_path, "missing/v1", "this-run") is None


def test_loss_history_round_trips_and_long_runs_are_thinned_keeping_both_ends():
    short = [0.5, 0.25, float("nan"), 0.125]
    back = loss_history({"loralab_loss_history": loss_history_text(short)})
    assert back[:2] == [0.5, 0.25] and back[3] == 0.125 and back[2] != back[2]
    long = [1.0 / (i + 1) for i in range(10_000)]
    text = loss_history_text(long)
    values = json.loads(text)
    assert len(values) == MAX_LOSS_POINTS + 1 and values[0] == 1.0 and values[-1] == pytest.approx(long[-1], rel=1e-4)
    assert len(text) < 30_000                     # fits a safetensors header comfortably
    assert loss_history({}) == [] and loss_history({"loralab_loss_history": "{broken"}) == []

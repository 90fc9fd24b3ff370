"""LoRA files: safe names, atomic non-clobbering saves, kohya metadata and sshs hashes."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings, strategies as st

from lora_lab.trainer.lora import files as lora_file
from lora_lab.trainer.lora.files import load_lora_file, lora_relative_path, save_lora_file, sshs_hashes
from lora_lab.trainer.training.kohya_metadata import kohya_metadata, tag_frequency


def lora_tensors(value=0.5, rank=4):
    return {
        "lora_unet_proj.lora_down.weight": torch.full((rank, 16), value),
        "lora_unet_proj.lora_up.weight": torch.linspace(-1, 1, 32 * rank).reshape(32, rank),
        "lora_unet_proj.alpha": torch.tensor(0.1),
    }


def leftovers(folder: Path):
    return [path.name for path in folder.rglob("*") if ".tmp-" in path.name]


def test_save_then_load_round_trips_tensors_and_string_metadata(tmp_path):
    tensors = lora_tensors()
    path = save_lora_file(tmp_path, "mylora", tensors, {"ss_output_name": "mylora", "note": "héllo"})
    assert path == tmp_path / "mylora.safetensors"
    loaded, metadata = load_lora_file(path)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[key], tensors[key]) for key in tensors)
    assert metadata["ss_output_name"] == "mylora" and metadata["note"] == "héllo"
    assert all(isinstance(key, str) and isinstance(value, str) for key, value in metadata.items())
    assert len(metadata["sshs_model_hash"]) == 64 and len(metadata["sshs_legacy_hash"]) == 8
    assert leftovers(tmp_path) == []


def test_existing_files_are_never_replaced_by_default(tmp_path):
    paths = [save_lora_file(tmp_path, "style", lora_tensors(value), {}) for value in (1.0, 2.0, 3.0)]
    assert [path.name for path in paths] == ["style.safetensors", "style_2.safetensors", "style_3.safetensors"]
    for path, value in zip(paths, (1.0, 2.0, 3.0)):
        assert load_lora_file(path)[0]["lora_unet_proj.lora_down.weight"][0, 0].item() == value


def test_overwrite_replaces_in_place(tmp_path):
    save_lora_file(tmp_path, "style", lora_tensors(1.0), {})
    path = save_lora_file(tmp_path, "style.safetensors", lora_tensors(2.0), {}, overwrite=True)
    assert path == tmp_path / "style.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style.safetensors"]
    assert load_lora_file(path)[0]["lora_unet_proj.lora_down.weight"][0, 0].item() == 2.0


def test_a_name_with_subfolders_creates_them(tmp_path):
    path = save_lora_file(tmp_path, "mychar/v1", lora_tensors(), {})
    assert path == tmp_path / "mychar" / "v1.safetensors" and path.is_file()
    assert save_lora_file(tmp_path, "mychar\\v1", lora_tensors(), {}) == tmp_path / "mychar" / "v1_2.safetensors"


@pytest.mark.parametrize("name", [
    "", "   ", "..", "../escape", "a/../../escape", "a/./b", "a//b", "trailing/", "/etc/passwd", "\\\\server\\share",
    "C:\\loras\\x", "c:x", "nul\x00byte", "CON", "con.txt", "sub/NUL", "COM1", "lpt9.lora", "ends.", "ends ",
    "pipe|name", "what?", "x" * 201,
])
def test_unsafe_names_are_refused_and_nothing_is_written(tmp_path, name):
    with pytest.raises(ValueError, match="LoRA name"):
        save_lora_file(tmp_path, name, lora_tensors(), {})
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("ab./\\:\x00 C") + ["..", "CON", "é"]), max_size=30).map("".join))
def test_any_accepted_name_stays_inside_the_folder(name):
    folder = Path("/models/loras")
    try:
        relative = lora_relative_path(name)
    except ValueError:
        return
    assert not relative.is_absolute() and ".." not in relative.parts
    assert relative.name.endswith(".safetensors") and relative.name != ".safetensors"
    assert os.path.normpath(folder / relative).startswith(str(folder) + os.sep)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, overwrite):
    old = save_lora_file(tmp_path, "style", lora_tensors(1.0), {})
    old_bytes = old.read_bytes()

    def write_half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_lora_file(tmp_path, "style", lora_tensors(2.0), {}, overwrite=overwrite)
    assert old.read_bytes() == old_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style.safetensors"]


def test_a_failed_publish_leaves_no_temporary(tmp_path, monkeypatch):
    old = save_lora_file(tmp_path, "style", lora_tensors(1.0), {})
    old_bytes = old.read_bytes()

    def failing_replace(source, destination):
        raise PermissionError("file is open in another program")

    monkeypatch.setattr(lora_file.os, "replace", failing_replace)
    with pytest.raises(PermissionError):
        save_lora_file(tmp_path, "style", lora_tensors(2.0), {}, overwrite=True)
    assert old.read_bytes() == old_bytes
    assert leftovers(tmp_path) == []


def test_a_name_taken_by_another_writer_meanwhile_is_not_replaced(tmp_path, monkeypatch):
    real_link = os.link

    def competitor_wins(source, destination):
        if Path(destination).name == "style.safetensors":
            Path(destination).write_bytes(b"the other writer's file")
        return real_link(source, destination)

    monkeypatch.setattr(lora_file.os, "link", competitor_wins)
    path = save_lora_file(tmp_path, "style", lora_tensors(), {})
    assert path.name == "style_2.safetensors"
    assert (tmp_path / "style.safetensors").read_bytes() == b"the other writer's file"
    assert leftovers(tmp_path) == []


def test_without_hard_links_a_new_name_is_still_published(tmp_path, monkeypatch):
    def no_links(source, destination):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(lora_file.os, "link", no_links)
    save_lora_file(tmp_path, "style", lora_tensors(1.0), {})
    path = save_lora_file(tmp_path, "style", lora_tensors(2.0), {})
    assert path.name == "style_2.safetensors" and leftovers(tmp_path) == []
    assert load_lora_file(tmp_path / "style.safetensors")[0]["lora_unet_proj.lora_down.weight"][0, 0] == 1.0


def test_dtype_casts_weights_but_not_scalars_or_integers(tmp_path):
    tensors = dict(lora_tensors(), counter=torch.arange(3))
    loaded, _ = load_lora_file(save_lora_file(tmp_path, "half", tensors, {}, dtype=torch.float16))
    assert loaded["lora_unet_proj.lora_down.weight"].dtype == torch.float16
    assert loaded["lora_unet_proj.alpha"].dtype == torch.float32
    assert loaded["lora_unet_proj.alpha"].item() == torch.tensor(0.1).item()
    assert loaded["counter"].dtype == torch.int64
    # the stored hash describes the bytes actually written
    assert load_lora_file(tmp_path / "half.safetensors")[1]["sshs_model_hash"] == sshs_hashes(loaded, {})[0]


def test_non_string_metadata_is_refused(tmp_path):
    with pytest.raises(ValueError, match="str to str"):
        save_lora_file(tmp_path, "x", lora_tensors(), {"ss_network_dim": 16})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_load_refuses_pickle_formats(tmp_path, suffix):
    path = tmp_path / f"old{suffix}"
    path.write_bytes(b"not opened")
    with pytest.raises(ValueError, match="pickle"):
        load_lora_file(path)


def test_load_refuses_other_and_corrupt_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        load_lora_file(tmp_path / "notes.txt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_lora_file(tmp_path / "broken.safetensors")


def test_load_without_metadata_gives_an_empty_dict(tmp_path):
    path = tmp_path / "bare.safetensors"
    safetensors.torch.save_file(lora_tensors(), str(path))
    assert load_lora_file(path)[1] == {}


def metadata_example(**overrides):
    arguments = dict(output_name="mychar", base_model_version="sd_v1", network_dim=16, network_alpha=8,
                     resolution=(512, 768), num_train_images=40,
                     tag_frequency={"10_mychar": {"mychar": 4, "smile": 2}}, steps=400, learning_rate=1e-4,
                     started_at=1700000000.5, finished_at=1700000600.25, trigger_word="mychar")
    arguments.update(overrides)
    return kohya_metadata(**arguments)


def test_kohya_metadata_has_the_keys_a1111_reads_as_strings():
    metadata = metadata_example(extra={"ss_clip_skip": "2", "ss_bucket_info": {"buckets": {}}})
    assert all(isinstance(value, str) for value in metadata.values())
    assert metadata["ss_output_name"] == "mychar"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "16" and metadata["ss_network_alpha"] == "8.0"
    assert metadata["ss_resolution"] == "(512, 768)"
    assert metadata["ss_num_train_images"] == "40"
    assert json.loads(metadata["ss_tag_frequency"]) == {"10_mychar": {"mychar": 4, "smile": 2}}
    assert metadata["ss_steps"] == metadata["ss_max_train_steps"] == "400"
    assert float(metadata["ss_learning_rate"]) == 1e-4
    assert float(metadata["ss_training_started_at"]) == 1700000000.5
    assert float(metadata["ss_training_finished_at"]) == 1700000600.25
    assert metadata["loralab_trigger_word"] == metadata["modelspec.trigger_phrase"] == "mychar"
    assert metadata["ss_clip_skip"] == "2" and json.loads(metadata["ss_bucket_info"]) == {"buckets": {}}


def test_kohya_metadata_variants():
    assert metadata_example(base_model_version="sd_v2")["ss_v2"] == "True"
    assert metadata_example(base_model_version="sdxl_base_v1-0")["ss_v2"] == "False"
    assert metadata_example(max_train_steps=500)["ss_max_train_steps"] == "500"
    untriggered = metadata_example(trigger_word=None)
    assert "loralab_trigger_word" not in untriggered and "modelspec.trigger_phrase" not in untriggered
    with pytest.raises(ValueError, match="may not replace 'ss_network_dim'"):
        metadata_example(extra={"ss_network_dim": "4"})


def test_tag_frequency_counts_like_kohya():
    frequency = tag_frequency({
        "10_cat": ["a cat, Sitting ,on a mat", "a cat,, sitting", "  "],
        "5_dog": ["dog"],
        "1_empty": [],
    })
    assert frequency == {"10_cat": {"a cat": 2, "sitting": 2, "on a mat": 1}, "5_dog": {"dog": 1}, "1_empty": {}}


def test_sshs_model_hash_is_the_sha256_of_the_written_tensor_data(tmp_path):
    path = save_lora_file(tmp_path, "x", lora_tensors(), metadata_example())
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    _, metadata = load_lora_file(path)
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header_length:]).hexdigest()
    # files under 1 MiB: the legacy window is empty
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]


def test_sshs_hashes_are_stable_follow_the_tensors_and_ignore_user_metadata():
    big = {"w": torch.arange(400_000, dtype=torch.float32)}  # 1.6 MB: the legacy window holds tensor data
    metadata = metadata_example()
    first = sshs_hashes(big, metadata)
    assert first == sshs_hashes({"w": big["w"].clone()}, dict(metadata))
    assert sshs_hashes(big, dict(metadata, note="user edit", sshs_model_hash="x")) == first
    changed = {"w": big["w"].clone()}
    changed["w"][270_000] += 1  # byte 1,080,000 of the data, inside [0x100000, 0x110000) after the header
    model_hash, legacy_hash = sshs_hashes(changed, metadata)
    assert model_hash != first[0] and legacy_hash != first[1]
    assert sshs_hashes(lora_tensors(0.5), {})[0] != sshs_hashes(lora_tensors(0.25), {})[0]

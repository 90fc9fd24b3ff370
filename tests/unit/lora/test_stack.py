"""LORA_STACK handling without ComfyUI: interop stacks, safe name resolution, the file cache, trigger words,
comparison columns, and the labelled grid picture."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from lora_lab.trainer.lora import stack as lora_stack
from lora_lab.trainer.image_grid import compose_grid, grid_geometry
from lora_lab.trainer.lora.stack import (LoraFileCache, LoraStackError, comparison_columns, normalize_stack,
                                         parse_strengths, resolve_lora)
from lora_lab.trainer.lora.trigger_words import join_words, trigger_words


def write_lora(path: Path, metadata=None, value=0.5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.full((2, 4), value),
                                 "lora_unet_x.lora_up.weight": torch.ones(4, 2),
                                 "lora_unet_x.alpha": torch.tensor(2.0)}, str(path), metadata=metadata or {})
    return path


@pytest.fixture
def loras(tmp_path):
    """A loras folder as ComfyUI lists it, plus ComfyUI's get_full_path semantics (".." cannot escape)."""
    root = tmp_path / "models" / "loras"
    write_lora(root / "style.safetensors")
    write_lora(root / "chars" / "hero.safetensors")
    (root / "old.ckpt").write_bytes(b"not really a pickle")
    listed = ["chars/hero.safetensors", "old.ckpt", "style.safetensors"]

    def full_path(name):
        candidate = root / os.path.relpath(os.path.join("/", name), "/")
        return str(candidate) if candidate.is_file() else None
    return root, listed, full_path


def resolve(loras, name):
    root, listed, full_path = loras
    return resolve_lora(name, listed, [str(root)], full_path)


# --- stacks ------------------------------------------------------------------------------------------
def test_interop_stacks_become_plain_tuples_and_none_slots_go():
    comfyroll = [("style.safetensors", 1, 0.5), ["None", 1.0, 1.0], ("chars\\hero.safetensors", "0.7", 0.2)]
    assert normalize_stack(comfyroll) == [("style.safetensors", 1.0, 0.5), ("chars\\hero.safetensors", 0.7, 0.2)]
    assert normalize_stack(None) == [] and normalize_stack([]) == []
    assert normalize_stack([(None, 1, 1), ("", 1, 1)]) == []


@pytest.mark.parametrize("bad, says", [
    ("style.safetensors", "str"), ([("a", 1)], "Entry 1"), ([("a", "strong", 1)], "numbers"),
    ([("a", float("nan"), 1)], "numbers"),
])
def test_malformed_stacks_are_refused_with_the_entry(bad, says):
    with pytest.raises(LoraStackError, match=says) as error:
        normalize_stack(bad)
    assert error.value.fix


def test_relative_names_match_whatever_the_separator_or_suffix(loras):
    assert resolve(loras, "chars\\hero.safetensors").name == "chars/hero.safetensors"
    assert resolve(loras, "./chars//hero").name == "chars/hero.safetensors"
    resolved = resolve(loras, "style.safetensors")
    assert Path(resolved.path).samefile(loras[0] / "style.safetensors")


def test_a_file_not_listed_yet_is_found_but_dotdot_cannot_leave_the_folder(loras, tmp_path):
    write_lora(loras[0] / "fresh.safetensors")                     # ComfyUI's listing is cached
    assert resolve(loras, "fresh.safetensors").name == "fresh.safetensors"
    write_lora(tmp_path / "models" / "secret.safetensors")
    with pytest.raises(LoraStackError, match="not found") as error:
        resolve(loras, "../secret.safetensors")
    assert str(loras[0]) in error.value.problem


def test_missing_file_names_the_file_and_the_folders(loras):
    with pytest.raises(LoraStackError) as error:
        resolve(loras, "nowhere/gone.safetensors")
    assert "nowhere/gone.safetensors" in error.value.problem and str(loras[0]) in error.value.problem


def test_absolute_paths_only_inside_the_loras_folders(loras, tmp_path):
    root = loras[0]
    assert resolve(loras, str(root / "chars" / "hero.safetensors")).name == "chars/hero.safetensors"
    assert resolve(loras, str(root / "chars" / ".." / "style.safetensors")).name == "style.safetensors"
    outside = write_lora(tmp_path / "elsewhere" / "x.safetensors")
    for sneaky in (str(outside), str(root / ".." / ".." / "elsewhere" / "x.safetensors"), "C:\\loras\\x.safetensors"):
        with pytest.raises(LoraStackError, match="outside the loras folders") as error:
            resolve(loras, sneaky)
        assert "extra_model_paths.yaml" in error.value.fix
    with pytest.raises(LoraStackError, match="does not exist"):
        resolve(loras, str(root / "missing.safetensors"))


def test_a_link_inside_the_folder_to_a_file_elsewhere_is_what_comfyui_lists(loras, tmp_path):
    target = write_lora(tmp_path / "store" / "linked.safetensors")
    (loras[0] / "linked.safetensors").symlink_to(target)
    assert resolve(loras, str(loras[0] / "linked.safetensors")).name == "linked.safetensors"
    with pytest.raises(LoraStackError, match="outside"):
        resolve(loras, str(target))      # the same bytes, but named by a path outside the folders


def test_pickles_and_other_files_are_refused(loras):
    with pytest.raises(LoraStackError, match="pickle") as error:
        resolve(loras, "old.ckpt")
    assert "convert it to .safetensors" in error.value.fix
    with pytest.raises(LoraStackError, match="No LoRA"):
        resolve(loras, "None")


# --- the cache ---------------------------------------------------------------------------------------
def test_cache_reads_each_file_once_and_rereads_a_replaced_file(loras, monkeypatch):
    reads = []
    real_loader = lora_stack.load_lora_file
    monkeypatch.setattr(lora_stack, "load_lora_file", lambda path: reads.append(path) or real_loader(path))
    cache = LoraFileCache(max_entries=2)
    path = str(loras[0] / "style.safetensors")
    first = cache.get(path)
    assert cache.get(path) is first and len(reads) == 1
    write_lora(Path(path), value=0.25)
    os.utime(path, ns=(1, 1))                      # a different mtime whatever the clock resolution
    second = cache.get(path)
    assert len(reads) == 2 and second is not first and len(cache) == 1
    assert torch.all(second.tensors["lora_unet_x.lora_down.weight"] == 0.25)


def test_cache_evicts_the_least_recently_used(loras, monkeypatch):
    reads = []
    real_loader = lora_stack.load_lora_file
    monkeypatch.setattr(lora_stack, "load_lora_file", lambda path: reads.append(Path(path).name) or real_loader(path))
    cache = LoraFileCache(max_entries=2)
    a, b = str(loras[0] / "style.safetensors"), str(loras[0] / "chars" / "hero.safetensors")
    c = str(write_lora(loras[0] / "c.safetensors"))
    for path in (a, b, a, c, a, b):
        cache.get(path)
    assert reads == ["style.safetensors", "hero.safetensors", "c.safetensors", "hero.safetensors"]
    small = LoraFileCache(max_entries=8, max_bytes=1)
    small.get(a), small.get(b)
    assert len(small) == 1                          # over the byte budget only the newest stays


def test_damaged_files_name_the_file(loras):
    broken = loras[0] / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoraStackError, match="broken.safetensors") as error:
        LoraFileCache().get(str(broken))
    assert error.value.fix


def write_raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


@pytest.mark.parametrize("entry", [{"dtype": "F32", "shape": [1], "data_offsets": [5]},
                                   {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]},
                                   {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]},
                                   {"dtype": "F32", "shape": [1], "data_offsets": [0, True]},
                                   {"dtype": "F32", "shape": [1]}, "not a tensor entry"])
def test_read_header_refuses_malformed_data_offsets(tmp_path, entry):
    header = json.dumps({"__metadata__": {}, "lora_unet_x.alpha": entry}).encode()
    path = write_raw_safetensors(tmp_path / "odd.safetensors", header, b"\0" * 4)
    with pytest.raises(LoraStackError, match="odd.safetensors is damaged") as error:
        lora_stack.read_header(str(path))
    assert "data_offsets" in error.value.problem and error.value.fix


def test_read_header_refuses_a_deeply_nested_header(tmp_path):
    header = b'{"__metadata__": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    path = write_raw_safetensors(tmp_path / "deep.safetensors", header)
    with pytest.raises(LoraStackError, match="deep.safetensors is damaged") as error:
        lora_stack.read_header(str(path))
    assert error.value.fix


def test_read_header_of_a_real_lora(loras):
    header = lora_stack.read_header(str(loras[0] / "style.safetensors"))
    assert set(header) == {"__metadata__", "lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight",
                           "lora_unet_x.alpha"}


# --- trigger words -----------------------------------------------------------------------------------
def test_trigger_words_prefer_the_stored_word_then_frequent_tags():
    assert trigger_words({"loralab_trigger_word": "sks", "ss_tag_frequency": "{}"}) == ["sks"]
    assert trigger_words({"modelspec.trigger_phrase": "ohwx man"}) == ["ohwx man"]
    frequency = {"10_hero": {"hero": 9, "red cape": 5, "sky": 1}, "2_extra": {"red cape": 6, "city": 2}}
    assert trigger_words({"ss_tag_frequency": json.dumps(frequency)}) == ["red cape", "hero", "city"]
    assert trigger_words({"ss_tag_frequency": "not json"}) == [] and trigger_words({}) == []
    assert join_words(["sks", "hero", "SKS", ""]) == "sks, hero"


# --- comparison columns ------------------------------------------------------------------------------
def test_columns_are_base_each_alone_the_stack_and_a_sweep_inside_the_stack():
    entries = [("a.safetensors", 1.0, 1.0), ("sub/b.safetensors", 0.5, 0.0), ("off.safetensors", 0.0, 0.0)]
    columns = comparison_columns(entries, sweep_index=1, sweep=[0.0, 1.0])
    assert [c.label for c in columns] == ["base", "a 1", "b 0.5/0", "stack (2)", "b @ 0", "b @ 1"]
    assert columns[0].entries == () and columns[1].entries == (entries[0],)
    assert columns[3].entries == (entries[0], entries[1])
    assert columns[5].entries[1] == ("sub/b.safetensors", 1.0, 0.0)          # clip strength stays 0
    assert [c.label for c in comparison_columns(entries[:1])] == ["base", "a 1"]   # one LoRA: no duplicate
    with pytest.raises(LoraStackError, match="sweep_index"):
        comparison_columns(entries, sweep_index=3, sweep=[1.0])


def test_sweep_strengths_parse():
    assert parse_strengths("0, 0.5,1 ; -1") == [0.0, 0.5, 1.0, -1.0]
    assert parse_strengths("  ") == []
    with pytest.raises(LoraStackError, match="not a number"):
        parse_strengths("0, half")


# --- the grid picture --------------------------------------------------------------------------------
def test_grid_places_every_cell_unscaled_under_its_labels():
    cells = [[np.full((64, 48, 3), 40 * (r * 3 + c), np.uint8) for c in range(3)] for r in range(2)]
    grid = compose_grid(cells, ["base", "a very long label that must wrap " * 3, "stack"], ["p1", "p2"])
    geometry = grid_geometry(2, 3, 48, 64)
    assert grid.shape == (geometry.height, geometry.width, 3) and grid.dtype == np.uint8
    for r in range(2):
        for c in range(3):
            x, y = geometry.cell_origin(r, c)
            assert np.array_equal(grid[y:y + 64, x:x + 48], cells[r][c])
    assert (grid[:geometry.top, geometry.left:] < 128).any(), "no column label was drawn"
    assert (grid[geometry.top:, :geometry.left - 4] < 128).any(), "no row label was drawn"
    with pytest.raises(ValueError):
        compose_grid(cells, ["only one"], ["p1", "p2"])


def test_sidecar_words_come_from_the_txt_and_civitai_info_beside_the_lora(tmp_path):
    from lora_lab.trainer.lora.trigger_words import SIDECAR_BYTES, sidecar_words
    lora = tmp_path / "hero.safetensors"
    lora.write_bytes(b"")
    assert sidecar_words(str(lora)) == []
    (tmp_path / "hero.txt").write_text("ohwx hero, red cape\n  blue sky ,\n\n", encoding="utf-8")
    (tmp_path / "hero.civitai.info").write_text(json.dumps({"trainedWords": ["hero style, cape", 3, ""]}))
    assert sidecar_words(str(lora)) == ["ohwx hero", "red cape", "blue sky", "hero style", "cape"]
    (tmp_path / "hero.civitai.info").write_text("{not json")
    assert sidecar_words(str(lora)) == ["ohwx hero", "red cape", "blue sky"]
    (tmp_path / "hero.txt").write_text("x" * (SIDECAR_BYTES + 1))          # not a trigger-word file
    assert sidecar_words(str(lora)) == []
    (tmp_path / "hero.txt").unlink()
    (tmp_path / "hero.txt").mkdir()                                        # a folder of that name
    assert sidecar_words(str(lora)) == []

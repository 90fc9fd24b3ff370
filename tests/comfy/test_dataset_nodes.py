"""The dataset nodes inside a real ComfyUI: folders under input/, registered lora_datasets roots,
refusals with their messages, IS_CHANGED, IMAGE batches and the contact sheet in temp/."""
from __future__ import annotations

import importlib
import os
import shutil
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FOLDER_NODE, IMAGES_NODE, PREVIEW_NODE = "LoraLabDatasetFromFolder", "LoraLabDatasetFromImages", "LoraLabDatasetPreview"


@pytest.fixture
def nodes(pack):
    return importlib.import_module(pack.__name__ + ".dataset")


@pytest.fixture
def errors(pack):
    return importlib.import_module(pack.__name__ + ".messages")


@pytest.fixture
def folder_paths(comfy):
    import folder_paths
    return folder_paths


@pytest.fixture
def dataset_dir(folder_paths):
    """A fresh folder under ComfyUI's input directory; yields (name typed in the node, path)."""
    name = f"set_{uuid.uuid4().hex[:8]}"
    path = Path(folder_paths.get_input_directory()) / name
    path.mkdir()
    yield name, path
    shutil.rmtree(path, ignore_errors=True)


def picture(path: Path, size=(64, 48), color=(255, 0, 255)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def run_folder_node(pack, folder, caption_extension=".txt", default_repeats=1, batch_size=1, target_steps=0):
    node = pack.NODE_CLASS_MAPPINGS[FOLDER_NODE]()
    with torch.inference_mode():     # how ComfyUI runs every node
        return node.load(folder, caption_extension, default_repeats, batch_size, target_steps)


def test_nodes_are_registered_with_their_fixed_ids(pack):
    for node_id in (FOLDER_NODE, IMAGES_NODE, PREVIEW_NODE):
        cls = pack.NODE_CLASS_MAPPINGS[node_id]
        assert cls.CATEGORY == "LoRA Lab/Dataset"
        assert callable(getattr(cls(), cls.FUNCTION))
        assert "LoRA Lab" in pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
    assert pack.NODE_CLASS_MAPPINGS[FOLDER_NODE].RETURN_TYPES == ("LORALAB_DATASET", "STRING")
    assert pack.NODE_CLASS_MAPPINGS[IMAGES_NODE].RETURN_TYPES == ("LORALAB_DATASET",)
    assert pack.NODE_CLASS_MAPPINGS[PREVIEW_NODE].RETURN_TYPES == ("IMAGE",)
    assert pack.NODE_CLASS_MAPPINGS[PREVIEW_NODE].OUTPUT_NODE is True
    assert "lora_datasets" in pack.NODE_CLASS_MAPPINGS[FOLDER_NODE].INPUT_TYPES()["required"]["folder"][1]["tooltip"]


# --- Dataset from Folder ------------------------------------------------------------------------------
def test_folder_is_a_list_of_the_folders_there_are_and_old_names_still_validate(pack, dataset_dir):
    """A list to pick from, not a text box: input subfolders and theirs, without kohya's repeat folders,
    hidden ones or ComfyUI's clipspace; a saved name that is not on the list gets the node's own message."""
    name, path = dataset_dir
    for sub in ("10_sks", ".hidden", "projects/mychar", "projects/mychar/5_more"):
        (path / sub).mkdir(parents=True)
    node = pack.NODE_CLASS_MAPPINGS[FOLDER_NODE]
    choices = node.INPUT_TYPES()["required"]["folder"][0]
    assert {name, f"{name}/projects"} <= set(choices), choices
    assert not {f"{name}/10_sks", f"{name}/.hidden", f"{name}/projects/mychar", "clipspace"} & set(choices)
    # A name typed before `folder` was a list (or picked on another machine) is checked by the node itself:
    assert node.VALIDATE_INPUTS(folder=f"{name}/projects/mychar") is True
    message = node.VALIDATE_INPUTS(folder="not_here_at_all")
    assert "Dataset from Folder › folder" in message and "Fix:" in message and name in message


def test_folder_node_agrees_with_train_lora_on_steps(pack):
    """Its report is kohya's estimate: it names the SD1.5 range Train LoRA names and points at Train LoRA's
    exact count (batches per aspect-ratio bucket, gradient accumulation)."""
    folder_inputs = pack.NODE_CLASS_MAPPINGS[FOLDER_NODE].INPUT_TYPES()["required"]
    train_inputs = pack.NODE_CLASS_MAPPINGS["LoraLabTrainLora"].INPUT_TYPES()["required"]
    assert "1500-3000" in train_inputs["steps"][1]["tooltip"]
    assert "1500-3000" in folder_inputs["target_steps"][1]["tooltip"]
    assert folder_inputs["target_steps"][1]["default"] == 2000        # inside that range, as users.md aims
    assert "Train LoRA's report has the exact count" in folder_inputs["batch_size"][1]["tooltip"]


def test_folder_node_reads_a_kohya_folder_and_reports_the_arithmetic(pack, dataset_dir):
    name, path = dataset_dir
    for index in range(30):
        picture(path / "10_me" / f"{index:02}.png")
    (path / "10_me" / "00.txt").write_text("sks person, smiling", encoding="utf-8")
    (path / "notes.md").write_text("todo")

    output = run_folder_node(pack, f" {name}/ ", default_repeats=1, batch_size=1, target_steps=3000)
    dataset, report = output["result"]
    assert output["ui"] == {"text": [report]}
    assert dataset.num_images == 30 and dataset.total_repeats == 300
    assert dataset.items[0].caption == "sks person, smiling"
    assert f"30 picture(s) in '{name}/': 1 captioned, 29 without a caption." in report
    assert "10_me: 30 x 10 repeats = 300" in report
    assert "batch size = 300 / 1 = 300; Train LoRA's report has the exact count" in report
    assert "For 3000 steps: 10 epochs = 3000 steps." in report
    assert "notes.md: not a picture" in report
    assert os.path.dirname(dataset.items[0].path) == str((path / "10_me").resolve())


@pytest.mark.parametrize("folder, problem", [
    ("", "No folder given"),
    ("/etc", "path outside ComfyUI's folders"),
    ("C:\\Users\\me\\pictures", "path outside ComfyUI's folders"),
    ("~/pictures", "path outside ComfyUI's folders"),
    ("..", "uses '..'"),
    ("mine/../../models", "uses '..'"),
    ("mi\x00ne", "NUL character"),
    (".", "names the whole input folder"),
])
def test_folder_names_that_could_leave_the_input_folder_are_refused(pack, errors, folder, problem):
    cls = pack.NODE_CLASS_MAPPINGS[FOLDER_NODE]
    with pytest.raises(errors.LoraLabError) as caught:
        run_folder_node(pack, folder)
    message = str(caught.value)
    assert message.startswith("[LoRA Lab · Dataset from Folder › folder]") and problem in message
    assert "Fix:" in message
    assert cls.VALIDATE_INPUTS(folder=folder) == message


def test_refusal_says_how_to_allow_a_folder_elsewhere(pack, errors, folder_paths):
    with pytest.raises(errors.LoraLabError) as caught:
        run_folder_node(pack, "/data/my pictures")
    fix = str(caught.value).split("Fix:", 1)[1]
    assert folder_paths.get_input_directory() in fix
    assert "extra_model_paths.yaml" in fix and "lora_datasets: /data/my pictures" in fix


def test_a_link_out_of_the_input_folder_is_refused(pack, errors, folder_paths, tmp_path):
    picture(tmp_path / "elsewhere" / "a.png")
    link = Path(folder_paths.get_input_directory()) / f"link_{uuid.uuid4().hex[:8]}"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    try:
        with pytest.raises(errors.LoraLabError, match="symbolic link leading outside ComfyUI's input folder") as caught:
            run_folder_node(pack, link.name)
        assert "lora_datasets" in str(caught.value).split("Fix:", 1)[1]
        assert isinstance(pack.NODE_CLASS_MAPPINGS[FOLDER_NODE].VALIDATE_INPUTS(folder=link.name), str)
    finally:
        link.unlink()


def test_files_linking_out_of_the_dataset_are_skipped(pack, dataset_dir, tmp_path):
    name, path = dataset_dir
    picture(path / "a.png")
    (path / "b.png").symlink_to(picture(tmp_path / "private.png"))
    dataset, report = run_folder_node(pack, name)["result"]
    assert [item.key for item in dataset.items] == ["a.png"]
    assert "b.png: symbolic link leading outside the dataset folder" in report


def test_missing_folder_lists_what_is_there(pack, errors, dataset_dir):
    name, _ = dataset_dir
    with pytest.raises(errors.LoraLabError, match=f"There is no folder 'nope' in ComfyUI's input folder.*{name}"):
        run_folder_node(pack, "nope")


def test_empty_and_broken_folders_are_clear_errors(pack, errors, dataset_dir):
    name, path = dataset_dir
    with pytest.raises(errors.LoraLabError, match=r"› folder\] No pictures in .*Fix: Put your training pictures"):
        run_folder_node(pack, name)
    (path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (path / "empty.jpg").write_bytes(b"")
    with pytest.raises(errors.LoraLabError) as caught:
        run_folder_node(pack, name)
    assert "None of the 2 picture(s)" in str(caught.value) and "empty.jpg: empty file" in str(caught.value)


def test_caption_extension_is_validated_and_used(pack, errors, dataset_dir):
    name, path = dataset_dir
    picture(path / "a.png")
    (path / "a.caption").write_text("from .caption")
    cls = pack.NODE_CLASS_MAPPINGS[FOLDER_NODE]
    assert cls.VALIDATE_INPUTS(folder=name) is True
    assert cls.VALIDATE_INPUTS(folder=None) is True      # a linked input: checked when the node runs
    with pytest.raises(errors.LoraLabError) as caught:
        run_folder_node(pack, name, caption_extension="../x")
    message = str(caught.value)
    assert message.startswith("[LoRA Lab · Dataset from Folder › caption_extension]") and ".txt or .caption" in message
    assert run_folder_node(pack, name, caption_extension="caption")["result"][0].items[0].caption == "from .caption"


def test_is_changed_follows_files_and_captions(pack, dataset_dir):
    name, path = dataset_dir
    cls = pack.NODE_CLASS_MAPPINGS[FOLDER_NODE]
    picture(path / "a.png")
    first = cls.IS_CHANGED(folder=name, caption_extension=".txt", default_repeats=1, batch_size=1, target_steps=0)
    assert cls.IS_CHANGED(folder=name, caption_extension=".txt") == first
    (path / "a.txt").write_text("new caption")
    captioned = cls.IS_CHANGED(folder=name, caption_extension=".txt")
    assert captioned != first
    picture(path / "b.png")
    assert cls.IS_CHANGED(folder=name, caption_extension=".txt") not in (first, captioned)
    assert "no folder" in cls.IS_CHANGED(folder="does-not-exist", caption_extension=".txt")


@pytest.fixture
def registered_roots(folder_paths, tmp_path):
    """Register two lora_datasets roots the way extra_model_paths.yaml does, and undo it afterwards."""
    roots = [tmp_path / "datasets_a", tmp_path / "datasets_b"]
    for root in roots:
        root.mkdir()
    previous = folder_paths.folder_names_and_paths.get("lora_datasets")
    folder_paths.folder_names_and_paths.pop("lora_datasets", None)
    yaml_path = tmp_path / "extra_model_paths.yaml"
    yaml_path.write_text(f"lora_lab:\n    base_path: {tmp_path}\n"
                         "    lora_datasets: |\n        datasets_a\n        datasets_b\n")
    try:
        from utils.extra_config import load_extra_path_config      # ComfyUI >= 2024-08
        load_extra_path_config(str(yaml_path))
    except ImportError:     # 2024-03 keeps the loader in main.py; it calls exactly this per line
        for root in roots:
            folder_paths.add_model_folder_path("lora_datasets", str(root))
    assert [os.path.realpath(p) for p in folder_paths.get_folder_paths("lora_datasets")] == [str(r) for r in roots]
    yield roots
    folder_paths.folder_names_and_paths.pop("lora_datasets", None)
    if previous is not None:
        folder_paths.folder_names_and_paths["lora_datasets"] = previous


def test_registered_lora_datasets_roots(pack, errors, registered_roots):
    first, second = registered_roots
    picture(first / "cats" / "c.png")
    picture(second / "dogs" / "5_dog" / "d.png")
    picture(second / "top.png")
    dogs, _ = run_folder_node(pack, "lora_datasets/dogs")["result"]
    assert dogs.items[0].key == "5_dog/d.png" and dogs.total_repeats == 5
    assert run_folder_node(pack, "lora_datasets\\cats")["result"][0].items[0].key == "c.png"
    assert run_folder_node(pack, "lora_datasets/")["result"][0].root == str(first)    # the first root itself
    cls = pack.NODE_CLASS_MAPPINGS[FOLDER_NODE]
    assert cls.VALIDATE_INPUTS(folder="lora_datasets/dogs") is True
    with pytest.raises(errors.LoraLabError, match="uses '..'"):
        run_folder_node(pack, "lora_datasets/../datasets_b")
    with pytest.raises(errors.LoraLabError, match=r"no folder 'lora_datasets/birds' in the lora_datasets folders"):
        run_folder_node(pack, "lora_datasets/birds")


def test_absolute_path_of_a_lora_datasets_root_works_but_not_of_the_input_folder(pack, errors, folder_paths,
                                                                                 registered_roots):
    first, second = registered_roots
    picture(second / "top.png")
    dataset, _ = run_folder_node(pack, str(second))["result"]      # like typing `lora_datasets` for a root
    assert dataset.root == str(second) and [item.key for item in dataset.items] == ["top.png"]
    assert pack.NODE_CLASS_MAPPINGS[FOLDER_NODE].VALIDATE_INPUTS(folder=str(second)) is True
    with pytest.raises(errors.LoraLabError, match="names the whole input folder") as caught:
        run_folder_node(pack, folder_paths.get_input_directory())
    assert "subfolder of the input folder" in str(caught.value).split("Fix:", 1)[1]


# --- Dataset from Images --------------------------------------------------------------------------------
def run_images_node(pack, images, captions, repeats=1):
    node = pack.NODE_CLASS_MAPPINGS[IMAGES_NODE]()
    with torch.inference_mode():
        return node.build(images, captions, repeats)


def test_images_node_one_caption_per_line_or_one_for_all(pack):
    with torch.inference_mode():
        batch = torch.rand(3, 16, 24, 3)
    (dataset,) = run_images_node(pack, batch, "a red fox\n\nthe third one\n", repeats=5)
    assert [(item.caption, item.has_caption) for item in dataset.items] == [
        ("a red fox", True), ("", False), ("the third one", True)]
    assert dataset.total_repeats == 15 and not dataset.pixels.is_inference()
    assert torch.equal(dataset.pixels, batch)
    (same,) = run_images_node(pack, batch, "  sks style  ")
    assert {item.caption for item in same.items} == {"sks style"}
    (none,) = run_images_node(pack, batch, "")
    assert not any(item.has_caption for item in none.items)


def test_images_node_caption_count_mismatch_names_the_input(pack, errors):
    with pytest.raises(errors.LoraLabError) as caught:
        run_images_node(pack, torch.rand(3, 8, 8, 3), "one\ntwo")
    message = str(caught.value)
    assert message.startswith("[LoRA Lab · Dataset from Images › captions] 2 caption lines for 3 pictures.")
    assert "Fix: Write exactly 3 lines" in message
    with pytest.raises(errors.LoraLabError, match="› images"):
        run_images_node(pack, torch.rand(8, 8, 3), "")


# --- Dataset Preview ------------------------------------------------------------------------------------
def run_preview(pack, dataset, resolution=0, thumbnail_size=96, max_images=64):
    node = pack.NODE_CLASS_MAPPINGS[PREVIEW_NODE]()
    with torch.inference_mode():
        return node.preview(dataset, resolution, thumbnail_size, max_images)


def colour_count(image: torch.Tensor, rgb) -> int:
    pixels = (image[0].numpy() * 255).round().astype(int)
    return int(np.all(pixels == np.array(rgb), axis=-1).sum())


def test_preview_shows_thumbnails_and_saves_into_temp(pack, nodes, dataset_dir, folder_paths):
    name, path = dataset_dir
    picture(path / "a.png", size=(200, 100), color=(255, 0, 255))
    picture(path / "b.png", size=(100, 200), color=(0, 255, 0))
    (path / "a.txt").write_text("a magenta banner " * 8)
    (path / "b.txt").write_text("green")
    dataset, _ = run_folder_node(pack, name)["result"]

    output = run_preview(pack, dataset, thumbnail_size=96)
    (sheet,) = output["result"]
    assert sheet.dim() == 4 and sheet.shape[0] == 1 and sheet.shape[-1] == 3 and sheet.dtype == torch.float32
    assert 0 <= sheet.min() and sheet.max() <= 1
    assert colour_count(sheet, (255, 0, 255)) >= 96 * 48 * 0.9      # a.png at thumbnail size
    assert colour_count(sheet, (0, 255, 0)) >= 48 * 96 * 0.9
    assert colour_count(sheet, nodes.ATTENTION) == 0                  # no bucket outlines, nothing uncaptioned
    (shown,) = output["ui"]["images"]
    assert shown["type"] == "temp"
    saved = Path(folder_paths.get_temp_directory()) / shown["subfolder"] / shown["filename"]
    with Image.open(saved) as png:
        assert png.size == (sheet.shape[2], sheet.shape[1])
        assert np.array_equal(np.asarray(png.convert("RGB")), (sheet[0].numpy() * 255).round().astype(np.uint8))


def test_preview_with_resolution_adds_buckets_and_crop_outlines(pack, nodes, dataset_dir):
    name, path = dataset_dir
    picture(path / "wide.png", size=(400, 100))
    (path / "wide.txt").write_text("wide")
    dataset, _ = run_folder_node(pack, name)["result"]
    plain = run_preview(pack, dataset)["result"][0]
    bucketed = run_preview(pack, dataset, resolution=512)["result"][0]
    assert bucketed.shape[1] > plain.shape[1]                         # one more text line per cell
    assert colour_count(bucketed, nodes.ATTENTION) > 20                 # the centre-crop outline


def test_preview_caps_the_count_and_survives_a_vanished_file(pack, nodes, dataset_dir):
    name, path = dataset_dir
    for index in range(5):
        picture(path / f"{index}.png")
    dataset, _ = run_folder_node(pack, name)["result"]
    few = run_preview(pack, dataset, max_images=2)["result"][0]
    many = run_preview(pack, dataset, max_images=5)["result"][0]
    assert few.shape[1] * few.shape[2] < many.shape[1] * many.shape[2]
    (path / "0.png").unlink()
    sheet = run_preview(pack, dataset)["result"][0]
    assert colour_count(sheet, (255, 0, 255)) >= 4 * 64 * 48 * 0.9 - 1  # the other four still drawn


def test_preview_of_an_image_batch_and_bad_inputs(pack, nodes, errors):
    batch = torch.zeros(2, 32, 32, 3)
    batch[..., 1] = 1.0
    (dataset,) = run_images_node(pack, batch, "green squares")
    sheet = run_preview(pack, dataset, resolution=64)["result"][0]
    assert colour_count(sheet, (0, 255, 0)) == 2 * 30 * 30     # small pictures are not blown up; outline inside
    assert colour_count(sheet, nodes.ATTENTION) >= 2 * 4 * 31
    with pytest.raises(errors.LoraLabError, match=r"Dataset Preview › dataset\] Expected a LoRA Lab dataset"):
        run_preview(pack, "not a dataset")


# --- through a real server: prompt validation, execution, ui messages, /history --------------------------
@pytest.mark.server
def test_folder_to_preview_through_the_server(server):
    from comfyui_server import ComfyExecutionError
    name = f"served_{uuid.uuid4().hex[:8]}"
    for index in range(3):
        picture(server.overlay / "input" / name / "4_fox" / f"{index}.png", size=(96, 64))
    (server.overlay / "input" / name / "4_fox" / "0.txt").write_text("a fox")
    prompt = {
        "1": {"class_type": FOLDER_NODE, "inputs": {"folder": name, "caption_extension": ".txt", "default_repeats": 1,
                                                    "batch_size": 2, "target_steps": 60}},
        "2": {"class_type": PREVIEW_NODE, "inputs": {"dataset": ["1", 0], "resolution": 512, "thumbnail_size": 64,
                                                     "max_images": 8}},
    }
    outputs = server.run(prompt, timeout=300)["outputs"]
    report = outputs["1"]["text"][0]
    assert "4_fox: 3 x 4 repeats = 12" in report and "= 12 / 2 = 6; Train LoRA's report" in report
    assert "10 epochs = 60 steps" in report
    (shown,) = outputs["2"]["images"]
    query = urllib.parse.urlencode(shown)      # what the front end asks for to draw it on the node
    with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as answer:
        assert answer.read(8) == b"\x89PNG\r\n\x1a\n"

    prompt["1"]["inputs"]["folder"] = "/etc"
    with pytest.raises(ComfyExecutionError) as rejected:
        server.run(prompt, timeout=60)
    (error,) = rejected.value.details["node_errors"]["1"]["errors"]     # one message, on the folder input
    assert error["type"] == "custom_validation_failed" and error["extra_info"]["input_name"] == "folder"
    assert "[LoRA Lab · Dataset from Folder › folder] '/etc' is a path outside" in error["details"]
    assert "lora_datasets" in error["details"].split("Fix:", 1)[1]

"""Compare Epochs in a real in-process ComfyUI: a run trained here with a save every epoch (and a held-out
picture, so the saves carry validation losses) is rendered as rows = epochs, columns = prompts x strengths.
Grids compared pixel for pixel are rendered on one arithmetic path (tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch

import random_models
from training import SIZE, options, run_train

pytestmark = pytest.mark.usefixtures("leave_models_unpatched")     # (tests/conftest.py)
RUN = "epochs_run"


@pytest.fixture(scope="module")
def base_model(comfy):
    return random_models.sd15_model_patcher(model_channels=32, seed=5)


@pytest.fixture(scope="module")
def trained_run(pack, base_model, sd15_clip, small_vae, loras_dir):
    """3 pictures, 1 held out: 2 steps per epoch; 3 epochs -> <RUN>_epoch1, <RUN>_epoch2 and <RUN> (epoch 3)."""
    from lora_lab.trainer.data.dataset import dataset_from_pixels
    from training import pattern_pixels
    with torch.inference_mode():
        dataset = dataset_from_pixels(pattern_pixels(3), ["sks, red", "sks, blue", "sks, green"], 2)
    result = run_train(base_model, sd15_clip, small_vae, dataset, RUN, steps=1, epochs=3, learning_rate=5e-3,
                       options=options(save_every_n_epochs=1, validation_pictures=1, save_precision="fp32"))
    assert result["result"][2] == f"{RUN}.safetensors"
    return result["ui"]["validation_loss"]


def run_grid(base_model, sd15_clip, small_vae, name=f"{RUN}.safetensors", prompts="{trigger}, a cat",
             strengths="0.5, 1", **extra):
    from lora_lab.nodes.epoch_grid import LoraLabEpochGrid
    args = dict(model=base_model, clip=sd15_clip, vae=small_vae, lora_name=name, prompts=prompts, strengths=strengths,
                seed=7, steps=1, cfg=3.0, sampler_name="euler", scheduler="normal", width=SIZE, height=SIZE)
    args.update(extra)
    with torch.inference_mode():
        return LoraLabEpochGrid().compare(**args)


def cell(grid, geometry, row, column):
    x, y = geometry.cell_origin(row, column)
    return grid[0, y:y + SIZE, x:x + SIZE]


def test_rows_are_the_epochs_found_labelled_with_their_validation_loss(trained_run, base_model, sd15_clip, small_vae,
                                                                        one_arithmetic_path):
    import comfy.utils
    import nodes as comfy_nodes
    from lora_lab.trainer.image_grid import grid_geometry
    progress = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *rest, **kw: progress.append((value, total)))
    try:
        output = run_grid(base_model, sd15_clip, small_vae)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    (grid,) = output["result"]
    geometry = grid_geometry(3, 2, SIZE, SIZE)          # epochs 1, 2, final x strengths 0.5, 1
    assert grid.shape == (1, geometry.height, geometry.width, 3) and grid.dtype == torch.float32
    assert progress[-1] == (6, 6), progress             # 3 rows x 2 columns x 1 step

    # the labels: each row's epoch and the validation loss its save recorded; the lowest is marked
    losses = {epoch: loss for epoch, loss, _ in trained_run}
    lowest = min(losses, key=losses.get)
    expected = [f"{RUN}_epoch1.safetensors: epoch 1 · val loss {losses[1]:.4g}",
                f"{RUN}_epoch2.safetensors: epoch 2 · val loss {losses[2]:.4g}",
                f"{RUN}.safetensors: final, epoch 3 · val loss {losses[3]:.4g}"]
    expected[lowest - 1] += " · lowest"
    assert output["ui"]["text"][0].splitlines() == expected

    # one cell is exactly what LoraLoader + KSampler + VAEDecode make from that epoch's file and the seed
    with torch.inference_mode():
        model, clip = comfy_nodes.LoraLoader().load_lora(base_model, sd15_clip, f"{RUN}_epoch2.safetensors", 1.0, 1.0)
        positive = comfy_nodes.CLIPTextEncode().encode(clip, "sks, a cat")[0]     # {trigger}: the stored word
        negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = comfy_nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
        samples = comfy_nodes.common_ksampler(model, 7, 1, 3.0, "euler", "normal", positive, negative, latent)[0]
        native = comfy_nodes.VAEDecode().decode(small_vae, samples)[0][0]
    native = (native.clamp(0, 1) * 255).round() / 255
    assert torch.equal(cell(grid, geometry, 1, 1), native)

    rows = [cell(grid, geometry, row, 1) for row in range(3)]
    assert not torch.equal(rows[0], rows[2]), "the first and the last epoch look the same"
    assert not torch.equal(cell(grid, geometry, 1, 0), rows[1]), "the strengths make no difference"

    # any of the run's files names the run
    same = run_grid(base_model, sd15_clip, small_vae, name=f"{RUN}_epoch2.safetensors")
    assert torch.equal(same["result"][0], grid)
    overridden = run_grid(base_model, sd15_clip, small_vae, name="None", lora_name_override=RUN)
    assert torch.equal(overridden["result"][0], grid)


def test_rendering_stops_between_cells_on_cancel(trained_run, base_model, sd15_clip, small_vae):
    import comfy.model_management
    import comfy.utils
    seen = []

    def hook(value, total, *rest, **kw):
        seen.append(value)
        if value >= 1:
            comfy.model_management.interrupt_current_processing(True)   # Cancel after the first cell
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_grid(base_model, sd15_clip, small_vae)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert max(seen) == 1, f"rendering went on after Cancel: {seen}"


def failure(*args, **kwargs) -> str:
    with pytest.raises(ValueError) as error:
        run_grid(*args, **kwargs)
    return str(error.value)


def test_clear_messages_when_there_is_nothing_to_compare(trained_run, base_model, sd15_clip, small_vae, make_dataset,
                                                        loras_dir):
    from lora_lab.nodes.epoch_grid import LoraLabEpochGrid
    models = (base_model, sd15_clip, small_vae)
    run_train(base_model, sd15_clip, small_vae, make_dataset(2), "no_epoch_saves", steps=1)
    message = failure(*models, name="no_epoch_saves.safetensors")
    assert "Compare Epochs › lora_name" in message and "has no epoch saves" in message
    assert "save_every_n_epochs on the Saves & Resume node" in message

    message = failure(*models, name="None", lora_name_override="ghost_run")
    assert "Compare Epochs › lora_name_override" in message and "no LoRA 'ghost_run'" in message
    assert "Compare Epochs › lora_name] no LoRA is chosen" in failure(*models, name="None")

    broken = loras_dir / f"{RUN}_epoch9.safetensors"          # a save that cannot be read stops it before rendering
    broken.write_bytes(b"not a safetensors file")
    try:
        message = failure(*models)
    finally:
        broken.unlink()
    assert f"{RUN}_epoch9.safetensors" in message and "Compare Epochs › lora_name" in message

    validate = LoraLabEpochGrid.VALIDATE_INPUTS
    assert "Compare Epochs › strengths" in validate(prompts="a cat", strengths="0.8, lots")
    assert "Compare Epochs › strengths" in validate(prompts="a cat", strengths="1, 1, 1, 1, 1")
    assert "Compare Epochs › prompts" in validate(prompts=" \n ", strengths="1")
    assert validate(prompts="a cat", strengths="0.8, 1.0") is True


def test_saves_another_run_left_under_the_name_are_left_out(trained_run, base_model, sd15_clip, small_vae, loras_dir):
    """Trained again under the same name with overwrite, a run with fewer epochs leaves the older run's later
    epoch saves behind: they are not this run's, so they are not shown."""
    from safetensors.torch import load_file, save_file
    from lora_lab.trainer.lora.files import load_lora_file
    stale = loras_dir / f"{RUN}_epoch5.safetensors"
    metadata = dict(load_lora_file(loras_dir / f"{RUN}_epoch2.safetensors")[1], loralab_unfinished_run="another run")
    save_file(load_file(str(loras_dir / f"{RUN}_epoch2.safetensors")), str(stale), metadata=metadata)
    try:
        output = run_grid(base_model, sd15_clip, small_vae, strengths="1")
    finally:
        stale.unlink()
    lines = output["ui"]["text"][0].splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == [f"{RUN}_epoch1.safetensors", f"{RUN}_epoch2.safetensors",
                                                          f"{RUN}.safetensors"]
    assert lines[3] == f"note: left out {RUN}_epoch5.safetensors: it is a save of another run than {RUN}.safetensors"


def test_the_node_is_registered_under_lora_lab(pack):
    assert pack.NODE_CLASS_MAPPINGS["LoraLabEpochGrid"].CATEGORY == "LoRA Lab/Train"
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["LoraLabEpochGrid"] == "Compare Epochs (LoRA Lab)"
    inputs = pack.NODE_CLASS_MAPPINGS["LoraLabEpochGrid"].INPUT_TYPES()
    assert inputs["required"]["strengths"][1]["default"] == "0.8, 1.0"
    assert inputs["optional"]["lora_name_override"][1]["forceInput"] is True

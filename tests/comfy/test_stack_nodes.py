"""LoRA pedals, Apply LoRA Stack and the comparison grid in a real ComfyUI, with kohya-format LoRA files
written here for small random-weight SD1.5-architecture models (and for the full-shape checkpoint the
server tests load)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import demo_data
import random_models
from lora_files import kohya_tensors, unet_shapes, clip_shapes, write_lora, native_chain, denoised, encoded, full_size_lora

SIZE = 64


# --- kohya LoRA files written by the tests ----------------------------------------------------------


@pytest.fixture(scope="module")
def lora_files(loras_dir, tiny_unet, sd15_clip):
    """style: UNet + CLIP, stored trigger word; chars/hero: UNet + CLIP, kohya tag frequency only;
    detail: UNet only, no metadata."""
    frequency = {"10_hero": {"hero": 12, "red cape": 7, "city": 2, "night": 1}}
    files = {
        "style": write_lora(loras_dir, "stack_style.safetensors",
                            kohya_tensors({**unet_shapes(tiny_unet), **clip_shapes(sd15_clip)}, seed=11),
                            {"loralab_trigger_word": "stylex", "ss_output_name": "stack_style"}),
        "hero": write_lora(loras_dir, "chars/stack_hero.safetensors",
                           kohya_tensors({**unet_shapes(tiny_unet, every=2), **clip_shapes(sd15_clip, (3,))}, seed=12),
                           {"ss_tag_frequency": json.dumps(frequency)}),
        "detail": write_lora(loras_dir, "stack_detail.safetensors", kohya_tensors(unet_shapes(tiny_unet, 3), seed=13)),
    }
    names = {key: os.path.relpath(path, loras_dir) for key, path in files.items()}
    return names


pytestmark = pytest.mark.usefixtures("leave_models_unpatched")     # (tests/conftest.py)


@pytest.fixture
def stack_nodes(pack):
    from lora_lab.nodes import pedals
    pedals.LORA_FILES.clear()
    return pedals


def pedal(stack_nodes, name, strength_model=1.0, strength_clip=1.0, enabled=True, incoming=None, override=None):
    node = stack_nodes.LoraLabLoraStack()
    kwargs = {} if override is None else {"lora_name_override": override}
    with torch.inference_mode():
        return node.stack(name, strength_model, strength_clip, enabled, lora_stack=incoming, **kwargs)[0]


def apply(stack_nodes, model, clip, stack, ui=None):
    with torch.inference_mode():
        output = stack_nodes.LoraLabApplyLoraStack().apply(model, stack, clip)
    if ui is not None:
        ui.extend(output["ui"]["text"])
    return output["result"]


# --- registration -------------------------------------------------------------------------------------
def test_nodes_are_registered_with_their_fixed_ids(pack, lora_files):
    for node_id in ("LoraLabLoraStack", "LoraLabApplyLoraStack", "LoraLabLoraCompareGrid"):
        cls = pack.NODE_CLASS_MAPPINGS[node_id]
        assert cls.CATEGORY == "LoRA Lab/Stack" and node_id in pack.NODE_DISPLAY_NAME_MAPPINGS
    spec = pack.NODE_CLASS_MAPPINGS["LoraLabLoraStack"].INPUT_TYPES()
    choices = spec["required"]["lora_name"][0]
    assert choices[0] == "None" and set(lora_files.values()) <= set(choices)
    assert spec["required"]["strength_model"][1]["min"] == -10 and spec["required"]["strength_model"][1]["step"] == 0.05
    assert spec["optional"]["lora_name_override"][0] == "STRING"
    assert pack.NODE_CLASS_MAPPINGS["LoraLabLoraStack"].RETURN_TYPES == ("LORA_STACK",)


# --- pedals -------------------------------------------------------------------------------------------
def test_pedals_chain_with_incoming_entries_first(stack_nodes, lora_files):
    first = pedal(stack_nodes, lora_files["style"], 1.0, 0.5)
    second = pedal(stack_nodes, lora_files["hero"], -0.75, 2.0, incoming=first)
    assert second == [(lora_files["style"], 1.0, 0.5), (lora_files["hero"], -0.75, 2.0)]
    assert all(type(entry) is tuple for entry in second) and type(second) is list
    assert first == [(lora_files["style"], 1.0, 0.5)], "the incoming stack must not be modified"


def test_disabled_zero_and_none_pedals_pass_the_stack_through(stack_nodes, lora_files):
    incoming = [(lora_files["style"], 1.0, 1.0)]
    assert pedal(stack_nodes, lora_files["hero"], enabled=False, incoming=incoming) is incoming
    assert pedal(stack_nodes, lora_files["hero"], 0.0, 0.0, incoming=incoming) is incoming
    assert pedal(stack_nodes, "None", incoming=incoming) is incoming
    assert pedal(stack_nodes, lora_files["hero"], enabled=False) == []
    # only one strength zero is still a change (clip-only or model-only)
    assert len(pedal(stack_nodes, lora_files["hero"], 0.0, 1.0, incoming=incoming)) == 2


def test_the_override_wins_and_names_come_out_as_comfyui_lists_them(stack_nodes, lora_files, loras_dir):
    hero = lora_files["hero"]
    assert pedal(stack_nodes, lora_files["style"], override=hero) == [(hero, 1.0, 1.0)]
    assert pedal(stack_nodes, "None", override=hero.replace("/", "\\")) == [(hero, 1.0, 1.0)]
    assert pedal(stack_nodes, "None", override=hero[:-len(".safetensors")]) == [(hero, 1.0, 1.0)]
    assert pedal(stack_nodes, "None", override=str(loras_dir / hero)) == [(hero, 1.0, 1.0)]
    assert pedal(stack_nodes, lora_files["style"], override="") == [(lora_files["style"], 1.0, 1.0)]


def test_validation_rejects_out_of_range_strengths_and_missing_files(stack_nodes, lora_files, loras_dir):
    validate = stack_nodes.LoraLabLoraStack.VALIDATE_INPUTS
    assert validate(strength_model=1.0, strength_clip=-10.0, lora_name=lora_files["style"], enabled=True) is True
    message = validate(strength_model=10.5, strength_clip=1.0, lora_name=lora_files["style"], enabled=True)
    assert isinstance(message, str) and "strength_model" in message and "Fix:" in message
    assert "strength_clip" in validate(strength_model=0.0, strength_clip=-11.0, lora_name="None", enabled=True)
    missing = validate(strength_model=1.0, strength_clip=1.0, lora_name="gone/away.safetensors", enabled=True)
    assert "gone/away.safetensors" in missing and str(loras_dir) in missing and "Fix:" in missing
    # a disabled pedal, a connected override (None at validation time) or "None" never block the prompt
    assert validate(1.0, 1.0, "gone/away.safetensors", False) is True
    assert validate(1.0, 1.0, "gone/away.safetensors", True, None) is True
    assert validate(1.0, 1.0, "None", True) is True
    assert validate(1.0, 1.0, lora_files["hero"].replace("/", "\\"), True) is True


# --- applying: the same as chaining LoraLoader nodes ----------------------------------------------------
def test_apply_equals_chained_native_lora_loaders(stack_nodes, lora_files, tiny_unet, sd15_clip, caplog):
    stack = [(lora_files["style"], 0.8, 0.6), (lora_files["hero"], -0.5, 1.25), (lora_files["detail"], 1.5, 0.0)]
    report = []
    with caplog.at_level(logging.WARNING):
        model, clip, words = apply(stack_nodes, tiny_unet, sd15_clip, stack, ui=report)
    assert "not loaded" not in caplog.text.lower()
    native_model, native_clip = native_chain(tiny_unet, sd15_clip, stack)

    ours, theirs, base = denoised(model), denoised(native_model), denoised(tiny_unet)
    assert not torch.allclose(ours, base, atol=1e-4), "the stack changes nothing"
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()
    ours_text, theirs_text, base_text = encoded(clip), encoded(native_clip), encoded(sd15_clip)
    assert not torch.allclose(ours_text, base_text, atol=1e-4), "the stack does not change the text encoder"
    assert torch.allclose(ours_text, theirs_text, atol=1e-5, rtol=1e-5), (ours_text - theirs_text).abs().max()
    assert words == "stylex, hero, red cape, city"
    assert report == [f"{lora_files['style']}  0.8/0.6\n{lora_files['hero']}  -0.5/1.25\n"
                      f"{lora_files['detail']}  1.5/0\ntrigger words: stylex, hero, red cape, city"]
    assert model is not tiny_unet and clip is not sd15_clip


def test_model_only_equals_lora_loader_model_only(stack_nodes, lora_files, tiny_unet):
    stack = [(lora_files["style"], 0.7, 1.0), (lora_files["detail"], -1.0, 0.0)]
    model, clip, _ = apply(stack_nodes, tiny_unet, None, stack)
    native_model, _ = native_chain(tiny_unet, None, stack)
    assert clip is None
    assert torch.allclose(denoised(model), denoised(native_model), atol=1e-5, rtol=1e-5)


def test_order_matters_only_as_much_as_in_comfyui(stack_nodes, lora_files, tiny_unet, sd15_clip):
    """Reversed stacks equal reversed native chains (LoRA deltas add up, so both agree closely too)."""
    stack = [(lora_files["hero"], 1.0, 1.0), (lora_files["style"], 1.0, 1.0)]
    model, _, _ = apply(stack_nodes, tiny_unet, sd15_clip, stack)
    reversed_native, _ = native_chain(tiny_unet, sd15_clip, stack[::-1])
    assert torch.allclose(denoised(model), denoised(reversed_native), atol=1e-4)


def test_zero_and_none_entries_apply_nothing(stack_nodes, lora_files, tiny_unet, sd15_clip):
    model, clip, words = apply(stack_nodes, tiny_unet, sd15_clip,
                               [(lora_files["style"], 0.0, 0.0), ("None", 1.0, 1.0), ["None", 0, 0]])
    assert model is tiny_unet and clip is sd15_clip and words == ""
    model, clip, words = apply(stack_nodes, tiny_unet, sd15_clip, [])
    assert model is tiny_unet and words == ""


# --- interop ------------------------------------------------------------------------------------------
def test_comfyroll_and_efficiency_stacks_are_accepted(stack_nodes, lora_files, loras_dir, tiny_unet, sd15_clip):
    clean = [(lora_files["style"], 1.0, 0.5), (lora_files["hero"], 0.5, 1.0)]
    messy = [["None", 1.0, 1.0],                                         # Efficiency's empty slot
             [str(loras_dir / lora_files["style"]), 1, 0.5],             # absolute path inside, ints, a list
             (lora_files["hero"].replace("/", "\\"), "0.5", 1.0)]        # authored on Windows
    clean_model, clean_clip, clean_words = apply(stack_nodes, tiny_unet, sd15_clip, clean)
    messy_model, messy_clip, messy_words = apply(stack_nodes, tiny_unet, sd15_clip, messy)
    assert torch.equal(denoised(clean_model), denoised(messy_model))
    assert torch.equal(encoded(clean_clip), encoded(messy_clip))
    assert clean_words == messy_words


def test_our_stack_works_with_a_comfyroll_style_apply_node(stack_nodes, lora_files, tiny_unet, sd15_clip):
    """What CR Apply LoRA Stack does with a stack (nodes_lora.py:122-160): unpack, get_full_path, apply."""
    import comfy.sd
    import comfy.utils
    import folder_paths
    stack = pedal(stack_nodes, lora_files["hero"], 0.5, 1.0,
                  incoming=pedal(stack_nodes, lora_files["style"], 1.0, 0.5))
    model, clip = tiny_unet, sd15_clip
    with torch.inference_mode():
        for tup in stack:
            lora_name, strength_model, strength_clip = tup
            lora = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", lora_name), safe_load=True)
            model, clip = comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)
    ours, _, _ = apply(stack_nodes, tiny_unet, sd15_clip, stack)
    assert torch.allclose(denoised(model), denoised(ours), atol=1e-5)


def test_absolute_paths_outside_the_loras_folders_are_refused(stack_nodes, lora_files, loras_dir, tmp_path,
                                                              tiny_unet, sd15_clip):
    outside = tmp_path / "downloads" / "stray.safetensors"
    outside.parent.mkdir()
    shutil.copy(loras_dir / lora_files["detail"], outside)
    for node_call in (lambda: apply(stack_nodes, tiny_unet, sd15_clip, [(str(outside), 1.0, 1.0)]),
                      lambda: pedal(stack_nodes, "None", override=str(outside))):
        with pytest.raises(ValueError) as error:
            node_call()
        text = str(error.value)
        assert "outside the loras folders" in text and str(loras_dir) in text and "Fix:" in text


# --- the file cache -----------------------------------------------------------------------------------
def test_files_are_read_once_across_queues_and_pedal_flips(stack_nodes, lora_files, loras_dir, tiny_unet,
                                                            sd15_clip, monkeypatch):
    from lora_lab.trainer.lora import stack as lora_stack
    reads = []
    real_loader = lora_stack.load_lora_file
    monkeypatch.setattr(lora_stack, "load_lora_file", lambda path: reads.append(Path(path).name) or real_loader(path))

    def queue(hero_enabled: bool):
        stack = pedal(stack_nodes, lora_files["style"], 1.0, 1.0)
        stack = pedal(stack_nodes, lora_files["hero"], 1.0, 1.0, enabled=hero_enabled, incoming=stack)
        stack = pedal(stack_nodes, lora_files["detail"], 1.0, 1.0, incoming=stack)
        return apply(stack_nodes, tiny_unet, sd15_clip, stack)

    queue(True)
    assert sorted(reads) == ["stack_detail.safetensors", "stack_hero.safetensors", "stack_style.safetensors"]
    queue(False)
    queue(True)
    assert len(reads) == 3, f"re-read: {reads[3:]}"
    os.utime(loras_dir / lora_files["detail"], ns=(10**9, 10**9))   # the file changed on disk
    queue(True)
    assert reads[3:] == ["stack_detail.safetensors"]


def test_is_changed_follows_the_file_on_disk(stack_nodes, lora_files, loras_dir):
    is_changed = stack_nodes.LoraLabLoraStack.IS_CHANGED
    before = is_changed(lora_name=lora_files["detail"], enabled=True)
    os.utime(loras_dir / lora_files["detail"], ns=(2 * 10**9, 2 * 10**9))
    assert is_changed(lora_name=lora_files["detail"], enabled=True) != before
    assert is_changed(lora_name="gone.safetensors", enabled=True) == ""


# --- bad input ----------------------------------------------------------------------------------------
def failure(stack_nodes, model, clip, stack) -> str:
    with pytest.raises(ValueError) as error:
        apply(stack_nodes, model, clip, stack)
    text = str(error.value)
    assert "Apply LoRA Stack" in text and "Fix:" in text
    return text


def test_missing_file_names_it_and_the_folders_searched(stack_nodes, tiny_unet, sd15_clip, loras_dir):
    text = failure(stack_nodes, tiny_unet, sd15_clip, [("nowhere/gone.safetensors", 1.0, 1.0)])
    assert "nowhere/gone.safetensors" in text and str(loras_dir) in text


def test_corrupt_file_is_named(stack_nodes, tiny_unet, sd15_clip, loras_dir):
    broken = loras_dir / "stack_broken.safetensors"
    data = (loras_dir / "stack_detail.safetensors").read_bytes()
    broken.write_bytes(data[: len(data) // 2])          # a download cut short
    text = failure(stack_nodes, tiny_unet, sd15_clip, [("stack_broken.safetensors", 1.0, 1.0)])
    assert "stack_broken.safetensors" in text


def test_files_that_would_change_nothing_are_errors(stack_nodes, tiny_unet, sd15_clip, loras_dir, lora_files):
    write_lora(loras_dir, "stack_not_a_lora.safetensors", {"foo.weight": torch.ones(3), "bar.bias": torch.zeros(2)})
    text = failure(stack_nodes, tiny_unet, sd15_clip, [("stack_not_a_lora.safetensors", 1.0, 1.0)])
    assert "stack_not_a_lora.safetensors" in text and "change nothing" in text
    # a checkpoint put into the loras folder
    write_lora(loras_dir, "stack_checkpoint.safetensors",
               {"model.diffusion_model.out.2.weight": torch.ones(4, 32, 3, 3)})
    assert "full checkpoint" in failure(stack_nodes, tiny_unet, sd15_clip, [("stack_checkpoint.safetensors", 1, 1)])
    # an SDXL-style LoRA on SD1.5: LoRA keys, but none that this model has
    write_lora(loras_dir, "stack_other_family.safetensors", kohya_tensors(
        {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": (640, 640)}, seed=3))
    assert "another model family" in failure(stack_nodes, tiny_unet, sd15_clip,
                                             [("stack_other_family.safetensors", 1, 1)])
    # a text-encoder-only LoRA without a CLIP changes nothing either
    write_lora(loras_dir, "stack_te_only.safetensors", kohya_tensors(clip_shapes(sd15_clip, (0,)), seed=4))
    assert "stack_te_only.safetensors" in failure(stack_nodes, tiny_unet, None, [("stack_te_only.safetensors", 1, 1)])
    model, clip, _ = apply(stack_nodes, tiny_unet, sd15_clip, [("stack_te_only.safetensors", 1.0, 1.0)])
    assert not torch.allclose(encoded(clip), encoded(sd15_clip), atol=1e-4)


def test_pickles_are_refused_with_how_to_convert(stack_nodes, tiny_unet, sd15_clip, loras_dir):
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, loras_dir / "stack_old.ckpt")
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, loras_dir / "stack_old.pt")
    for name in ("stack_old.ckpt", "stack_old.pt"):
        text = failure(stack_nodes, tiny_unet, sd15_clip, [(name, 1.0, 1.0)])
        assert name in text and "pickle" in text and "convert it to .safetensors" in text


def test_malformed_stack_is_reported(stack_nodes, tiny_unet, sd15_clip):
    assert "Entry 1" in failure(stack_nodes, tiny_unet, sd15_clip, [("only a name",)])


# --- the comparison grid ------------------------------------------------------------------------------
def run_grid(stack_nodes, tiny_unet, sd15_clip, small_vae, stack, prompts="a cat\na house on a hill", **extra):
    args = dict(model=tiny_unet, clip=sd15_clip, vae=small_vae, lora_stack=stack, prompts=prompts, seed=7,
                steps=1, cfg=3.0, sampler_name="euler", scheduler="normal", width=SIZE, height=SIZE)
    args.update(extra)
    with torch.inference_mode():
        return stack_nodes.LoraLabLoraCompareGrid().compare(**args)[0]


def cell(grid, geometry, row, column):
    x, y = geometry.cell_origin(row, column)
    return grid[0, y:y + SIZE, x:x + SIZE]


def test_grid_renders_prompts_by_base_each_lora_and_the_stack(stack_nodes, lora_files, tiny_unet, sd15_clip,
                                                              small_vae):
    import comfy.utils
    import nodes as comfy_nodes
    from lora_lab.trainer.image_grid import grid_geometry
    stack = [(lora_files["style"], 1.0, 1.0), (lora_files["hero"], 1.0, 1.0)]
    progress = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *rest, **kw: progress.append((value, total)))
    try:
        grid = run_grid(stack_nodes, tiny_unet, sd15_clip, small_vae, stack)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)

    geometry = grid_geometry(2, 4, SIZE, SIZE)
    assert grid.shape == (1, geometry.height, geometry.width, 3) and grid.dtype == torch.float32
    assert 0 <= grid.min() and grid.max() <= 1
    assert progress[-1] == (8, 8), progress          # 2 prompts x 4 columns x 1 step

    # the base column is exactly what KSampler + VAEDecode make from the same seed
    with torch.inference_mode():
        positive = comfy_nodes.CLIPTextEncode().encode(sd15_clip, "a house on a hill")[0]
        negative = comfy_nodes.CLIPTextEncode().encode(sd15_clip, "")[0]
        latent = comfy_nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
        samples = comfy_nodes.common_ksampler(tiny_unet, 7, 1, 3.0, "euler", "normal", positive, negative, latent)[0]
        native = comfy_nodes.VAEDecode().decode(small_vae, samples)[0][0]
    native = (native.clamp(0, 1) * 255).round() / 255
    assert torch.allclose(cell(grid, geometry, 1, 0), native, atol=1.5 / 255)

    cells = [[cell(grid, geometry, r, c) for c in range(4)] for r in range(2)]
    for r in range(2):
        for c in range(1, 4):
            assert (cells[r][c] - cells[r][0]).abs().max() > 2 / 255, f"column {c} looks like the base"
    assert (cells[0][3] - cells[0][1]).abs().max() > 2 / 255, "the stack looks like its first LoRA alone"
    assert (cells[0][0] - cells[1][0]).abs().max() > 2 / 255, "the prompts make no difference"


def test_grid_sweep_adds_a_column_per_strength(stack_nodes, lora_files, tiny_unet, sd15_clip, small_vae):
    from lora_lab.trainer.image_grid import grid_geometry
    stack = [(lora_files["style"], 1.0, 1.0), (lora_files["detail"], 0.5, 0.0)]
    grid = run_grid(stack_nodes, tiny_unet, sd15_clip, small_vae, stack, prompts="a cat",
                    sweep_index=1, sweep_strengths="0, 0.5")
    geometry = grid_geometry(1, 6, SIZE, SIZE)    # base, style, detail, stack, detail@0, detail@0.5
    assert grid.shape == (1, geometry.height, geometry.width, 3)
    # detail@0 inside the stack is style alone; detail@0.5 is the stack as given
    assert torch.allclose(cell(grid, geometry, 0, 4), cell(grid, geometry, 0, 1), atol=1.5 / 255)
    assert torch.allclose(cell(grid, geometry, 0, 5), cell(grid, geometry, 0, 3), atol=1.5 / 255)


def test_grid_stops_between_cells_on_cancel(stack_nodes, lora_files, tiny_unet, sd15_clip, small_vae):
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
            run_grid(stack_nodes, tiny_unet, sd15_clip, small_vae, [(lora_files["style"], 1.0, 1.0)])
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert max(seen) == 1, f"rendering went on after Cancel: {seen}"


def test_grid_inputs_default_to_the_users_test_prompts_with_a_trigger(stack_nodes):
    inputs = stack_nodes.LoraLabLoraCompareGrid.INPUT_TYPES()
    prompts = inputs["required"]["prompts"][1]
    rows = prompts["default"].splitlines()
    assert len(rows) == 3 and all(row.startswith("{trigger}, ") for row in rows)
    assert "lighthouse" in rows[0] and "workshop" in rows[1] and "rainy" in rows[2]     # research/users.md
    assert prompts["dynamicPrompts"] is False          # the front ends leave {trigger} alone
    # added last, so saved workflows keep their widget values; empty = the stack's stored trigger words
    assert list(inputs["optional"])[-1] == "trigger_word"
    assert inputs["optional"]["trigger_word"] == ("STRING", inputs["optional"]["trigger_word"][1])
    assert inputs["optional"]["trigger_word"][1]["default"] == ""


def test_trigger_placeholder_is_filled_like_the_training_previews(stack_nodes):
    from lora_lab.nodes.training_previews import PreviewSettings
    for line in ("{trigger}, a cat", "a cat by {trigger}", "a cat", "{trigger}"):
        for trigger in ("stylex", "stylex, hero", ""):
            assert [stack_nodes.with_trigger(line, trigger)] == PreviewSettings(prompts=line).prompt_lines(trigger)
    assert stack_nodes.with_trigger("{trigger}, a cat", "") == "a cat"


def test_grid_fills_trigger_from_its_input_else_from_the_stacked_loras(stack_nodes, lora_files, tiny_unet, sd15_clip,
                                                                       small_vae, one_arithmetic_path):
    # Grids compared pixel for pixel are rendered on one arithmetic path (tests/conftest.py): the same
    # prompt then gives the same picture bitwise, so equal means "the same prompt was used".
    stack = [(lora_files["style"], 1.0, 1.0), (lora_files["detail"], 1.0, 0.0)]   # stylex; detail stores none

    def grid(prompts, **extra):
        return run_grid(stack_nodes, tiny_unet, sd15_clip, small_vae, stack, prompts=prompts, **extra)

    # The filled-in text is the prompt of every cell (base column included) and the row label.
    assert torch.equal(grid("{trigger}, a cat"), grid("stylex, a cat"))
    assert torch.equal(grid("{trigger}, a cat", trigger_word=" red fox "), grid("red fox, a cat"))
    assert not torch.equal(grid("{trigger}, a cat"), grid("a cat"))
    # with a sweep, the swept LoRA's words count even where the stack has it at 0
    hero_only = [(lora_files["detail"], 1.0, 0.0), (lora_files["hero"], 0.0, 0.0)]
    swept = dict(sweep_index=1, sweep_strengths="1")
    assert torch.equal(run_grid(stack_nodes, tiny_unet, sd15_clip, small_vae, hero_only, prompts="{trigger}", **swept),
                       run_grid(stack_nodes, tiny_unet, sd15_clip, small_vae, hero_only,
                                prompts="hero, red cape, city", **swept))


def test_grid_reports_bad_inputs_before_rendering(stack_nodes, lora_files, tiny_unet, sd15_clip, small_vae):
    validate = stack_nodes.LoraLabLoraCompareGrid.VALIDATE_INPUTS
    assert "prompts" in validate(prompts="  \n ", sweep_strengths="1")
    assert "sweep_strengths" in validate(prompts="a cat", sweep_strengths="0, lots")
    assert validate(prompts="a cat", sweep_strengths="0,1") is True
    with pytest.raises(ValueError, match="sweep_index"):
        run_grid(stack_nodes, tiny_unet, sd15_clip, small_vae, [(lora_files["style"], 1.0, 1.0)],
                 sweep_index=2, sweep_strengths="1")
    with pytest.raises(ValueError, match="gone.safetensors"):
        run_grid(stack_nodes, tiny_unet, sd15_clip, small_vae, [("gone.safetensors", 1.0, 1.0)])


# --- through a real server ----------------------------------------------------------------------------


def pedal_node(name, strength_model, strength_clip, incoming=None, override=None):
    inputs = {"lora_name": name, "strength_model": strength_model, "strength_clip": strength_clip, "enabled": True}
    if incoming:
        inputs["lora_stack"] = incoming
    if override:
        inputs["lora_name_override"] = override
    return {"class_type": "LoraLabLoraStack", "inputs": inputs}


@pytest.fixture(scope="module")
def server_loras(server, tiny_unet, sd15_clip):
    return {
        "style": full_size_lora(server.overlay, "server_style.safetensors", tiny_unet, sd15_clip, 21, slice(0, 12),
                                {"loralab_trigger_word": "stylex"}),
        "detail": full_size_lora(server.overlay, "sub/server_detail.safetensors", tiny_unet, sd15_clip, 22,
                                 slice(12, 24)),
    }


@pytest.mark.server
def test_server_train_then_pedals_apply_and_sample(server, server_loras):
    root = server.overlay / "input" / "stack_e2e_dataset"
    if root.exists():
        shutil.rmtree(root)
    demo_data.write_demo_dataset(root, count=2, repeats=1, size=64)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_models.CHECKPOINT_NAME}},
        "2": {"class_type": "LoraLabDatasetFromFolder", "inputs": {
            "folder": "stack_e2e_dataset", "caption_extension": ".txt", "default_repeats": 1, "batch_size": 1,
            "target_steps": 1}},
        "3": {"class_type": "LoraLabTrainLora", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "output_name": "stack_trained",
            "resolution": 64, "steps": 1, "epochs": 0, "batch_size": 1, "learning_rate": 1e-4, "rank": 4,
            "alpha": 4.0, "seed": 1, "trigger_word": ""}},
        # the pedal's own choice is stale on purpose: the connected override wins
        "10": pedal_node("None", 1.0, 1.0, override=["3", 2]),
        "11": pedal_node(server_loras["detail"].replace("/", "\\"), 0.8, 0.5, incoming=["10", 0]),
        "12": {"class_type": "LoraLabApplyLoraStack", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                                 "lora_stack": ["11", 0]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": ["12", 2], "clip": ["12", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["12", 1]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["12", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
            "seed": 3, "steps": 1, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "stack_e2e"}},
    }
    log_before = len(server.log_text())
    history = server.run(prompt, timeout=1200)
    assert (server.overlay / "models" / "loras" / "stack_trained.safetensors").is_file()
    applied = history["outputs"]["12"]["text"][0].splitlines()
    assert applied == ["stack_trained.safetensors  1", f"{server_loras['detail']}  0.8/0.5",
                       f"trigger words: {demo_data.TRIGGER}"]
    image_info = history["outputs"]["9"]["images"][0]
    image = Image.open(server.overlay / "output" / image_info["subfolder"] / image_info["filename"])
    assert image.size == (64, 64)
    new_log = server.log_text()[log_before:].lower()
    assert "lora key not loaded" not in new_log and "not loaded" not in new_log


@pytest.mark.server
def test_server_grid(server, server_loras):
    from lora_lab.trainer.image_grid import grid_geometry
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_models.CHECKPOINT_NAME}},
        "2": pedal_node(server_loras["style"], 1.0, 1.0),
        "3": pedal_node(server_loras["detail"], 0.5, 0.5, incoming=["2", 0]),
        "4": {"class_type": "LoraLabLoraCompareGrid", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "lora_stack": ["3", 0], "prompts": "a lighthouse",
            "seed": 5, "steps": 1, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "width": 64,
            "height": 64, "sweep_index": 1, "sweep_strengths": "0, 1"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "stack_grid"}},
    }
    events = []
    history = server.run(prompt, timeout=1200, on_event=events.append)
    image_info = history["outputs"]["5"]["images"][0]
    image = Image.open(server.overlay / "output" / image_info["subfolder"] / image_info["filename"])
    geometry = grid_geometry(1, 6, 64, 64)      # base, style, detail, stack, detail@0, detail@1
    assert image.size == (geometry.width, geometry.height)
    progress = [e["data"] for e in events if e.get("type") == "progress" and e["data"].get("node") == "4"]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 6


@pytest.mark.server
def test_server_rejects_bad_pedals_before_running(server, server_loras):
    from comfyui_server import ComfyExecutionError

    def graph(pedal):
        return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_models.CHECKPOINT_NAME}},
                "2": pedal,
                "3": {"class_type": "LoraLabApplyLoraStack", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                                        "lora_stack": ["2", 0]}},
                "4": {"class_type": "CLIPTextEncode", "inputs": {"text": ["3", 2], "clip": ["3", 1]}},
                "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                "6": {"class_type": "KSampler", "inputs": {
                    "model": ["3", 0], "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["5", 0],
                    "seed": 3, "steps": 1, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
                    "denoise": 1.0}},
                "7": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
                "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}}}

    with pytest.raises(ComfyExecutionError) as error:
        server.queue(graph(pedal_node(server_loras["style"], 12.0, 1.0)))
    assert "strength_model" in str(error.value)
    with pytest.raises(ComfyExecutionError) as error:
        server.queue(graph(pedal_node("never/there.safetensors", 1.0, 1.0)))
    assert "never/there.safetensors" in str(error.value) and "loras" in str(error.value)


def test_trigger_words_written_beside_a_lora_come_first(stack_nodes, lora_files, loras_dir, tiny_unet, sd15_clip):
    """<name>.txt (LoRA managers, Civitai downloads) and <name>.civitai.info (Civitai Helper) beside the file: their
    words lead, then the file's own; the same words once (any case)."""
    stem = os.path.splitext(loras_dir / lora_files["detail"])[0]
    with open(stem + ".txt", "w", encoding="utf-8") as sidecar:
        sidecar.write("detailer, fine lines\n")
    with open(stem + ".civitai.info", "w", encoding="utf-8") as info:
        json.dump({"trainedWords": ["Fine Lines, crisp"]}, info)
    try:
        stack = [(lora_files["detail"], 1.0, 0.0), (lora_files["style"], 1.0, 1.0)]
        _, _, words = apply(stack_nodes, tiny_unet, sd15_clip, stack)
        assert words == "detailer, fine lines, crisp, stylex"
    finally:
        os.remove(stem + ".txt")
        os.remove(stem + ".civitai.info")

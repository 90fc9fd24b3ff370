"""The LoRA Pedalboard and the /loralab routes in a real ComfyUI: the board equals a chain of pedals + Apply
LoRA Stack and a chain of native LoraLoader nodes, rows are skipped and ordered as documented, bad rows are
named, and the routes read headers only and never leave the loras folders."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import random_models  # noqa: E402
from lora_files import clip_shapes, denoised, encoded, full_size_lora, kohya_tensors, native_chain, unet_shapes, write_lora

STYLE_METADATA = {"loralab_trigger_word": "stylex", "ss_output_name": "board_style",
                  "ss_base_model_version": "sd_v1", "ss_network_dim": "4", "ss_network_alpha": "4.0",
                  "ss_network_module": "networks.lora", "ss_steps": "30"}
HERO_FREQUENCY = {"10_hero": {"hero": 12, "red cape": 7, "city": 2, "night": 1}}


@pytest.fixture(scope="module")
def files(loras_dir, tiny_unet, sd15_clip):
    """style: UNet + CLIP, stored trigger word and kohya metadata; hero: tag frequency only (in a subfolder);
    detail: UNet only, no metadata."""
    paths = {
        "style": write_lora(loras_dir, "board_style.safetensors",
                            kohya_tensors({**unet_shapes(tiny_unet), **clip_shapes(sd15_clip)}, seed=31), STYLE_METADATA),
        "hero": write_lora(loras_dir, "board/hero.safetensors",
                           kohya_tensors({**unet_shapes(tiny_unet, every=2), **clip_shapes(sd15_clip, (3,))}, seed=32),
                           {"ss_tag_frequency": json.dumps(HERO_FREQUENCY)}),
        "detail": write_lora(loras_dir, "board_detail.safetensors", kohya_tensors(unet_shapes(tiny_unet, 3), seed=33)),
    }
    return {key: os.path.relpath(path, loras_dir) for key, path in paths.items()}


pytestmark = pytest.mark.usefixtures("leave_models_unpatched")     # (tests/conftest.py)


@pytest.fixture
def nodes(pack):
    from lora_lab.nodes import pedalboard, pedals
    pedals.LORA_FILES.clear()
    return pedalboard


def rows(*items) -> str:
    """pedals JSON from (lora, strength_model, strength_clip[, on]) tuples."""
    return json.dumps([{"on": item[3] if len(item) > 3 else True, "lora": item[0], "strength_model": item[1],
                        "strength_clip": item[2]} for item in items])


def play(nodes, pedals, ui=None, **inputs):
    with torch.inference_mode():
        output = nodes.LoraLabPedalboard().play(pedals, **inputs)
    if ui is not None:
        ui.extend(output["ui"]["text"])
    return output["result"]


def pedal_chain_and_apply(model, clip, entries):
    """The same entries through LoRA Pedal nodes and Apply LoRA Stack."""
    from lora_lab.nodes import pedals
    lora_stack = None
    with torch.inference_mode():
        for name, strength_model, strength_clip in entries:
            (lora_stack,) = pedals.LoraLabLoraStack().stack(name, strength_model, strength_clip, True, lora_stack)
        model, clip, words = pedals.LoraLabApplyLoraStack().apply(model, lora_stack, clip)["result"]
    return lora_stack, model, clip, words


def same_model(a, b):
    return torch.allclose(denoised(a), denoised(b), atol=1e-5, rtol=1e-5)


def same_clip(a, b):
    return torch.allclose(encoded(a), encoded(b), atol=1e-5, rtol=1e-5)


# --- registration -------------------------------------------------------------------------------------
def test_the_pedalboard_is_registered(pack):
    cls = pack.NODE_CLASS_MAPPINGS["LoraLabPedalboard"]
    assert cls.CATEGORY == "LoRA Lab/Stack"
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["LoraLabPedalboard"].startswith("LoRA Pedalboard")
    assert cls.RETURN_TYPES == ("LORA_STACK", "MODEL", "CLIP", "STRING")
    spec = cls.INPUT_TYPES()
    assert spec["required"]["pedals"][0] == "STRING" and json.loads(spec["required"]["pedals"][1]["default"]) == []
    assert {"lora_stack", "model", "clip", "trained_lora"} <= set(spec["optional"])
    assert spec["optional"]["trained_lora"][1]["forceInput"] is True
    assert spec["optional"]["trained_strength_model"][1]["max"] == 10


# --- the board equals pedals + apply, and native LoraLoaders --------------------------------------------
def test_board_equals_pedal_chain_apply_and_native_loaders(nodes, files, tiny_unet, sd15_clip):
    entries = [(files["style"], 0.8, 0.6), (files["hero"], -0.5, 1.25), (files["detail"], 1.5, 0.0)]
    report = []
    stack_out, model, clip, words = play(nodes, rows(*entries), ui=report, model=tiny_unet, clip=sd15_clip)
    pedal_stack, pedal_model, pedal_clip, pedal_words = pedal_chain_and_apply(tiny_unet, sd15_clip, entries)
    native_model, native_clip = native_chain(tiny_unet, sd15_clip, entries)

    assert stack_out == pedal_stack == entries
    assert not torch.allclose(denoised(model), denoised(tiny_unet), atol=1e-4), "the board changes nothing"
    assert same_model(model, pedal_model) and same_model(model, native_model)
    assert not torch.allclose(encoded(clip), encoded(sd15_clip), atol=1e-4)
    assert same_clip(clip, pedal_clip) and same_clip(clip, native_clip)
    assert words == pedal_words == "stylex, hero, red cape, city"
    assert report[0].splitlines()[0] == f"{files['style']}  0.8/0.6"
    assert model is not tiny_unet and clip is not sd15_clip


def test_model_only_board_equals_lora_loader_model_only(nodes, files, tiny_unet):
    entries = [(files["style"], 0.7, 1.0), (files["detail"], -1.0, 0.0)]
    _, model, clip, _ = play(nodes, rows(*entries), model=tiny_unet)
    native_model, _ = native_chain(tiny_unet, None, entries)
    assert clip is None and same_model(model, native_model)


def test_disabled_zero_and_empty_rows_are_skipped(nodes, files, tiny_unet, sd15_clip):
    pedals = rows((files["hero"], 1.0, 1.0, False), (files["style"], 1.0, 0.5), (files["detail"], 0.0, 0.0),
                  ("", 1.0, 1.0), ("None", 1.0, 1.0), ("gone/never.safetensors", 1.0, 1.0, False))
    stack_out, model, clip, words = play(nodes, pedals, model=tiny_unet, clip=sd15_clip)
    assert stack_out == [(files["style"], 1.0, 0.5)] and words == "stylex"
    native_model, native_clip = native_chain(tiny_unet, sd15_clip, stack_out)
    assert same_model(model, native_model) and same_clip(clip, native_clip)
    # every row off: the inputs come back untouched
    stack_out, model, clip, words = play(nodes, rows((files["style"], 1.0, 1.0, False)), model=tiny_unet, clip=sd15_clip)
    assert stack_out == [] and model is tiny_unet and clip is sd15_clip and words == ""
    assert play(nodes, "", model=tiny_unet)[0] == [] and play(nodes, "[]")[0] == []


def test_incoming_stack_first_rows_next_trained_lora_last(nodes, files, loras_dir, tiny_unet, sd15_clip):
    incoming = [["None", 1.0, 1.0], (files["style"], 1.0, 0.5)]          # an Efficiency-style empty slot too
    stack_out, model, clip, words = play(
        nodes, rows((files["hero"], 0.5, 1.0)), lora_stack=incoming, model=tiny_unet, clip=sd15_clip,
        trained_lora=str(loras_dir / files["detail"]), trained_strength_model=0.75, trained_strength_clip=0.0)
    assert stack_out == incoming + [(files["hero"], 0.5, 1.0), (files["detail"], 0.75, 0.0)]
    expected = [(files["style"], 1.0, 0.5), (files["hero"], 0.5, 1.0), (files["detail"], 0.75, 0.0)]
    native_model, native_clip = native_chain(tiny_unet, sd15_clip, expected)
    assert same_model(model, native_model) and same_clip(clip, native_clip)
    assert words == "stylex, hero, red cape, city"
    assert incoming == [["None", 1.0, 1.0], (files["style"], 1.0, 0.5)], "the incoming stack was modified"
    # trained strengths both zero: the trained LoRA stays out, like a zero pedal
    stack_out = play(nodes, "[]", trained_lora=files["detail"], trained_strength_model=0.0, trained_strength_clip=0.0)[0]
    assert stack_out == []


def test_stack_only_reads_headers_not_tensors(nodes, files, tiny_unet, sd15_clip, monkeypatch):
    from lora_lab.trainer.lora import stack as lora_stack
    loads = []
    real = lora_stack.load_lora_file
    monkeypatch.setattr(lora_stack, "load_lora_file", lambda path: loads.append(path) or real(path))
    report = []
    stack_out, model, clip, words = play(nodes, rows((files["style"], 1.0, 1.0), (files["hero"], 1.0, 1.0)),
                                         ui=report, lora_stack=[(files["detail"], 0.5, 0.5)])
    assert stack_out == [(files["detail"], 0.5, 0.5), (files["style"], 1.0, 1.0), (files["hero"], 1.0, 1.0)]
    assert model is None and clip is None and loads == []
    assert words == "stylex, hero, red cape, city"
    assert "MODEL not connected" in report[0]
    # the same words as applying the stack
    assert pedal_chain_and_apply(tiny_unet, sd15_clip, stack_out)[3] == words


def test_model_outputs_wired_without_a_model_input_are_named(nodes, files, tiny_unet, sd15_clip):
    prompt = {"5": {"class_type": "LoraLabPedalboard", "inputs": {"pedals": "[]"}},
              "6": {"class_type": "KSampler", "inputs": {"model": ["5", 1]}}}
    with pytest.raises(ValueError) as error:
        play(nodes, rows((files["style"], 1.0, 1.0)), prompt=prompt, unique_id="5")
    assert "LoRA Pedalboard › model" in str(error.value) and "Fix:" in str(error.value)
    with pytest.raises(ValueError, match="clip output is connected"):
        play(nodes, "[]", model=tiny_unet, prompt={"6": {"inputs": {"clip": ["5", 2]}}}, unique_id="5")
    with pytest.raises(ValueError, match="CLIP is connected without MODEL"):
        play(nodes, "[]", clip=sd15_clip)
    # only the stack output used: fine without a model
    assert play(nodes, rows((files["style"], 1.0, 1.0)), prompt={"6": {"inputs": {"lora_stack": ["5", 0]}}},
                unique_id="5")[0] == [(files["style"], 1.0, 1.0)]


# --- validation and bad input --------------------------------------------------------------------------
def test_validation_names_the_node_the_input_and_the_fix(nodes, files, loras_dir):
    validate = nodes.LoraLabPedalboard.VALIDATE_INPUTS

    def message(pedals, **extra):
        text = validate(pedals=pedals, **extra)
        assert isinstance(text, str) and "LoRA Pedalboard ›" in text and "Fix:" in text, text
        return text

    assert validate(pedals=rows((files["style"], 1.0, -10.0), (files["hero"].replace("/", "\\"), 10.0, 0.0))) is True
    assert validate(pedals="[]") is True and validate(pedals="") is True
    assert "not valid JSON" in message('[{"on": true, "lora": "x.safetensors"')
    assert "not a list" in message('{"lora": "x.safetensors"}')
    assert "Row 2" in message(json.dumps([{"lora": files["style"]}, "style.safetensors"]))
    assert '"on"' in message(json.dumps([{"on": "yes", "lora": files["style"]}]))
    assert "strength_clip" in message(json.dumps([{"lora": files["style"], "strength_clip": "strong"}]))
    out_of_range = message(rows((files["style"], 1.0, 1.0), (files["hero"], 10.5, 1.0)))
    assert "Row 2" in out_of_range and "strength_model" in out_of_range and "-10..10" in out_of_range
    missing = message(rows(("gone/never.safetensors", 1.0, 1.0)))
    assert "gone/never.safetensors" in missing and str(loras_dir) in missing
    (loras_dir / "board_old.ckpt").write_bytes(b"not even a pickle")
    assert "pickle" in message(rows(("board_old.ckpt", 1.0, 1.0)))
    # off, zero-strength or empty rows never block the prompt, whatever they name
    assert validate(pedals=rows(("gone.safetensors", 1.0, 1.0, False), ("gone.safetensors", 0.0, 0.0), ("", 1, 1))) is True
    assert "trained_strength_clip" in validate(pedals="[]", trained_strength_model=1.0, trained_strength_clip=-12.0)


def test_running_bad_rows_raises_the_same_messages(nodes, files, loras_dir, tiny_unet):
    for pedals, expected in (("[{", "not valid JSON"), (rows((files["style"], 99.0, 1.0)), "strength_model"),
                             (rows(("gone/never.safetensors", 1.0, 1.0)), "gone/never.safetensors")):
        with pytest.raises(ValueError) as error:
            play(nodes, pedals, model=tiny_unet)
        assert "LoRA Pedalboard › pedals" in str(error.value) and expected in str(error.value)
    with pytest.raises(ValueError) as error:
        play(nodes, "[]", trained_lora="not/trained.safetensors")
    assert "LoRA Pedalboard › trained_lora" in str(error.value) and str(loras_dir) in str(error.value)
    with pytest.raises(ValueError, match="lora_stack"):
        play(nodes, "[]", lora_stack="style.safetensors")


def test_a_file_deleted_after_validation_is_named(nodes, files, loras_dir, tiny_unet, sd15_clip):
    doomed = write_lora(loras_dir, "board_doomed.safetensors", kohya_tensors(unet_shapes(tiny_unet, 4), seed=5))
    pedals = rows(("board_doomed.safetensors", 1.0, 1.0))
    assert nodes.LoraLabPedalboard.VALIDATE_INPUTS(pedals=pedals) is True
    doomed.unlink()
    with pytest.raises(ValueError) as error:
        play(nodes, pedals, model=tiny_unet, clip=sd15_clip)
    assert "board_doomed.safetensors" in str(error.value) and str(loras_dir) in str(error.value)


def test_a_damaged_file_is_named(nodes, files, loras_dir, tiny_unet, sd15_clip):
    data = (loras_dir / files["detail"]).read_bytes()
    (loras_dir / "board_cut.safetensors").write_bytes(data[: len(data) // 2])
    for model, clip in ((tiny_unet, sd15_clip), (None, None)):      # applying, and headers-only
        with pytest.raises(ValueError) as error:
            play(nodes, rows(("board_cut.safetensors", 1.0, 1.0)), model=model, clip=clip)
        assert "board_cut.safetensors" in str(error.value) and "LoRA Pedalboard › pedals" in str(error.value)


def test_is_changed_follows_the_files_of_active_rows(nodes, files, loras_dir):
    is_changed = nodes.LoraLabPedalboard.IS_CHANGED
    pedals = rows((files["style"], 1.0, 1.0), (files["hero"], 1.0, 1.0, False))
    before = is_changed(pedals=pedals, trained_lora=files["detail"])
    os.utime(loras_dir / files["style"], ns=(3 * 10**9, 3 * 10**9))
    after = is_changed(pedals=pedals, trained_lora=files["detail"])
    assert after != before
    os.utime(loras_dir / files["detail"], ns=(4 * 10**9, 4 * 10**9))
    assert is_changed(pedals=pedals, trained_lora=files["detail"]) != after
    unchanged = is_changed(pedals=pedals)          # an off row's file does not matter
    os.utime(loras_dir / files["hero"], ns=(6 * 10**9, 6 * 10**9))
    assert is_changed(pedals=pedals) == unchanged
    assert is_changed(pedals="[{") == ""


# --- the info route's logic, in-process ---------------------------------------------------------------
def test_lora_info_reads_the_header_only(pack, files, loras_dir, monkeypatch):
    from lora_lab.nodes import routes
    from lora_lab.trainer.lora import stack as lora_stack
    import safetensors
    monkeypatch.setattr(lora_stack, "load_lora_file", lambda *a: pytest.fail("lora_info loaded tensors"))
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("lora_info opened tensors"))
    status, body = routes.lora_info(files["style"])
    assert status == 200, body
    assert body["name"] == files["style"] and body["trigger_words"] == ["stylex"]
    assert (body["base_model"], body["network_dim"], body["network_alpha"]) == ("sd_v1", 4, 4.0)
    assert body["output_name"] == "board_style" and body["steps"] == 30 and body["tensor_count"] > 0
    status, body = routes.lora_info(files["hero"].replace("/", "\\"))
    assert status == 200 and body["trigger_words"] == ["hero", "red cape", "city"] and body["base_model"] is None
    assert body["trained_tags"] == [["hero", 12], ["red cape", 7], ["city", 2], ["night", 1]]
    assert set(files.values()) <= set(routes.lora_names()) and "None" not in routes.lora_names()


def test_lora_info_refuses_what_it_must_not_read(pack, files, loras_dir, tmp_path):
    from lora_lab.nodes import routes
    outside = tmp_path / "secret.safetensors"
    write_lora(tmp_path, "secret.safetensors", {"x": torch.ones(1)}, {"secret": "yes"})
    (loras_dir / "board_old.ckpt").write_bytes(b"not even a pickle")
    header_lies = loras_dir / "board_lies.safetensors"
    header_lies.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    relative_out = os.path.relpath(outside, loras_dir)          # ../../.. up and into tmp_path
    cases = {
        "": 400, "gone/never.safetensors": 404, relative_out: 404,
        str(outside): 400, "board_old.ckpt": 400, "board_lies.safetensors": 400, "a\x00b.safetensors": 400,
    }
    for name, expected in cases.items():
        status, body = routes.lora_info(name)
        assert status == expected, (name, status, body)
        assert body["error"] and "tensor_count" not in body
    assert "outside the loras folders" in routes.lora_info(str(outside))[1]["error"]
    assert "pickle" in routes.lora_info("board_old.ckpt")[1]["error"]


# --- through a real server ----------------------------------------------------------------------------
def http_get(server, path: str, **query) -> tuple[int, object]:
    url = server.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


@pytest.fixture(scope="module")
def server_board_loras(server, tiny_unet, sd15_clip):
    return {
        "style": full_size_lora(server.overlay, "board_server_style.safetensors", tiny_unet, sd15_clip, 41,
                                slice(0, 12), {"loralab_trigger_word": "boardx", "ss_base_model_version": "sd_v1",
                                               "ss_network_dim": "4"}),
        "detail": full_size_lora(server.overlay, "board_sub/server_detail.safetensors", tiny_unet, sd15_clip, 42,
                                 slice(12, 24)),
    }


@pytest.mark.server
def test_server_routes_list_loras_and_read_headers(server, server_board_loras):
    status, names = http_get(server, "/loralab/loras")
    assert status == 200 and set(server_board_loras.values()) <= set(names)
    status, info = http_get(server, "/loralab/lora_info", name=server_board_loras["style"])
    assert status == 200 and info["trigger_words"] == ["boardx"] and info["base_model"] == "sd_v1"
    assert info["network_dim"] == 4 and info["name"] == server_board_loras["style"]
    status, info = http_get(server, "/loralab/lora_info", name=server_board_loras["detail"].replace("/", "\\"))
    assert status == 200 and info["trigger_words"] == [] and info["name"] == server_board_loras["detail"]
    status, body = http_get(server, "/loralab/lora_info")
    assert status == 400 and "name=" in body["error"]


@pytest.mark.server
def test_server_lora_info_refuses_path_traversal(server, server_board_loras):
    checkpoint = server.overlay / "models" / "checkpoints" / random_models.CHECKPOINT_NAME
    assert checkpoint.exists()       # a real safetensors file next door: reading it would answer 200
    for name in (f"../checkpoints/{random_models.CHECKPOINT_NAME}",
                 f"..\\checkpoints\\{random_models.CHECKPOINT_NAME}",
                 f"board_sub/../../checkpoints/{random_models.CHECKPOINT_NAME}"):
        status, body = http_get(server, "/loralab/lora_info", name=name)
        assert status == 404 and "tensor_count" not in body, (name, body)
    status, body = http_get(server, "/loralab/lora_info", name=str(checkpoint))
    assert status == 400 and "outside the loras folders" in body["error"]
    # percent-encoded dots reach the handler decoded, and are refused the same way
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(server.url + "/loralab/lora_info?name=%2e%2e%2fcheckpoints%2f"
                               + random_models.CHECKPOINT_NAME, timeout=30)
    assert error.value.code == 404
    (server.overlay / "models" / "loras" / "board_pickle.pt").write_bytes(b"\x80\x04K\x01.")
    status, body = http_get(server, "/loralab/lora_info", name="board_pickle.pt")
    assert status == 400 and "pickle" in body["error"]


def sampler_branch(model_ref, clip_ref, text_ref, prefix: str, first_id: int) -> dict:
    ids = [str(first_id + i) for i in range(6)]
    return {
        ids[0]: {"class_type": "CLIPTextEncode", "inputs": {"text": text_ref, "clip": clip_ref}},
        ids[1]: {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip_ref}},
        ids[2]: {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        ids[3]: {"class_type": "KSampler", "inputs": {
            "model": model_ref, "positive": [ids[0], 0], "negative": [ids[1], 0], "latent_image": [ids[2], 0],
            "seed": 3, "steps": 1, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        ids[4]: {"class_type": "VAEDecode", "inputs": {"samples": [ids[3], 0], "vae": ["1", 2]}},
        ids[5]: {"class_type": "SaveImage", "inputs": {"images": [ids[4], 0], "filename_prefix": prefix}},
    }


def saved_image(server, history, node_id) -> Image.Image:
    info = history["outputs"][node_id]["images"][0]
    return Image.open(server.overlay / "output" / info["subfolder"] / info["filename"])


@pytest.mark.server
def test_server_api_prompt_with_a_pedalboard_matches_pedals_and_apply(server, server_board_loras):
    """One API-format prompt, two branches from the same checkpoint and seed: pedalboard vs pedals + apply."""
    style, detail = server_board_loras["style"], server_board_loras["detail"]
    pedals = json.dumps([{"on": True, "lora": style, "strength_model": 1.0, "strength_clip": 0.5},
                         {"on": False, "lora": "board_missing.safetensors", "strength_model": 1, "strength_clip": 1},
                         {"on": True, "lora": detail.replace("/", "\\"), "strength_model": 0.8, "strength_clip": 0.0}])
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_models.CHECKPOINT_NAME}},
        "2": {"class_type": "LoraLabPedalboard", "inputs": {"pedals": pedals, "model": ["1", 0], "clip": ["1", 1]}},
        **sampler_branch(["2", 1], ["2", 2], ["2", 3], "board_api", 10),
        "3": {"class_type": "LoraLabLoraStack", "inputs": {"lora_name": style, "strength_model": 1.0,
                                                           "strength_clip": 0.5, "enabled": True}},
        "4": {"class_type": "LoraLabLoraStack", "inputs": {"lora_name": detail, "strength_model": 0.8,
                                                           "strength_clip": 0.0, "enabled": True,
                                                           "lora_stack": ["3", 0]}},
        "5": {"class_type": "LoraLabApplyLoraStack", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                                "lora_stack": ["4", 0]}},
        **sampler_branch(["5", 0], ["5", 1], ["5", 2], "board_api_pedals", 20),
        "30": {"class_type": "KSampler", "inputs": {    # the base, to show the LoRAs change the picture
            "model": ["1", 0], "positive": ["10", 0], "negative": ["11", 0], "latent_image": ["12", 0],
            "seed": 3, "steps": 1, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "31": {"class_type": "VAEDecode", "inputs": {"samples": ["30", 0], "vae": ["1", 2]}},
        "32": {"class_type": "SaveImage", "inputs": {"images": ["31", 0], "filename_prefix": "board_api_base"}},
    }
    history = server.run(prompt, timeout=1200)
    assert history["outputs"]["2"]["text"][0].splitlines() == [f"{style}  1/0.5", f"{detail}  0.8/0",
                                                               "trigger words: boardx"]
    board, pedals_image, base = (torch.from_numpy(np.asarray(saved_image(server, history, node), dtype=np.float32))
                                 for node in ("15", "25", "32"))
    assert (board - pedals_image).abs().max() <= 1, "the pedalboard differs from pedals + Apply LoRA Stack"
    assert (board - base).abs().max() > 2, "the LoRAs did not change the picture"


@pytest.mark.server
def test_server_rejects_a_bad_pedalboard_before_running(server, server_board_loras):
    from comfyui_server import ComfyExecutionError

    def graph(pedals):
        return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_models.CHECKPOINT_NAME}},
                "2": {"class_type": "LoraLabPedalboard", "inputs": {"pedals": pedals, "model": ["1", 0],
                                                                    "clip": ["1", 1]}},
                **sampler_branch(["2", 1], ["2", 2], ["2", 3], "board_bad", 10)}

    for pedals, expected in (('[{"lora": ', "not valid JSON"),
                             (json.dumps([{"lora": server_board_loras["style"], "strength_clip": 20}]), "strength_clip"),
                             (json.dumps([{"lora": "never/there.safetensors"}]), "never/there.safetensors")):
        with pytest.raises(ComfyExecutionError) as error:
            server.queue(graph(pedals))
        assert "LoRA Pedalboard" in str(error.value) and expected in str(error.value), str(error.value)


# --- named boards (nodes/board_presets.py) ------------------------------------------------------------------
def test_a_board_saved_under_a_name_comes_back_row_for_row(pack):
    from lora_lab.nodes import board_presets
    rows = [{"on": True, "lora": "style.safetensors", "strength_model": 0.8, "strength_clip": 1.0},
            {"on": False, "lora": "detail.safetensors", "strength_model": 0.5, "strength_clip": 0.5}]
    assert board_presets.save_board("portrait mix", rows) == {"name": "portrait mix", "replaced": False, "rows": 2}
    assert board_presets.load_board(" portrait mix ") == {"name": "portrait mix", "rows": rows}
    assert "portrait mix" in board_presets.board_names()
    assert board_presets.save_board("portrait mix", rows[:1])["replaced"] is True
    assert board_presets.load_board("portrait mix")["rows"] == rows[:1]


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "x" * 65, "trailing.", None])
def test_a_board_name_that_could_leave_its_folder_or_hide_is_refused(pack, name):
    from lora_lab.nodes import board_presets
    with pytest.raises(board_presets.BoardError, match="cannot name a board"):
        board_presets.save_board(name, [])
    with pytest.raises(board_presets.BoardError, match="cannot name a board"):
        board_presets.load_board(name)


def test_rows_the_node_would_refuse_are_not_saved(pack):
    from lora_lab.nodes import board_presets
    with pytest.raises(board_presets.BoardError, match="Row 1 of pedals has \"strength_model\": 'x'"):
        board_presets.save_board("bad rows", [{"lora": "a.safetensors", "strength_model": "x"}])
    with pytest.raises(board_presets.BoardError, match="no saved board named 'bad rows'") as missing:
        board_presets.load_board("bad rows")
    assert missing.value.status == 404


def http_post(server, path: str, body) -> tuple[int, object]:
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


@pytest.mark.server
def test_server_saves_lists_and_loads_named_boards(server, server_board_loras):
    rows = [{"on": True, "lora": server_board_loras["style"], "strength_model": 0.7, "strength_clip": 0.9}]
    assert http_post(server, "/loralab/boards/save", {"name": "server board", "rows": rows}) == (
        200, {"name": "server board", "replaced": False, "rows": 1})
    status, names = http_get(server, "/loralab/boards")
    assert status == 200 and "server board" in names
    assert http_get(server, "/loralab/boards/load", name="server board") == (200, {"name": "server board", "rows": rows})
    status, body = http_get(server, "/loralab/boards/load", name="../../secrets")
    assert status == 400 and "cannot name a board" in body["error"]
    status, body = http_post(server, "/loralab/boards/save", ["not", "an", "object"])
    assert status == 400 and "Send JSON" in body["error"]

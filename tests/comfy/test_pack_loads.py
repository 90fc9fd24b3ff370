"""The pack loads in a real ComfyUI (in-process and as a server) and every node is registered."""
import asyncio
import inspect

import pytest

import comfyui_home
import random_models

# Node ids from DESIGN.md that are implemented; workflows and tests depend on them, so they never change.
EXPECTED_NODES = {
    "LoraLabDatasetFromFolder", "LoraLabDatasetFromImages", "LoraLabDatasetPreview", "LoraLabClassImages",
    "LoraLabBlipLoader", "LoraLabCaption", "LoraLabWd14Loader", "LoraLabTagImages", "LoraLabTagReport",
    "LoraLabTrainLora", "LoraLabTrainingOptions",
    "LoraLabLoraStack", "LoraLabApplyLoraStack", "LoraLabLoraCompareGrid",
    "LoraLabOptimizerOptions", "LoraLabNetworkOptions", "LoraLabNoiseOptions", "LoraLabCaptionOptions",
    "LoraLabSaveOptions", "LoraLabPreviewOptions", "LoraLabMemoryOptions",
}


def test_pack_loads_the_comfyui_way(comfy):
    """ComfyUI's own custom-node loader imports the pack's __init__ and registers every node."""
    import nodes as comfy_nodes
    link = comfy.root / "custom_nodes" / comfyui_home.PACK_LINK_NAME
    loaded = comfy_nodes.load_custom_node(str(link))
    if inspect.iscoroutine(loaded):
        loaded = asyncio.run(loaded)
    assert loaded is True, "ComfyUI could not import the pack (see the log above)"
    registered = {name for name, cls in comfy_nodes.NODE_CLASS_MAPPINGS.items()
                  if getattr(cls, "CATEGORY", "").startswith("LoRA Lab")}
    assert EXPECTED_NODES <= registered


LOAD_AND_LIST_HEAVY_MODULES = """
import asyncio, inspect, sys
from pathlib import Path
sys.path.insert(0, {tools!r})
import comfyui_home
overlay = comfyui_home.build_overlay(Path({folder!r}), link_pack=True)
comfyui_home.prepare_in_process(overlay)
import nodes
loaded = nodes.load_custom_node(str(overlay / "custom_nodes" / comfyui_home.PACK_LINK_NAME))
if inspect.iscoroutine(loaded):
    loaded = asyncio.run(loaded)
assert loaded is True and "LoraLabTrainLora" in nodes.NODE_CLASS_MAPPINGS
print("HEAVY", sorted(m for m in ("peft", "accelerate", "transformers.modeling_utils") if m in sys.modules))
"""


def test_loading_the_pack_does_not_import_peft(tmp_path):
    """peft (with accelerate and transformers' modeling code) costs seconds and ~25 MB: a ComfyUI that
    loads the pack but trains nothing must not pay it. A fresh process, as ComfyUI starts."""
    import subprocess
    import sys
    code = LOAD_AND_LIST_HEAVY_MODULES.format(tools=str(comfyui_home.REPO / "tests" / "support"), folder=str(tmp_path / "comfy"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    line = next((l for l in out.stdout.splitlines() if l.startswith("HEAVY")), None)
    assert line is not None, out.stderr[-2000:]
    assert line == "HEAVY []", line


def test_node_classes_are_well_formed(pack):
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY.startswith("LoRA Lab/"), name
        assert callable(getattr(cls, cls.FUNCTION)), name
        spec = cls.INPUT_TYPES()
        assert "required" in spec, name
        assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES), name
        assert name in pack.NODE_DISPLAY_NAME_MAPPINGS, name


@pytest.mark.server
def test_server_lists_every_node_and_imported_cleanly(server):
    # Only our pack's lines count: ComfyUI 2025-10 without torchaudio reports its own audio nodes.
    ours_failed = [line for line in server.log_text().splitlines()
                   if ("IMPORT FAILED" in line or "Cannot import" in line) and comfyui_home.PACK_LINK_NAME in line]
    assert not ours_failed, server.log_tail()
    assert f"custom_nodes/{comfyui_home.PACK_LINK_NAME}" in server.log_text(), "the pack was not even tried"
    info = server.get_json("/object_info")
    ours = {name for name, spec in info.items() if spec.get("category", "").startswith("LoRA Lab")}
    assert EXPECTED_NODES <= ours, f"missing from /object_info: {EXPECTED_NODES - ours}"


def sd15_txt2img_prompt(checkpoint: str, text: str = "a photo of a lighthouse", size: int = 64,
                        steps: int = 1, prefix: str = "loralab_smoke") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 1, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


@pytest.mark.server
def test_checkpoint_sampling_runs_with_the_pack_loaded(server):
    """CheckpointLoaderSimple -> KSampler -> SaveImage on the random full-shape SD1.5 checkpoint."""
    history = server.run(sd15_txt2img_prompt(random_models.CHECKPOINT_NAME))
    images = history["outputs"]["7"]["images"]
    saved = server.overlay / "output" / images[0]["subfolder"] / images[0]["filename"]
    assert saved.is_file() and saved.stat().st_size > 0

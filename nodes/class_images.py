"""Class Images: the regularization pictures for prior preservation, sampled by the base model itself (DreamBooth's
"class images", kohya's reg folder filled by hand today), kept on disk so a second run samples none again.

Picture i is sampled alone at seed + i with ComfyUI's own KSampler path, so asking for more pictures later keeps the
first ones, and a Cancel keeps every picture finished. They live in ComfyUI's user folder, under a key of
everything that shapes them: the model (its weights and patches: comfy_bridge.model_fingerprint), the prompts,
size, steps, cfg, sampler and seed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import torch
from PIL import Image

import comfy.model_management
import comfy.utils
import nodes as comfy_nodes

from ..trainer.data.dataset import DatasetError
from ..trainer.data.folder_scan import scan_folder
from . import comfy_bridge, folders
from .messages import user_error

NODE = "Class Images"
CATEGORY = "LoRA Lab/Dataset"
SAMPLER, SCHEDULER = "euler", "normal"
USUAL_CFG = {"flux1": 1.0, "sd3": 4.5}      # else 7.0; Flux.1 is guidance-distilled: sampled at cfg 1
PREVIEW_PICTURES = 16


class LoraLabClassImages:
    TITLE = NODE

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base model you train on, without your LoRA."}),
            "clip": ("CLIP",),
            "vae": ("VAE",),
            "class_prompt": ("STRING", {"default": "a photo of a woman", "multiline": True, "dynamicPrompts": False,
                             "tooltip": "What your subject is an example of, without its trigger word (DreamBooth's "
                             "class prompt). It is also each picture's caption."}),
            "count": ("INT", {"default": 100, "min": 1, "max": 10_000, "tooltip":
                      "How many pictures. DreamBooth used 200 per class; kohya's guides 100-200; at least as many "
                      "as your pictures x repeats keeps each one new within an epoch."}),
            "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 64, "tooltip":
                           "Square size in pixels; 0 = the model's own (512 SD1.5, 1024 SDXL/SD3/Flux)."}),
            "steps": ("INT", {"default": 25, "min": 1, "max": 150}),
            "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.5, "tooltip":
                    "0 = the model's usual: 7 for SD1.5/SDXL, 4.5 for SD3, 1 for Flux.1."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Picture i uses seed + i."}),
        }, "optional": {
            "negative_prompt": ("STRING", {"default": "", "multiline": True, "dynamicPrompts": False}),
        }}

    RETURN_TYPES = ("LORALAB_DATASET", "IMAGE", "STRING")
    RETURN_NAMES = ("dataset", "preview", "report")
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Samples the class pictures for prior preservation with the base model (kept on disk, so only "
                   "missing ones are sampled again); connect dataset to Train LoRA's regularization.")

    def sample(self, model, clip, vae, class_prompt, count, resolution, steps, cfg, seed, negative_prompt=""):
        prompt = " ".join(str(class_prompt).split())
        if not prompt:
            raise user_error(NODE, "class_prompt", "the class prompt is empty.",
                             "describe the class your subject belongs to, e.g. 'a photo of a woman'.")
        family = comfy_bridge.model_family(model)
        size = resolution or comfy_bridge.default_resolution(model)
        cfg = cfg or USUAL_CFG.get(family, 7.0)
        settings = {"prompt": prompt, "negative": negative_prompt.strip(), "size": size, "steps": steps, "cfg": cfg,
                    "sampler": [SAMPLER, SCHEDULER], "seed": seed}
        comfy_bridge.load_fully(model)      # the base weights for the fingerprint, not a LoRA a sampler left in
        folder = folders.user_folder("class-images", cache_key(comfy_bridge.model_fingerprint(model), settings))
        folder.mkdir(parents=True, exist_ok=True)
        missing = [i for i in range(count) if not picture_path(folder, i).exists()]
        if missing:
            positive = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]
            negative = comfy_nodes.CLIPTextEncode().encode(clip, settings["negative"])[0]
            progress = comfy.utils.ProgressBar(len(missing))
            for done, index in enumerate(missing, start=1):
                latent = comfy_nodes.EmptyLatentImage().generate(size, size, 1)[0]
                sampled = comfy_nodes.common_ksampler(model, seed + index, steps, cfg, SAMPLER, SCHEDULER, positive,
                                                      negative, latent)[0]
                save_picture(folder, index, vae.decode(sampled["samples"])[0], prompt)
                progress.update_absolute(done, len(missing))
                comfy.model_management.throw_exception_if_processing_interrupted()
        try:
            dataset = first_pictures(scan_folder(str(folder)), count, folder)
        except DatasetError as error:
            raise user_error(NODE, "count", error.problem, error.fix) from None
        # A look at the first few, not all: 100 pictures at 1024 px would be 1.2 GB as an IMAGE batch.
        preview = torch.stack([torch.from_numpy(np.asarray(dataset.load_image(i), dtype=np.float32) / 255.0)
                               for i in range(min(PREVIEW_PICTURES, count))])
        report = (f"{count} class picture(s) of '{prompt}' at {size}x{size}, {steps} steps, cfg {cfg:g}, seeds "
                  f"{seed}-{seed + count - 1}: {len(missing)} sampled now, {count - len(missing)} kept from before "
                  f"(in {folder}). Each is captioned with the class prompt.")
        return {"ui": {"text": [report]}, "result": (dataset, preview, report)}


def cache_key(model_fingerprint: str, settings: dict) -> str:
    """The folder name: what shapes the pictures, hashed."""
    text = json.dumps([model_fingerprint, settings], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def picture_path(folder, index: int):
    return folder / f"class_{index:05d}.png"


def save_picture(folder, index: int, pixels: torch.Tensor, caption: str) -> None:
    """The picture and its caption, each written under a temporary name first: a Cancel or a crash never leaves
    half a file under a name the next run would take as finished."""
    final = picture_path(folder, index)
    caption_path = final.with_suffix(".txt")
    temporary = final.with_name(final.name + ".tmp")
    array = (pixels.clamp(0, 1) * 255).round().byte().cpu().numpy()
    caption_path.with_name(caption_path.name + ".tmp").write_text(caption, encoding="utf-8")
    os.replace(caption_path.with_name(caption_path.name + ".tmp"), caption_path)
    Image.fromarray(array).save(temporary, format="PNG")
    os.replace(temporary, final)


def first_pictures(dataset, count: int, folder):
    """The dataset of pictures 0..count-1 (a folder sampled for more earlier keeps the others for later)."""
    names = {picture_path(folder, i).name for i in range(count)}
    items = tuple(item for item in dataset.items if item.key in names)
    if len(items) != count:
        broken = sorted(rel for rel, _ in dataset.skipped if rel in names)
        raise DatasetError(f"{count - len(items)} of the {count} class pictures in {folder} could not be read back"
                           f"{': ' + ', '.join(broken[:5]) if broken else ''}.",
                           "Delete those files (or the folder) and queue again: missing pictures are sampled anew.")
    return dataclasses.replace(dataset, items=items)


NODE_CLASS_MAPPINGS = {"LoraLabClassImages": LoraLabClassImages}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraLabClassImages": f"{NODE} (LoRA Lab)"}

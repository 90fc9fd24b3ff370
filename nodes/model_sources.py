"""Which files the trained model came from, read from the queued graph, and what kind of model it is.

A MODEL carries no file name, but the queued prompt does: following Train LoRA's ``model`` input
upstream (through LoRA loaders, ModelSampling and other patches, which all take a ``model`` input)
reaches the loader and its ``ckpt_name`` / ``unet_name``. The same for ``vae``: a VAE Loader means a
separate VAE file (kohya's ``--vae``); the checkpoint's own VAE is not named again. kohya writes these as
``ss_sd_model_name`` / ``ss_vae_name`` with their hashes; a graph whose model comes from elsewhere (a
merge, a model made in code) simply has none.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import folder_paths

from ..trainer.file_hashes import HashCache
from ..trainer.training.kohya_metadata import BaseModel
from . import folders

log = logging.getLogger("LoRA Lab")

# loader input -> the folder kinds ComfyUI lists its files under (the UNet folder's name changed in 2024)
MODEL_FILE_INPUTS = {"ckpt_name": ("checkpoints",), "unet_name": ("diffusion_models", "unet")}
VAE_FILE_INPUTS = {"vae_name": ("vae",)}
_MAX_HOPS = 64

_hash_caches: dict = {}      # cache file -> HashCache (one per ComfyUI user folder)


@dataclass(frozen=True)
class LoaderFile:
    name: str
    path: str


def loader_file(prompt, node_id, input_name: str, file_inputs: dict) -> LoaderFile | None:
    """The file behind ``node_id``'s ``input_name``, following same-named inputs upstream."""
    seen = set()
    link = _link(prompt, node_id, input_name)
    while link and link not in seen and len(seen) < _MAX_HOPS:
        seen.add(link)
        inputs = prompt.get(link[0], {}).get("inputs", {})
        for file_input, kinds in file_inputs.items():
            name = inputs.get(file_input)
            if isinstance(name, str):
                path = _full_path(kinds, name)
                return LoaderFile(name, path) if path else None
        link = _link(prompt, link[0], input_name)
    return None


def base_model(prompt, node_id, model, clip) -> BaseModel:
    """What kohya's metadata says about the base: files and hashes (when the graph names them), the
    model's variant, and the CLIP's clip skip."""
    model_file = vae_file = None
    if isinstance(prompt, dict) and node_id is not None:
        model_file = loader_file(prompt, str(node_id), "model", MODEL_FILE_INPUTS)
        vae_file = loader_file(prompt, str(node_id), "vae", VAE_FILE_INPUTS)
    return BaseModel(name=model_file.name if model_file else None, hashes=_hashes(model_file),
                     vae_name=vae_file.name if vae_file else None, vae_hashes=_hashes(vae_file),
                     variant=model_variant(model), clip_skip=clip_skip(clip))


def model_variant(patcher) -> str | None:
    """The variant kohya names in ``modelspec.architecture``: Flux "dev"/"schnell"; SD3 "medium", "5-medium"
    or "5-large", told apart as sd-scripts does (3.5 has q/k norms; 3.5 medium adds self-attention in
    its first blocks)."""
    config = getattr(patcher.model, "model_config", None)
    name = type(config).__name__
    if name in ("Flux", "FluxSchnell"):
        return "schnell" if name == "FluxSchnell" else "dev"
    if name == "SD3":
        unet = getattr(config, "unet_config", {}) or {}
        if not unet.get("qk_norm"):
            return "medium"
        return "5-medium" if unet.get("x_block_self_attn_layers") else "5-large"
    return None


def clip_skip(clip) -> int | None:
    """kohya's --clip_skip from ComfyUI's CLIP Set Last Layer (-1 -> 1, -2 -> 2); None when never set,
    which is also what kohya writes when the option is not given."""
    layer = getattr(clip, "layer_idx", None)
    return -int(layer) if isinstance(layer, int) and layer < 0 else None


def _link(prompt, node_id, input_name):
    value = prompt.get(node_id, {}).get("inputs", {}).get(input_name)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return str(value[0]), value[1]
    return None


def _full_path(kinds, name) -> str | None:
    for kind in kinds:
        try:
            path = folder_paths.get_full_path(kind, name)
        except KeyError:          # a folder kind this ComfyUI does not have
            continue
        if path:
            return path
    return None


def _hashes(file: LoaderFile | None):
    if file is None:
        return None
    cache_file = folders.user_folder() / "model_hashes.json"
    cache = _hash_caches.setdefault(cache_file, HashCache(cache_file))
    try:
        return cache.hashes(file.path)
    except OSError as error:      # the file went away since it was loaded: its name is still worth keeping
        log.warning("[LoRA Lab] could not hash %s for the LoRA's metadata: %s", file.name, error)
        return None

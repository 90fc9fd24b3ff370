"""Real model architectures with random weights, built in-process (nothing can be downloaded here).

Needs an in-process ComfyUI (see comfyui_home.prepare_in_process) for everything but tiny_blip.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

SD15_FULL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def sd15_unet_config(model_channels: int = 32) -> dict:
    """SD1.5's UNet layout (four levels, attention in the first three) at a chosen width.

    model_channels 32 -> about 10 M parameters, 64 -> 37 M, 320 -> the real 860 M.
    """
    config = dict(SD15_FULL_UNET, model_channels=model_channels)
    if model_channels < 320:
        config["num_head_channels"] = -1
        config["num_heads"] = 8 if model_channels >= 64 else 4
    return config


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give a module built by ComfyUI's no-init ops real random weights.

    ComfyUI's ``disable_weight_init`` layers override ``reset_parameters`` with a no-op, so call the
    torch base class's initialiser directly.
    """
    torch.manual_seed(seed)
    bases = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Conv3d, torch.nn.GroupNorm,
             torch.nn.LayerNorm, torch.nn.Embedding)
    with torch.no_grad():
        for sub in module.modules():
            for base in bases:
                if isinstance(sub, base):
                    base.reset_parameters(sub)
                    break
        for param in module.parameters():
            if not torch.isfinite(param).all() or param.abs().max() > 1e6:
                param.normal_(0, 0.02)
    return module


def sd15_model_patcher(model_channels: int = 32, seed: int = 0):
    """An SD1.5-architecture BaseModel (eps prediction) in a ModelPatcher on the CPU."""
    import comfy.supported_models
    return patcher_for(comfy.supported_models.SD15(sd15_unet_config(model_channels)), seed)


def patcher_for(config, seed: int, state_dict: dict | None = None, finish=None):
    """``config.get_model`` with random weights in a ModelPatcher on the CPU. ``state_dict``: what
    ComfyUI's detection reads when building (e.g. SD2's v-prediction tell); ``finish(model)``: any
    initialisation randomize_ cannot do."""
    import comfy.model_patcher
    # Built inside inference mode, as ComfyUI's loaders build models while executing a node.
    with torch.inference_mode():
        model = config.get_model(state_dict or {})
        randomize_(model, seed)
        if finish is not None:
            finish(model)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def sd2_v_model_patcher(model_channels: int = 32, seed: int = 0):
    """An SD2.x-architecture BaseModel that predicts v (like SD 2.1 768-v), in a ModelPatcher on the CPU.

    ComfyUI decides eps vs v for SD2 from the checkpoint (``SD20.model_type``: a spread-out
    ``output_blocks.11.1...norm1.bias``); that same detection is fed a tensor that says "v".
    """
    import comfy.supported_models
    unet = dict(sd15_unet_config(model_channels), context_dim=1024, use_linear_in_transformer=True)
    config = comfy.supported_models.SD20(unet)
    # SD20 forces 64-channel heads (its unet_extra_config); a narrow test model needs fewer channels per head.
    config.unet_config.update(num_heads=4, num_head_channels=-1)
    says_v = {"output_blocks.11.1.transformer_blocks.0.norm1.bias": torch.linspace(-1, 1, model_channels)}
    return patcher_for(config, seed, says_v)


def sd2_clip(seed: int = 1):
    """ComfyUI's SD2 CLIP (OpenCLIP ViT-H text tower, 1024 wide, and its tokenizer) with random weights."""
    import comfy.sd
    import comfy.supported_models
    target = comfy.supported_models.SD20(dict(sd15_unet_config(32), context_dim=1024)).clip_target()
    with torch.inference_mode():
        clip = comfy.sd.CLIP(target=target)
        randomize_(clip.cond_stage_model, seed)
    return clip


def sd15_clip(seed: int = 1):
    """ComfyUI's SD1 CLIP (the real ViT-L/14 text tower and tokenizer) with random weights."""
    import comfy.sd
    import comfy.supported_models
    target = comfy.supported_models.SD15(sd15_unet_config(32)).clip_target()
    with torch.inference_mode():
        clip = comfy.sd.CLIP(target=target)
        randomize_(clip.cond_stage_model, seed)
    return clip


SMALL_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                      "ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [],
                      "dropout": 0.0}


def small_vae(seed: int = 2):
    """An SD-style KL VAE (8x down, 4 latent channels) at a quarter of the width, random weights."""
    import comfy.ldm.models.autoencoder
    import comfy.sd
    with torch.inference_mode():
        torch.manual_seed(seed)
        model = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=SMALL_VAE_DDCONFIG, embed_dim=4)
        randomize_(model, seed)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        return comfy.sd.VAE(sd=state, config={"params": {"ddconfig": SMALL_VAE_DDCONFIG, "embed_dim": 4}})


def full_sd15_checkpoint_state(seed: int = 0, unet_config: dict | None = None) -> dict[str, torch.Tensor]:
    """A state dict ComfyUI's CheckpointLoaderSimple recognises as SD1.5: real shapes, random values.
    ``unet_config``: another SD1.5 UNet layout (SD15_SLIM_UNET) beside the full CLIP and VAE."""
    import comfy.ldm.models.autoencoder
    import comfy.supported_models
    state: dict[str, torch.Tensor] = {}
    with torch.inference_mode(False), torch.no_grad():
        unet = patcher_for(comfy.supported_models.SD15(unet_config or sd15_unet_config(320)), seed).model
        state.update({"model." + k: v.half() for k, v in unet.state_dict().items()
                      if k.startswith("diffusion_model.")})
        del unet
        full_vae = dict(SMALL_VAE_DDCONFIG, ch=128, num_res_blocks=2)
        vae = randomize_(comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=full_vae, embed_dim=4), seed + 2)
        state.update({"first_stage_model." + k: v.half() for k, v in vae.state_dict().items()})
        del vae
        clip = sd15_clip(seed + 1)
        for key, value in clip.cond_stage_model.state_dict().items():
            if key.startswith("clip_l.transformer."):
                state["cond_stage_model." + key[len("clip_l."):]] = value.half()
    return {k: v.contiguous() for k, v in state.items()}


CHECKPOINT_NAME = "loralab_random_sd15.safetensors"
CHECKPOINT_FORMAT = 1  # bump when the recipe changes, so cached files are rebuilt
# ComfyUI tells SD1.5 by model_channels 320 and context_dim 768 (comfy.supported_models.SD15), not by depth:
# two levels with one ResBlock each is still "SD1.5" to every loader, and trains a 64 px step about 20x
# faster than the full UNet on a CPU (the crash campaign restarts the server dozens of times).
SD15_SLIM_UNET = dict(SD15_FULL_UNET, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1],
                      transformer_depth_output=[1, 1, 1, 1])
SLIM_CHECKPOINT_NAME = "loralab_slim_sd15.safetensors"


def link_slim_checkpoint(overlay: Path) -> str:
    """The slim-UNet SD1.5 checkpoint (built aside once) in ``overlay``'s checkpoints folder: its name there."""
    return link_checkpoint(full_sd15_checkpoint_built_aside(slim=True), overlay, SLIM_CHECKPOINT_NAME)


def ensure_full_sd15_checkpoint(cache: Path, seed: int = 0, slim: bool = False) -> Path:
    """Write (once) a full-shape SD1.5 checkpoint with random weights and return its path.

    Cached outside the repository; about 2.1 GB in fp16. Its pictures are noise: it exists so that
    ComfyUI's own loaders, samplers and our nodes can run end to end without downloading a model.
    ``slim``: the UNet is SD15_SLIM_UNET (CLIP and VAE as in the full one).
    """
    import safetensors.torch
    path = Path(cache) / f"random-{'slim-' if slim else ''}sd15-seed{seed}-v{CHECKPOINT_FORMAT}.safetensors"
    if path.exists():
        return path
    state = full_sd15_checkpoint_state(seed, SD15_SLIM_UNET if slim else None)
    partial = path.with_suffix(".partial")
    safetensors.torch.save_file(state, str(partial), metadata={
        "loralab_note": "random weights for tests; produces noise", "modelspec.architecture": "stable-diffusion-v1"})
    os.replace(partial, path)
    return path


def full_sd15_checkpoint_built_aside(timeout: float = 1200, slim: bool = False) -> Path:
    """The cached full-shape (or ``slim``) random SD1.5 checkpoint, built first if missing.

    Building needs ComfyUI imported; a child process keeps its 3.5 GB of fp32 weights out of the caller's
    memory (the test session, the demo).
    """
    import subprocess
    import sys
    import comfyui_home
    kind = "slim-sd15" if slim else "sd15"
    cached = Path(comfyui_home.cache_dir()) / f"random-{kind}-seed0-v{CHECKPOINT_FORMAT}.safetensors"
    if cached.exists():
        return cached
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import comfyui_home, random_models, pathlib, tempfile;"
            "ov = comfyui_home.build_overlay(pathlib.Path(tempfile.mkdtemp()) / 'c', link_pack=False);"
            "comfyui_home.prepare_in_process(ov);"
            f"print(random_models.ensure_full_sd15_checkpoint(comfyui_home.cache_dir(), slim={slim}))")
    made = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent)], capture_output=True,
                          text=True, timeout=timeout)
    if made.returncode != 0:
        raise RuntimeError("building the random SD1.5 checkpoint failed:\n" + made.stderr[-3000:])
    return Path(made.stdout.strip().splitlines()[-1])


def link_checkpoint(checkpoint: Path, overlay: Path, name: str = CHECKPOINT_NAME) -> str:
    """Make the cached checkpoint visible in an overlay's models/checkpoints; returns its list name."""
    link = Path(overlay) / "models" / "checkpoints" / name
    if not link.exists():
        link.symlink_to(checkpoint)
    return name


# --- BLIP (transformers; no ComfyUI needed) --------------------------------------------------------
BLIP_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "cat", "dog",
              "red", "blue", "car", "tree", "on", "the", "grass", "house"]


def tiny_blip(folder: Path, seed: int = 0, layers: int = 2, width: int = 32, image_size: int = 32,
              patch_size: int = 8) -> Path:
    """Save a BLIP captioning model (transformers' real classes; 2 layers, 32 wide by default) to ``folder``.

    Its ``generate()`` really runs; its captions are random words from a 19-token vocabulary, and they
    depend on the picture (see ``_make_it_look``).
    """
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration,
                              BlipImageProcessor, BlipProcessor)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(BLIP_VOCAB) + "\n")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]", model_max_length=64)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    heads = max(2, width // 32)
    text = {"vocab_size": len(BLIP_VOCAB), "hidden_size": width, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": 2 * width, "max_position_embeddings": 128,
            "encoder_hidden_size": width, "bos_token_id": 5, "pad_token_id": 0, "sep_token_id": 3, "eos_token_id": 3}
    vision = {"hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": heads,
              "intermediate_size": 2 * width, "image_size": image_size, "patch_size": patch_size,
              "initializer_range": 0.02}
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=width)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    _make_it_look(model, seed)
    model.save_pretrained(str(folder), safe_serialization=True)
    processor.save_pretrained(str(folder))
    return folder


def _make_it_look(model, seed: int, cross_attention_gain: float = 10.0) -> None:
    """Make a random BLIP's words depend on the picture.

    Left at random init the decoder barely listens to the vision tower, so every picture gets the
    same caption and "batched equals one at a time" would prove nothing. Re-draw the vision weights
    (patch embedding larger, so pixels dominate the position embeddings) and strengthen cross-attention.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in sorted(model.named_parameters()):
            if name.startswith("vision_model.") and "norm" not in name and (value.dim() >= 2 or "class_embedding" in name):
                std = 0.2 if "patch_embedding" in name else 0.02
                value.copy_(torch.randn(value.shape, generator=generator) * std)
            elif "crossattention" in name and value.dim() >= 2:
                value.mul_(cross_attention_gain)


# --- SDXL (small UNet, real CLIP-L, small CLIP-G) ------------------------------------------------
SDXL_CLIP_L_WIDTH = 768
SDXL_SIZE_EMBED_WIDTH = 6 * 256   # encode_adm: height, width, crop_h, crop_w, target_height, target_width


def sdxl_unet_config(model_channels: int = 32, pooled_dim: int = 256) -> dict:
    """SDXL's UNet layout (three levels, attention only in the second and third, linear projections,
    "sequential" size/pooled conditioning) at a chosen width, one transformer block per attention.

    ``context_dim`` is CLIP-L's 768 plus the (small) CLIP-G's width, ``adm_in_channels`` that CLIP-G's
    pooled width plus six 256-wide size embeddings, as in the real one (2048 and 2816). The keys are
    those ComfyUI's model_detection produces for an SDXL checkpoint, in 2024-03 and 2025-10 alike.
    """
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": pooled_dim + SDXL_SIZE_EMBED_WIDTH,
        "in_channels": 4, "model_channels": model_channels, "num_res_blocks": [2, 2, 2],
        "transformer_depth": [0, 0, 1, 1, 1, 1], "channel_mult": [1, 2, 4], "transformer_depth_middle": 1,
        "use_linear_in_transformer": True, "context_dim": SDXL_CLIP_L_WIDTH + pooled_dim,
        "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def sdxl_model_patcher(model_channels: int = 32, seed: int = 0, pooled_dim: int = 256):
    """An SDXL-architecture BaseModel (eps prediction, ComfyUI's model_base.SDXL) in a ModelPatcher on the CPU.

    Pair it with ``sdxl_clip(g_width=pooled_dim)``: its cross-attention takes 768 + pooled_dim wide
    context and its class embedding pooled_dim + 1536 wide ``y``.
    """
    import comfy.supported_models
    config = comfy.supported_models.SDXL(sdxl_unet_config(model_channels, pooled_dim))
    # BASE forces 64-channel heads (unet_extra_config); a narrow test model needs fewer channels per head.
    config.unet_config.update(num_heads=4, num_head_channels=-1)
    return patcher_for(config, seed)


def _small_bigg_config(g_width: int, g_layers: int) -> dict:
    """This ComfyUI's clip_config_bigg.json (OpenCLIP ViT-bigG text tower), narrowed and shortened."""
    import json

    import comfy.sdxl_clip
    with open(Path(comfy.sdxl_clip.__file__).resolve().parent / "clip_config_bigg.json") as f:
        config = json.load(f)
    config.update(hidden_size=g_width, intermediate_size=4 * g_width, num_attention_heads=4,
                  num_hidden_layers=g_layers, projection_dim=g_width)
    return config


_SDXL_CLIP_CLASSES = None


def _sdxl_clip_classes():
    """(SmallClipG, SmallSDXLClipModel), defined once ComfyUI is importable."""
    global _SDXL_CLIP_CLASSES
    if _SDXL_CLIP_CLASSES is not None:
        return _SDXL_CLIP_CLASSES
    import inspect

    import comfy.sd1_clip
    import comfy.sdxl_clip

    class _SwapJsonConfig(comfy.sd1_clip.SDClipModel):
        """Sits between SDXLClipG and SDClipModel in SmallClipG's MRO: SDXLClipG.__init__ runs as is
        (its special tokens, layer, pooled and model_options settings for this ComfyUI version) and only
        the json config it passes on is swapped for the small one."""

        def __init__(self, *args, **kwargs):
            kwargs["textmodel_json_config"] = self.__dict__["_loralab_g_config"]
            super().__init__(*args, **kwargs)

    class SmallClipG(comfy.sdxl_clip.SDXLClipG, _SwapJsonConfig):
        """ComfyUI's SDXLClipG with a narrow, shallow OpenCLIP-bigG-style tower."""

        def __init__(self, g_config_path: str, **kwargs):
            self.__dict__["_loralab_g_config"] = g_config_path   # read by _SwapJsonConfig; not a Module attr
            super().__init__(**kwargs)
            del self.__dict__["_loralab_g_config"]

    sdclip_params = set(inspect.signature(comfy.sd1_clip.SDClipModel.__init__).parameters)
    clip_g_params = set(inspect.signature(comfy.sdxl_clip.SDXLClipG.__init__).parameters)

    class SmallSDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
        """ComfyUI's SDXLClipModel (its encode_token_weights, set_clip_options, ...) with the real CLIP-L
        and a small CLIP-G. ``g_config`` comes from ClipTarget.params; the rest is what comfy.sd.CLIP
        passes: (device, dtype) in 2024-03, (device, dtype, model_options) in 2025-10."""

        def __init__(self, g_config: dict, device="cpu", dtype=None, **kwargs):
            import json
            import tempfile
            torch.nn.Module.__init__(self)
            # As SDXLClipModel.__init__ builds clip_l; only keyword arguments this version knows are passed.
            l_extra = {k: v for k, v in kwargs.items() if k in sdclip_params}
            self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     layer_norm_hidden_state=False, **l_extra)
            # SDClipModel reads its config from a path in 2024-03 (2025-10 also takes a dict): a temp file.
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump(g_config, f)
            try:
                g_extra = {k: v for k, v in kwargs.items() if k in clip_g_params}
                self.clip_g = SmallClipG(f.name, device=device, dtype=dtype, **g_extra)
            finally:
                os.unlink(f.name)
            width = self.clip_g.transformer.text_model.embeddings.token_embedding.weight.shape[1]
            if width != g_config["hidden_size"]:
                raise RuntimeError("this ComfyUI's SDXLClipG ignored the small config; sdxl_clip needs updating")
            self.dtypes = {dtype}   # 2025-10's comfy.sd.CLIP reads it; harmless in 2024-03

    _SDXL_CLIP_CLASSES = (SmallClipG, SmallSDXLClipModel)
    return _SDXL_CLIP_CLASSES


def sdxl_clip(seed: int = 1, g_width: int = 256, g_layers: int = 4):
    """ComfyUI's SDXL text encoders (SDXLTokenizer, SDXLClipModel layout) with random weights.

    ``clip_l`` is the real ViT-L/14 text tower, used as SDXL does (penultimate layer, no final norm);
    ``clip_g`` an OpenCLIP-bigG-style tower ``g_width`` wide and ``g_layers`` deep (the real one is
    1280 x 32) with SDXLClipG's settings. Encoding gives cond (B, 77, 768 + g_width) and pooled
    (B, g_width), so it feeds ``sdxl_model_patcher(pooled_dim=g_width)``.
    """
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base
    _, model_class = _sdxl_clip_classes()
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, model_class)
    target.params["g_config"] = _small_bigg_config(g_width, g_layers)
    with torch.inference_mode():
        clip = comfy.sd.CLIP(target=target)
        randomize_(clip.cond_stage_model, seed)
    return clip

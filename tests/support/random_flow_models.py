"""Small flow-matching models (SD3 MMDiT, Flux) with random weights, built from ComfyUI's own classes.

Needs an in-process ComfyUI that has them (2024-08 or later; tested on 0.3.64, 2025-10), prepared
by comfyui_home.prepare_in_process. Nothing is downloaded: every weight is random.

The configs use the same unet_config keys comfy/model_detection.py derives from a real checkpoint,
so ``config.get_model({})`` builds exactly the module layout a real SD3 / Flux file gives, only
narrower and shallower:

* SD3 (MMDiT): the width is tied to the depth (hidden = 64 * depth, one 64-wide head per block),
  so depth 2 -> 128 wide, 2 heads. The last joint block is "pre_only" on its context side, as in
  the real model. Context (T5 / padded CLIP) and pooled (CLIP-L+G) widths are shrunk.
* Flux: hidden 64, 2 heads of 32, rotary axes [4, 14, 14] (the real [16, 56, 56] / 4), one double
  and one single block, guidance embedding on (Flux dev). ``in_channels`` is the latent's 16; the
  model packs 2x2 patches itself, so its img_in Linear takes 64.

To train them: ``small_flow_vae`` (16 latent channels, as SD3's and Flux's VAEs), ``sd3_clip`` (ComfyUI's
SD3 text encoder with CLIP-L only: pair with ``sd3_model_patcher(context_dim=4096, pooled_dim=2048)``) and
``flux_clip`` (ComfyUI's Flux text encoder, CLIP-L and a tiny T5: pair with
``flux_model_patcher(context_dim=TINY_T5["d_model"], pooled_dim=768)``).
"""
from __future__ import annotations

import torch

from random_models import patcher_for, randomize_


def sd3_unet_config(depth: int = 2, context_dim: int = 64, pooled_dim: int = 32, pos_embed_max_size: int = 64,
                    qk_norm: str | None = None, x_block_self_attn_layers: tuple[int, ...] = ()) -> dict:
    """What model_detection.detect_unet_config returns for an MMDiT checkpoint, at a chosen size.

    The real SD3 medium: depth 24, context_dim 4096, pooled_dim 2048, pos_embed_max_size 192, no
    qk_norm. SD3.5 medium adds qk_norm "rms" and x_block_self_attn_layers 0..12 (large: depth 38,
    qk_norm "rms"). ``pos_embed_max_size`` 64 -> latents up to 128x128 (1024 px).
    """
    return {
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": depth, "input_size": None,
        "adm_in_channels": pooled_dim,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": context_dim, "out_features": 64 * depth}},
        "num_patches": pos_embed_max_size * pos_embed_max_size, "pos_embed_max_size": pos_embed_max_size,
        "pos_embed_scaling_factor": None,
        **({"qk_norm": qk_norm} if qk_norm else {}),
        "x_block_self_attn_layers": list(x_block_self_attn_layers),
    }


def flux_unet_config(hidden_size: int = 64, num_heads: int = 2, depth: int = 1, depth_single_blocks: int = 1,
                     context_dim: int = 64, pooled_dim: int = 32, guidance_embed: bool = True,
                     axes_dim: tuple[int, ...] | None = None) -> dict:
    """What model_detection.detect_unet_config returns for a Flux checkpoint, at a chosen size.

    The real Flux dev: hidden 3072, 24 heads, depth 19, depth_single_blocks 38, context 4096 (T5-XXL),
    pooled 768 (CLIP-L), axes_dim [16, 56, 56]; schnell has guidance_embed False.
    """
    head_dim = hidden_size // num_heads
    if axes_dim is None:   # the real split (1/8, 7/16, 7/16 of a head), each even as rope needs
        first = max(2, head_dim // 8 // 2 * 2)
        rest = (head_dim - first) // 2 // 2 * 2
        axes_dim = (first + (head_dim - first - 2 * rest), rest, rest)
    return {
        "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16,
        "vec_in_dim": pooled_dim, "context_in_dim": context_dim, "hidden_size": hidden_size, "mlp_ratio": 4.0,
        "num_heads": num_heads, "depth": depth, "depth_single_blocks": depth_single_blocks,
        "axes_dim": list(axes_dim), "theta": 10000, "qkv_bias": True, "guidance_embed": guidance_embed,
    }


def _finish_init_(model: torch.nn.Module) -> None:
    """What randomize_ cannot know: RMSNorm scales (torch.empty in ComfyUI) become 1 and SD3's
    fixed ``pos_embed`` buffer gets the sin-cos table the real checkpoints carry."""
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                for param in module.parameters(recurse=False):
                    param.fill_(1.0)
        network = model.diffusion_model
        if getattr(network, "pos_embed", None) is not None:
            from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
            table = get_2d_sincos_pos_embed(network.hidden_size, network.pos_embed_max_size)
            network.pos_embed.copy_(torch.from_numpy(table).to(network.pos_embed).unsqueeze(0))


def _patcher(config, seed: int):
    return patcher_for(config, seed, finish=_finish_init_)


def sd3_model_patcher(seed: int = 0, **config):
    """ComfyUI's SD3 BaseModel (MMDiT, flow matching, shift 3.0), tiny, in a ModelPatcher on the CPU.

    ``config``: sd3_unet_config's arguments. About 1.1 M parameters at the defaults (plus the
    64x64x128 ``pos_embed`` buffer).
    """
    import comfy.supported_models
    return _patcher(comfy.supported_models.SD3(sd3_unet_config(**config)), seed)


def flux_model_patcher(seed: int = 0, weight_dtype: torch.dtype | None = None, **config):
    """ComfyUI's Flux BaseModel (flow matching, ModelSamplingFlux shift 1.15), tiny, in a ModelPatcher on
    the CPU. Flux dev by default; ``guidance_embed=False`` gives a schnell-like model (FluxSchnell's
    sampling: shift 1.0, multiplier 1.0, ModelType.FLOW). ``config``: flux_unet_config's arguments.
    About 0.28 M parameters at the defaults.
    """
    import comfy.supported_models
    unet = flux_unet_config(**config)
    family = comfy.supported_models.Flux if unet["guidance_embed"] else comfy.supported_models.FluxSchnell
    random = _patcher(family(unet), seed)
    if weight_dtype is None:
        return random
    # As Load Diffusion Model with weight_dtype fp8_e4m3fn builds it: ComfyUI's manual-cast ops, weights stored
    # in that dtype, computing in fp32 here (the CPU); the same random weights, cast by load_state_dict.
    import comfy.model_patcher
    stored = family(unet)
    stored.set_inference_dtype(weight_dtype, torch.float32)
    with torch.inference_mode():
        model = stored.get_model({})
        model.load_state_dict(random.model.state_dict())
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


# --- what else a flow model needs to train: a 16-channel VAE and its text encoders -----------------
SMALL_FLOW_VAE_DDCONFIG = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3,
                           "ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [],
                           "dropout": 0.0}


def small_flow_vae(seed: int = 2):
    """A KL VAE like SD3's and Flux's (8x down, 16 latent channels) at a quarter of the width, random weights.

    The real ones are 128 wide with two res blocks per level and no quant convs; this one keeps
    ComfyUI's plain AutoencoderKL (with quant convs), which encodes to the same 16-channel latents.
    """
    import comfy.ldm.models.autoencoder
    import comfy.sd
    with torch.inference_mode():
        torch.manual_seed(seed)
        model = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=SMALL_FLOW_VAE_DDCONFIG, embed_dim=16)
        randomize_(model, seed)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        vae = comfy.sd.VAE(sd=state, config={"params": {"ddconfig": SMALL_FLOW_VAE_DDCONFIG, "embed_dim": 16}})
    vae.latent_channels = 16     # an explicit config leaves ComfyUI's default of 4 (used by tiled encoding)
    return vae


def _random_clip(target, seed: int, model_options: dict | None = None):
    import comfy.sd
    with torch.inference_mode():
        clip = comfy.sd.CLIP(target=target, model_options=model_options or {})
        randomize_(clip.cond_stage_model, seed)
        # T5's layer norms (T5LayerNorm, torch.empty in ComfyUI) scale by 1, as a trained T5's roughly do.
        for module in clip.cond_stage_model.modules():
            if type(module).__name__ == "T5LayerNorm":
                module.weight.fill_(1.0)
    return clip


def sd3_clip(seed: int = 1):
    """ComfyUI's SD3 text encoder (SD3Tokenizer, SD3ClipModel) with CLIP-L only and random weights.

    That is a real SD3 setup (TripleCLIPLoader without G and T5 files): CLIP-L's penultimate layer
    padded to 4096 wide, and the pooled vector CLIP-L's 768 followed by 1280 zeros for the missing
    CLIP-G. Encoding gives cond (B, 77, 4096) and pooled (B, 2048), so it feeds
    ``sd3_model_patcher(context_dim=4096, pooled_dim=2048)``.
    """
    import comfy.supported_models_base
    import comfy.text_encoders.sd3_clip as sd3
    target = comfy.supported_models_base.ClipTarget(sd3.SD3Tokenizer, sd3.sd3_clip(clip_l=True, clip_g=False, t5=False))
    return _random_clip(target, seed)


TINY_T5 = {"d_model": 32, "d_ff": 64, "num_layers": 2, "num_heads": 2, "d_kv": 16}


def flux_clip(seed: int = 1, t5: dict | None = None):
    """ComfyUI's Flux text encoder (FluxTokenizer, FluxClipModel): the real CLIP-L and a tiny T5, random weights.

    The T5 is narrowed through ComfyUI's own ``t5xxl_model_config`` model option (SDClipModel applies
    ``<model_name>_model_config`` over its json config; ComfyUI 2024-08 and later). Encoding gives
    cond (B, 256, d_model) from T5 (Flux's T5 pads to 256 tokens) and pooled (B, 768) from CLIP-L, so it
    feeds ``flux_model_patcher(context_dim=d_model, pooled_dim=768)``. The real T5-XXL: d_model 4096,
    d_ff 10240, 24 layers, 64 heads of 64.
    """
    import comfy.supported_models_base
    import comfy.text_encoders.flux as flux
    config = dict(TINY_T5, **(t5 or {}))
    target = comfy.supported_models_base.ClipTarget(flux.FluxTokenizer, flux.flux_clip())
    clip = _random_clip(target, seed, {"t5xxl_model_config": config})
    width = clip.cond_stage_model.t5xxl.transformer.shared.weight.shape[1]
    if width != config["d_model"]:
        raise RuntimeError("this ComfyUI ignored t5xxl_model_config; flux_clip needs updating")
    return clip

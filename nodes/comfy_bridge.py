"""The only place the trainer meets ComfyUI: a ComfyUI MODEL/CLIP/VAE behind trainer's protocols.

Everything here works on ComfyUI 2024-03 and 2025-10; version differences are feature-detected
(see shared/research/comfyui-internals.md).
"""
from __future__ import annotations

import contextlib
import inspect
import logging

import torch

import comfy.lora
import comfy.model_management
import comfy.sd

from ..trainer.training.gradient_checkpointing import clone_inputs_of, gradient_checkpointing
from ..trainer.data.encoded_dataset import PictureSize, TextEncoding
from ..trainer.lora.network import DIT_BLOCKS, Network

log = logging.getLogger("LoRA Lab")

try:      # ComfyUI 2024-08+ converts some foreign formats first, as load_lora_for_models does
    from comfy.lora_convert import convert_lora as _CONVERT_LORA
except ImportError:
    _CONVERT_LORA = None


def model_sampling(patcher):
    getter = getattr(patcher, "get_model_object", None)
    return getter("model_sampling") if getter else patcher.model.model_sampling


def model_family(patcher) -> str:
    """A short name for the base model family, as kohya's ss_base_model_version spells it.

    By ComfyUI's model config class, not isinstance: a subclass (FluxInpaint, ...) is
    another model that needs its own support (refused by unsupported_family under its own name).
    """
    config_name = type(getattr(patcher.model, "model_config", None)).__name__
    families = {"SD15": "sd_v1", "SD20": "sd_v2", "SD21UnclipL": "sd_v2", "SD21UnclipH": "sd_v2",
                "SDXL": "sdxl_base_v1-0", "SDXLRefiner": "sdxl_refiner_v1-0", "SSD1B": "sdxl_base_v1-0",
                "SD3": "sd3", "Flux": "flux1", "FluxSchnell": "flux1"}   # SD3 / Flux: ComfyUI mid-2024 on
    return families.get(config_name, config_name.lower() or "unknown")


def predicts_v(patcher) -> bool:
    return prediction_type(model_sampling(patcher)) == "v"


def base_model_version(patcher) -> str:
    """kohya's ss_base_model_version: the family, "_v" appended for SD1/SD2 v-prediction ("sd_v2_v")."""
    family = model_family(patcher)
    return family + "_v" if family in ("sd_v1", "sd_v2") and predicts_v(patcher) else family


def default_resolution(patcher) -> int:
    family = model_family(patcher)
    if family.startswith("sdxl") or family in FLOW_FAMILIES:
        return 1024
    return 768 if family == "sd_v2" and predicts_v(patcher) else 512   # SD 2.x 768-v vs 512 base


FLOW_FAMILIES = ("sd3", "flux1")      # flow matching (model_sampling CONST), DiT blocks, 16-channel latents
SUPPORTED_FAMILIES = ("sd_v1", "sd_v2", "sdxl_base_v1-0", *FLOW_FAMILIES)


def unsupported_family(patcher) -> str | None:
    """The model type's name when this trainer cannot train it yet (checked before any work is done)."""
    family = model_family(patcher)
    return None if family in SUPPORTED_FAMILIES else type(getattr(patcher.model, "model_config", None)).__name__


def prediction_type(sampling) -> str:
    """eps / v / flow / other, from ComfyUI's model_sampling class (subclasses are tested first)."""
    import comfy.model_sampling as kinds
    for name, label in (("EDM", "edm"), ("X0", "x0"), ("V_PREDICTION", "v"), ("EPS", "eps"), ("CONST", "flow")):
        kind = getattr(kinds, name, None)
        if kind is not None and isinstance(sampling, kind):
            return label
    return type(sampling).__name__.lower()


class ComfyDenoiser:
    """trainer.loop.Denoiser over a ComfyUI BaseModel: ComfyUI's own model_sampling does the math."""

    def __init__(self, patcher, guidance: float | None = None):
        self.base_model = patcher.model
        self.guidance = guidance       # Flux.1 dev's guidance input; None: ComfyUI's default (3.5)
        self.sampling = model_sampling(patcher)
        self.prediction_type = prediction_type(self.sampling)
        sigmas = getattr(self.sampling, "sigmas", None)
        # Discrete models (eps, v) train on their 1000 timesteps; a plain copy escapes inference mode.
        self.sigmas = sigmas.detach().clone().float() if sigmas is not None else None

    def training_sigmas(self, u: torch.Tensor) -> torch.Tensor:
        if self.sigmas is None:
            raise NotImplementedError("this model type has no discrete timesteps; not supported yet")
        index = (u * len(self.sigmas)).long().clamp_(0, len(self.sigmas) - 1)
        return self.sigmas.to(u.device)[index.to(self.sigmas.device)].to(u.device)

    def noisy_latents(self, latents, noise, sigma):
        return self.sampling.noise_scaling(sigma.view(-1, 1, 1, 1), noise, latents)

    def conditioning(self, texts: list[TextEncoding], sizes: list[PictureSize], device) -> dict:
        """The model's inputs besides the latents, made by ComfyUI's own ``extra_conds`` as KSampler does:
        cross-attention states, and for SDXL the ``y`` vector of pooled text and size conditioning
        (original size, crop, target size, as kohya trains). Gradients flow through it when a text
        encoder trains."""
        return _concatenated(self._extra_conds(texts, sizes, device), device)

    def grouped_conditioning(self, texts: list[TextEncoding], sizes: list[PictureSize], device
                             ) -> list[tuple[list[int], dict]]:
        """(positions, conditioning) of the groups ComfyUI can put in one batch (its own ``can_concat``,
        as its samplers decide): SD1/SDXL repeat shorter token sequences to a common length, but
        SD3/Flux's T5 states of different lengths cannot share a batch."""
        per_example = self._extra_conds(texts, sizes, device)
        groups: list[list[int]] = []
        for index, conds in enumerate(per_example):
            home = next((group for group in groups if all(
                key in conds and per_example[group[0]][key].can_concat(conds[key]) for key in per_example[group[0]])),
                None)
            if home is None:
                groups.append([index])
            else:
                home.append(index)
        return [(group, _concatenated([per_example[i] for i in group], device)) for group in groups]

    def _extra_conds(self, texts, sizes, device) -> list[dict]:
        extra = {} if self.guidance is None else {"guidance": self.guidance}
        return [self.base_model.extra_conds(**condition_arguments(text, size, device), **extra)
                for text, size in zip(texts, sizes)]

    def denoise(self, noisy, sigma, cond):
        if isinstance(cond, dict):
            return self.base_model.apply_model(noisy, sigma, **cond)
        return self.base_model.apply_model(noisy, sigma, c_crossattn=cond)

    def output_error_scale(self, sigma):
        # calculate_denoised(sigma, out, x) = a*x - s*out, so s = -calculate_denoised(sigma, 1, 0).
        shape = (sigma.shape[0], 1, 1, 1)
        zeros = torch.zeros(shape, device=sigma.device)
        return -self.sampling.calculate_denoised(sigma, torch.ones(shape, device=sigma.device), zeros).view(-1)


def _concatenated(per_example: list[dict], device) -> dict:
    """One batch from each example's ComfyUI conds (CONDRegular, CONDCrossAttn... ``concat``)."""
    return {key: per_example[0][key].concat([conds[key] for conds in per_example[1:]]).to(device)
            for key in per_example[0]}


def condition_arguments(text: TextEncoding, size: PictureSize, device) -> dict:
    """extra_conds' keyword arguments, named as ComfyUI's CLIPTextEncodeSDXL and samplers name them."""
    arguments = {"cross_attn": text.cross_attn, "device": device,
                 "width": size.original[0], "height": size.original[1],
                 "crop_w": size.crop[0], "crop_h": size.crop[1],
                 "target_width": size.target[0], "target_height": size.target[1]}
    if text.pooled is not None:
        arguments["pooled_output"] = text.pooled
    return arguments


# --- which layers get adapters, and their kohya names ---------------------------------------------
UNET_BLOCKS = ("SpatialTransformer", "ResBlock", "Downsample", "Upsample")
# SD3's JointBlock, Flux's DoubleStreamBlock / SingleStreamBlock (DIT_BLOCKS, trainer/lora/network.py).
DENOISER_BLOCKS = UNET_BLOCKS + DIT_BLOCKS


def unet_lora_targets(patcher, shape: Network | None = None) -> dict[str, str]:
    """{module path inside diffusion_model: kohya module name} for the network shape (kohya default)."""
    return {path: name for path, (name, _) in unet_lora_layers(patcher, shape or Network()).items()}


def unet_lora_layers(patcher, shape: Network) -> dict[str, tuple[str, str]]:
    """{module path: (kohya name, "linear" | "conv")} for every UNet / DiT layer the shape trains.

    Names come from ComfyUI's own LoRA key map, so every saved key is one ComfyUI maps (no "lora key
    not loaded"). SD1/SD2 files use the diffusers-style names kohya and A1111 write
    (``lora_unet_down_blocks_0_resnets_0_conv1``); SDXL uses the LDM names kohya writes. SD3 and Flux
    use the module path, as kohya's lora_sd3 / lora_flux write it and ComfyUI maps it for every weight
    (``lora_unet_joint_blocks_0_x_block_attn_qkv``, ``lora_unet_double_blocks_0_img_attn_qkv``,
    ``lora_unet_single_blocks_0_linear1``), never diffusers' split to_q/to_k/to_v (slices of the fused
    qkv). Which Linears of the DiT blocks each preset trains: trainer/lora/network.py.
    """
    base_model = patcher.model
    key_map = comfy.lora.model_lora_keys_unet(base_model, {})
    names_for_weight: dict[str, list[str]] = {}
    for lora_name, weight_key in key_map.items():
        if lora_name.startswith("lora_unet_"):
            names_for_weight.setdefault(weight_key, []).append(lora_name)
    family = model_family(patcher)
    prefer_ldm_names = family.startswith("sdxl") or family in FLOW_FAMILIES
    layers = {}
    for block_path, block in base_model.diffusion_model.named_modules():
        block_kind = type(block).__name__
        if block_kind not in DENOISER_BLOCKS:
            continue
        for inner_path, layer in block.named_modules():
            if isinstance(layer, torch.nn.Linear):
                part = shape.part_of(block_kind, inner_path, "Linear")
            elif isinstance(layer, torch.nn.Conv2d):
                part = shape.part_of(block_kind, inner_path, "Conv2d", tuple(layer.kernel_size))
            else:
                continue
            if part is None:
                continue
            path = f"{block_path}.{inner_path}"
            candidates = names_for_weight.get(f"diffusion_model.{path}.weight", [])
            ldm_name = "lora_unet_" + path.replace(".", "_")
            diffusers = [n for n in candidates if n != ldm_name]
            if prefer_ldm_names or not diffusers:
                chosen = ldm_name if ldm_name in candidates else None
            else:
                chosen = diffusers[0]
            if chosen is None:
                raise RuntimeError(f"ComfyUI has no LoRA key for {path}; cannot train it safely")
            layers[path] = (chosen, part)
    return layers


# --- getting a shared model ready to train, and handing it back unchanged --------------------------
class PartiallyLoaded(RuntimeError):
    """ComfyUI kept part of a model off the GPU (its low-VRAM mode) where training cannot stream it."""


class StreamingNeedsCheckpointing(PartiallyLoaded):
    """ComfyUI kept layers in CPU memory that training streams only with gradient checkpointing."""


def load_models(patchers: list) -> None:
    """ComfyUI's own loader: it puts on the GPU what fits and leaves the rest of a model in CPU memory
    (low-VRAM mode). The one place training loads a model; tests call ComfyUI's low-VRAM load here to stand
    for a small card, which a CPU never is."""
    comfy.model_management.load_models_gpu(patchers)


def streamed_layers(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers ComfyUI left in CPU memory when the model did not fit: its op copies each one's weight to
    the GPU (with any LoRA the graph put on the model) as the layer computes. ComfyUI marks them
    ``prev_comfy_cast_weights`` (2024-03 and 2025-10); 2025-10 also marks a layer it did load
    ``comfy_patched_weights``, which a compute-dtype override leaves with the first mark too."""
    return [m for m in network.modules() if hasattr(m, "prev_comfy_cast_weights")
            and not getattr(m, "comfy_patched_weights", False) and next(m.parameters(recurse=False), None) is not None]


def load_for_training(patcher, companions=(), streaming: bool = False) -> list[torch.nn.Module]:
    """Put the model (with the graph's LoRA patches applied) on its device, with ``companions`` (the text
    encoder's patcher when it trains too) in the same call. Returns the layers ComfyUI left in CPU memory
    (streamed_layers): none when the model fits. ``streaming``: whether training may go on with some (it keeps
    nothing of them between forward and backward only when the blocks are checkpointed); when not, or when
    weights stay off the device outside those layers, or a companion did not fit, raises PartiallyLoaded.

    Everything else ComfyUI holds on the device (VAE, other models) is unloaded first: their work is
    done once the dataset is encoded, and training needs the room. Loading UNet and text encoder in
    one ``load_models_gpu`` call means ComfyUI makes room for both together, so neither evicts the
    other; training then never calls ComfyUI's loader again (see loaded_caption_encoder).
    """
    comfy.model_management.unload_all_models()
    load_models([patcher, *companions])
    for companion in companions:
        stray = _off_device(companion.model, torch.device(companion.load_device))
        if stray:
            raise PartiallyLoaded(f"{len(stray)} of the text encoder's weights stayed off its device "
                                  f"(e.g. {stray[0][0]}): ComfyUI could not fit it beside the model")
    network, device = patcher.model.diffusion_model, torch.device(patcher.load_device)
    streamed = streamed_layers(network)
    inside = {id(p) for layer in streamed for p in layer.parameters(recurse=False)}
    stray = [name for name, p in _off_device(network, device) if id(p) not in inside]
    if stray:
        raise PartiallyLoaded(f"{len(stray)} of {type(network).__name__}'s weights stayed off {device} (e.g. "
                              f"{stray[0]}) because ComfyUI could not fit the whole model on {device}")
    if streamed and not streaming:
        raise StreamingNeedsCheckpointing(f"ComfyUI could fit only part of {type(network).__name__} on {device} "
                              f"({len(streamed)} layers, {_bytes(streamed) / 2**30:.2f} GiB, stayed in CPU memory)")
    return streamed


def load_fully(patcher) -> bool:
    """Load the model as training would (its weights with the graph's patches, not a LoRA a sampler left in):
    whether it is all on its device, so that its weights can be read as a whole (fingerprints)."""
    try:
        return not load_for_training(patcher, streaming=True)
    except PartiallyLoaded:
        return False


def _off_device(module: torch.nn.Module, device: torch.device) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in module.named_parameters() if p.device.type != device.type]


def _bytes(layers) -> int:
    return sum(p.numel() * p.element_size() for layer in layers for p in layer.parameters(recurse=False))


def describe_streamed(layers) -> str:
    return (f"ComfyUI's partial load: {len(layers)} layers ({_bytes(layers) / 2**30:.2f} GiB) did not fit on the GPU "
            "and stay in CPU memory; ComfyUI copies each over as it computes, which is slower than a model that fits")


def detach_from_inference_mode(module: torch.nn.Module) -> int:
    """Swap inference-mode weights for ordinary copies with the same values and flags.

    ComfyUI builds models inside ``torch.inference_mode()``; autograd may not save such tensors for
    backward. Each weight is swapped one at a time, so memory grows by one tensor, not one model.
    ComfyUI itself replaces parameter objects when it patches weights, so identity is not relied on.
    """
    swapped = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and param.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(param.detach().clone(),
                                                               requires_grad=param.requires_grad)
                    swapped += 1
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None and buffer.is_inference():
                    sub._buffers[name] = buffer.detach().clone()
                    swapped += 1
    return swapped


@contextlib.contextmanager
def trainable_unet(patcher, checkpointing: bool, clip=None):
    """The UNet (or SD3 / Flux DiT) ready for adapters: loaded (with checkpointing, the layers that do not fit
    may stay in CPU memory: streamed_layers), autograd-safe weights, in-place traps defused, optional gradient
    checkpointing. Everything but the weight copies is undone on exit.
    ``clip``: a text encoder that trains too, loaded alongside (see load_for_training).

    In-place traps: a block that adds into a tensor a LayerNorm saved for backward (2024-03's
    BasicTransformerBlock ``x += n``; Flux's DoubleStreamBlock ``txt += ...`` and SingleStreamBlock
    ``x += ...``). Every LayerNorm in those blocks sees a private copy of its input.
    """
    # Checkpointed blocks keep nothing of a streamed layer between forward and backward; without it autograd
    # would keep every streamed weight's GPU copy for the backward pass, the whole model at once.
    load_for_training(patcher, [clip.patcher] if clip is not None else [], streaming=checkpointing)
    network = patcher.model.diffusion_model
    detach_from_inference_mode(network)
    norms = [m for block in network.modules() if type(block).__name__ in ("BasicTransformerBlock", *DIT_BLOCKS)
             for m in block.modules() if isinstance(m, torch.nn.LayerNorm)]
    with clone_inputs_of(norms), gradient_checkpointing(blocks_of(network), enabled=checkpointing):
        yield network


def blocks_of(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks that checkpoint (and swap), in forward order: modules the model calls through __call__
    (TimestepEmbedSequential is bypassed by forward_timestep_embed, so wrapping it would do nothing). In a UNet the
    transformer and res blocks; in SD3 / Flux the joint, double and single blocks (Flux passes img= / txt= as
    keywords)."""
    return [m for m in network.modules() if type(m).__name__ in ("BasicTransformerBlock", "ResBlock", *DIT_BLOCKS)]


# --- the text encoder, when it trains too -----------------------------------------------------------
def clip_lora_targets(clip) -> dict[str, str]:
    """{module path inside clip.cond_stage_model: kohya name} for kohya's text-encoder LoRA: the
    self_attn q/k/v/out_proj and mlp fc1/fc2 Linears of every CLIP layer, named by ComfyUI's own key
    map, so every saved key is one ComfyUI loads: ``lora_te_`` for SD1 (clip_l) and SD2 (clip_h);
    ``lora_te1_`` (clip_l) and ``lora_te2_`` (clip_g) for SDXL, as kohya writes them."""
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    names_for_weight: dict[str, list[str]] = {}
    for lora_name, weight_key in key_map.items():
        if lora_name.startswith(("lora_te_", "lora_te1_", "lora_te2_")) and "_text_model_encoder_layers_" in lora_name \
                and weight_key.endswith(".weight"):      # the layers' Linears, not text_projection (2025-10 maps it)
            names_for_weight.setdefault(weight_key[: -len(".weight")], []).append(lora_name)
    # ComfyUI maps a clip_l under both the SD1 name and "lora_te1_"; kohya numbers the encoders only
    # when there are two (SDXL).
    two_encoders = any(name.startswith("lora_te2_") for names in names_for_weight.values() for name in names)
    prefixes = ("lora_te1_", "lora_te2_") if two_encoders else ("lora_te_",)
    targets = {path: chosen[0] for path, names in names_for_weight.items()
               if (chosen := [name for name in names if name.startswith(prefixes)])}
    if not targets:
        raise RuntimeError(f"ComfyUI has no lora_te_ keys for {type(clip.cond_stage_model).__name__}")
    return targets


def text_encoder_of(kohya_name: str) -> str:
    """"text_encoder" (SD1/SD2, and SDXL's CLIP-L) or "text_encoder_2" (SDXL's OpenCLIP bigG)."""
    return "text_encoder_2" if kohya_name.startswith("lora_te2_") else "text_encoder"


@contextlib.contextmanager
def trainable_text_encoder(clip):
    """CLIP's text model ready for adapters (loaded by trainable_unet): autograd-safe weights and the
    in-place trap defused (CLIPLayer does ``x += self_attn(layer_norm1(x))`` on both versions)."""
    encoder = clip.cond_stage_model
    detach_from_inference_mode(encoder)
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    with clone_inputs_of(norms):
        yield encoder


def loaded_caption_encoder(clip, with_gradients: bool):
    """caption -> conditioning inside the training loop (through the adapters when CLIP trains).

    What CLIP.encode_from_tokens does, minus its ``load_model()``: the encoder was loaded beside the
    UNet (trainable_unet's ``clip``), and asking ComfyUI to load it again mid-training could make it
    unload the UNet (with our adapters inside) on a tight GPU.
    """
    encoder = clip.cond_stage_model

    def encode(caption: str) -> TextEncoding:
        tokens = clip.tokenize(caption)
        with torch.enable_grad() if with_gradients else torch.no_grad():
            encoder.reset_clip_options()
            if clip.layer_idx is not None:
                encoder.set_clip_options({"layer": clip.layer_idx})
            encoded = encoder.encode_token_weights(tokens)     # (cond, pooled[, extras]) on 2025-10
            return TextEncoding(encoded[0], encoded[1])
    return encode


# --- encoders ----------------------------------------------------------------------------------------
def pixel_encoder(vae, patcher):
    """(1,H,W,3) pixels -> model-space latents (VAE.encode is unscaled; process_latent_in scales).

    ComfyUI 2024-03 samples the VAE posterior with the global RNG; a fixed seed per picture makes a
    picture's latent the same whatever order or run it is encoded in.
    """
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            return patcher.model.process_latent_in(vae.encode(pixels[..., :3]))
    return encode


def vae_fingerprint(vae, patcher, resolution: int) -> str:
    """Identifies the latents a VAE makes: its encoder weights, the latent format and the size."""
    from ..trainer.data.latent_disk_cache import vae_fingerprint as fingerprint
    state = vae.first_stage_model.state_dict()
    encoder = {k: v for k, v in state.items() if k.startswith(("encoder.", "quant_conv."))} or state
    return fingerprint(encoder, extra=f"{latent_space_name(patcher)}:{resolution}")


def model_fingerprint(patcher) -> str:
    """Identifies what a run trains on top of: the diffusion model's weights (names, shapes, dtypes of
    all, a sample of 16), the patches the graph put on it before training (LoRAs, with strengths),
    its sampling (prediction type, sigmas) and the names of any model_options patches. Patches made
    of other objects fold in by type; function objects by name only, so only what they are, not
    where in memory, counts."""
    from ..trainer.data.latent_disk_cache import vae_fingerprint as fingerprint
    sampling = model_sampling(patcher)
    sigmas = getattr(sampling, "sigmas", None)
    patches = []
    for key in sorted(getattr(patcher, "patches", {}) or {}):
        tensors: list[torch.Tensor] = []
        patches.append([key, _describe_patch(patcher.patches[key], tensors)])
        if tensors:
            patches.append(fingerprint(tensors, sample_tensors=4, max_elements=1 << 12))
    transformer_options = (getattr(patcher, "model_options", {}) or {}).get("transformer_options", {})
    extra = repr([model_family(patcher), type(patcher.model).__name__, prediction_type(sampling),
                  fingerprint([sigmas]) if isinstance(sigmas, torch.Tensor) else None, patches,
                  sorted(getattr(patcher, "object_patches", {}) or {}),
                  sorted(k for k in (getattr(patcher, "model_options", {}) or {}) if k != "transformer_options"),
                  sorted(transformer_options)])
    return fingerprint(patcher.model.diffusion_model.state_dict(), extra=extra, sample_tensors=16)


def _describe_patch(value, tensors: list, depth: int = 0):
    """Numbers and strings as they are, tensors by position in ``tensors``, objects by type and fields."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return f"tensor{len(tensors) - 1}"
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if depth > 6:
        return type(value).__name__
    if isinstance(value, (list, tuple)):
        return [_describe_patch(v, tensors, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe_patch(v, tensors, depth + 1) for k, v in sorted(value.items(), key=str)}
    if callable(value) and not hasattr(value, "__dict__"):
        return getattr(value, "__qualname__", type(value).__name__)
    fields = getattr(value, "__dict__", None)
    return [type(value).__name__, _describe_patch(fields, tensors, depth + 1) if isinstance(fields, dict) else None]


def latent_space_name(patcher) -> str:
    """Latents are stored after process_latent_in, so they are only valid for one latent format."""
    return type(getattr(patcher.model, "latent_format", None)).__name__


def caption_encoder(clip):
    """caption -> TextEncoding through ComfyUI's CLIP.encode_from_tokens (it loads the encoder)."""
    def encode(caption: str) -> TextEncoding:
        with torch.no_grad():
            cond, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
            return TextEncoding(cond, pooled)
    return encode


def send_to_front_end(event: str, data: dict) -> None:
    """A websocket event for the front end (js/), when a ComfyUI server is running (not in-process tests)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(event, data, getattr(server, "client_id", None))


class _DropMissingKeyWarnings(logging.Filter):
    def filter(self, record):
        return "lora key not loaded" not in record.getMessage()


def converted_lora(tensors: dict) -> dict:
    """The file's tensors as load_lora_for_models hands them to load_lora (2024-08+ converts some formats)."""
    return _CONVERT_LORA(dict(tensors)) if _CONVERT_LORA else dict(tensors)


def quiet_load_lora(tensors: dict, key_map: dict) -> dict:
    """comfy.lora.load_lora without its "lora key not loaded" lines: a check's, not the real application's."""
    if "log_missing" in inspect.signature(comfy.lora.load_lora).parameters:
        return comfy.lora.load_lora(tensors, key_map, log_missing=False)
    # 2024-03 logs every unmatched key; the real application logs them once, a check stays quiet.
    quiet = _DropMissingKeyWarnings()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        return comfy.lora.load_lora(tensors, key_map)
    finally:
        root.removeFilter(quiet)


def loader_applies_dora() -> bool:
    """Whether this ComfyUI's LoraLoader applies a DoRA's ``dora_scale`` (ComfyUI from 2024-05 on). Older ones
    skip the key and apply the plain LoRA part: a DoRA trained here would sample otherwise than it trained.
    Asked of ComfyUI itself: a one-weight file, and whether its dora_scale reaches the patch."""
    dora_scale = torch.ones(1, 1)
    probe = {"probe.lora_up.weight": torch.zeros(1, 1), "probe.lora_down.weight": torch.zeros(1, 1),
             "probe.dora_scale": dora_scale}
    patch = quiet_load_lora(probe, {"probe": "probe.weight"}).get("probe.weight")
    return _holds(patch, dora_scale)


def _holds(value, tensor: torch.Tensor, depth: int = 0) -> bool:
    """Whether a ComfyUI patch (tuples, or 2025's adapter objects with ``weights``) holds this very tensor."""
    if value is tensor:
        return True
    if depth > 3:
        return False
    if isinstance(value, (tuple, list)):
        return any(_holds(item, tensor, depth + 1) for item in value)
    return _holds(getattr(value, "weights", None), tensor, depth + 1) if hasattr(value, "weights") else False


def apply_lora(model, clip, tensors: dict, strength_model: float = 1.0, strength_clip: float = 1.0):
    """The same path as ComfyUI's LoraLoader: patched clones, the shared originals untouched."""
    return comfy.sd.load_lora_for_models(model, clip, tensors, strength_model, strength_clip)


def lora_key_map(model, clip) -> dict:
    """ComfyUI's map from LoRA key names to weights, as comfy.sd.load_lora_for_models builds it."""
    key_map = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def apply_lora_by_blocks(model, clip, tensors: dict, strength_model: float, strength_clip: float, ratio_of):
    """apply_lora with each patched weight's strengths multiplied by ``ratio_of(weight key)`` (block weights).

    ComfyUI's own steps, as comfy.sd.load_lora_for_models takes them, except that the patches go in by
    groups of equal ratio: ratio 1 everywhere makes the very patches apply_lora makes, ratio 0 none."""
    loaded = comfy.lora.load_lora(converted_lora(tensors), lora_key_map(model, clip))
    groups: dict[float, dict] = {}
    for key, patch in loaded.items():
        groups.setdefault(float(ratio_of(key)), {})[key] = patch
    new_model = model.clone() if model is not None else None
    new_clip = clip.clone() if clip is not None else None
    placed = set()
    for ratio, patches in groups.items():
        if ratio == 0:
            placed.update(patches)         # muted on purpose, not "not loaded"
            continue
        if new_model is not None:
            placed.update(new_model.add_patches(patches, strength_model * ratio))
        if new_clip is not None:
            placed.update(new_clip.add_patches(patches, strength_clip * ratio))
    for key in loaded:
        if key not in placed:
            logging.warning("NOT LOADED %s", key)     # as load_lora_for_models says it
    return new_model, new_clip

"""Sample previews while training: the in-training LoRA rendered every N steps, shown as they arrive.

Three rules keep this safe inside a training run:
- The prompts are encoded before training starts, so the text encoder is never loaded mid-run.
- Sampling runs ComfyUI's own Euler sampler (comfy.k_diffusion) and sigma schedule straight on the
  model that carries the live adapters — no ModelPatcher clone, no model loading, nothing that could
  move the UNet (adapters inside) off the GPU. Its own seeded generator and a forked RNG leave the
  training run's random stream exactly as it was, so previews never change what is trained.
- The VAE decodes the previews only after training (the IMAGE output); while training, each one is
  shown at once as a quick latent-to-RGB picture, like ComfyUI's own live previews.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

import comfy.k_diffusion.sampling
import comfy.samplers
import folder_paths

from ..trainer.data.encoded_dataset import PictureSize
from ..trainer.training.loop import autocast_for
from . import events
from .comfy_bridge import ComfyDenoiser, caption_encoder, model_family, send_to_front_end

log = logging.getLogger("LoRA Lab")
TRIGGER_PLACEHOLDER = "{trigger}"


@dataclass(frozen=True)
class PreviewSettings:
    every_n_steps: int = 0          # 0 = off
    prompts: str = f"{TRIGGER_PLACEHOLDER}, a portrait\n{TRIGGER_PLACEHOLDER}, full body, outdoors"
    seed: int = 42
    steps: int = 20
    cfg: float = 7.0

    def prompt_lines(self, trigger_word: str) -> list[str]:
        lines = [line.strip() for line in self.prompts.splitlines() if line.strip()]
        return [line.replace(TRIGGER_PLACEHOLDER, trigger_word or "").strip(" ,") for line in lines] or [trigger_word]


class TrainingPreviews:
    """Renders, keeps and announces the previews of one run."""

    def __init__(self, model, clip, settings: PreviewSettings, trigger_word: str, size: tuple[int, int],
                 unique_id, precision: str):
        self.model, self.settings, self.unique_id, self.precision = model, settings, unique_id, precision
        self.height, self.width = size
        self.prompts = settings.prompt_lines(trigger_word)
        encode = caption_encoder(clip)
        # Stored copies are plain tensors: usable outside inference mode.
        texts, uncond = [encode(text).stored() for text in self.prompts], encode("").stored()
        # Each prompt beside the empty one, as the model takes them (SDXL: pooled and size conditioning
        # as at inference after CLIPTextEncode: the picture's own size, uncropped). Made once per run.
        picture = PictureSize((self.width, self.height), (0, 0), (self.width, self.height))
        denoiser, cpu = ComfyDenoiser(model), torch.device("cpu")
        # Flux.1 is guidance-distilled: ComfyUI's Flux workflows sample it at cfg 1 (the guidance is an
        # input, 3.5), and classifier-free guidance on top burns the picture. So: the prompt alone.
        self.cfg = 1.0 if model_family(model) == "flux1" else settings.cfg
        with torch.no_grad():
            self.passes = [self.model_passes(denoiser, text, uncond, picture, cpu) for text in texts]
        self.sigmas = schedule(model.model, settings.steps).detach().clone()   # the same for every preview
        self.rendered: list[tuple[int, torch.Tensor]] = []    # (step, model-space latents of every prompt)
        # Each render's quick pictures as /view references, {step, prompts, images}: the strip on Train LoRA.
        self.shown: list[dict] = []
        self.failed: str | None = None
        self.run_token = f"{os.getpid()}_{time.time_ns() // 1_000_000:x}"

    def model_passes(self, denoiser, text, uncond, picture, device) -> list[tuple[int, dict]]:
        """The conditionings one denoising step runs: [prompt] at cfg 1; [prompt and empty, batched];
        or [prompt], [empty] in two passes when they cannot share a batch (SD3 / Flux T5 lengths)."""
        if self.cfg == 1.0:
            return [(1, denoiser.conditioning([text], [picture], device))]
        groups = denoiser.grouped_conditioning([text, uncond], [picture, picture], device)
        return [(len(positions), cond) for positions, cond in groups]

    def due(self, step: int) -> bool:
        return self.failed is None and self.settings.every_n_steps > 0 and step % self.settings.every_n_steps == 0

    def render(self, lora, step: int) -> None:
        started = time.perf_counter()
        device = torch.device(self.model.load_device)
        lora.train(False)                                    # no LoRA dropout in a preview
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    autocast_for(device, self.precision):
                latents = torch.cat([self.sample(passes, device) for passes in self.passes])
        finally:
            lora.train(True)
        self.rendered.append((step, latents.float().cpu()))
        files = [self.quick_picture(latent, step, index) for index, latent in enumerate(latents)]
        self.shown.append({"step": step, "prompts": self.prompts, "images": files})
        log.info("[LoRA Lab] preview at step %d: %d picture(s) in %.1fs", step, len(files), time.perf_counter() - started)
        send_to_front_end(events.TRAIN_PREVIEW, {"node": self.unique_id, "step": step, "prompts": self.prompts,
                                          "images": files})

    def sample(self, passes: list[tuple[int, dict]], device: torch.device) -> torch.Tensor:
        base = self.model.model
        sigmas = self.sigmas.to(device)
        channels = getattr(base.latent_format, "latent_channels", 4)
        generator = torch.Generator().manual_seed(self.settings.seed)
        noise = torch.randn((1, channels, self.height // 8, self.width // 8), generator=generator).to(device)
        passes = [(rows, {key: value.to(device) for key, value in cond.items()}) for rows, cond in passes]
        cfg = self.cfg

        def denoised(x, sigma, **_):
            outputs = [base.apply_model(x.repeat(rows, 1, 1, 1), sigma.repeat(rows), **cond).float()
                       for rows, cond in passes]
            out = torch.cat(outputs)
            if cfg == 1.0:
                return out
            positive, negative = out.chunk(2)
            return negative + cfg * (positive - negative)
        return comfy.k_diffusion.sampling.sample_euler(denoised, noise * sigmas[0], sigmas, disable=True)

    # --- showing ---------------------------------------------------------------------------------
    def quick_picture(self, latent: torch.Tensor, step: int, index: int) -> dict:
        """A latent-to-RGB picture in ComfyUI's temp folder; returns the /view reference for the front end."""
        factors = getattr(self.model.model.latent_format, "latent_rgb_factors", None)
        if factors is not None:
            rgb = latent.float().cpu().permute(1, 2, 0) @ torch.tensor(factors)
            pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).byte().numpy()
        else:                                            # a format without factors: first three channels
            pixels = latent[:3].float().cpu().permute(1, 2, 0).sigmoid().mul(255).byte().numpy()
        picture = Image.fromarray(pixels).resize((self.width // 2, self.height // 2), Image.BILINEAR)
        folder = os.path.join(folder_paths.get_temp_directory(), "loralab")
        os.makedirs(folder, exist_ok=True)
        # A name per run, so a browser never shows a cached picture of an earlier run under the same URL;
        # a subgraph node's id ("5:3") made file-name safe (':' is not allowed on Windows).
        node = re.sub(r"[^A-Za-z0-9_-]", "_", str(self.unique_id or "node"))
        name = f"preview_{node}_{self.run_token}_{step:06d}_{index}.png"
        picture.save(os.path.join(folder, name))
        return {"filename": name, "subfolder": "loralab", "type": "temp"}

    # --- after training ---------------------------------------------------------------------------
    def decoded(self, vae) -> torch.Tensor | None:
        """Every preview decoded by the VAE, in step order then prompt order: an IMAGE batch."""
        if not self.rendered:
            return None
        latents = torch.cat([latent for _, latent in self.rendered])
        with torch.no_grad():
            return vae.decode(self.model.model.process_latent_out(latents)).float().cpu()

    def labels(self) -> list[str]:
        return [f"step {step}: {prompt}" for step, _ in self.rendered for prompt in self.prompts]


def schedule(base_model, steps: int) -> torch.Tensor:
    """ComfyUI's "normal" sigma schedule (the function moved and changed its argument in 2024)."""
    if hasattr(comfy.samplers, "calculate_sigmas"):
        return comfy.samplers.calculate_sigmas(base_model.model_sampling, "normal", steps)
    return comfy.samplers.calculate_sigmas_scheduler(base_model, "normal", steps)


def empty_previews() -> torch.Tensor:
    """The previews output when previews are off: one small black picture (an IMAGE must be a batch)."""
    return torch.from_numpy(np.zeros((1, 64, 64, 3), dtype=np.float32))

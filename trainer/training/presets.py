"""First-run training presets (issue #18): base family x goal x GPU memory -> the values public recipes use.

How the table is built (read it top to bottom, it is short on purpose):
  1. ``_FAMILY``: one recipe per base family, each value quoted from the recipe it comes from.
  2. ``_GOAL``: what a goal changes in that recipe. Only SD1.5 and SDXL style change: no cited
     recipe changes its numbers for a character versus a concept (Civitai's on-site trainer, the one
     these users use, sets its defaults by base model only), nor Flux's or SD3's for any goal.
  3. ``_GPU``: what the card's memory changes, last, so memory limits win over the goal.
Every step says where its numbers come from, in a comment quoting the value and in ``sources``.
Values no source gives for a cell are derived from the nearest cited one; the comment says how.

Conventions (kohya arithmetic: steps per epoch = pictures x repeats / batch size):
- ``target_steps`` counts optimizer steps: 2000 in every cell. At the table's batch sizes that shows
  each recipe's number of pictures (SD1.5: Civitai's 400 image-repeats x 10 epochs = 4000 pictures =
  batch 2 x 2000 steps, Holostrawberry's batch and "around 2000 steps"; SDXL: Civitai's 200 x 10 =
  2000 = batch 1 x 2000, as Civitai's AI Toolkit engine runs it; SD3/Flux: ai-toolkit's
  ``steps: 2000`` at ``batch_size: 1``), inside the 2000-3000 the users' own guides aim at
  (shared/research/users.md). A run rounds them to whole epochs (``whole_epochs``).
- The batch size is the recipe's and stays the same at every memory size, so the steps keep showing
  the recipe's number of pictures; memory changes what the recipes change for it: the rank, the
  text encoder, gradient checkpointing and (SD3, Flux) the resolution.
- Where a recipe needs an optional package (AdamW8bit: bitsandbytes) this table still names it; the
  caller falls back to AdamW, with a note, when the package is missing.
- SD3 and Flux train on an fp8 base (``fp8_base``), as every recipe read holds them 8-bit (kohya's
  ``--fp8_base``, ai-toolkit's ``quantize: true``). Flux at 12 and 8 GB also swaps blocks to the CPU
  (``blocks_to_swap``), as kohya's recipe does, in numbers that bring docs/memory.md's predicted peak under
  the card (LoRA Lab counts Flux's 57 blocks one by one; kohya counts them its own way).

Sources read for this table (snapshots of 2026-02 to 2026-08):
  kohya-ss/sd-scripts docs/*.md, bmaltais/kohya_ss presets/lora/*.json, ostris/ai-toolkit
  config/examples/*.yaml (+ toolkit/optimizer.py, toolkit/config_modules.py), civitai/civitai (the
  code of Civitai's on-site trainer: src/components/Training/Form/TrainingParams.tsx,
  TrainingSubmitAdvancedSettings.tsx, src/utils/training.ts), Holostrawberry's trainer notebooks
  hollowstrawberry/kohya-colab (the ones his Civitai guide civitai.com/models/22530 uses),
  bghira/SimpleTuner documentation/quickstart/{FLUX,SD3}.md, education.civitai.com.
No torch, comfy or folder_paths in here: the front end and the unit tests read this table as data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

FAMILIES = ("SD1.5", "SDXL", "SD3", "Flux")
GOALS = ("character", "style", "concept")
GPU_MEMORY = ("8 GB", "12 GB", "16 GB", "24+ GB")

# --- the sources, as short citations -----------------------------------------------------------------
CIVITAI_PARAMS = "civitai/civitai:src/components/Training/Form/TrainingParams.tsx"
CIVITAI_STEPS = "civitai/civitai:src/components/Training/Form/TrainingSubmitAdvancedSettings.tsx"
CIVITAI_AIT = "civitai/civitai:src/utils/training.ts"
CIVITAI_SD35 = "civitai/civitai@f734e240ba:src/components/Training/Form/TrainingParams.tsx (SD3.5, 2024-11)"
CIVITAI_GUIDE = "https://education.civitai.com/using-civitai-the-on-site-lora-trainer/"
HOLO_SD15 = "hollowstrawberry/kohya-colab:Lora_Trainer.ipynb (guide: https://civitai.com/models/22530)"
HOLO_XL = "hollowstrawberry/kohya-colab:Lora_Trainer_XL.ipynb"
SDS_NETWORK = "kohya-ss/sd-scripts:docs/train_network.md"
SDS_SDXL = "kohya-ss/sd-scripts:docs/sdxl_train_network.md"
SDS_SDXL_TIPS = "kohya-ss/sd-scripts:docs/train_SDXL-en.md"
SDS_SD3 = "kohya-ss/sd-scripts:docs/sd3_train_network.md"
SDS_FLUX = "kohya-ss/sd-scripts:docs/flux_train_network.md"
KSS_SD15 = "bmaltais/kohya_ss:presets/lora/sd15 - EDG_LoraOptiSettings.json"
KSS_SDXL = "bmaltais/kohya_ss:presets/lora/SDXL - *.json"
KSS_FLUX = "bmaltais/kohya_ss:presets/lora/flux1D - adamw8bit fp8.json"
AIT_SD35 = "ostris/ai-toolkit:config/examples/train_lora_sd35_large_24gb.yaml"
AIT_FLUX = "ostris/ai-toolkit:config/examples/train_lora_flux_24gb.yaml"
AIT_OPTIMIZER = "ostris/ai-toolkit:toolkit/optimizer.py"
ST_SD3 = "bghira/SimpleTuner:documentation/quickstart/SD3.md"
ST_FLUX = "bghira/SimpleTuner:documentation/quickstart/FLUX.md"
USERS = "shared/research/users.md"

# --- what the user must know -----------------------------------------------------------------------
NEEDS_BITSANDBYTES = "AdamW8bit needs the bitsandbytes package (python -m pip install bitsandbytes)."
STYLE_NETWORK = ("style: LoCon (+conv) layers and a frozen text encoder, as Holostrawberry's Civitai guide "
                 "advises for art styles.")
SDXL_8GB = ("kohya: an SDXL LoRA trains in 8 GB (10 GB recommended) with the U-Net alone, gradient "
            "checkpointing, cached latents, an 8-bit optimizer or Adafactor and dim 4-8: that is this preset. "
            "Close other programs that use the GPU.")
SDXL_UNET_ONLY = ("the text encoders are not trained at this memory size (kohya 'highly recommended' "
                  "--network_train_unet_only for SDXL LoRAs; it also saves their memory).")
SDXL_24GB = ("Civitai's trainer shows the same 2000 pictures as batch 4 x 500 steps; with 24 GB you may do "
             "that instead (batch_size 4, steps 500).")
SD3_24GB = ("ai-toolkit trains SD3.5 Large 8-bit quantized even at 24 GB, as this preset does (fp8_base): its 8B "
            "weights take 8 GB in fp8. SD3 Medium and SD3.5 Medium fit with room to spare.")
SD3_16GB = ("SD3.5 Large in fp8 is 8 GB of weights: tight at 16 GB; if it runs out of memory, set blocks_to_swap "
            "(Memory & Speed; kohya's SD3 example swaps 32 blocks). SD3 Medium and SD3.5 Medium fit.")
SD3_LOW = ("512 px, as SimpleTuner's lowest-memory SD3 setup (10-12 GB) trains; that setup holds the base in "
           "4 bits (nf4), LoRA Lab in fp8: use SD3 Medium / SD3.5 Medium. SD3.5 Large (8 GB in fp8) trains too, "
           "slowly: ComfyUI keeps what does not fit on the card in CPU memory and copies it over as it computes.")
FLUX_FP8 = ("Flux.1 in bf16 needs more than 30 GB to train (SimpleTuner: 'a bit more than 30G VRAM when not "
            "quantising the base model'); every recipe here holds it 8-bit, as this preset does (fp8_base: "
            "its 12B weights take 12 GB). On a card under 24 GB load it in fp8 (Load Diffusion Model, "
            "weight_dtype fp8_e4m3fn, or an fp8 checkpoint): of a model loaded in bf16, only the part that fits on "
            "the card is converted; ComfyUI keeps the rest in CPU memory in bf16 and copies it over at every step.")


def _swap_note(blocks: int) -> str:
    return (f"{blocks} of Flux's 57 blocks wait in CPU memory and come to the GPU as they compute (blocks_to_swap, "
            "as kohya's recipe for this memory swaps blocks): slower, about 2 copies of each a step. Flux in fp8 is "
            "11 GB, more than this card holds whole: ComfyUI loads what fits and keeps the rest in CPU memory, "
            "copying each of those layers over as it computes (as it does to sample Flux on this card); then the "
            "swap moves its blocks away.")


FLUX_16GB = ("Predicted peak 14.7 GB at 1024 px (docs/memory.md), without block swap; kohya's recipe for 16 GB "
             "swaps some blocks: if it runs out of memory, set blocks_to_swap (Memory & Speed) to 8 or so.")


@dataclass(frozen=True)
class Preset:
    family: str
    goal: str
    gpu_memory: str
    # values for Train LoRA's own widgets
    resolution: int
    batch_size: int
    learning_rate: float
    rank: int
    alpha: float
    target_steps: int            # the steps the recipe aims at; the run rounds to whole epochs (whole_epochs)
    # values for the training options, by TrainingOptions field name (nodes/training_options.py); only
    # the fields the recipe decides
    options: Mapping[str, object] = field(hash=False)
    notes: tuple[str, ...] = ()  # what the user must know
    sources: tuple[str, ...] = ()  # short citations (repo:path or URL) for the values

    def __post_init__(self):
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def widget_values(self) -> dict[str, object]:
        """The values of Train LoRA's widgets this preset fills."""
        return {"resolution": self.resolution, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                "rank": self.rank, "alpha": self.alpha, "steps": self.target_steps}

    def label(self) -> str:
        return f"{self.family} · {self.goal} · {self.gpu_memory}"


@dataclass(frozen=True)
class _Change:
    """What one row of the table sets: widget values, options, a rank cap, and why (notes, sources)."""
    values: Mapping[str, object] = field(default_factory=dict)   # resolution, batch_size, learning_rate, ...
    options: Mapping[str, object] = field(default_factory=dict)
    max_rank: int = 0            # cap rank (and conv_rank) at this, keeping alpha / rank
    notes: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()


# =====================================================================================================
# 1. One recipe per family
# =====================================================================================================
_FAMILY = {
    # SD1.5: Civitai's on-site trainer (kohya engine), its SD 1.5 defaults in TrainingParams.tsx: resolution
    # "default: 512"; Unet LR "default: 5e-4"; Text Encoder LR "default: 5e-5"; Network Dim "default: 32";
    # Network Alpha "default: 16"; optimizer "default: 'AdamW8Bit'" with args "AdamW8Bit: 'weight_decay=0.1'"
    # (here the weight_decay option); LR Scheduler "default: 'cosine_with_restarts'" with "LR Scheduler
    # Cycles ... default: 3"; Min SNR Gamma "default: 5"; Noise Offset "default: 0.1"; LoRA Type "lora"
    # (kohya's plain LoRA). Holostrawberry's notebook agrees on the learning rate ("unet_lr = 5e-4"),
    # the schedule ("cosine_with_restarts", "lr_scheduler_number = 3") and min SNR ("5.0").
    # Batch and steps: Civitai's batch default is 6 (its own large GPUs) and each epoch shows
    # "repeatsTarget = ... 'sd15' ? 400" pictures for "maxTrainEpochs ... default: 10", i.e. 4000
    # pictures; Holostrawberry trains "train_batch_size = 2", "around 10 epochs or around 2000 steps".
    # Batch 2 x 2000 steps shows Civitai's 4000 pictures and is Holostrawberry's setting.
    # Precision: kohya's docs ("If your GPU supports it, specifying fp16 or bf16 ...") = "auto" (bf16
    # where the card has it, else fp16). Latents cached to disk: every kohya_ss preset
    # ("cache_latents_to_disk": true).
    "SD1.5": _Change(
        values=dict(resolution=512, batch_size=2, learning_rate=5e-4, rank=32, alpha=16.0, target_steps=2000),
        options=dict(optimizer="AdamW8bit", optimizer_args="", weight_decay=0.1,
                     lr_schedule="cosine_with_restarts", lr_cycles=3,
                     network_preset="kohya default", train_text_encoder=True, text_encoder_lr=5e-5,
                     min_snr_gamma=5.0, noise_offset=0.1,
                     precision="auto", gradient_checkpointing=False, latent_disk_cache=True),
        sources=(CIVITAI_PARAMS, CIVITAI_STEPS, HOLO_SD15, SDS_NETWORK, USERS)),

    # SDXL: Civitai's SDXL defaults (kohya engine): resolution "sdxl: { all: { min: 1024, max: 2048,
    # default: 1024 } }"; optimizer "sdxl: { kohya: { default: 'Adafactor' } }" with args
    # "Adafactor: 'scale_parameter=False, relative_step=False, warmup_init=False'"; Unet LR 5e-4 and Text
    # Encoder LR 5e-5 (no SDXL override; one rate for both encoders, so text_encoder_2_lr = 5e-5 too);
    # cosine_with_restarts, 3 cycles; Dim 32 / Alpha 16; Min SNR 5; Noise Offset 0.1. weight_decay 0:
    # kohya builds Adafactor with the optimizer args alone (sd-scripts library/train_util.py:
    # "optimizer_class(trainable_params, lr=lr, **optimizer_kwargs)"; transformers' default is 0.0),
    # while this engine would pass its default 0.01. The optimizer and learning rate are also Civitai's
    # AI Toolkit engine SDXL defaults ("sdxl: ... 'ai-toolkit': { default: 'Adafactor' }", 5e-4; that
    # engine differs in "cosine" and alpha 32).
    # Batch and steps: Civitai's kohya engine shows 200 pictures per epoch ("repeatsTarget = ... : 200")
    # for 10 epochs = 2000 pictures (at its "sdxl: { all: { default: 4, max: 4 } }" that is 500 steps);
    # its AI Toolkit engine runs "trainBatchSize = 1" for "Math.max(10 * (numImages || 1),
    # aiToolkitStepDefault(...))" steps, 2000 for SDXL. Batch 1 x 2000 steps: the same 2000 pictures.
    # Gradient checkpointing: on in every "SDXL - *" preset of kohya_ss ("gradient_checkpointing": true), in
    # kohya's SDXL example ("--gradient_checkpointing") and in Holostrawberry's XL notebook.
    # Precision: kohya, SDXL: "bf16 or fp16 is recommended. Choose the one supported by your GPU" = auto.
    "SDXL": _Change(
        values=dict(resolution=1024, batch_size=1, learning_rate=5e-4, rank=32, alpha=16.0, target_steps=2000),
        options=dict(optimizer="Adafactor",
                     optimizer_args="scale_parameter=False relative_step=False warmup_init=False",
                     weight_decay=0.0, lr_schedule="cosine_with_restarts", lr_cycles=3,
                     network_preset="kohya default", train_text_encoder=True, text_encoder_lr=5e-5,
                     text_encoder_2_lr=5e-5, min_snr_gamma=5.0, noise_offset=0.1,
                     precision="auto", gradient_checkpointing=True, latent_disk_cache=True),
        sources=(CIVITAI_PARAMS, CIVITAI_STEPS, CIVITAI_AIT, SDS_SDXL, KSS_SDXL)),

    # SD3: ai-toolkit's SD3.5 example, train_lora_sd35_large_24gb.yaml: "linear: 16", "linear_alpha: 16",
    # "resolution: [ 1024 ]", "batch_size: 1", "steps: 2000  # total number of steps to train 500 - 4000
    # is a good range", "optimizer: \"adamw8bit\"", "lr: 1e-4", "gradient_checkpointing: true",
    # "dtype: bf16", "train_text_encoder: false", "cache_latents_to_disk: true". ai-toolkit builds
    # adamw8bit with "eps=1e-6" (toolkit/optimizer.py) and bitsandbytes' default weight decay 0.01; its
    # scheduler default is 'constant' (toolkit/config_modules.py), as in kohya's SD3 example
    # ("--lr_scheduler=\"constant\"", "--learning_rate=1e-4", "--network_dim=16"). Flow matching: no
    # min-SNR weighting (the engine refuses it for SD3/Flux), no noise offset (ai-toolkit's default 0.0).
    # Not taken: "caption_dropout_rate: 0.05" (here changing captions keep the T5-XXL text encoder on the
    # GPU for the whole run, gigabytes these memory sizes do not have), "ema_config: use_ema: true"
    # (LoRA Lab has no EMA). "quantize: true" (8-bit): fp8_base. Civitai's SD3.5 defaults
    # (2024-11 to 2025-10: Unet LR 1e-5, Dim 2, Alpha 16) are left aside: rank 2 is an outlier among
    # the recipes read, and its alpha 16 is over the engine's 4 x rank warning.
    "SD3": _Change(
        values=dict(resolution=1024, batch_size=1, learning_rate=1e-4, rank=16, alpha=16.0, target_steps=2000),
        options=dict(optimizer="AdamW8bit", optimizer_args="eps=1e-06", weight_decay=0.01,
                     lr_schedule="constant", network_preset="kohya default", train_text_encoder=False,
                     min_snr_gamma=0.0, noise_offset=0.0,
                     precision="bf16", gradient_checkpointing=True, latent_disk_cache=True, fp8_base=True),
        sources=(AIT_SD35, AIT_OPTIMIZER, SDS_SD3)),

    # Flux: ai-toolkit's train_lora_flux_24gb.yaml: "linear: 16", "linear_alpha: 16", "batch_size: 1",
    # "steps: 2000", "optimizer: \"adamw8bit\"", "lr: 1e-4", "gradient_checkpointing: true  # need the on
    # unless you have a ton of vram", "dtype: bf16" ("other dtypes may not work correctly"),
    # "train_text_encoder: false  # probably won't work with flux", "cache_latents_to_disk: true";
    # "resolution: [ 512, 768, 1024 ]  # flux enjoys multiple resolutions": one resolution here, its
    # largest, the size it samples at ("width: 1024"). kohya's Flux example agrees ("--network_dim=16",
    # "--learning_rate=1e-4", "--optimizer_type=\"AdamW8bit\"", "--lr_scheduler=\"constant\""), and
    # Civitai caps Flux at batch 1 for its AI Toolkit engine ("aiToolkitBatchMax ... return 1") and turns
    # min-SNR off ("flux_dev: { all: { disabled: true, default: 0, max: 0 } }"). Not taken, as for SD3:
    # caption dropout 0.05, EMA. Taken: the 8-bit base ("quantize: true"; kohya's --fp8_base): fp8_base.
    "Flux": _Change(
        values=dict(resolution=1024, batch_size=1, learning_rate=1e-4, rank=16, alpha=16.0, target_steps=2000),
        options=dict(optimizer="AdamW8bit", optimizer_args="eps=1e-06", weight_decay=0.01,
                     lr_schedule="constant", network_preset="kohya default", train_text_encoder=False,
                     min_snr_gamma=0.0, noise_offset=0.0,
                     precision="bf16", gradient_checkpointing=True, latent_disk_cache=True, fp8_base=True),
        notes=(FLUX_FP8,),
        sources=(AIT_FLUX, AIT_OPTIMIZER, SDS_FLUX, CIVITAI_AIT)),
}

# =====================================================================================================
# 2. What the goal changes
# =====================================================================================================
# Civitai's trainer presets its settings by base model only (the "model type" of
# education.civitai.com is the base: Standard, Anime, Realistic, SDXL...; the wizard's
# Character/Style/Concept choice changes no training value in TrainingParams.tsx), so a character and
# a concept keep the family recipe. Holostrawberry backs the text encoder for both: "The text encoder
# helps your Lora learn concepts slightly better." The goal-named kohya_ss presets were read and left
# aside: "SDXL - LoRA AI_characters standard v1.1" (AdamW 3e-5, dim 32/32, batch 3, 50 epochs) and
# "SDXL - LoRA face dogu_cat v1.0" (AdamW8bit 1e-4, dim 92/46, batch 1) disagree with each other 3x in
# learning rate; "SDXL - LoRA aitrepreneur clothing v1.0" (a concept: Adafactor 9e-4, dim 128, alpha 1,
# gradient accumulation 2) needs rank 128, which the 8-12 GB rows cannot give.
_UNCHANGED = _Change()
_GOAL = {
    # Style, SD1.5: Holostrawberry's notebook, "LoCon is good with artstyles as it has more layers to learn
    # more aspects of the dataset", its table row "| LoCon | 16 | 8 | 8 | 4 |" (dim, alpha, conv_dim,
    # conv_alpha), and for the text encoder: "If you're training a style you can even set it to 0".
    "SD1.5": {"character": _UNCHANGED, "concept": _UNCHANGED,
              "style": _Change(values=dict(rank=16, alpha=8.0),
                               options=dict(network_preset="LoCon (+conv)", conv_rank=8, conv_alpha=4.0,
                                            train_text_encoder=False),
                               notes=(STYLE_NETWORK,), sources=(HOLO_SD15,))},
    # Style, SDXL: Holostrawberry's XL notebook, row "| Style LoCon | 16 | 8 | 16 | 8 |" and "If you're
    # training a style you can choose to set the text encoder to 0."
    "SDXL": {"character": _UNCHANGED, "concept": _UNCHANGED,
             "style": _Change(values=dict(rank=16, alpha=8.0),
                              options=dict(network_preset="LoCon (+conv)", conv_rank=16, conv_alpha=8.0,
                                           train_text_encoder=False),
                              notes=(STYLE_NETWORK,), sources=(HOLO_XL,))},
    # SD3 and Flux: no recipe read changes a number by goal. (ai-toolkit's "content_or_style: balanced  #
    # content, style, balanced" biases the timestep sampling cubically; LoRA Lab has no such option, and
    # a hard min/max timestep range would be a different thing.) LoCon adds nothing on a DiT: it has no
    # convolutions (trainer/lora/network.py).
    "SD3": {goal: _UNCHANGED for goal in GOALS},
    "Flux": {goal: _UNCHANGED for goal in GOALS},
}

# =====================================================================================================
# 3. What the GPU memory changes (applied last: memory limits win over the goal)
# =====================================================================================================
_GPU = {
    # SD1.5 fits everywhere at 512 px and batch 2. 8 GB: gradient checkpointing, "This can significantly
    # reduce memory usage ... Useful when memory is limited" (kohya's train_network.md; its example runs
    # with "--gradient_checkpointing"). 12 GB and up: off, as kohya_ss's SD1.5 preset trains
    # ("gradient_checkpointing": false at "train_batch_size": 3, "max_resolution": "512,650").
    "SD1.5": {
        "8 GB": _Change(options=dict(gradient_checkpointing=True), sources=(SDS_NETWORK,)),
        "12 GB": _Change(sources=(KSS_SD15,)),
        "16 GB": _Change(sources=(KSS_SD15,)),
        "24+ GB": _Change(sources=(KSS_SD15,)),
    },
    # SDXL, kohya's train_SDXL-en.md: "The LoRA training can be done with 8GB GPU memory (10GB recommended).
    # For reducing the GPU memory usage, the following options are recommended: Train U-Net only. Use
    # gradient checkpointing. Use --cache_text_encoder_outputs option and caching latents. Use one of 8bit
    # optimizers or Adafactor optimizer. Use lower dim (4 to 8 for 8GB GPU)." 8 GB: all of it, dim 8 with
    # Civitai's alpha = dim / 2 (the style LoCon's conv dim too). 12 GB: 2 GB over the "10GB
    # recommended", so Civitai's dim, but still the U-Net alone ("--network_train_unet_only option is
    # highly recommended for SDXL LoRA"). 16 GB: the text encoders train as Civitai does; Holostrawberry's
    # XL notebook, which "Can work with multiple colab configurations, including T4 (free)" (a 16 GB
    # card), trains them by default ("text_encoder_lr = 6e-5", "train_batch_size = 4").
    "SDXL": {
        "8 GB": _Change(options=dict(train_text_encoder=False), max_rank=8, notes=(SDXL_8GB,),
                        sources=(SDS_SDXL_TIPS,)),
        "12 GB": _Change(options=dict(train_text_encoder=False), notes=(SDXL_UNET_ONLY,), sources=(SDS_SDXL_TIPS,)),
        "16 GB": _Change(sources=(HOLO_XL,)),
        "24+ GB": _Change(notes=(SDXL_24GB,), sources=(CIVITAI_PARAMS,)),
    },
    # SD3: 24 GB is ai-toolkit's own recipe. 16 GB: the same values; SD3.5 Large needs the quantized base.
    # 12 and 8 GB: SimpleTuner's "Lowest VRAM config ... GPU: A single NVIDIA CUDA device (10G, 12G) ...
    # Resolution: 512px ... Batch size: 1"; Civitai trained SD3.5 at 512 by default too (resolution
    # "default: 512", no SD3 override). kohya's SD3 example swaps blocks ("--blocks_to_swap=32").
    "SD3": {
        "8 GB": _Change(values=dict(resolution=512), notes=(SD3_LOW,), sources=(ST_SD3, CIVITAI_SD35, SDS_SD3)),
        "12 GB": _Change(values=dict(resolution=512), notes=(SD3_LOW,), sources=(ST_SD3, CIVITAI_SD35, SDS_SD3)),
        "16 GB": _Change(notes=(SD3_16GB,), sources=(SDS_SD3,)),
        "24+ GB": _Change(notes=(SD3_24GB,), sources=(AIT_SD35,)),
    },
    # Flux, kohya's flux_train_network.md, "Recommended Settings by GPU Memory" (with --fp8_base):
    # "24GB VRAM | Basic settings work fine (batch size 2)", "16GB VRAM | Set batch size to 1 and use
    # --blocks_to_swap", "12GB VRAM | Use --blocks_to_swap 16 and 8bit AdamW", "8GB VRAM | Use
    # --blocks_to_swap 28, recommend fp8 format for T5XXL". Batch 1 everywhere (ai-toolkit's 24 GB recipe
    # and Civitai's cap; 24 GB could take kohya's batch 2). AdamW8bit is already the recipe's. Resolution:
    # 1024 down to 16 GB (kohya's 16 GB row changes the batch and the swap, not the size); 512 at 12 and
    # 8 GB: SimpleTuner's lowest-memory Flux setup ("Resolution: 512px", "1024px requires >= 12G VRAM"
    # even on a 4-bit base), kohya_ss's only Flux preset, the fp8 one ("max_resolution": "512,512"), and
    # Civitai's Flux default (resolution "default: 512", no Flux override). blocks_to_swap: 20 at 12 GB and 40 at
    # 8 GB bring tools/bench_memory.py's predicted peak to 10.5 and 6.7 GB (docs/memory.md); kohya's 16 and 28
    # count a double block as two, so they are not the same numbers.
    "Flux": {
        "8 GB": _Change(values=dict(resolution=512), options=dict(blocks_to_swap=40), notes=(_swap_note(40),),
                        sources=(SDS_FLUX, ST_FLUX, KSS_FLUX)),
        "12 GB": _Change(values=dict(resolution=512), options=dict(blocks_to_swap=20), notes=(_swap_note(20),),
                         sources=(SDS_FLUX, ST_FLUX, KSS_FLUX, CIVITAI_PARAMS)),
        "16 GB": _Change(notes=(FLUX_16GB,), sources=(SDS_FLUX,)),
        "24+ GB": _Change(sources=(AIT_FLUX, SDS_FLUX)),
    },
}

_WIDGETS = ("resolution", "batch_size", "learning_rate", "rank", "alpha", "target_steps")


def _build(family: str, goal: str, gpu_memory: str) -> Preset:
    values: dict = {}
    options: dict = {}
    notes: list[str] = []
    sources: list[str] = []
    for change in (_FAMILY[family], _GOAL[family][goal], _GPU[family][gpu_memory]):
        values.update(change.values)
        options.update(change.options)
        if change.max_rank:
            _cap_rank(values, "rank", "alpha", change.max_rank)
            _cap_rank(options, "conv_rank", "conv_alpha", change.max_rank)
        notes += [note for note in change.notes if note not in notes]
        sources += [source for source in change.sources if source not in sources]
    if not options.get("train_text_encoder"):
        # A frozen text encoder has no learning rate to set.
        options.pop("text_encoder_lr", None)
        options.pop("text_encoder_2_lr", None)
    if options.get("optimizer") == "AdamW8bit":
        notes.insert(0, NEEDS_BITSANDBYTES)
    return Preset(family, goal, gpu_memory, **{name: values[name] for name in _WIDGETS},
                  options=options, notes=tuple(notes), sources=tuple(sources))


def _cap_rank(where: dict, rank: str, alpha: str, cap: int) -> None:
    """Lower where[rank] to cap, alpha with it (the same alpha / rank, so the same strength per rank)."""
    if where.get(rank, 0) > cap:
        where[alpha] = float(where[alpha]) * cap / where[rank]
        where[rank] = cap


_TABLE = {(family, goal, memory): _build(family, goal, memory)
          for family in FAMILIES for goal in GOALS for memory in GPU_MEMORY}


def preset_for(family: str, goal: str, gpu_memory: str) -> Preset:
    """The preset of one cell; ValueError naming the argument that is not one of its choices."""
    for name, value, choices in (("family", family, FAMILIES), ("goal", goal, GOALS),
                                 ("gpu_memory", gpu_memory, GPU_MEMORY)):
        if value not in choices:
            raise ValueError(f"{name} {value!r} is not one of the preset {name} choices: {', '.join(choices)}")
    return _TABLE[family, goal, gpu_memory]


def all_presets() -> list[Preset]:
    """All 48 presets, in FAMILIES x GOALS x GPU_MEMORY order."""
    return list(_TABLE.values())


def whole_epochs(target_steps: int, steps_per_epoch: int) -> int:
    """kohya arithmetic: the whole number of epochs (>= 1) whose steps come closest to target_steps.

    A tie (target halfway between two epoch counts) takes the fewer epochs: the shorter run, the one
    less likely to over-train.
    """
    if target_steps < 1 or steps_per_epoch < 1:
        raise ValueError(f"target_steps and steps_per_epoch must be >= 1, got {target_steps} and {steps_per_epoch}")
    fewer = max(1, target_steps // steps_per_epoch)
    more = fewer + 1
    if abs(more * steps_per_epoch - target_steps) < abs(target_steps - fewer * steps_per_epoch):
        return more
    return fewer

"""The widgets of the training options, one spec per option, shared by the option nodes.

Each option is declared once here (type, range, default, tooltip) and shown by the small option node of
its group (option_nodes.py) and by the deprecated all-in-one Training Options node, which must keep
accepting the workflows saved with it.
"""
from __future__ import annotations

from ..trainer.lora.network import PRESETS as NETWORK_PRESETS
from ..trainer.lora.network_types import NETWORK_TYPES
from ..trainer.training.loss_shapes import HUBER_SCHEDULES, LOSS_TYPES, TIMESTEP_SAMPLINGS
from ..trainer.training.optimizers import OPTIMIZERS
from ..trainer.training.schedules import SCHEDULES
from .training_options import EMA_WEIGHTS, NO_RESUME, PRECISIONS, SAVE_DTYPES, TrainingOptions, resume_choices


def option_inputs() -> dict[str, tuple]:
    """Every option's widget spec, in the order the all-in-one node lists them."""
    d = TrainingOptions()
    return {
            "lr_schedule": (list(SCHEDULES), {"default": d.lr_schedule, "tooltip":
                            "How the learning rate moves over the run: constant (flat, no warm-up), "
                            "constant_with_warmup, linear or cosine (down to 0 at the last step), "
                            "cosine_with_restarts (lr_cycles times)."}),
            "warmup_steps": ("INT", {"default": d.warmup_steps, "min": 0, "max": 100_000, "tooltip":
                             "Optimizer steps over which the learning rate rises to full. Used by "
                             f"{', '.join(name for name in SCHEDULES if name != 'constant')}; constant "
                             "ignores it (use constant_with_warmup). 0 = off."}),
            "gradient_accumulation": ("INT", {"default": d.gradient_accumulation, "min": 1, "max": 256,
                                              "tooltip": "Batches per optimizer step (a bigger batch without the memory)."}),
            "max_grad_norm": ("FLOAT", {"default": d.max_grad_norm, "min": 0.0, "max": 100.0, "step": 0.1,
                                        "tooltip": "Clip gradients to this norm; 0 = off."}),
            "gradient_checkpointing": ("BOOLEAN", {"default": d.gradient_checkpointing,
                                                   "tooltip": "Less memory, about 30% slower."}),
            "precision": (list(PRECISIONS), {"default": d.precision, "tooltip":
                          "auto = bf16 (or fp16 with loss scaling) on a GPU, fp32 on the CPU. With bf16/fp16 "
                          "the frozen model weights train in that precision too (less memory); your loaded "
                          "model gets its exact weights back afterwards."}),
            "dropout": ("FLOAT", {"default": d.dropout, "min": 0.0, "max": 0.9, "step": 0.05, "tooltip":
                        "network_dropout: dropout on the LoRA layers' input while training; 0 = off."}),
            "save_every_n_steps": ("INT", {"default": d.save_every_n_steps, "min": 0, "max": 1_000_000,
                                           "tooltip": "Also save <name>_step<N> every N steps; 0 = only at the end."}),
            "save_precision": (list(SAVE_DTYPES), {"default": d.save_precision, "tooltip":
                               "Precision of the saved file; fp16 is what kohya and Civitai use."}),
            "overwrite_existing": ("BOOLEAN", {"default": d.overwrite_existing, "tooltip":
                                   "Off: an existing LoRA of that name is kept and a numbered name is used."}),
            "resume_from": (resume_choices(), {"default": NO_RESUME, "tooltip":
                            "A LoRA Lab save to continue exactly (weights, optimizer, schedule, step count); "
                            "the list holds every LoRA in models/loras with a resume state and refreshes with "
                            "the node definitions (R). steps on Train LoRA is then the new total."}),
            "optimizer": (list(OPTIMIZERS), {"default": d.optimizer, "tooltip":
                          "AdamW8bit needs bitsandbytes, Prodigy needs prodigyopt (use lr 1.0 with Prodigy)."}),
            "optimizer_args": ("STRING", {"default": d.optimizer_args, "tooltip":
                               "kohya-style extra arguments, e.g. 'd_coef=2 decouple=True'."}),
            "weight_decay": ("FLOAT", {"default": d.weight_decay, "min": 0.0, "max": 1.0, "step": 0.001}),
            "lr_cycles": ("INT", {"default": d.lr_cycles, "min": 1, "max": 100,
                                  "tooltip": "Restarts for cosine_with_restarts."}),
            "noise_offset": ("FLOAT", {"default": d.noise_offset, "min": 0.0, "max": 1.0, "step": 0.01,
                                       "tooltip": "0.05-0.1 helps very dark and very bright pictures; 0 = off."}),
            "min_timestep": ("INT", {"default": d.min_timestep, "min": 0, "max": 999}),
            "max_timestep": ("INT", {"default": d.max_timestep, "min": 1, "max": 1000}),
            "min_snr_gamma": ("FLOAT", {"default": d.min_snr_gamma, "min": 0.0, "max": 20.0, "step": 0.5,
                                        "tooltip": "5 is typical; 0 = off."}),
            "scale_v_pred_loss": ("BOOLEAN", {"default": d.scale_v_pred_loss}),
            "caption_dropout": ("FLOAT", {"default": d.caption_dropout, "min": 0.0, "max": 1.0, "step": 0.05}),
            "shuffle_tags": ("BOOLEAN", {"default": d.shuffle_tags}),
            "keep_tokens": ("INT", {"default": d.keep_tokens, "min": 0, "max": 32, "tooltip":
                            "Tags kept in place when shuffling (1 keeps the trigger word first)."}),
            "tag_dropout": ("FLOAT", {"default": d.tag_dropout, "min": 0.0, "max": 1.0, "step": 0.05}),
            "latent_disk_cache": ("BOOLEAN", {"default": d.latent_disk_cache, "tooltip":
                                  "Keep VAE latents on disk (user/loralab/latent-cache), so a second run "
                                  "on the same pictures skips encoding."}),
            "network_preset": (list(NETWORK_PRESETS), {"default": d.network_preset, "tooltip":
                               "Which layers learn. kohya default: attention, feed-forward and proj_in/out of "
                               "the transformer blocks. attention only: to_q/k/v/out (smaller, gentler). "
                               "LoCon (+conv): also the ResBlock and down/upsample convolutions (more detail "
                               "and style, bigger file). SD3/Flux: kohya default = every Linear of the "
                               "transformer blocks; attention only = attention qkv/proj (Flux single blocks' "
                               "fused linear1/linear2 whole); LoCon = kohya default (no convolutions)."}),
            "conv_rank": ("INT", {"default": d.conv_rank, "min": 0, "max": 256, "tooltip":
                          "LoCon: rank of the 3x3 convolutions (kohya conv_dim); 0 = same as rank."}),
            "conv_alpha": ("FLOAT", {"default": d.conv_alpha, "min": 0.0, "max": 256.0, "step": 0.5, "tooltip":
                           "LoCon: alpha of the 3x3 convolutions (kohya conv_alpha); 0 = same as alpha."}),
            "keep_last_saves": ("INT", {"default": d.keep_last_saves, "min": 0, "max": 10_000, "tooltip":
                                "Keep only the newest K periodic <name>_step<N> saves of this run (older ones "
                                "of this run are deleted; the final file is always kept); 0 = keep all."}),
            "train_text_encoder": ("BOOLEAN", {"default": d.train_text_encoder, "tooltip":
                                   "Also train a LoRA on the text encoder (CLIP). Captions are then encoded "
                                   "every step: slower, and stronger prompt binding."}),
            "text_encoder_lr": ("FLOAT", {"default": d.text_encoder_lr, "min": 0.0, "max": 1.0, "step": 1e-5,
                                "round": False, "tooltip":
                                "Learning rate of the text-encoder LoRA (kohya text_encoder_lr); usually "
                                "a half to a tenth of the UNet's; 0 = the same as learning_rate."}),
            "preview_every_n_steps": ("INT", {"default": d.preview_every_n_steps, "min": 0, "max": 1_000_000,
                                      "tooltip": "Render the preview prompts with the LoRA as it trains every N "
                                      "steps, shown on Train LoRA as they arrive; 0 = off."}),
            # dynamicPrompts off: the front ends would otherwise read {trigger} as a {a|b} choice.
            "preview_prompts": ("STRING", {"default": d.preview_prompts, "multiline": True,
                                "dynamicPrompts": False, "tooltip":
                                "One prompt per line; {trigger} becomes the run's trigger word."}),
            "preview_seed": ("INT", {"default": d.preview_seed, "min": 0, "max": 0xFFFFFFFF, "tooltip":
                             "The same seed every time, so previews show what the LoRA learned."}),
            "preview_steps": ("INT", {"default": d.preview_steps, "min": 1, "max": 150}),
            "preview_cfg": ("FLOAT", {"default": d.preview_cfg, "min": 0.0, "max": 30.0, "step": 0.5, "tooltip":
                            "Classifier-free guidance of the previews. Flux.1 (guidance-distilled) previews "
                            "are sampled at cfg 1 whatever this says."}),
            # Added after the first release: kept last so workflows saved with the all-in-one node keep
            # their widget values (the front ends map saved values to widgets by position).
            "text_encoder_2_lr": ("FLOAT", {"default": d.text_encoder_2_lr, "min": 0.0, "max": 1.0, "step": 1e-5,
                                  "round": False, "tooltip":
                                  "SDXL only: learning rate of the second text encoder (OpenCLIP bigG, "
                                  "lora_te2_); 0 = the same as text_encoder_lr."}),
            "save_every_n_epochs": ("INT", {"default": d.save_every_n_epochs, "min": 0, "max": 10_000, "tooltip":
                                    "Also save <name>_epoch<E> at the end of every N epochs (epochs = pictures x "
                                    "repeats / batch size steps); 0 = off. Works with save_every_n_steps."}),
            "validation_pictures": ("INT", {"default": d.validation_pictures, "min": 0, "max": 10_000, "tooltip":
                                    "Keep this many pictures (picked from the seed, with all their repeats) out of "
                                    "training and measure the loss on them at the end of every epoch, at fixed "
                                    "noise: the epoch with the lowest validation loss fits pictures it never saw "
                                    "best. Costs one forward pass per held-out picture per epoch. 0 = off; at least "
                                    "one picture must be left to train."}),
            "fp8_base": ("BOOLEAN", {"default": d.fp8_base, "tooltip":
                         "Hold the frozen model's Linear weights in fp8 while training (kohya's --fp8_base): half "
                         "the memory of bf16 (Flux's transformer: about 12 GB instead of 24 GB), on any GPU. The "
                         "LoRA trains beside them in the training precision; your loaded model gets its exact "
                         "weights back afterwards. A model loaded in fp8 (Load Diffusion Model, weight_dtype "
                         "fp8_e4m3fn) trains in fp8 with or without this; on a card smaller than the model in "
                         "bf16, load it that way (converting needs the bf16 model on the card first). The SD3 and "
                         "Flux presets turn it on, but this node sets it itself: switch it on here for them."}),
            "blocks_to_swap": ("INT", {"default": d.blocks_to_swap, "min": 0, "max": 200, "tooltip":
                               "Keep this many of the model's blocks in CPU memory while training (kohya's "
                               "--blocks_to_swap), each brought to the GPU only while it computes, the next one "
                               "copied over while the current one runs. Saves their weights' memory on the GPU at "
                               "some speed; swapped blocks recompute in backward, as gradient checkpointing does. "
                               "Counts blocks as the model has them (Flux: 19 double + 38 single; SD3: its joint "
                               "blocks; SD1.5/SDXL: transformer and res blocks), spread evenly; kohya counts Flux's "
                               "differently. The LoRA is the same as without. 0 = off; on the CPU it does "
                               "nothing."}),
            "loss_type": (list(LOSS_TYPES), {"default": d.loss_type, "tooltip":
                          "How a wrong guess is scored (kohya's --loss_type). l2: squared error, the usual. huber: "
                          "squared for small errors, linear for large ones, so a few odd pictures or noisy "
                          "timesteps pull less; smooth_l1: the same, scaled like l1; l1: absolute error."}),
            "huber_schedule": (list(HUBER_SCHEDULES), {"default": d.huber_schedule, "tooltip":
                               "huber / smooth_l1 only: where the loss turns from squared to linear, per timestep "
                               "(kohya's --huber_schedule). snr: near 1 at low noise, huber_c at high noise (SD1.5, "
                               "SDXL only); exponential: huber_scale at low noise down to huber_c x huber_scale at "
                               "high noise; constant: huber_c x huber_scale."}),
            "huber_c": ("FLOAT", {"default": d.huber_c, "min": 0.001, "max": 1.0, "step": 0.01, "tooltip":
                        "huber / smooth_l1: the threshold (kohya's --huber_c, default 0.1)."}),
            "huber_scale": ("FLOAT", {"default": d.huber_scale, "min": 0.01, "max": 10.0, "step": 0.1, "tooltip":
                            "huber / smooth_l1 with the exponential or constant schedule: scales the threshold "
                            "(kohya's --huber_scale)."}),
            "timestep_sampling": (list(TIMESTEP_SAMPLINGS), {"default": d.timestep_sampling, "tooltip":
                                  "Which noise levels training visits. uniform: all alike. logit_normal: mostly "
                                  "the middle ones (SD3's recipe; kohya's 'sigmoid' for Flux), with logit_mean and "
                                  "logit_std. min_timestep / max_timestep still apply."}),
            "logit_mean": ("FLOAT", {"default": d.logit_mean, "min": -3.0, "max": 3.0, "step": 0.1, "tooltip":
                           "logit_normal: above 0 favours higher noise (layout, colour), below 0 lower (detail)."}),
            "logit_std": ("FLOAT", {"default": d.logit_std, "min": 0.1, "max": 3.0, "step": 0.1, "tooltip":
                          "logit_normal: how widely around the middle (1.0 in SD3's recipe and kohya's default)."}),
            "flow_shift": ("FLOAT", {"default": d.flow_shift, "min": 0.0, "max": 20.0, "step": 0.05, "tooltip":
                           "SD3 / Flux only: shift the noise levels trained towards high noise, as kohya's "
                           "--discrete_flow_shift (its Flux recipe: 3.1582; SD3's own: 3.0). 0 = the model's own "
                           "schedule."}),
            "flux_guidance": ("FLOAT", {"default": d.flux_guidance, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip":
                              "Flux.1 dev only: the guidance value the model is given while training (kohya's "
                              "--guidance_scale; its recipes use 1.0). 3.5 is ComfyUI's default for Flux."}),
            "ema_decay": ("FLOAT", {"default": d.ema_decay, "min": 0.0, "max": 0.9999, "step": 0.0001, "round": False,
                          "tooltip": "Keep a moving average of the LoRA's weights (EMA), as OneTrainer, SimpleTuner "
                          "and ai-toolkit do: smoother results, less sensitive to where training stops. 0.999 is "
                          "usual for a few thousand steps (ai-toolkit: 0.99 for short runs). The decay warms up as "
                          "diffusers' does, (1 + n) / (10 + n) at step n, so 0.99 is reached after about 900 steps and "
                          "0.999 after about 9000; the report says what was reached. 0 = off."}),
            "ema_weights": (list(EMA_WEIGHTS), {"default": d.ema_weights, "tooltip":
                            "With ema_decay: replace = every save holds the average instead of the raw weights; "
                            "beside = saves hold the raw weights and the final save also writes <name>_ema with "
                            "the average. Either way resume goes on exactly (its state keeps both)."}),
            "masked_loss": ("BOOLEAN", {"default": d.masked_loss, "tooltip":
                            "Learn only (or mostly) where each picture's mask is white, as kohya's "
                            "--masked_loss and OneTrainer's masked training: the character, not the background. "
                            "Masks come from Dataset From Images' masks input, a <name>.mask.png (or OneTrainer's "
                            "<name>-masklabel.png) next to the picture, or the picture's own transparency "
                            "(opaque = learned). Pictures without one train whole; the report says which had one."}),
            "unmasked_weight": ("FLOAT", {"default": d.unmasked_weight, "min": 0.0, "max": 0.99, "step": 0.05,
                                "tooltip": "masked_loss: how much the loss outside a mask still counts (OneTrainer's "
                                "unmasked_weight, its default 0.1); 0 = nothing outside the masks is learned."}),
            "prior_loss_weight": ("FLOAT", {"default": d.prior_loss_weight, "min": 0.01, "max": 10.0, "step": 0.05,
                                  "tooltip": "With pictures on Train LoRA's regularization input: how much their "
                                  "loss counts beside the training pictures' (kohya's --prior_loss_weight, 1.0)."}),
            "network_type": (list(NETWORK_TYPES), {"default": d.network_type, "tooltip":
                             "What kind of network learns, on the layers network_preset picks. LoRA: the usual. "
                             "DoRA: LoRA plus a learned magnitude per input channel; closer to full fine-tuning "
                             "at the same rank, a little slower (needs ComfyUI from mid-2024 to load). LoHa: two "
                             "LoRAs multiplied element by element; more detail for the same file size. LoKr: a "
                             "Kronecker product, very small files; rank and lokr_factor set its size. All load in "
                             "ComfyUI's Load LoRA, A1111/Forge and kohya (LyCORIS' keys)."}),
            "lokr_factor": ("INT", {"default": d.lokr_factor, "min": -1, "max": 1024, "tooltip":
                            "LoKr only: the size of the smaller Kronecker factor (LyCORIS' factor). Smaller = "
                            "smaller file; -1 = as square as possible (largest)."}),
    }

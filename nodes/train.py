"""Train LoRA: dataset + the MODEL/CLIP/VAE already loaded -> a saved LoRA and the model wearing it."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import weakref

import torch

import comfy.model_management
import comfy.utils
import folder_paths

from ..trainer.captions import augment as caption_augment
from ..trainer.data.dataset import DatasetError
from ..trainer.data.encoded_dataset import encode_dataset
from ..trainer.data.loss_masks import MaskedLoss
from ..trainer.data.regularization import with_class_captions, with_regularization
from ..trainer.data.latent_disk_cache import (EncodeDatasetCache, LatentDiskCache, describe as describe_cache,
                                              vae_fingerprint)
from ..trainer.lora import trigger_words as lora_words
from ..trainer.lora.files import load_lora_file
from ..trainer.loss_plot import loss_curve_image
from ..trainer.training import run_reuse, saves
from ..trainer.training.block_swap import blocks_swapped
from ..trainer.training.ema import AdapterEma
from ..trainer.training.fp8_base import frozen_base_in_fp8, has_fp8_weights
from ..trainer.training.half_precision_base import frozen_weights_in
from ..trainer.training.kohya_metadata import Description, kohya_max_token_length
from ..trainer.training.loop import TrainSettings, train
from ..trainer.training.noise import ADDED_AFTER_FIRST_RELEASE as noise_options_added_later, notes_for
from ..trainer.training.optimizers import lr_advice, parse_optimizer_args
from ..trainer.training.run import TrainingRun
from ..trainer.training.schedules import schedule_notes
from ..trainer.training.validation import NothingLeftToTrain, ValidationHistory, hold_out
from . import comfy_bridge, folders, model_sources, train_preset
from .messages import user_error
from .train_adapters import inject_adapters
from .train_checks import NODE, check_inputs, check_noise_settings, check_optimizer
from .train_distributed import DISTRIBUTED_TYPE, Relay, train_elsewhere
from .train_host import ComfyHost
from .training_options import OPTIONS_TYPE, TrainingOptions
from .training_previews import TrainingPreviews, empty_previews

log = logging.getLogger("LoRA Lab")

# Latents survive across queue runs (per VAE object, keyed by picture content and bucket), so changing
# only the learning rate and queueing again does not re-encode the dataset. Weak keys: a VAE that is
# unloaded takes its latents with it, and a new VAE can never be served another one's latents.
_LATENTS_BY_VAE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LATENT_CACHE_LIMIT = 4096


class LoraLabTrainLora:
    DESCRIPTION = ("Trains a LoRA on the dataset with the MODEL/CLIP/VAE you loaded, saves it to "
                   "models/loras, and outputs MODEL and CLIP wearing it, so the next KSampler samples with it.")
    CATEGORY = "LoRA Lab/Train"
    FUNCTION = "train_lora"
    # trigger_word came after the first release: last, so saved workflows' links keep their output slots.
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("model", "clip", "lora_name", "loss_curve", "previews", "trigger_word")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "vae": ("VAE",),
                "dataset": ("LORALAB_DATASET",),
                "output_name": ("STRING", {"default": "my_lora", "tooltip":
                                "File name in models/loras (a subfolder like 'mychar/v1' is fine). "
                                "An existing file is kept: a numbered name is used instead."}),
                "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 64, "tooltip":
                               "Training size in pixels; 0 = the model's own (512 for SD1.5, 1024 for SDXL). "
                               "Pictures keep their aspect ratio in buckets of about this area."}),
                "steps": ("INT", {"default": 1500, "min": 1, "max": 1_000_000, "tooltip":
                          "Total optimizer steps (SD1.5 LoRAs usually want 1500-3000). Ignored when epochs > 0."}),
                "epochs": ("INT", {"default": 0, "min": 0, "max": 10_000, "tooltip":
                           "0 = use steps. Otherwise steps = epochs x (images x repeats / batch size)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5,
                                            "round": False}),
                "rank": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip": "network_dim"}),
                "alpha": ("FLOAT", {"default": 8.0, "min": 0.01, "max": 256.0, "step": 0.5, "tooltip":
                          "network_alpha; the LoRA is scaled by alpha / rank."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
            },
            "optional": {
                "trigger_word": ("STRING", {"default": "", "tooltip":
                                 "Stored in the file's metadata; empty = the first tag all captions share."}),
                "options": (OPTIONS_TYPE, {"tooltip": "Advanced settings from LoRA Lab's option nodes (Optimizer & "
                            "Schedule, Network, Noise & Loss, Caption Augment, Saves & Resume, Previews, Memory & "
                            "Speed), chained in any order."}),
                # Added after the first release: last, so saved workflows keep their widget values in place.
                **train_preset.PRESET_INPUTS,
                "regularization": ("LORALAB_DATASET", {"tooltip":
                                   "Prior preservation (kohya's reg folders): pictures of the class without your "
                                   "subject (e.g. 1_woman/*.png), trained beside the dataset so the model keeps what "
                                   "the class looks like. Each epoch shows as many of them as training pictures "
                                   "(so about twice the steps); their loss counts prior_loss_weight (Noise & Loss). "
                                   "A picture without a caption takes its folder's class."}),
                "distributed": (DISTRIBUTED_TYPE, {"tooltip":
                                "From a Distributed Training node: train on several GPUs (and machines) at once. "
                                "The same settings give the same LoRA; only the speed changes."}),
            },
            # The queued graph names the checkpoint and VAE files the MODEL/VAE came from (model_sources.py).
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, preset=None, goal=None, gpu_memory=None):
        # Named here so ComfyUI skips its own list check for them: workflows saved before they existed hold
        # null in their places and still run (with the defaults); a real wrong value gets our message.
        return train_preset.choice_problem(preset, goal, gpu_memory) or True

    def train_lora(self, model, clip, vae, dataset, output_name, resolution, steps, epochs, batch_size,
                   learning_rate, rank, alpha, seed, trigger_word="", options=None, preset=train_preset.NO_PRESET,
                   goal=train_preset.GOALS[0], gpu_memory=train_preset.GPU_MEMORY[0], regularization=None,
                   distributed=None, unique_id=None, prompt=None):
        check_inputs(model, dataset, output_name, rank, alpha, options)
        preset, goal, gpu_memory = train_preset.with_defaults(preset, goal, gpu_memory)
        chosen = train_preset.choose(preset, goal, gpu_memory, comfy_bridge.model_family(model), dict(
            resolution=resolution, batch_size=batch_size, learning_rate=learning_rate, rank=rank, alpha=alpha,
            steps=steps, epochs=epochs), options or TrainingOptions())
        options = chosen.options
        check_optimizer(options, learning_rate)
        resolution = resolution or comfy_bridge.default_resolution(model)
        device = torch.device(model.load_device)
        host = ComfyHost(NODE)
        run = TrainingRun(host, saves.free_base_name(host.save_folders.loras, output_name, options.overwrite_existing),
                          unique_id, options.save_dtype, options.optimizer)
        run.notes += chosen.report_lines()

        with torch.inference_mode(False):   # tensors made in here (resume state too) may take part in autograd
            resume = load_resume(options, host) if options.resume_from else None
            masked = MaskedLoss(dataset, options.unmasked_weight) if options.masked_loss else None
            data, run.cache_report = encode_for_training(model, clip, vae, dataset, resolution,
                                                         options.latent_disk_cache, masked)
            if masked:
                run.notes.append(f"masked loss: {masked.description()}.")
            split = hold_out_for_validation(data, options.validation_pictures, seed)
            prior = None
            if regularization is not None:      # beside the pictures that train (never held out)
                reg_data, _ = encode_for_training(model, clip, vae, class_captioned(regularization), resolution,
                                                  options.latent_disk_cache, input_name="regularization")
                training, prior = with_regularization(split.training, reg_data, options.prior_loss_weight)
                data, _ = with_regularization(data, reg_data, options.prior_loss_weight)    # for the run identity
                split = dataclasses.replace(split, training=training)
                run.notes.append(prior.description() + ".")
            epoch_plan = split.training.epochs(batch_size, options.gradient_accumulation)
            steps, rounding = train_preset.steps_in_whole_epochs(chosen, epoch_plan)
            run.notes += [rounding] if rounding else []
            settings = TrainSettings(
                steps=epoch_plan.steps_for(epochs) if epochs > 0 else steps, batch_size=batch_size,
                learning_rate=learning_rate, text_encoder_lr=options.text_encoder_lr or None,
                text_encoder_2_lr=options.text_encoder_2_lr or None, network=options.network(rank, alpha),
                train_text_encoder=options.train_text_encoder, lr_schedule=options.lr_schedule,
                warmup_steps=options.warmup_steps,
                gradient_accumulation=options.gradient_accumulation, max_grad_norm=options.max_grad_norm,
                mixed_precision=options.resolved_precision(device), seed=seed,
                # A UNet ComfyUI runs in fp16 gives fp16 gradients whatever we choose: scale them.
                loss_scaling=model.model.get_dtype() == torch.float16,
                optimizer=options.optimizer, optimizer_args=parse_optimizer_args(options.optimizer_args),
                weight_decay=options.weight_decay, lr_cycles=options.lr_cycles, noise=options.noise,
                captions=options.captions, validation_pictures=options.validation_pictures)
            check_noise_settings(model, settings)
            run.validate_on(split, settings,
                            resumed_save=folder_paths.get_full_path("loras", options.resume_from) if resume else None,
                            measured_with=validation_measured_with(model, options))
            advice = lr_advice(settings.optimizer, settings.learning_rate)
            run.notes += (notes_for(comfy_bridge.prediction_type(comfy_bridge.model_sampling(model)), settings.noise)
                          + schedule_notes(settings.lr_schedule, settings.warmup_steps, settings.steps)
                          + ([advice] if advice else []))
            guidance_unused = flux_guidance(model, options) is None
            if guidance_unused and options.flux_guidance != ADDED_SINCE_FIRST_RUNS["flux_guidance"]:
                run.notes.append(f"flux_guidance does nothing here: it is Flux.1's guidance input, and this model is "
                                 f"{comfy_bridge.model_family(model)}.")
            for note in run.notes:
                log.warning("[LoRA Lab] %s", note)
            trigger_word = (trigger_word or saves.shared_first_tag(dataset)
                            or (resumed_trigger_word(options.resume_from) if resume else ""))
            family = comfy_bridge.base_model_version(model)
            describe = Description(
                output_name=run.output_name, family=family, resolution=resolution,
                settings=settings, dataset=split.trained_items(dataset), trigger_word=trigger_word,
                epoch_plan=epoch_plan, epochs=epochs, v_parameterization=comfy_bridge.predicts_v(model),
                base_model=model_sources.base_model(prompt, unique_id, model, clip),
                gradient_checkpointing=options.gradient_checkpointing, fp8_base=options.fp8_base,
                flux_guidance=flux_guidance(model, options),
                masked_loss=masked.description() if masked else None,
                regularization=(prior, regularization) if prior else None,
                max_token_length=None if family in comfy_bridge.FLOW_FAMILIES else kohya_max_token_length(
                    encoding.cross_attn.shape[1] for encoding in data.conds.values()))
            if resume and resume.step >= settings.steps and epochs > 0:
                done = epoch_plan.completed_at(resume.step)
                raise user_error(NODE, "epochs", f"'{options.resume_from}' already has {resume.step} steps "
                                 f"({done} epochs); {epochs} epochs are {settings.steps} steps.",
                                 f"set epochs above {done} to train further.")
            if resume and resume.step >= settings.steps:
                raise user_error(NODE, "steps", f"'{options.resume_from}' already has {resume.step} steps; "
                                 f"steps is {settings.steps}.", f"set steps above {resume.step} to train further.")
            run.identity = identity_of_run(model, data, settings, options, resolution, trigger_word, resume)
            finished = run.identity and run_reuse.find_finished(
                host.save_folders.loras, saves.base_name(output_name), run.identity)
            if finished:
                del data
                return reuse_finished(model, clip, finished, run, describe)
            if resume is None:      # this run was interrupted before (ComfyUI killed): it goes on from its last save
                resume, describe = run.continue_interrupted(saves.base_name(output_name), describe)
            if distributed is not None:     # the workers train, render the previews and save (train_distributed.py)
                relay = Relay(run, host)
                saved = train_elsewhere(distributed, prompt, unique_id, model, dict(
                    split=split, settings=settings, options=options, describe=describe, resume=resume), relay)
                shown, previews = relay.previews_shown, relay.previews
            else:
                if options.previews.every_n_steps:      # prompts encoded now: CLIP is not loaded mid-run
                    run.previews = TrainingPreviews(model, clip, options.previews, trigger_word,
                                                    (resolution, resolution), unique_id, settings.mixed_precision)
                saved = train_adapters(model, clip, split, settings, options, device, run, describe, resume)
                shown = previews = None
            del data, split
        comfy.model_management.soft_empty_cache()
        if run.previews:        # rendered in this process: decoded now that training has left the GPU
            shown, previews = run.previews.shown, run.previews.decoded(vae)

        tensors, _ = load_lora_file(saved)
        model_out, clip_out = comfy_bridge.apply_lora(model, clip, tensors)
        lora_name = os.path.relpath(saved, host.save_folders.loras)
        curve = torch.from_numpy(run.loss_curve(title=f"{lora_name} loss")).unsqueeze(0)
        ui = {"text": [run.report(lora_name, describe)], **run.chart()}
        if shown:
            # For the node's own preview strip (js/preview_strip.js), not "images": ComfyUI would show them
            # a second time as node images, squeezed and without their steps.
            ui["previews"] = shown
        return {"ui": ui, "result": (model_out, clip_out, lora_name, curve,
                                     previews if previews is not None else empty_previews(), describe.trigger_word or "")}


# Options that cannot change the trained weights or the file: a finished run stays reusable when
# only these differ (trainer/training/run_reuse.py).
NOT_IN_RUN_IDENTITY = ("save_every_n_steps", "save_every_n_epochs", "keep_last_saves", "overwrite_existing",
                       "latent_disk_cache", "gradient_checkpointing", "blocks_to_swap", "preview_every_n_steps",
                       "preview_prompts", "preview_seed", "preview_steps", "preview_cfg",
                       "groups_set")      # which node set an option: the values themselves are in the identity


# Options whose whole effect is in the pictures' loss weights, which the data fingerprint holds: left out of the
# options, so that changing them where they do nothing (no regularization input) keeps a finished run reusable.
IN_THE_DATA_FINGERPRINT = ("prior_loss_weight",)


# Options added after runs were saved, with their defaults: the value that trains as before they existed.
ADDED_SINCE_FIRST_RUNS = {name: getattr(TrainingOptions(), name) for name in (
    "validation_pictures", "fp8_base", *noise_options_added_later, "flux_guidance", "ema_decay", "ema_weights",
    "network_type", "lokr_factor", "masked_loss", "unmasked_weight")}


def options_added_since_saved(options) -> tuple[str, ...]:
    """Options added after runs were saved, left out of the identity while they train as before, so those runs
    stay reusable (and an interrupted one continuable) after an update."""
    unused = (("ema_weights",) if not options.ema_decay else ()       # it says where an average goes: none is kept
              ) + (("unmasked_weight",) if not options.masked_loss else ())
    return tuple(name for name, before in ADDED_SINCE_FIRST_RUNS.items()
                 if getattr(options, name) == before or name in unused)


def flux_guidance(model, options) -> float | None:
    """The guidance input Flux.1 dev trains with; None for models without one (other families, Flux schnell)."""
    if comfy_bridge.model_family(model) != "flux1" or model_sources.model_variant(model) == "schnell":
        return None
    return float(options.flux_guidance)


def validation_measured_with(model, options) -> dict:
    """What changes the validation numbers besides the noise settings (validation.history_key), only when on:
    Flux's guidance other than ComfyUI's default, the moving average measured in place of the weights."""
    measured = {}
    guidance = flux_guidance(model, options)
    if guidance is not None and guidance != ADDED_SINCE_FIRST_RUNS["flux_guidance"]:
        measured["flux_guidance"] = guidance
    if options.ema_decay and options.ema_weights == "replace":
        measured["ema_decay"] = float(options.ema_decay)
    return measured


def identity_of_run(model, data, settings, options, resolution, trigger_word, resume) -> str | None:
    """The run's identity (finished_runs), or None when the base model cannot be loaded whole to look at
    (too big for the device: training streams part of it, or says why it cannot)."""
    if not comfy_bridge.load_fully(model):    # the base weights, not a LoRA a sampler left patched in
        return None       # part of it in CPU memory: weights read there are without the graph's LoRA patches
    return run_reuse.run_identity(
        data=run_reuse.data_fingerprint(data), model=comfy_bridge.model_fingerprint(model),
        settings={"options": run_reuse.settings_of(options, NOT_IN_RUN_IDENTITY + IN_THE_DATA_FINGERPRINT
                                                   + options_added_since_saved(options)),
                  "resolution": resolution,
                  "steps": settings.steps, "batch_size": settings.batch_size, "learning_rate": settings.learning_rate,
                  "rank": settings.network.rank, "alpha": settings.network.alpha, "seed": settings.seed,
                  "trigger_word": trigger_word,
                  "precision": settings.mixed_precision, "loss_scaling": settings.loss_scaling,
                  "resume": [resume.step, vae_fingerprint(resume.tensors)] if resume else None})


def reuse_finished(model, clip, path, run, describe):
    """The outputs of a finished run with the same identity, from its file: nothing is trained."""
    tensors, metadata = load_lora_file(path)
    lora_name = os.path.relpath(path, run.folders.loras)
    losses = run_reuse.loss_history(metadata)
    validation = ValidationHistory.from_metadata(metadata) or ValidationHistory()
    log.info("[LoRA Lab] %s was trained from the same pictures, captions, model and settings; reusing it", path)
    model_out, clip_out = comfy_bridge.apply_lora(model, clip, tensors)
    chart = run_reuse.reused_chart(losses, metadata, validation)
    curve = torch.from_numpy(loss_curve_image(losses, title=f"{lora_name} loss (reused)", steps=chart["loss_steps"],
                                              validation=validation.entries)).unsqueeze(0)
    text = "\n".join([f"Reused {lora_name} in {run.folders.loras}: it was trained from these same "
                      "pictures, captions, model and settings, so nothing was trained again.",
                      "To train again, change a setting (the seed, say) or delete or rename that file.",
                      describe.arithmetic(), *validation.report_lines()])
    return {"ui": {"text": [text], **chart},
            "result": (model_out, clip_out, lora_name, curve, empty_previews(), describe.trigger_word or "")}


def encode_for_training(model, clip, vae, dataset, resolution, use_disk_cache: bool, masked=None,
                        input_name="dataset"):
    """VAE and text encoder run once per picture/caption, with a progress bar and Cancel.

    Latents are looked up in memory (this VAE object, this session), then on disk (any session, keyed
    by picture content, bucket and a fingerprint of the VAE's encoder and the latent format). ``masked``: the
    run's MaskedLoss, which weighs each picture's loss (its masks are read afresh: they cost no VAE).
    ``input_name``: the input the pictures came in on, for messages.
    """
    progress = comfy.utils.ProgressBar(len(dataset.items))

    def on_progress(done, total):
        progress.update_absolute(done, total)
        comfy.model_management.throw_exception_if_processing_interrupted()

    memory = _LATENTS_BY_VAE.setdefault(vae, {})
    cache, disk = memory, None
    if use_disk_cache:
        disk = LatentDiskCache(folders.latent_cache_folder(),
                               comfy_bridge.vae_fingerprint(vae, model, resolution))
        cache = EncodeDatasetCache(disk, memory=memory)
    try:
        data = encode_dataset(dataset, resolution, comfy_bridge.pixel_encoder(vae, model),
                              comfy_bridge.caption_encoder(clip), latent_cache=cache,
                              cache_key=f"{resolution}:{comfy_bridge.latent_space_name(model)}",
                              on_progress=on_progress, loss_weight=masked)
    except DatasetError as error:      # a picture changed, vanished or became a link leading out since the scan
        raise user_error(NODE, input_name, error.problem, error.fix) from None
    if masked is not None and not masked.masked:
        raise user_error(NODE, "options", f"masked_loss is on, but none of the {len(dataset.items)} pictures has a "
                         "mask.", "put a <name>.mask.png (white = learned) next to each picture, use pictures with "
                         "a transparent background, connect masks on Dataset From Images, or turn masked_loss off "
                         "on the Noise & Loss node.")
    _trim(memory)
    return data, (describe_cache(disk.stats) if disk else "latent disk cache: off")


def train_adapters(model, clip, split, settings, options, device, run, describe, resume, parallel=None):
    """Inject, train (``split.training``; ``split.pictures`` held out for validation), save; whatever happens
    the shared model comes back as it was. ``parallel``: this worker's share of a distributed run."""
    text_encoder_trains = settings.train_text_encoder
    # Captions that change per step (dropout, shuffle) or a training text encoder mean CLIP runs inside
    # the loop: it is loaded beside the UNet up front, and never through ComfyUI's loader mid-run.
    clip_in_loop = text_encoder_trains or caption_augment.varies(settings.captions)
    try:
        with comfy_bridge.trainable_unet(model, options.gradient_checkpointing,
                                         clip=clip if clip_in_loop else None) as network, \
                streamed_layers_checked(network, settings, run) as streamed, \
                (frozen_base_in_fp8(network, folders.parking_folder(), convert=options.fp8_base, leave=streamed)
                 if options.fp8_base or has_fp8_weights(network) else contextlib.nullcontext()) as fp8, \
                frozen_weights_in(network, HALF_PRECISION.get(settings.mixed_precision),
                                  folders.parking_folder()), \
                (comfy_bridge.trainable_text_encoder(clip) if text_encoder_trains
                 else contextlib.nullcontext()) as text_model, \
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(settings.seed)
            if fp8 is not None:
                run.notes.append(fp8.describe())
            lora = inject_adapters(model, network, clip, text_model, settings.network, settings.seed, device)
            # After the adapters: a swapped block's weights are away, and injecting reads their shapes.
            with run.kept_if_stopped(lora, describe), \
                    blocks_swapped(comfy_bridge.blocks_of(network), options.blocks_to_swap, device,
                                   leave=streamed) as swap:
                if options.blocks_to_swap:
                    run.notes.append(swap.describe())
                lora.train(True)
                if resume:
                    load_resumed_weights(lora, resume, options)
                # After the resumed weights: a run resumed without an average starts it from them.
                run.ema_beside = options.ema_weights == "beside"
                run.ema = (AdapterEma(all_parameters(lora), options.ema_decay, saved_instead=not run.ema_beside)
                           if options.ema_decay else None)
                # A trained text encoder encodes every step's captions with gradients; a frozen one's
                # encodings are made once (data.conds) or, when captions vary, memoised by the loop.
                encode_caption = comfy_bridge.loaded_caption_encoder(clip, with_gradients=text_encoder_trains)
                denoiser = comfy_bridge.ComfyDenoiser(model, flux_guidance(model, options))
                loop_state = train(denoiser, split.training, lora.parameters_by_part(),
                                   settings, device, on_step=run.step_callback(lora, describe, options),
                                   resume=resume.loop_state if resume else None,
                                   encode_caption=encode_caption, text_encoder_trains=text_encoder_trains,
                                   held_out=split.pictures, adapter_dropout=lora.train, ema=run.ema,
                                   parallel=parallel)
                return run.save_final(lora, describe, loop_state, settings.steps, options.overwrite_existing)
    except comfy_bridge.PartiallyLoaded as too_big:
        if isinstance(too_big, comfy_bridge.StreamingNeedsCheckpointing):
            raise user_error(NODE, "model", f"{too_big}.", "turn on gradient_checkpointing (Memory & Speed): "
                             "training then streams the layers that do not fit, as ComfyUI does when it samples; "
                             "or free VRAM (close other models).") from None
        clip_advice = (" turn off train_text_encoder / caption dropout and tag shuffle (they keep the text encoder "
                       "on the GPU too)," if clip_in_loop else "")
        raise user_error(NODE, "model", f"{too_big}.", f"free VRAM (close other models),{clip_advice} lower the "
                         "resolution or batch size, or start ComfyUI with --normalvram.") from None


@contextlib.contextmanager
def streamed_layers_checked(network, settings, run):
    """The layers ComfyUI left in CPU memory (comfy_bridge.streamed_layers), said in the report; refused for DoRA,
    whose layers read their whole weight where it is."""
    streamed = comfy_bridge.streamed_layers(network)
    if streamed and settings.network.network_type == "DoRA":
        raise user_error(NODE, "options", "network_type is DoRA, which reads each layer's whole weight, but ComfyUI "
                         f"could fit only part of the model on the GPU ({len(streamed)} layers stayed in CPU memory).",
                         "use network_type LoRA, LoHa or LoKr, or free VRAM (close other models).")
    if streamed:
        run.notes.append(comfy_bridge.describe_streamed(streamed))
    yield streamed


# bf16/fp16 training: the frozen UNet weights train in that precision too (as ComfyUI's own trainer
# does), the shared fp32 originals set aside and put back bitwise afterwards (trainer/training/half_precision_base.py).
HALF_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def class_captioned(regularization):
    """The regularization pictures, each with a caption (its own, else its folder's class), or our message."""
    try:
        return with_class_captions(regularization)
    except DatasetError as error:
        raise user_error(NODE, "regularization", error.problem, error.fix) from None


def hold_out_for_validation(data, count: int, seed: int):
    """The encoded dataset without the validation pictures (validation_pictures, on the Previews node)."""
    try:
        return hold_out(data, count, seed)
    except NothingLeftToTrain as error:
        raise user_error("Previews", "validation_pictures", error.problem, error.fix) from None


def load_resume(options, host) -> saves.ResumePoint:
    lora_path = folder_paths.get_full_path("loras", options.resume_from)
    if lora_path is None:
        raise user_error(NODE, "resume_from", f"{options.resume_from!r} is not in any loras folder.",
                         "pick a file the LoRA loaders list.")
    return saves.load_resume(lora_path, options.resume_from, NODE, host.save_folders).for_optimizer(options.optimizer)


def resumed_trigger_word(resume_from: str) -> str:
    """The trigger word the resumed save was trained with: a continued run keeps calling up the same word
    when none is typed and the captions share no first tag (a folder captioned half by hand, say)."""
    words = lora_words.trigger_words(run_reuse.file_metadata(folder_paths.get_full_path("loras", resume_from)),
                                     max_tags=0)
    return words[0] if words else ""


def load_resumed_weights(lora, resume, options):
    try:
        lora.load_kohya_state_dict(resume.tensors)
    except ValueError as bad:
        raise user_error(NODE, "options", f"'{options.resume_from}' does not fit this run's network ({bad}).",
                         "resume with the rank, network_preset, network_type, conv_rank and train_text_encoder "
                         "setting the save was trained with.") from None


def all_parameters(lora) -> list:
    """Every trainable weight of the LoRA, all parts (the moving average covers what the optimizer steps)."""
    return [parameter for part in lora.parameters_by_part().values() for parameter in part]


def _trim(cache: dict):
    while len(cache) > _LATENT_CACHE_LIMIT:
        cache.pop(next(iter(cache)))


NODE_CLASS_MAPPINGS = {"LoraLabTrainLora": LoraLabTrainLora}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraLabTrainLora": "Train LoRA (LoRA Lab)"}

"""The bundled example workflows, described in a few lines each: what tools/build_workflows.py builds
in the front end and what the tests load, run and check."""
from __future__ import annotations

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
DATASET = "my_dataset"
TRIGGER = "myconcept"
TRAINED = "my_first_lora"
PLACEHOLDER = "{trigger}"    # the Previews node's prompts and the Compare Grid fill in the trigger word
POSITIVE = f"{PLACEHOLDER}, a portrait, detailed, best quality"     # Prompt with Trigger fills it in
NEGATIVE = "blurry, lowres, watermark, text"


def node(key, kind, column, widgets=None, inputs=None, title=None, width=None):
    """One node: its column in the layout, widget values by name, inputs as {name: (node_key, output_slot)}."""
    return {"key": key, "type": kind, "column": column, "widgets": widgets or {}, "inputs": inputs or {},
            "title": title, "width": width}


def note(key, column, text, width=420):
    return node(key, "Note", column, {"text": text}, title="Read me", width=width)


def sampling(column, model, clip, vae, prefix, trigger):
    """Prompt -> KSampler -> VAEDecode -> SaveImage, sampling with the MODEL/CLIP given; the prompt's {trigger}
    is the trigger word from `trigger` (an output), so the user sets the word once, upstream."""
    return [
        node("positive", "LoraLabPromptWithTrigger", column, {"text": POSITIVE}, {"clip": clip, "trigger_word": trigger},
             title="Prompt ({trigger} = the trigger word)"),
        node("negative", "CLIPTextEncode", column, {"text": NEGATIVE}, {"clip": clip}, title="Negative prompt"),
        node("latent", "EmptyLatentImage", column, {"width": 512, "height": 512, "batch_size": 1}),
        node("sampler", "KSampler", column + 1,
             {"seed": 42, "control_after_generate": "fixed", "steps": 25, "cfg": 7.0, "sampler_name": "euler_ancestral",
              "scheduler": "normal", "denoise": 1.0},
             {"model": model, "positive": ("positive", 0), "negative": ("negative", 0), "latent_image": ("latent", 0)}),
        node("decode", "VAEDecode", column + 2, {}, {"samples": ("sampler", 0), "vae": vae}),
        node("save", "SaveImage", column + 2, {"filename_prefix": prefix}, {"images": ("decode", 0)}),
    ]


def dataset_and_captions(write_sidecars=True):
    """Folder -> BLIP captions (trigger word first, missing ones only, written as .txt files unless a later
    node saves them)."""
    return [
        node("dataset", "LoraLabDatasetFromFolder", 1,
             {"folder": DATASET, "caption_extension": ".txt", "default_repeats": 10, "batch_size": 1,
              "target_steps": 1500}),
        node("blip", "LoraLabBlipLoader", 1, {"model": "blip-base", "device": "auto", "precision": "auto"}),
        node("caption", "LoraLabCaption", 2,
             {"mode": "fill-missing", "trigger_word": TRIGGER, "prompt": "", "min_length": 5, "max_length": 30,
              "num_beams": 3, "batch_size": 8, "find": "", "replace": "", "remove_tags": "",
              "write_sidecars": write_sidecars},
             {"dataset": ("dataset", 0), "blip": ("blip", 0)}, width=380),
    ]


# Train LoRA as picking the preset SD1.5 · character · 8 GB leaves it (js/presets.js writes these values;
# tests/comfy/test_workflows.py checks they are the preset's).
TRAIN_WIDGETS = {"output_name": TRAINED, "resolution": 512, "steps": 2000, "epochs": 0, "batch_size": 2,
                 "learning_rate": 5e-4, "rank": 32, "alpha": 16.0, "seed": 0, "control_after_generate": "fixed",
                 "trigger_word": "", "preset": "SD1.5", "goal": "character", "gpu_memory": "8 GB"}

WORKFLOWS = {
    "1_caption_dataset": [
        note("readme", 0,
             "CAPTION A DATASET WITH BLIP\n\n"
             f"1. Put 10-500 pictures in ComfyUI/input/{DATASET}/ (kohya layout works too: "
             f"{DATASET}/10_{TRIGGER}/...). Type that folder name in 'folder'.\n"
             f"2. Set the trigger word ('trigger_word') to a rare word for your concept ({TRIGGER} here); it goes "
             "first in every caption.\n"
             "3. Queue. Pictures that already have a .txt caption keep it (mode fill-missing); "
             "the others get a BLIP caption, written next to the picture (write_sidecars).\n\n"
             "BLIP base (about 1 GB) downloads from the Hugging Face hub on first use. Offline, put the "
             "Salesforce/blip-image-captioning-base files in ComfyUI/models/blip/blip-base/."),
        *dataset_and_captions(),
        node("preview", "LoraLabDatasetPreview", 3,
             {"resolution": 512, "thumbnail_size": 192, "max_images": 64}, {"dataset": ("caption", 0)},
             title="Dataset preview (buckets + captions)"),
    ],
    "2_caption_train_sample": [
        note("readme", 0,
             "DATASET -> CAPTION -> TRAIN -> SAMPLE, IN ONE GRAPH\n\n"
             f"1. Checkpoint: pick your SD1.5 model (e.g. {CHECKPOINT}).\n"
             f"2. Dataset: pictures in ComfyUI/input/{DATASET}/; type its name in 'folder'.\n"
             f"3. Trigger word: set it on the Caption node ({TRIGGER} here) -- only there: it goes first in every "
             f"caption, Train LoRA finds it in them, and the prompts' {PLACEHOLDER} becomes it.\n"
             "4. Queue. Watch the loss chart on Train LoRA, and every 250 steps a preview of the prompts in "
             "the Previews node rendered with the LoRA so far; the LoRA is saved in models/loras as "
             f"'{TRAINED}.safetensors' and the sampler after it already uses it.\n\n"
             "Train LoRA runs the preset SD1.5 / character / 8 GB (public kohya_ss, Civitai and Holostrawberry "
             "recipes): 512 px, batch 2, rank 32, alpha 16, lr 5e-4, about 2000 steps in whole epochs. "
             "Pick your base model, goal and GPU memory at the bottom of Train LoRA to change it; every value "
             "stays yours to change. Cancel keeps what was trained as "
             f"{TRAINED}_stepN. Re-queueing an unchanged graph does not retrain.\n\n"
             "Several GPUs? Connect the Distributed Training node to Train LoRA's 'distributed' input and set "
             "its gpus: batch_size stays the whole batch, split across them, so the LoRA is the same, sooner."),
        node("checkpoint", "CheckpointLoaderSimple", 1, {"ckpt_name": CHECKPOINT}),
        *dataset_and_captions(),
        node("options", "LoraLabPreviewOptions", 2,
             {"preview_every_n_steps": 250,
              "preview_prompts": f"{PLACEHOLDER}, a portrait\n{PLACEHOLDER}, full body, outdoors"},
             title="Previews (every 250 steps)", width=380),
        node("distributed", "LoraLabDistributedTraining", 2,
             {"where": "this machine", "gpus": 2, "machines": 2, "address": "", "port": 29500, "timeout_seconds": 600},
             title="Distributed Training (connect for several GPUs)", width=380),
        node("train", "LoraLabTrainLora", 3, TRAIN_WIDGETS,
             {"model": ("checkpoint", 0), "clip": ("checkpoint", 1), "vae": ("checkpoint", 2),
              "dataset": ("caption", 0), "options": ("options", 0)}, width=420),
        node("loss", "PreviewImage", 3, {}, {"images": ("train", 3)}, title="Loss curve"),
        *sampling(4, ("train", 0), ("train", 1), ("checkpoint", 2), "lora_lab/sample", ("train", 5)),
    ],
    "3_pedals_and_grid": [
        note("readme", 0,
             "STACK LORAS LIKE GUITAR PEDALS, AND COMPARE THEM\n\n"
             f"Pedal 1 is the LoRA trained by workflow 2 ({TRAINED}.safetensors). Pedals 2 and 3 come switched "
             "off: to stack more LoRAs, pick one of yours from models/loras in each pedal's lora_name list and "
             "switch its 'enabled' on. Each pedal has its own model/clip strength; a switched-off or "
             "zero-strength pedal passes the stack through.\n\n"
             "Apply LoRA Stack loads them the same way ComfyUI's LoraLoader does and outputs their trigger "
             "words. The comparison grid renders each prompt with the base model, each pedal alone and "
             f"the whole stack, at the same seed; {PLACEHOLDER} in its prompts becomes its trigger_word, or "
             "when that is empty the trigger words stored in the stacked LoRAs. Set sweep_index to a pedal's "
             "position (0 = first) to also sweep its strength."),
        node("checkpoint", "CheckpointLoaderSimple", 1, {"ckpt_name": CHECKPOINT}),
        node("pedal1", "LoraLabLoraStack", 1,
             {"lora_name": f"{TRAINED}.safetensors", "strength_model": 1.0, "strength_clip": 1.0, "enabled": True},
             title="Pedal 1: the LoRA you trained"),
        node("pedal2", "LoraLabLoraStack", 1,
             {"lora_name": "style.safetensors", "strength_model": 0.6, "strength_clip": 0.6, "enabled": False},
             {"lora_stack": ("pedal1", 0)}, title="Pedal 2: a style LoRA (off)"),
        node("pedal3", "LoraLabLoraStack", 1,
             {"lora_name": "detail.safetensors", "strength_model": 0.4, "strength_clip": 0.4, "enabled": False},
             {"lora_stack": ("pedal2", 0)}, title="Pedal 3: a detail LoRA (off)"),
        node("apply", "LoraLabApplyLoraStack", 2, {},
             {"model": ("checkpoint", 0), "clip": ("checkpoint", 1), "lora_stack": ("pedal3", 0)}),
        node("grid", "LoraLabLoraCompareGrid", 2,
             {"prompts": f"{PLACEHOLDER}, a portrait\n{PLACEHOLDER}, a city street at night", "seed": 42,
              "control_after_generate": "fixed", "steps": 20, "cfg": 7.0, "sampler_name": "euler_ancestral",
              "scheduler": "normal", "width": 512, "height": 512, "negative_prompt": NEGATIVE,
              "sweep_index": -1, "sweep_strengths": "0, 0.5, 1", "trigger_word": ""},
             {"model": ("checkpoint", 0), "clip": ("checkpoint", 1), "vae": ("checkpoint", 2),
              "lora_stack": ("pedal3", 0)}, width=380),
        node("grid_save", "SaveImage", 5, {"filename_prefix": "lora_lab/grid"}, {"images": ("grid", 0)},
             title="Comparison grid"),
        *sampling(3, ("apply", 0), ("apply", 1), ("checkpoint", 2), "lora_lab/stacked", ("apply", 2)),
    ],
    "4_resume_training": [
        note("readme", 0,
             "RESUME TRAINING A LORA\n\n"
             f"'resume_from' picks the save to continue ({TRAINED}.safetensors, from workflow 2). Its list holds "
             "every LoRA Lab save in models/loras that has a resume state (press R to refresh it after training); "
             "the save continues exactly where it stopped (weights, optimizer, schedule, step count).\n\n"
             "'steps' is the total: 4000 here continues workflow 2's LoRA (about 2000 steps) to 4000. Use the "
             f"same checkpoint, dataset folder (ComfyUI/input/{DATASET}), preset, rank and alpha as the first run. "
             "The result is saved under the new output_name; "
             "save_every_n_steps keeps intermediate saves to compare."),
        node("checkpoint", "CheckpointLoaderSimple", 1, {"ckpt_name": CHECKPOINT}),
        node("dataset", "LoraLabDatasetFromFolder", 1,
             {"folder": DATASET, "caption_extension": ".txt", "default_repeats": 10, "batch_size": 1,
              "target_steps": 3000}),
        node("options", "LoraLabSaveOptions", 2,
             {"resume_from": f"{TRAINED}.safetensors", "save_every_n_steps": 500}, width=400),
        node("train", "LoraLabTrainLora", 3, dict(TRAIN_WIDGETS, output_name=f"{TRAINED}_resumed", steps=4000),
             {"model": ("checkpoint", 0), "clip": ("checkpoint", 1), "vae": ("checkpoint", 2),
              "dataset": ("dataset", 0), "options": ("options", 0)}, width=420),
        node("loss", "PreviewImage", 3, {}, {"images": ("train", 3)}, title="Loss curve"),
        *sampling(4, ("train", 0), ("train", 1), ("checkpoint", 2), "lora_lab/resumed", ("train", 5)),
    ],
    "5_tag_review_train": [
        note("readme", 0,
             "TAG, REVIEW AND TRAIN A CHARACTER\n\n"
             f"1. Put pictures of your character in ComfyUI/input/{DATASET}/; type that name in 'folder'. "
             f"Pick your SD1.5 checkpoint.\n"
             f"2. Trigger word: on the Caption node ({TRIGGER} here); it goes first in every caption.\n"
             "3. Queue. BLIP writes a sentence, the WD14 tagger adds booru tags (1girl, red dress...) and Review "
             "Captions lists every picture with its caption. Train LoRA waits: ready_to_train is off.\n"
             "4. Read the captions on Review Captions and fix what is wrong. Remove the tags that describe the "
             "character itself (hair, eyes, outfit: 'Show with tag(s)' finds them), so they bind to the trigger "
             "word. Save caption files keeps them as .txt files next to the pictures.\n"
             "5. Switch ready_to_train on and queue again: Train LoRA trains on the reviewed captions, and the "
             "sampler draws the character with the trigger word.\n\n"
             "BLIP base (about 1 GB) and the tagger wd-swinv2-tagger-v3 (about 450 MB) download on first use. "
             "Offline, put their files in ComfyUI/models/blip/blip-base/ and "
             "ComfyUI/models/wd14_tagger/wd-swinv2-tagger-v3/ (model.onnx, selected_tags.csv). The tagger "
             "needs onnxruntime: pip install onnxruntime."),
        node("checkpoint", "CheckpointLoaderSimple", 1, {"ckpt_name": CHECKPOINT}),
        *dataset_and_captions(write_sidecars=False),       # Review Captions saves the files
        node("tagger", "LoraLabWd14Loader", 1, {"model": "wd-swinv2-tagger-v3", "device": "auto"}),
        node("tag", "LoraLabTagImages", 2,
             {"merge": "BLIP sentence, then tags", "general_threshold": 0.35, "character_threshold": 0.85,
              "mcut": "off", "rating_tags": False, "replace_underscores": True, "escape_parentheses": True,
              "exclude_tags": "", "first_tags": "", "batch_size": 8, "write_sidecars": False,
              "sidecar_mode": "fill-missing"},
             {"dataset": ("caption", 0), "tagger": ("tagger", 0)}, width=380),
        node("review", "LoraLabReviewCaptions", 3, {"reviewed": "", "ready_to_train": False},
             {"dataset": ("tag", 0)}, width=640),
        node("train", "LoraLabTrainLora", 4, TRAIN_WIDGETS,
             {"model": ("checkpoint", 0), "clip": ("checkpoint", 1), "vae": ("checkpoint", 2),
              "dataset": ("review", 0)}, width=420),
        *sampling(5, ("train", 0), ("train", 1), ("checkpoint", 2), "lora_lab/character", ("train", 5)),
    ],
}

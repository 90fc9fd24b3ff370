"""WD14 tagger nodes: load one of SmilingWolf's booru taggers from ComfyUI/models/wd14_tagger, tag a
LORALAB_DATASET (tags beside or instead of BLIP's sentence, optionally saved as .txt sidecars), and chart how
often each tag occurs.

Taggers live in plain folders (``models/wd14_tagger/<name>/model.onnx`` + ``selected_tags.csv``, what the
hub repositories hold), so placing the two files by hand is easy when a machine is offline. The flat names
ComfyUI-WD14-Tagger uses (``models/wd14_tagger/<name>.onnx`` + ``<name>.csv``) are read too, so its users
reuse the files they have. onnxruntime is optional: only the loader imports it, when it runs.
The work is in trainer/captions/ (wd14*.py, tag_merge.py, tag_frequency.py, tag_chart.py).
"""
from __future__ import annotations

import logging
import os
import shutil
import statistics
import time

import torch

import comfy.model_management
import comfy.utils

from ..trainer.captions.tag_chart import tag_chart
from ..trainer.captions.tag_frequency import COMMON_SHARE, count_tags, describe
from ..trainer.captions.tag_merge import MERGES, SENTENCE_ONLY, TAGS_ONLY, merged_caption
from ..trainer.captions.wd14 import (CUDA, INSTALL_HINT, KNOWN_MODELS, MODEL_FILES, OnnxRuntimeMissing, TaggerFiles,
                                     TaggerModelError, Wd14Tagger, files_in, hub_url, load_onnxruntime,
                                     missing_files)
from ..trainer.captions.wd14_labels import TagListError
from ..trainer.captions.wd14_select import MCUT_CHOICES, TagOptions, select_tags
from ..trainer.data.dataset import DatasetError
# Shared with the Caption node on purpose: the same sidecar rules, report lines, offline check and lazy pictures.
from .caption import _LazyImages, _offline_reason, _sidecar_lines, write_sidecars_for
from .dataset import _save_temp_png, _to_image_tensor, expect_dataset
from .folders import model_folders
from .messages import user_error

CATEGORY = "LoRA Lab/Caption"
FOLDER_KIND = "wd14_tagger"          # ComfyUI-WD14-Tagger's name: one folder serves both packs
LOG = logging.getLogger("lora_lab.tagger")
LISTED_PICTURES = 40                 # per-picture lines in the report; the rest are counted


def tagger_folders() -> list[str]:
    return model_folders(FOLDER_KIND)


def model_choices() -> list[str]:
    names = list(KNOWN_MODELS)
    for base in tagger_folders():
        if not os.path.isdir(base):
            continue
        for entry in sorted(os.listdir(base)):
            stem, extension = os.path.splitext(entry)
            if entry.startswith(".") or entry in names:
                continue
            if os.path.isdir(os.path.join(base, entry)):
                names.append(entry)
            elif extension == ".onnx" and os.path.isfile(os.path.join(base, stem + ".csv")) and stem not in names:
                names.append(stem)
    return names


tagger_folders()  # register at import, so the folder kind exists for other code before the first run


# --- loader -----------------------------------------------------------------------------------------
class LoraLabWd14Loader:
    TITLE = "WD14 Tagger Loader"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (model_choices(), {"default": "wd-swinv2-tagger-v3", "tooltip":
                "SmilingWolf's booru taggers (0.3-1.3 GB each; eva02-large is the most accurate and slowest). "
                "model.onnx and selected_tags.csv are downloaded into ComfyUI/models/wd14_tagger/<name>/ on "
                "first use when online. Any subfolder there holding those two files is listed too."}),
            "device": (["auto", "cpu", "cuda"], {"default": "auto", "tooltip":
                "auto: the GPU when ComfyUI runs on one and onnxruntime-gpu is installed, else the CPU. "
                "On the GPU the model is loaded only while tagging."}),
        }}

    RETURN_TYPES = ("LORALAB_TAGGER",)
    RETURN_NAMES = ("tagger",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a WD14 (SmilingWolf) booru tagger from ComfyUI/models/wd14_tagger. Needs onnxruntime "
                   "(pip install onnxruntime, or onnxruntime-gpu).")

    def load(self, model, device):
        try:   # first: no point in downloading a model nothing can run
            ort = load_onnxruntime()
        except OnnxRuntimeMissing as missing:
            raise user_error(self.TITLE, None, f"WD14 taggers run on onnxruntime, which cannot be imported here "
                             f"({missing.__cause__}).", INSTALL_HINT) from None
        target = _device(self.TITLE, device, ort)
        files = locate_model(self.TITLE, model)
        if target == "cuda":
            # ComfyUI does not see onnxruntime's memory: let it unload its own models to make room.
            comfy.model_management.free_memory(2 * os.path.getsize(files.model), torch.device("cuda"))
        try:
            tagger = Wd14Tagger(files, target, name=model)
        except (TaggerModelError, TagListError) as error:
            fix = _fetch_instructions(model, os.path.dirname(files.model))
            raise user_error(self.TITLE, "model", str(error), fix) from None
        if device == "cuda" and not tagger.on_gpu:
            raise user_error(self.TITLE, "device", "onnxruntime could not start its CUDA provider (the console "
                             "says why; usually onnxruntime-gpu built for another CUDA or cuDNN version).",
                             "Install the onnxruntime-gpu that matches your CUDA version, or choose auto or cpu.")
        return (tagger,)


def _device(node: str, choice: str, ort) -> str:
    available = ort.get_available_providers()
    if choice == "cpu":
        return "cpu"
    if choice == "cuda":
        if CUDA not in available:
            raise user_error(node, "device", f"This onnxruntime ({ort.__version__}) has no CUDA provider (it offers "
                             f"{', '.join(available)}).", "Choose auto or cpu, or replace it with the GPU build: "
                             "`pip uninstall onnxruntime` then `pip install onnxruntime-gpu`.")
        return "cuda"
    on_gpu = comfy.model_management.get_torch_device().type == "cuda"
    return "cuda" if on_gpu and CUDA in available else "cpu"


def locate_model(node: str, name: str) -> TaggerFiles:
    """The files of tagger ``name``: the first complete ``<tagger folder>/<name>/``, else flat ``<name>.onnx``
    + ``<name>.csv``, else a fresh download into the first tagger folder (known models, online only), else an
    error that says what to put where."""
    if name in ("", ".", "..") or os.path.basename(name) != name or "/" in name:
        # The combo only offers plain names; an API prompt could send anything.
        raise user_error(node, "model", f"{name!r} is not a tagger name.", "Pick a model from the list.")
    candidates = [os.path.join(base, name) for base in tagger_folders()]
    for candidate in candidates:
        if not missing_files(candidate):
            return files_in(candidate)
        flat = TaggerFiles(candidate + ".onnx", candidate + ".csv")
        if os.path.isfile(flat.model) and os.path.isfile(flat.tags):
            return flat
    folder = next((path for path in candidates if os.path.isdir(path)), candidates[0])
    repo_id = KNOWN_MODELS.get(name)
    reason = _offline_reason()
    if repo_id and reason is None:
        try:
            _download(repo_id, folder)
        except ImportError:
            reason = "huggingface_hub is not installed"
        except Exception as error:  # no network, proxy, 404, disk full: all end in the manual route
            reason = f"the download failed: {error}"
        else:
            if not missing_files(folder):
                return files_in(folder)
            reason = "the download finished without all the files"
    missing = ", ".join(missing_files(folder))
    if repo_id:
        problem = (f"The WD14 tagger '{name}' is not in {folder} (missing: {missing}) and cannot be downloaded "
                   f"now ({reason}).")
    else:
        problem = f"{folder} is not a complete WD14 tagger folder (missing: {missing})."
    raise user_error(node, "model", problem, _fetch_instructions(name, folder))


def _fetch_instructions(name: str, folder: str) -> str:
    repo_id = KNOWN_MODELS.get(name)
    if repo_id is None:
        return (f"Put a WD14 tagger's {' and '.join(MODEL_FILES)} in {folder}{os.sep}, or choose one of "
                f"SmilingWolf's taggers from the list.")
    return (f"Download {' and '.join(MODEL_FILES)} from {hub_url(repo_id)} and put them directly in "
            f"{folder}{os.sep} (same names, no subfolders), then queue again. Online, unset HF_HUB_OFFLINE and "
            f"this node downloads them itself (set HF_ENDPOINT to use a mirror).")


def _download(repo_id: str, folder: str) -> None:
    from huggingface_hub import snapshot_download
    LOG.info("LoRA Lab: downloading %s into %s", repo_id, folder)
    created = not os.path.exists(folder)
    os.makedirs(folder, exist_ok=True)
    try:
        snapshot_download(repo_id=repo_id, local_dir=folder, allow_patterns=list(MODEL_FILES))
    except BaseException:
        if created:  # leave no empty folder behind: it would look like a model in the list
            shutil.rmtree(folder, ignore_errors=True)
        raise


# --- Tag Images -------------------------------------------------------------------------------------
class LoraLabTagImages:
    TITLE = "Tag Images (WD14)"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": ("LORALAB_DATASET", {"tooltip": "The pictures to tag (captioned by BLIP or not)."}),
            "tagger": ("LORALAB_TAGGER", {"tooltip": "From the WD14 Tagger Loader node."}),
            "merge": (list(MERGES), {"default": MERGES[0], "tooltip":
                "BLIP sentence, then tags: each caption keeps its text and gets the tags it does not have yet. "
                "tags only: the tags replace the caption. BLIP only: captions stay as they are (first_tags aside); "
                "the report still lists each picture's tags."}),
            "general_threshold": ("FLOAT", {"default": 0.35, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                "Keep a general tag (1girl, red dress, outdoors...) when the tagger is more sure than this. "
                "Lower: more tags, more mistakes."}),
            "character_threshold": ("FLOAT", {"default": 0.85, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                "Keep a character name tag when the tagger is more sure than this. Kept high: a wrong name "
                "teaches the LoRA the wrong person."}),
            "mcut": (list(MCUT_CHOICES), {"default": "off", "tooltip":
                "MCut picks the threshold per picture at the widest gap between the tagger's confidences "
                "(as SmilingWolf's demo does), instead of the fixed thresholds above. Character MCut never "
                "goes below 0.15."}),
            "rating_tags": ("BOOLEAN", {"default": False, "tooltip":
                "Add the most likely rating (general, sensitive, questionable, explicit) as the last tag."}),
            "replace_underscores": ("BOOLEAN", {"default": True, "tooltip":
                "long_hair -> long hair, as prompts are written. Faces like ^_^ keep their underscore."}),
            "escape_parentheses": ("BOOLEAN", {"default": True, "tooltip":
                "saber (fate) -> saber \\(fate\\). ComfyUI reads (word) as extra weight, and training encodes "
                "captions the same way: escaped, the tag is trained as written."}),
            "exclude_tags": ("STRING", {"default": "", "tooltip":
                "Comma-separated tags never to add, e.g. `simple background, watermark` (case, underscores and "
                "escaping ignored)."}),
            "first_tags": ("STRING", {"default": "", "tooltip":
                "Put first in every caption, once: the trigger word (`ohwx`), or several (`ohwx, 1girl`)."}),
            "batch_size": ("INT", {"default": 8, "min": 1, "max": 128, "tooltip":
                "Pictures tagged together; larger is faster until memory runs out."}),
            "write_sidecars": ("BOOLEAN", {"default": False, "tooltip":
                "Save each caption as a .txt file next to its picture (see sidecar_mode)."}),
            "sidecar_mode": (["fill-missing", "overwrite"], {"default": "fill-missing", "tooltip":
                "fill-missing: write caption files only for pictures that have none; an existing caption file "
                "is never replaced. overwrite: replace them too, keeping the old text in "
                ".loralab_caption_backup/<time>/ inside the dataset folder."}),
        }}

    RETURN_TYPES = ("LORALAB_DATASET", "STRING")
    RETURN_NAMES = ("dataset", "report")
    OUTPUT_NODE = True  # writing sidecars is a result on its own: a tagging-only graph must run
    FUNCTION = "tag"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Tags every picture with a WD14 tagger (booru tags: 1girl, red dress, outdoors...) and merges "
                   "the tags with the existing caption; can save .txt caption files.")

    def tag(self, dataset, tagger, merge, general_threshold, character_threshold, mcut, rating_tags,
            replace_underscores, escape_parentheses, exclude_tags, first_tags, batch_size, write_sidecars,
            sidecar_mode):
        expect_dataset(self.TITLE, dataset, "Connect the output of a Dataset node, Caption or another Tag Images.")
        if not isinstance(tagger, Wd14Tagger):
            raise user_error(self.TITLE, "tagger", f"Expected a WD14 tagger, got {type(tagger).__name__}.",
                             "Connect the output of the WD14 Tagger Loader node.")
        options = TagOptions(general_threshold=general_threshold, character_threshold=character_threshold,
                             mcut=mcut, rating=rating_tags, replace_underscores=replace_underscores,
                             escape_parentheses=escape_parentheses, exclude=exclude_tags)
        started = time.perf_counter()
        probabilities = _run_tagger(self.TITLE, tagger, dataset, batch_size)
        seconds = time.perf_counter() - started
        tags = [select_tags(row, tagger.tags, options).caption_tags(options) for row in probabilities]
        captions = [merged_caption(item.caption, picture_tags, merge, first_tags)
                    for item, picture_tags in zip(dataset.items, tags)]
        tagged = dataset.with_captions(captions)
        sidecars = None
        if write_sidecars:
            sidecars = self._write_sidecars(tagged, sidecar_mode)
        report = describe_run(tagger, tagged, tags, merge, options, batch_size, seconds, sidecars)
        LOG.info("%s", report)
        return {"ui": {"text": [report]}, "result": (tagged, report)}

    def _write_sidecars(self, dataset, mode):
        return write_sidecars_for(dataset, [item.caption for item in dataset.items], mode, node=self.TITLE)


def _run_tagger(node, tagger, dataset, batch_size):
    """Every picture's probabilities: a ComfyUI progress bar per batch, and Cancel checked between batches."""
    indices = list(range(len(dataset.items)))
    progress = comfy.utils.ProgressBar(max(1, len(indices)))

    def on_batch_done(done: int, total: int) -> None:
        progress.update_absolute(done, total)
        comfy.model_management.throw_exception_if_processing_interrupted()

    comfy.model_management.throw_exception_if_processing_interrupted()
    if tagger.on_gpu:
        comfy.model_management.free_memory(2 * tagger.weight_bytes(), torch.device("cuda"))
    try:
        return tagger.probabilities(_LazyImages(dataset, indices), batch_size=batch_size, on_batch_done=on_batch_done)
    except DatasetError as error:      # a picture changed, vanished or became a link leading out since the scan
        raise user_error(node, "dataset", error.problem, error.fix) from None
    except TaggerModelError as error:
        raise user_error(node, "tagger", str(error), "Load the tagger's matching model.onnx and "
                         "selected_tags.csv (both from the same hub repository).") from None


def describe_run(tagger, dataset, tags, merge, options, batch_size, seconds, sidecars) -> str:
    """The report on the node: what the tagger did and found, picture by picture, and what happened to the files."""
    total = len(dataset.items)
    speed = ""
    if total and seconds:
        speed = f" in {seconds:.1f} s ({total / seconds:.1f} pictures/s, batches of {batch_size})"
    providers = ", ".join(tagger.providers)
    lines = [f"WD14 tagged {total} picture(s) with {tagger.name} on {tagger.device} ({providers}){speed}."]
    thresholds = f"general > {options.general_threshold:g}, character > {options.character_threshold:g}"
    if options.mcut != "off":
        thresholds += f", MCut for {options.mcut}"
    lines.append(f"Merge: {merge}. Thresholds: {thresholds}.")
    counts = [len(picture_tags) for picture_tags in tags]
    if counts:
        lines.append(f"Tags: {min(counts)} to {max(counts)} per picture (mean {statistics.fmean(counts):.1f}).")
        untagged = sum(count == 0 for count in counts)
        if untagged:
            lines.append(f"{untagged} picture(s) got no tag above the thresholds; lower general_threshold or try mcut.")
    what = {SENTENCE_ONLY: "captions unchanged", TAGS_ONLY: "each is the picture's caption now"}.get(
        merge, "each added after the caption unless it is there already")
    lines.append(f"Tags per picture ({what}):")
    for item, picture_tags in list(zip(dataset.items, tags))[:LISTED_PICTURES]:
        lines.append(f"  {item.key}: {', '.join(picture_tags) or '(none)'}")
    if total > LISTED_PICTURES:
        lines.append(f"  ... and {total - LISTED_PICTURES} more picture(s) (the Tag Report node counts them all).")
    if sidecars is not None:
        lines += _sidecar_lines(dataset, sidecars)
    return "\n".join(lines)


# --- Tag Report -------------------------------------------------------------------------------------
class LoraLabTagReport:
    TITLE = "Tag Report"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": ("LORALAB_DATASET", {"tooltip": "A captioned or tagged dataset."}),
            "common_share": ("FLOAT", {"default": COMMON_SHARE, "min": 0.05, "max": 1.0, "step": 0.01, "tooltip":
                "Tags on at least this share of the pictures are marked: usually the ones to prune, so what "
                "they describe binds to the trigger word."}),
            "trigger_word": ("STRING", {"default": "", "tooltip":
                "Your trigger word(s): on every picture by design, so never marked for pruning."}),
            "max_tags": ("INT", {"default": 40, "min": 5, "max": 300, "tooltip":
                "Bars in the chart, most frequent first."}),
        }}

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("chart", "report")
    OUTPUT_NODE = True
    FUNCTION = "report"
    CATEGORY = CATEGORY
    DESCRIPTION = ("How many pictures carry each tag (kohya's ss_tag_frequency), as a bar chart; marks the tags on "
                   "almost every picture.")

    def report(self, dataset, common_share, trigger_word, max_tags):
        expect_dataset(self.TITLE, dataset, "Connect the output of a Dataset, Caption or Tag Images node.")
        counts = count_tags(dataset)
        pictures = len(dataset.items)
        chart = tag_chart(counts, pictures, common_share, trigger_word, max_tags)
        text = describe(counts, pictures, common_share, trigger_word)
        return {"ui": {"images": [_save_temp_png(chart)], "text": [text]}, "result": (_to_image_tensor(chart), text)}


NODE_CLASS_MAPPINGS = {
    "LoraLabWd14Loader": LoraLabWd14Loader,
    "LoraLabTagImages": LoraLabTagImages,
    "LoraLabTagReport": LoraLabTagReport,
}
NODE_DISPLAY_NAME_MAPPINGS = {name: f"{cls.TITLE} (LoRA Lab)" for name, cls in NODE_CLASS_MAPPINGS.items()}

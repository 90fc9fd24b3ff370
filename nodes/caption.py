"""Caption nodes: load BLIP from ComfyUI/models/blip, caption a LORALAB_DATASET, optionally write .txt sidecars.

BLIP lives in plain folders (``models/blip/<name>/config.json, model.safetensors, ...``), not the
Hugging Face cache layout, so placing the files by hand is easy when a machine is offline. The work
itself is in trainer/captions/blip.py (the model) and trainer/captions/edits.py (what captions become).
"""
from __future__ import annotations

import logging
import os
import shutil
import time

import torch

import comfy.model_management
import comfy.utils

from ..trainer.captions import edits as caption_edits
from ..trainer.captions.edits import MODES, CaptionEdits, SidecarReport, final_caption, needs_generation
from ..trainer.captions.blip import (DOWNLOAD_PATTERNS, HUB_FILES, KNOWN_MODELS, BlipCaptioner, hub_url,
                                 missing_files, pick_dtype, resolve_snapshot)
from ..trainer.data.dataset import DatasetError
from ..trainer.paths import is_inside
from .folders import model_folders
from .messages import user_error

CATEGORY = "LoRA Lab/Caption"
FOLDER_KIND = "blip"
LOG = logging.getLogger("lora_lab.caption")


def blip_folders() -> list[str]:
    return model_folders(FOLDER_KIND)


def model_choices() -> list[str]:
    names = list(KNOWN_MODELS)
    for base in blip_folders():
        if os.path.isdir(base):
            names += sorted(entry for entry in os.listdir(base) if not entry.startswith(".")
                            and os.path.isdir(os.path.join(base, entry)) and entry not in names)
    return names


blip_folders()  # register at import, so the folder kind exists for other code before the first run


# --- BLIP loader ------------------------------------------------------------------------------------
class LoraLabBlipLoader:
    TITLE = "BLIP Loader"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (model_choices(), {"default": "blip-base", "tooltip":
                "blip-base (Salesforce/blip-image-captioning-base, about 1 GB) or blip-large (about 1.9 GB) are "
                "downloaded into ComfyUI/models/blip/<name>/ on first use when online. Any subfolder of "
                "models/blip holding a BLIP model (config.json, model.safetensors, processor and tokenizer "
                "files) is listed too."}),
            "device": (["auto", "cpu", "cuda"], {"default": "auto", "tooltip":
                "auto: the device ComfyUI runs models on. The weights wait on the CPU and move there only "
                "while captioning."}),
            "precision": (["auto", "fp32", "fp16", "bf16"], {"default": "auto", "tooltip":
                "auto: fp16 on a GPU, fp32 on the CPU. The CPU always runs fp32 (half precision is slower "
                "there)."}),
        }}

    RETURN_TYPES = ("LORALAB_BLIP",)
    RETURN_NAMES = ("blip",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a BLIP captioning model from ComfyUI/models/blip (safetensors only, no remote code)."

    def load(self, model, device, precision):
        folder = locate_model(self.TITLE, model)
        target = _torch_device(self.TITLE, device)
        dtype = pick_dtype(target, precision)
        if dtype == torch.bfloat16 and target.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise user_error(self.TITLE, "precision", "This GPU has no bf16 support.", "Choose auto or fp16.")
        try:
            captioner = BlipCaptioner(folder, target, dtype, offload_device="cpu", name=model)
        except Exception as error:  # corrupt or foreign files: say which folder, whatever transformers raised
            raise user_error(self.TITLE, "model", f"Could not load a BLIP model from {folder} ({error}).",
                             _fetch_instructions(model, folder)) from error
        return (captioner,)


def locate_model(node: str, name: str) -> str:
    """The folder holding model ``name``: the first complete ``<blip folder>/<name>``, else a fresh download
    into the first blip folder (known models, online only), else an error that says what to put where."""
    if name in ("", ".", "..") or os.path.basename(name) != name or "/" in name:
        # The combo only offers plain folder names; an API prompt could send anything.
        raise user_error(node, "model", f"{name!r} is not a model folder name.", "Pick a model from the list.")
    candidates = [os.path.join(base, name) for base in blip_folders()]
    for candidate in candidates:
        resolved = resolve_snapshot(candidate)
        if os.path.isdir(resolved) and not missing_files(resolved):
            return resolved
    folder = next((path for path in candidates if os.path.isdir(path)), candidates[0])
    repo_id = KNOWN_MODELS.get(name)
    reason = _offline_reason()
    if repo_id and reason is None:
        try:
            _download(repo_id, folder)
        except Exception as error:  # no network, proxy, 404, disk full: all end in the manual route
            reason = f"the download failed: {error}"
        else:
            if not missing_files(folder):
                return folder
            reason = "the download finished without all the files"
    missing = missing_files(folder)
    if repo_id:
        problem = (f"The BLIP model '{name}' is not in {folder} (missing: {', '.join(missing)}) and cannot be "
                   f"downloaded now ({reason}).")
    else:
        problem = f"{folder} is not a complete BLIP model folder (missing: {', '.join(missing)})."
    raise user_error(node, "model", problem, _fetch_instructions(name, folder))


def _fetch_instructions(name: str, folder: str) -> str:
    repo_id = KNOWN_MODELS.get(name)
    if repo_id is None:
        return (f"Put a BLIP captioning model's files in {folder}: config.json, model.safetensors, "
                f"preprocessor_config.json, tokenizer_config.json and tokenizer.json (or vocab.txt), "
                f"or choose blip-base / blip-large.")
    return (f"Download {', '.join(HUB_FILES)} from {hub_url(repo_id)} and put them directly in "
            f"{folder}{os.sep} (same names, no subfolders), then queue again. Online, unset HF_HUB_OFFLINE "
            f"and this node downloads them itself.")


def _offline_reason() -> str | None:
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{variable} is set"
    return None


def _download(repo_id: str, folder: str) -> None:
    from huggingface_hub import snapshot_download
    LOG.info("LoRA Lab: downloading %s into %s", repo_id, folder)
    created = not os.path.exists(folder)
    os.makedirs(folder, exist_ok=True)
    try:
        snapshot_download(repo_id=repo_id, local_dir=folder, allow_patterns=list(DOWNLOAD_PATTERNS))
    except BaseException:
        if created:  # leave no empty folder behind: it would look like a model in the list
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _torch_device(node: str, choice: str) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise user_error(node, "device", "CUDA is not available to this ComfyUI.", "Choose auto or cpu.")
        return torch.device("cuda")
    return comfy.model_management.get_torch_device()


# --- Caption ----------------------------------------------------------------------------------------
class LoraLabCaption:
    TITLE = "Caption Dataset"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": ("LORALAB_DATASET", {"tooltip": "The pictures to caption."}),
            "blip": ("LORALAB_BLIP", {"tooltip": "From the BLIP Loader node."}),
            "mode": (list(MODES), {"default": "fill-missing", "tooltip":
                "fill-missing: caption only pictures without a caption. overwrite: replace every caption. "
                "append: add BLIP's text after each existing caption."}),
            "trigger_word": ("STRING", {"default": "", "tooltip":
                "Put first in every caption (`ohwx, a photo of ...`), once. Several tags allowed: `ohwx, sks style`."}),
            "prompt": ("STRING", {"default": "", "tooltip":
                "Optional start for BLIP to continue, e.g. `a photograph of`. It is not kept in the caption."}),
            "min_length": ("INT", {"default": 5, "min": 0, "max": 100, "tooltip":
                "Fewest word-pieces BLIP writes (the prompt is not counted)."}),
            "max_length": ("INT", {"default": 30, "min": 1, "max": 200, "tooltip":
                "Most word-pieces BLIP writes (the prompt is not counted)."}),
            "num_beams": ("INT", {"default": 3, "min": 1, "max": 16, "tooltip":
                "Beam search width: 1 is fastest (greedy); 3-5 gives steadier captions."}),
            "batch_size": ("INT", {"default": 8, "min": 1, "max": 64, "tooltip":
                "Pictures captioned together; larger is faster until memory runs out."}),
            "find": ("STRING", {"default": "", "tooltip": "Plain text to replace in every caption (case-sensitive)."}),
            "replace": ("STRING", {"default": "", "tooltip": "What `find` becomes (may be empty)."}),
            "remove_tags": ("STRING", {"default": "", "tooltip":
                "Comma-separated tags to drop wherever they are a whole tag, ignoring case: `blurry, watermark`."}),
            "write_sidecars": ("BOOLEAN", {"default": False, "tooltip":
                "Save each caption as a .txt file next to its picture. fill-missing never replaces an existing "
                "caption file; overwrite/append replace them and keep the old text in "
                ".loralab_caption_backup/<time>/ inside the dataset folder."}),
        }}

    RETURN_TYPES = ("LORALAB_DATASET", "STRING")
    RETURN_NAMES = ("dataset", "captions")
    OUTPUT_IS_LIST = (False, True)
    OUTPUT_NODE = True  # writing sidecars is a result on its own: a caption-only graph must run
    FUNCTION = "caption"
    CATEGORY = CATEGORY
    DESCRIPTION = "Captions a dataset with BLIP, adds a trigger word and edits, and can save .txt caption files."

    def caption(self, dataset, blip, mode, trigger_word, prompt, min_length, max_length, num_beams, batch_size,
                find, replace, remove_tags, write_sidecars):
        if min_length > max_length:
            raise user_error(self.TITLE, "min_length", f"min_length {min_length} is above max_length {max_length}.",
                             "Lower min_length or raise max_length.")
        items = dataset.items
        todo = [index for index, item in enumerate(items) if needs_generation(item.caption, mode)]
        started = time.perf_counter()
        generated = _run_blip(blip, dataset, todo, prompt, min_length, max_length, num_beams, batch_size)
        seconds = time.perf_counter() - started
        by_index = dict(zip(todo, generated))
        edits = CaptionEdits(trigger=trigger_word, find=find, replace=replace, remove_tags=remove_tags)
        captioned = dataset.with_captions([final_caption(item.caption, by_index.get(index), mode, edits)
                                           for index, item in enumerate(items)])
        captions = [item.caption for item in captioned.items]
        sidecars = None
        if write_sidecars:
            sidecars = write_sidecars_for(captioned, captions, mode)
        report = describe_run(blip, captioned, mode, len(todo), seconds, write_sidecars, sidecars)
        LOG.info("%s", report)
        return {"ui": {"text": [report]}, "result": (captioned, captions)}


def _run_blip(blip, dataset, todo, prompt, min_length, max_length, num_beams, batch_size) -> list[str]:
    """Caption the pictures at ``todo``: a ComfyUI progress bar per batch, and Cancel checked between batches."""
    if not todo:
        return []
    progress = comfy.utils.ProgressBar(len(todo))

    def on_batch_done(done: int, total: int) -> None:
        progress.update_absolute(done, total)
        comfy.model_management.throw_exception_if_processing_interrupted()

    comfy.model_management.throw_exception_if_processing_interrupted()
    on_gpu = blip.device.type != "cpu"
    if on_gpu:
        # ComfyUI does not know about BLIP's weights: let it unload its own models to make room
        # (weights plus a batch's activations, roughly twice the weights).
        comfy.model_management.free_memory(2 * blip.weight_bytes(), blip.device)
    try:
        return blip.caption(_LazyImages(dataset, todo), prompt=prompt, min_length=min_length, max_length=max_length,
                            num_beams=num_beams, batch_size=batch_size, on_batch_done=on_batch_done)
    except DatasetError as error:      # a picture changed, vanished or became a link leading out since the scan
        raise user_error(LoraLabCaption.TITLE, "dataset", error.problem, error.fix) from None
    finally:
        if on_gpu:
            comfy.model_management.soft_empty_cache()


class _LazyImages:
    """The pictures at ``indices``, decoded when asked for: only one batch of full-size pictures in memory."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, position):
        return self.dataset.load_image(self.indices[position])


NAME_MAX = 255                  # bytes per file name on ext4, NTFS, APFS
TEMPORARY_NAME_EXTRA = 14       # the sidecar writer's ".<name>.<8 random>.tmp"


def write_sidecars_for(dataset, captions: list[str], mode: str, node: str = "Caption Dataset",
                       input_name: str | None = "write_sidecars") -> SidecarReport:
    """Write ``captions`` next to the dataset's pictures; an OS error becomes a message of ``node``."""
    paths = [item.caption_path for item in dataset.items]
    moved = [path for path in paths if path and not _still_inside(path, dataset.root)]
    too_long = [path for path in paths if path and path not in moved
                and len(os.fsencode(os.path.basename(path))) + TEMPORARY_NAME_EXTRA > NAME_MAX]
    refused = set(moved) | set(too_long)
    try:
        report = caption_edits.write_sidecars([None if path in refused else path for path in paths], captions,
                                              replace_existing=mode != "fill-missing", backup_root=dataset.root)
    except OSError as error:      # disk full, permissions: name the file instead of a bare traceback
        raise user_error(node, input_name,
                         f"Writing the caption file {error.filename or ''} failed ({error.strerror or error}); "
                         f"caption files written before it are kept.",
                         "Free disk space or fix the folder's permissions and queue again, or turn write_sidecars "
                         "off to use the captions in this graph only.") from None
    report.without_path -= len(refused)
    report.moved, report.too_long = moved + report.moved, too_long   # + the links found when opening
    return report


def _still_inside(path: str, root: str | None) -> bool:
    """Re-checked right before writing: a sidecar (or its folder) swapped for a symbolic link since the scan
    could otherwise make this node read or write a file outside the dataset folder. Where the platform allows,
    write_sidecars also opens every file without following links, so a link swapped in after this check is
    skipped too (on Windows this check is the guard)."""
    if root is None:
        return True
    real_root = os.path.realpath(root)
    folder = os.path.realpath(os.path.dirname(path))
    return is_inside(folder, real_root) and not os.path.islink(path)


def describe_run(blip, dataset, mode: str, generated: int, seconds: float, wrote: bool,
                 sidecars: SidecarReport | None) -> str:
    """The report shown on the node: what BLIP did, what happened to every caption file."""
    total = len(dataset.items)
    model = f"{blip.name} on {blip.device} ({str(blip.dtype).replace('torch.', '')})"
    lines = [f"BLIP captioned {generated} of {total} picture(s) with {model}"
             + (f" in {seconds:.1f} s." if generated else ".")]
    if mode == "fill-missing" and generated < total:
        lines.append(f"{total - generated} picture(s) kept their caption (fill-missing).")
    empty = sum(not item.caption for item in dataset.items)
    if empty:
        lines.append(f"{empty} picture(s) still have no caption (BLIP returned nothing); check max_length.")
    if wrote and sidecars is not None:
        lines += _sidecar_lines(dataset, sidecars)
    return "\n".join(lines)


def _sidecar_lines(dataset, sidecars: SidecarReport) -> list[str]:
    def shown(path: str) -> str:
        return os.path.relpath(path, dataset.root) if dataset.root else path

    lines = []
    if sidecars.without_path < len(dataset.items):
        lines.append(f"Caption files: {len(sidecars.written)} written, {len(sidecars.replaced)} replaced, "
                     f"{len(sidecars.unchanged)} already up to date, {len(sidecars.kept)} kept.")
    if sidecars.replaced:
        lines.append("Replaced (old text backed up):")
        lines += [f"  - {shown(path)} -> {shown(backup)}" for path, backup in sidecars.replaced]
    if sidecars.kept:
        lines.append(f"Kept {len(sidecars.kept)} existing caption file(s) as they are (fill-missing never replaces "
                     f"a caption file); the trigger word and other edits reach those captions in this graph only.")
    if sidecars.too_long:
        names = ", ".join(shown(path)[:60] + "…" for path in sidecars.too_long[:5])
        lines.append(f"Warning: {len(sidecars.too_long)} caption file name(s) would be longer than file systems "
                     f"allow ({NAME_MAX} bytes with the temporary name): {names}. Give those pictures shorter names.")
    if sidecars.moved:
        lines.append(f"Warning: {len(sidecars.moved)} caption file(s) not written because they, their folder or "
                     f"the backup folder became a symbolic link (or something other than a plain file or folder) "
                     f"after the dataset was scanned: "
                     f"{', '.join(shown(path) for path in sidecars.moved[:10])}. Replace the links with real files or "
                     f"folders and run the dataset node again.")
    if sidecars.without_path:
        if dataset.root is None:
            lines.append("Warning: this dataset came from an IMAGE batch, so there are no picture files to write "
                         "caption files next to; the captions are used in this graph only.")
        else:
            lines.append(f"Warning: {sidecars.without_path} picture(s) got no caption file because the dataset "
                         f"node skipped the file next to them (see its warnings).")
    return lines


NODE_CLASS_MAPPINGS = {
    "LoraLabBlipLoader": LoraLabBlipLoader,
    "LoraLabCaption": LoraLabCaption,
}
NODE_DISPLAY_NAME_MAPPINGS = {name: f"{cls.TITLE} (LoRA Lab)" for name, cls in NODE_CLASS_MAPPINGS.items()}

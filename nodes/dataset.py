"""Dataset nodes: a folder or an IMAGE batch becomes a LORALAB_DATASET; a contact sheet shows it.

Folders are read only inside ComfyUI's input folder and the roots a server owner registers as the
``lora_datasets`` folder kind (extra_model_paths.yaml), so a shared server never reads elsewhere.
"""
from __future__ import annotations

import math
import os
import random
import re

import numpy as np
import torch
from PIL import Image, ImageDraw

import comfy.utils
import folder_paths

from ..trainer.data.buckets import make_buckets, nearest_bucket
from ..trainer.data.dataset import (DEFAULT_MAX_PIXELS, EXACT_STEPS_NOTE, Dataset, DatasetError, dataset_from_pixels,
                                    mask_batch, steps_report)
from ..trainer.data.folder_scan import folder_signature, normalize_caption_extension, scan_folder
from ..trainer.fonts import drawable, fit, label_font, text_width, wrap
from ..trainer.paths import is_inside
from .messages import user_error, validation_message

CATEGORY = "LoRA Lab/Dataset"
DATASET_ROOT_KIND = "lora_datasets"     # the folder kind server owners register extra roots under

FOLDER_TOOLTIP = (
    "A folder inside ComfyUI's input folder, e.g. `mychar` or `projects/mychar`; subfolders are read "
    "too, and kohya-style `10_name` subfolders repeat their pictures 10 times. To use folders elsewhere, "
    "register them in extra_model_paths.yaml under the key `lora_datasets` (e.g. `lora_datasets: "
    "/data/datasets`), restart ComfyUI and type `lora_datasets/<subfolder>` (or just `lora_datasets` for "
    "the registered folder itself). `..`, and absolute paths outside those folders, are refused.")


# --- nodes ----------------------------------------------------------------------------------------
class LoraLabDatasetFromFolder:
    TITLE = "Dataset from Folder"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            # A list, not a text box: what there is to pick (refreshed with R). A saved name that is not
            # on this machine's list still arrives (VALIDATE_INPUTS names `folder`) and gets its own message.
            "folder": (dataset_folder_choices(), {"tooltip": FOLDER_TOOLTIP}),
            "caption_extension": ("STRING", {"default": ".txt", "tooltip":
                "Captions are read from a file next to each picture with the same name and this "
                "extension: a.png -> a.txt (or a.caption)."}),
            "default_repeats": ("INT", {"default": 1, "min": 1, "max": 10000, "tooltip":
                "How often each picture is shown per epoch, unless its folder is named `N_name`."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip":
                "Only for the report's arithmetic: steps per epoch = pictures x repeats / batch size; "
                f"{EXACT_STEPS_NOTE}."}),
            "target_steps": ("INT", {"default": 2000, "min": 0, "max": 1_000_000, "step": 100, "tooltip":
                "Only for the report: how many epochs reach this many steps (SD1.5 LoRAs usually want "
                "1500-3000). 0 leaves it out."}),
        }}

    RETURN_TYPES = ("LORALAB_DATASET", "STRING")
    RETURN_NAMES = ("dataset", "report")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Reads pictures and caption files from a folder (kohya layout welcome) and reports steps per epoch."

    @classmethod
    def VALIDATE_INPUTS(cls, folder=None):
        # Only `folder`: ComfyUI repeats a failure once per argument named here, and caption_extension
        # is checked when the node runs. A linked input arrives as None; it is checked at run time too.
        if isinstance(folder, str):
            try:
                resolve_dataset_folder(folder)
            except DatasetError as error:
                return validation_message(cls.TITLE, "folder", error.problem, error.fix)
        return True

    @classmethod
    def IS_CHANGED(cls, folder, caption_extension=".txt", **_):
        # Names, sizes and modification times: a new picture or an edited caption reruns the node.
        try:
            return folder_signature(resolve_dataset_folder(folder), caption_extension)
        except DatasetError as error:
            return str(error)      # the node itself raises the proper message

    def load(self, folder, caption_extension, default_repeats, batch_size, target_steps):
        path = _or_user_error(self.TITLE, "folder", resolve_dataset_folder, folder)
        extension = _or_user_error(self.TITLE, "caption_extension", normalize_caption_extension, caption_extension)
        dataset = _or_user_error(self.TITLE, "folder", scan_folder, path, extension, default_repeats,
                                 DEFAULT_MAX_PIXELS, _progress_bar())
        report = steps_report(dataset, batch_size, target_steps, source=f"in '{folder.strip()}'")
        return {"ui": {"text": [report]}, "result": (dataset, report)}


class LoraLabDatasetFromImages:
    TITLE = "Dataset from Images"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "A batch of pictures from any node (Load Image, a batch node...)."}),
            "captions": ("STRING", {"default": "", "multiline": True, "tooltip":
                "One caption per line, in batch order; or a single line used for every picture; or empty "
                "to caption them later with the Caption node."}),
            "repeats": ("INT", {"default": 1, "min": 1, "max": 10000, "tooltip":
                "How often each picture is shown per epoch."}),
        }, "optional": {
            "masks": ("MASK", {"tooltip":
                "With masked_loss on (Noise & Loss): where each picture is learned, white = learned; one mask per "
                "picture or one for all, at the pictures' size. Load Image's MASK is white where the picture is "
                "transparent: put an Invert Mask between."}),
        }}

    RETURN_TYPES = ("LORALAB_DATASET",)
    RETURN_NAMES = ("dataset",)
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = "Turns an IMAGE batch and typed captions (and masks, for masked loss) into a dataset."

    def build(self, images, captions, repeats, masks=None):
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise user_error(self.TITLE, "images", "This input needs an IMAGE batch.",
                             "Connect an IMAGE output, e.g. from Load Image.")
        text = (captions or "").strip()
        lines = text.splitlines() if text else []
        count = images.shape[0]
        if len(lines) not in (0, 1, count):
            raise user_error(self.TITLE, "captions", f"{len(lines)} caption lines for {count} pictures.",
                             f"Write exactly {count} lines (one per picture, in batch order), a single line "
                             "for all of them, or nothing to caption them later.")
        if masks is not None:
            masks = _or_user_error(self.TITLE, "masks", mask_batch, masks, count, images.shape[1], images.shape[2])
        return (_or_user_error(self.TITLE, "images", dataset_from_pixels, images, lines, repeats, masks),)


class LoraLabDatasetPreview:
    TITLE = "Dataset Preview"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": ("LORALAB_DATASET",),
            "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8, "tooltip":
                "Training resolution (512 for SD1.5, 1024 for SDXL): shows the bucket each picture is "
                "cropped to. 0 hides buckets."}),
            "thumbnail_size": ("INT", {"default": 192, "min": 64, "max": 512, "step": 16}),
            "max_images": ("INT", {"default": 64, "min": 1, "max": 1024, "tooltip":
                "Larger datasets show their first pictures and a count of the rest."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("contact_sheet",)
    FUNCTION = "preview"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "A contact sheet of the dataset: thumbnails, captions, repeats and training buckets."

    def preview(self, dataset, resolution, thumbnail_size, max_images):
        expect_dataset(self.TITLE, dataset, "Connect the output of Dataset from Folder, Dataset from Images or Caption.")
        buckets = None
        if resolution > 0:
            try:
                buckets = make_buckets(resolution)
            except ValueError as error:
                raise user_error(self.TITLE, "resolution", f"{error}.", "Use 64 or more, e.g. 512 or 1024.") from None
        sheet = contact_sheet(dataset, thumbnail_size, max_images, buckets)
        return {"ui": {"images": [_save_temp_png(sheet)]}, "result": (_to_image_tensor(sheet),)}


NODE_CLASS_MAPPINGS = {
    "LoraLabDatasetFromFolder": LoraLabDatasetFromFolder,
    "LoraLabDatasetFromImages": LoraLabDatasetFromImages,
    "LoraLabDatasetPreview": LoraLabDatasetPreview,
}
NODE_DISPLAY_NAME_MAPPINGS = {name: f"{cls.TITLE} (LoRA Lab)" for name, cls in NODE_CLASS_MAPPINGS.items()}


def expect_dataset(node: str, dataset, fix: str) -> None:
    """What every node taking a LORALAB_DATASET says of anything else (an API prompt can send anything)."""
    if not isinstance(dataset, Dataset):
        raise user_error(node, "dataset", f"Expected a LoRA Lab dataset, got {type(dataset).__name__}.", fix)


def _progress_bar():
    """A progress callback drawing ComfyUI's bar on the node; created once the total is known."""
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)
    return update


def _or_user_error(node: str, input_name: str, function, *args):
    try:
        return function(*args)
    except DatasetError as error:
        raise user_error(node, input_name, error.problem, error.fix) from None


# --- where a dataset folder may be ---------------------------------------------------------------------
def resolve_dataset_folder(folder: str) -> str:
    """The real path of the folder named by ``folder``, or ``DatasetError`` saying how to allow it.

    ``name/sub`` is looked up in ComfyUI's input folder; ``lora_datasets/sub`` in each registered
    lora_datasets root in order (when that kind is registered; otherwise it is an input subfolder).
    """
    text = (folder or "").strip().replace("\\", "/")
    if not text:
        raise DatasetError("No folder given.",
                           "Type the name of a folder inside ComfyUI's input folder, e.g. mychar.")
    if "\x00" in text:
        raise DatasetError("The folder name contains a NUL character.", "Retype the folder name.")
    if text.startswith(("/", "~")) or re.match(r"[A-Za-z]:", text):
        inside = _absolute_inside_allowed_roots(text)
        if inside:
            return inside
        raise DatasetError(f"'{text}' is a path outside ComfyUI's folders; LoRA Lab only reads datasets inside "
                           "the input folder and folders registered as lora_datasets.", _how_to_allow(text))
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise DatasetError(f"'{text}' uses '..' to leave the folder it names.", _how_to_allow(None))

    if parts and parts[0] == DATASET_ROOT_KIND and DATASET_ROOT_KIND in folder_paths.folder_names_and_paths:
        bases, parts = folder_paths.get_folder_paths(DATASET_ROOT_KIND), parts[1:]
        where = f"the {DATASET_ROOT_KIND} folders ({', '.join(bases)})"
    else:
        if not parts:
            raise DatasetError("'.' names the whole input folder.",
                               "Put the pictures in a subfolder of the input folder and type its name.")
        input_folder = folder_paths.get_input_directory()
        bases, where = [input_folder], f"ComfyUI's input folder ({input_folder})"
    for base in bases:
        base_real = os.path.realpath(base)
        candidate = os.path.realpath(os.path.join(base_real, *parts))
        if not is_inside(candidate, base_real):
            raise DatasetError(f"'{text}' is a symbolic link leading outside {where}.", _how_to_allow(candidate))
        if os.path.isdir(candidate):
            return candidate
    listing = _subfolders(bases)
    hint = f" Folders there: {listing}." if listing else " It has no subfolders yet."
    raise DatasetError(f"There is no folder '{text}' in {where}.{hint}",
                       "Create the folder and put your pictures in it, or type one of the names listed.")


def _absolute_inside_allowed_roots(text: str) -> str | None:
    """The real folder an absolute path names when it lies inside the input folder or a lora_datasets root
    (a local user pasting the full path of a folder they put there), else None (refused by the caller).

    As with relative names, a lora_datasets root itself is a dataset but the input folder itself is not."""
    if not os.path.isabs(text):            # "~", or a Windows drive on POSIX
        return None
    candidate = os.path.realpath(text)
    input_real = os.path.realpath(folder_paths.get_input_directory())
    dataset_roots = ([os.path.realpath(base) for base in folder_paths.get_folder_paths(DATASET_ROOT_KIND)]
                     if DATASET_ROOT_KIND in folder_paths.folder_names_and_paths else [])
    if candidate == input_real and candidate not in dataset_roots:
        raise DatasetError(f"'{text}' names the whole input folder.",
                           "Put the pictures in a subfolder of the input folder and type its name.")
    for base_real in [input_real, *dataset_roots]:
        if is_inside(candidate, base_real) and os.path.isdir(candidate):
            return candidate
    return None


def _how_to_allow(path: str | None) -> str:
    register = (f"register it in extra_model_paths.yaml (e.g. `lora_lab:` then `    lora_datasets: {path}`), "
                "restart ComfyUI and type `lora_datasets`" if path else
                "register the folder in extra_model_paths.yaml under the key `lora_datasets`, restart ComfyUI "
                "and type `lora_datasets/<subfolder>`")
    return (f"Move or copy the pictures into a subfolder of ComfyUI's input folder "
            f"({folder_paths.get_input_directory()}) and type its name, or (server owners) {register}.")


KOHYA_REPEAT_FOLDER = re.compile(r"^\d+_")     # "10_mychar": part of a dataset, not a dataset of its own
NOT_DATASETS = {"clipspace", "3d"}            # folders ComfyUI's own front end keeps in input/
MAX_CHOICES = 500


def dataset_folder_choices() -> list[str]:
    """`folder`'s list: the input folder's subfolders and theirs (projects/mychar), and each registered
    lora_datasets root's, as `lora_datasets/<name>`; kohya's `10_name` folders are listed with their parent
    only. The list's first entry is "" when there is nothing to pick yet, so the widget still shows."""
    choices = _dataset_folders(folder_paths.get_input_directory(), "")
    if DATASET_ROOT_KIND in folder_paths.folder_names_and_paths:
        for base in folder_paths.get_folder_paths(DATASET_ROOT_KIND):
            choices += [DATASET_ROOT_KIND] + _dataset_folders(base, f"{DATASET_ROOT_KIND}/")
    unique = list(dict.fromkeys(choices))[:MAX_CHOICES]
    return unique or [""]


def _dataset_folders(base: str, prefix: str, depth: int = 2) -> list[str]:
    found = []
    try:
        entries = sorted((entry for entry in os.scandir(base) if entry.is_dir()), key=lambda entry: entry.name.lower())
    except OSError:
        return found
    for entry in entries:
        if entry.name.startswith(".") or entry.name in NOT_DATASETS or KOHYA_REPEAT_FOLDER.match(entry.name):
            continue
        found.append(prefix + entry.name)
        if depth > 1:
            found += _dataset_folders(entry.path, f"{prefix}{entry.name}/", depth - 1)
        if len(found) >= MAX_CHOICES:
            break
    return found


def _subfolders(bases: list[str], limit: int = 12) -> str:
    names = []
    for base in bases:
        try:
            names += sorted(entry.name for entry in os.scandir(base)
                            if entry.is_dir() and not entry.name.startswith("."))
        except OSError:
            continue
    return ", ".join(names[:limit]) + (f" … ({len(names) - limit} more)" if len(names) > limit else "")


# --- the contact sheet ------------------------------------------------------------------------------
SHEET_BACKGROUND, CELL_BACKGROUND = (28, 28, 28), (44, 44, 44)
TEXT, DIM, ATTENTION = (232, 232, 232), (160, 160, 160), (255, 186, 74)
CAPTION_LINES = 3
PADDING = 8


def contact_sheet(dataset: Dataset, thumbnail_size: int, max_images: int, buckets=None) -> Image.Image:
    """A grid of thumbnails with name, repeats, bucket and caption; pictures decoded one at a time."""
    shown = min(dataset.num_images, max_images)
    font = label_font(max(11, thumbnail_size // 15))
    line_height = _line_height(font)
    text_lines = 1 + (buckets is not None) + CAPTION_LINES
    columns = max(1, min(shown, math.ceil(math.sqrt(max(shown, 1)))))
    rows = max(1, math.ceil(shown / columns))
    cell_width, cell_height = thumbnail_size, thumbnail_size + PADDING + text_lines * line_height
    header_height = 2 * line_height + PADDING
    width = columns * (cell_width + PADDING) + PADDING
    height = header_height + rows * (cell_height + PADDING) + PADDING
    sheet = Image.new("RGB", (width, height), SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)

    captioned = sum(item.has_caption for item in dataset.items)
    header = (f"{dataset.num_images} pictures - {captioned} captioned - "
              f"{dataset.total_repeats} per epoch with repeats")
    if shown < dataset.num_images:
        header += f" - showing the first {shown}"
    for row, line in enumerate(wrap(draw, header, font, width - 2 * PADDING, 2)):
        _text(draw, (PADDING, PADDING // 2 + row * line_height), line, font, TEXT)

    for index in range(shown):
        item = dataset.items[index]
        x = PADDING + (index % columns) * (cell_width + PADDING)
        y = header_height + (index // columns) * (cell_height + PADDING)
        draw.rectangle((x, y, x + cell_width - 1, y + thumbnail_size - 1), fill=CELL_BACKGROUND)
        bucket = nearest_bucket(item.width, item.height, buckets) if buckets is not None else None
        try:
            thumb = dataset.load_image(index, max_side=thumbnail_size)
            left, top = x + (cell_width - thumb.width) // 2, y + (thumbnail_size - thumb.height) // 2
            sheet.paste(thumb, (left, top))
            if bucket:
                draw.rectangle(_crop_outline(thumb.size, bucket, left, top), outline=ATTENTION)
            thumb.close()
        except DatasetError:
            _text(draw, (x + 4, y + 4), "cannot read", font, ATTENTION)
        text_y = y + thumbnail_size + PADDING // 2
        repeats = f" x{item.repeats}" if item.repeats != 1 else ""
        _text(draw, (x, text_y), fit(draw, item.key, font, cell_width - text_width(draw, repeats, font)) + repeats,
              font, DIM)
        text_y += line_height
        if bucket:
            _text(draw, (x, text_y), fit(draw, f"{item.width}x{item.height} -> bucket {bucket[0]}x{bucket[1]}",
                                          font, cell_width), font, DIM)
            text_y += line_height
        if not item.has_caption:
            _text(draw, (x, text_y), "(no caption yet)", font, ATTENTION)
        for line in wrap(draw, item.caption, font, cell_width, CAPTION_LINES):
            _text(draw, (x, text_y), line, font, TEXT)
            text_y += line_height
    return sheet


def _crop_outline(size: tuple[int, int], bucket: tuple[int, int], left: int, top: int) -> tuple[int, int, int, int]:
    """The part of the thumbnail that survives fit_to_bucket's centre crop, as a rectangle to draw."""
    width, height = size
    scale = max(bucket[0] / width, bucket[1] / height)
    keep_width, keep_height = round(bucket[0] / scale), round(bucket[1] / scale)
    x0, y0 = left + (width - keep_width) // 2, top + (height - keep_height) // 2
    return x0, y0, x0 + keep_width - 1, y0 + keep_height - 1


def _line_height(font) -> int:
    box = font.getbbox("Hgjy|")
    return box[3] - box[1] + 4


def _text(draw, position, text: str, font, fill) -> None:
    draw.text(position, drawable(text, font), font=font, fill=fill)


def _save_temp_png(sheet: Image.Image) -> dict:
    """Save into ComfyUI's temp folder the way PreviewImage does, so the node shows the picture."""
    prefix = "loralab_dataset_" + "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_temp_directory(), sheet.width, sheet.height)
    name = f"{filename}_{counter:05}_.png"
    sheet.save(os.path.join(folder, name), compress_level=1)
    return {"filename": name, "subfolder": subfolder, "type": "temp"}


def _to_image_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)

"""BLIP captioning through transformers, from a local folder only.

Loading never reaches the network and never runs code shipped with a model: weights come from
``model.safetensors`` (``use_safetensors=True``), everything from the folder (``local_files_only``),
and the classes are transformers' own (no ``trust_remote_code``). Downloading is the caller's job
(nodes/caption.py), so this module also says which files a BLIP folder needs.

Captions are made one ``generate()`` per batch: the vision tower and every decoding step run on the
whole batch at once, which is where the speed-up over one picture at a time comes from.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from PIL import Image

KNOWN_MODELS = {
    "blip-base": "Salesforce/blip-image-captioning-base",
    "blip-large": "Salesforce/blip-image-captioning-large",
}

# One entry per requirement; each lists the accepted names, the one Salesforce's repositories ship first.
# transformers 5 saves processor_config.json where older versions (and the hub repos) have
# preprocessor_config.json; a tokenizer loads from either tokenizer.json or vocab.txt.
REQUIRED_FILES: tuple[tuple[str, ...], ...] = (
    ("config.json",),
    ("model.safetensors", "model.safetensors.index.json"),
    ("preprocessor_config.json", "processor_config.json"),
    ("tokenizer_config.json",),
    ("tokenizer.json", "vocab.txt"),
)
# What a complete download of a Salesforce BLIP repository looks like (what to fetch by hand).
HUB_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "special_tokens_map.json",
             "tokenizer.json", "tokenizer_config.json", "vocab.txt")
DOWNLOAD_PATTERNS = ("*.json", "*.safetensors", "*.txt")

ProgressCallback = Callable[[int, int], None]


def missing_files(folder: str | os.PathLike) -> list[str]:
    """The files ``folder`` lacks to load as a BLIP captioner (first accepted name of each); [] if complete."""
    present = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    return [names[0] for names in REQUIRED_FILES if not present.intersection(names)]


def hub_url(repo_id: str) -> str:
    return f"https://huggingface.co/{repo_id}/tree/main"


def resolve_snapshot(folder: str | os.PathLike) -> str:
    """A folder in the Hugging Face cache layout (``models--org--name/snapshots/<rev>/``) -> its newest
    complete snapshot; any other folder -> itself.

    Other packs (WAS) download BLIP into ``models/blip`` with ``cache_dir``, which leaves this layout;
    reading it lets those users reuse the files they already have.
    """
    snapshots = os.path.join(folder, "snapshots")
    if missing_files(folder) and os.path.isdir(snapshots):
        candidates = [os.path.join(snapshots, name) for name in os.listdir(snapshots)]
        complete = [path for path in candidates if os.path.isdir(path) and not missing_files(path)]
        if complete:
            return max(complete, key=os.path.getmtime)
    return os.fspath(folder)


def pick_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype:
    """auto -> fp16 on CUDA, fp32 elsewhere. Half precision is refused on the CPU: many CPU kernels have
    no fp16 version and the ones that do are slower than fp32, so CPU always runs fp32."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.float32
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


class BlipCaptioner:
    """A BLIP captioning model and its processor, loaded from ``folder``.

    The weights rest on ``offload_device`` (CPU) and move to ``device`` only while ``caption`` runs, so a
    captioner kept in ComfyUI's output cache does not hold VRAM that training needs next.
    """

    def __init__(self, folder: str | os.PathLike, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, offload_device: torch.device | str = "cpu",
                 name: str | None = None):
        # Imported here: transformers takes seconds to import and ComfyUI imports every pack at start-up.
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.folder = os.fspath(folder)
        self.name = name or os.path.basename(os.path.normpath(self.folder))
        missing = missing_files(self.folder)
        if missing:
            raise FileNotFoundError(f"{self.folder} is not a complete BLIP folder; missing: {', '.join(missing)}")
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        # Half precision is for accelerators; on the CPU it is slower or missing kernels, so fp32 there.
        self.dtype = torch.float32 if self.device.type == "cpu" else dtype
        self.processor = BlipProcessor.from_pretrained(self.folder, local_files_only=True)
        # Loaded in fp32 then cast: the dtype keyword was renamed between transformers 4 and 5.
        model = BlipForConditionalGeneration.from_pretrained(
            self.folder, use_safetensors=True, local_files_only=True)
        self.model = model.to(self.offload_device, self.dtype).eval()

    def __repr__(self) -> str:
        return f"BlipCaptioner({self.name!r}, device={self.device}, dtype={self.dtype})"

    def weight_bytes(self) -> int:
        return sum(param.numel() * param.element_size() for param in self.model.parameters())

    def caption(self, images: Sequence[Image.Image], prompt: str | None = None, min_length: int = 5,
                max_length: int = 30, num_beams: int = 3, batch_size: int = 8,
                on_batch_done: ProgressCallback | None = None) -> list[str]:
        """One caption per image, in order.

        ``images`` only needs ``len`` and integer indexing, so a lazy view that decodes pictures on
        demand keeps at most one batch in memory. ``prompt`` is the start of every caption (BLIP's
        conditional captioning); it is removed from the result when the model echoes it.
        ``min_length`` / ``max_length`` count generated tokens, not the prompt's. ``on_batch_done(done,
        total)`` runs after every batch; an exception raised there (Cancel) stops the run.
        """
        if batch_size < 1 or num_beams < 1 or max_length < 1 or not 0 <= min_length <= max_length:
            raise ValueError(f"need batch_size >= 1, num_beams >= 1, 0 <= min_length <= max_length >= 1; got "
                             f"{batch_size=}, {num_beams=}, {min_length=}, {max_length=}")
        prompt = " ".join((prompt or "").split())
        echoed = self._echo_of(prompt)
        total = len(images)
        captions: list[str] = []
        moved = self.device != self.offload_device
        try:
            if moved and total:
                self.model.to(self.device)
            for start in range(0, total, batch_size):
                batch = [_rgb(images[index]) for index in range(start, min(start + batch_size, total))]
                texts = self._generate(batch, prompt, min_length, max_length, num_beams)
                captions.extend(_strip_echo(text, echoed) for text in texts)
                if on_batch_done is not None:
                    on_batch_done(len(captions), total)
        finally:
            if moved:
                self.model.to(self.offload_device)
        return captions

    def _generate(self, batch: list[Image.Image], prompt: str, min_length: int, max_length: int,
                  num_beams: int) -> list[str]:
        text = [prompt] * len(batch) if prompt else None
        inputs = self.processor(images=batch, text=text, return_tensors="pt")
        kwargs = {"pixel_values": inputs["pixel_values"].to(self.device, self.dtype)}
        if prompt:
            kwargs["input_ids"] = inputs["input_ids"].to(self.device)
            kwargs["attention_mask"] = inputs["attention_mask"].to(self.device)
        with torch.inference_mode():
            output = self.model.generate(**kwargs, num_beams=num_beams, min_new_tokens=min_length,
                                         max_new_tokens=max_length, do_sample=False)
        return [" ".join(text.split()) for text in self.processor.batch_decode(output, skip_special_tokens=True)]

    def _echo_of(self, prompt: str) -> str:
        """How the prompt reads after a round trip through the tokenizer (BLIP's is lower-case)."""
        if not prompt:
            return ""
        tokenizer = self.processor.tokenizer
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _strip_echo(text: str, echoed: str) -> str:
    """Remove the prompt from the start of ``text``, but only at a word boundary: if the model continued
    the prompt's last word ("a photo" -> "a photograph of ..."), cutting it would leave half a word."""
    if not echoed or not text.startswith(echoed):
        return text
    rest = text[len(echoed):]
    if rest and rest[0].isalnum():
        return text
    return rest.lstrip(" ,.;:")

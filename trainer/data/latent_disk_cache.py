"""VAE latents cached on disk, so a second run on the same pictures skips the VAE.

One small safetensors file per entry (tensor "latent" plus metadata), named by a hash of
(cache format version, VAE fingerprint, picture content hash, bucket). Writes go to a temporary
file that ``os.replace`` moves into place, so a reader sees a whole entry or none; an entry that
does not read back cleanly (truncated, wrong key in its metadata) is deleted, counted as corrupt and
reported as a miss, so the caller re-encodes and rewrites it. A cache is an optimisation: no disk
error ever escapes ``get`` or ``put``; they show in ``stats``.

Optional size cap: past ``max_bytes`` the least recently used entries go first (a hit touches the
file's mtime).

The fingerprint must change whenever the same pixels would give other latents: another VAE encoder,
another VAE dtype, or — because the trainer caches *model-space* latents (``process_latent_in``
applied) — another latent format/scale. Bump ``FORMAT_VERSION`` when pre-processing (resize, crop)
changes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, MutableMapping

import torch
from safetensors.torch import load as load_safetensors, save as save_safetensors

FORMAT_VERSION = 1
_SUFFIX = ".safetensors"
_STALE_TMP_SECONDS = 3600


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0
    corrupt: int = 0            # entries that failed to read back; deleted and counted as misses
    evicted: int = 0
    not_cached: int = 0         # latents refused (NaN/inf) or failed writes
    errors: list[str] = field(default_factory=list)   # the first few disk errors, for the report

    def note(self, message: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(message)


Bucket = tuple[int, int]


class LatentDiskCache:
    """Latents of pictures by (content hash, bucket) for one VAE fingerprint, in ``folder``.

    ``dtype``: how latents are stored (default float32, exact); ``get`` always returns float32 CPU.
    ``max_bytes``: size cap for the folder's entries (all fingerprints together); None = no cap.
    """

    def __init__(self, folder: str | os.PathLike, vae_fingerprint: str, max_bytes: int | None = None,
                 dtype: torch.dtype = torch.float32):
        if not vae_fingerprint:
            raise ValueError("a latent cache needs a VAE fingerprint (see vae_fingerprint())")
        self.folder = Path(folder)
        self.vae_fingerprint = str(vae_fingerprint)
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.stats = CacheStats()
        self._total_bytes: int | None = None   # entries' size, counted on first need
        self._remove_stale_tmp_files()

    # --- the API --------------------------------------------------------------------------------
    def get(self, content_hash: str, bucket: Bucket) -> torch.Tensor | None:
        path = self.entry_path(content_hash, bucket)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except OSError as error:
            self.stats.misses += 1
            self.stats.note(f"read {path.name}: {error}")
            return None
        try:
            latent = self._decode(data, content_hash, bucket)
        except Exception as error:  # anything unreadable is a stale or broken entry: drop it
            self.stats.corrupt += 1
            self.stats.misses += 1
            self.stats.note(f"corrupt {path.name}: {type(error).__name__}: {error}")
            self._unlink(path)
            return None
        self.stats.hits += 1
        try:
            os.utime(path)   # LRU: a hit makes the entry recent
        except OSError:
            pass
        return latent

    def put(self, content_hash: str, bucket: Bucket, latent: torch.Tensor) -> bool:
        """Store one latent; False (and nothing written) if it is not finite or the disk refuses."""
        latent = latent.detach().to("cpu")
        if not torch.isfinite(latent).all():
            self.stats.not_cached += 1
            self.stats.note(f"not cached: the latent of {content_hash[:12]} has NaN/inf values")
            return False
        path = self.entry_path(content_hash, bucket)
        data = save_safetensors({"latent": latent.to(self.dtype).contiguous()},
                                metadata=self._metadata(content_hash, bucket))
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as error:
            self._unlink(tmp)
            self.stats.not_cached += 1
            self.stats.note(f"write {path.name}: {error}")
            return False
        self.stats.writes += 1
        if self.max_bytes is not None:
            self._account(len(data))
        return True

    def entry_path(self, content_hash: str, bucket: Bucket) -> Path:
        width, height = (int(v) for v in bucket)
        key = f"{FORMAT_VERSION}|{self.vae_fingerprint}|{content_hash}|{width}x{height}"
        return self.folder / (hashlib.sha256(key.encode()).hexdigest()[:40] + _SUFFIX)

    def total_bytes(self) -> int:
        return sum(size for _, _, size in self._entries())

    # --- inside ---------------------------------------------------------------------------------
    def _metadata(self, content_hash: str, bucket: Bucket) -> dict[str, str]:
        width, height = (int(v) for v in bucket)
        return {"format": "loralab-latent", "version": str(FORMAT_VERSION), "vae": self.vae_fingerprint,
                "content_hash": content_hash, "bucket": f"{width}x{height}"}

    def _decode(self, data: bytes, content_hash: str, bucket: Bucket) -> torch.Tensor:
        (header_size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + header_size])
        if header.get("__metadata__") != self._metadata(content_hash, bucket):
            raise ValueError("metadata does not match the key")
        latent = load_safetensors(data)["latent"]
        return latent.to(torch.float32)

    def _entries(self) -> list[tuple[float, Path, int]]:
        entries = []
        try:
            with os.scandir(self.folder) as scan:
                for entry in scan:
                    if entry.name.endswith(_SUFFIX) and not entry.name.startswith("."):
                        try:
                            stat = entry.stat()
                        except OSError:
                            continue
                        entries.append((stat.st_mtime, Path(entry.path), stat.st_size))
        except OSError:
            pass
        return entries

    def _account(self, written: int) -> None:
        if self._total_bytes is None:
            self._total_bytes = self.total_bytes()    # includes the entry just written
        else:
            self._total_bytes += written
        if self._total_bytes > self.max_bytes:
            self._evict(target=int(self.max_bytes * 0.9))   # headroom, so eviction is not per put

    def _evict(self, target: int) -> None:
        entries = sorted(self._entries(), key=lambda e: e[0])
        total = sum(size for _, _, size in entries)
        for _, path, size in entries[:-1]:     # never the newest: it was just written
            if total <= target:
                break
            if self._unlink(path):
                total -= size
                self.stats.evicted += 1
        self._total_bytes = total

    def _remove_stale_tmp_files(self) -> None:
        now = time.time()
        try:
            with os.scandir(self.folder) as scan:
                for entry in scan:
                    if entry.name.endswith(".tmp") and now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                        self._unlink(Path(entry.path))
        except OSError:
            pass

    @staticmethod
    def _unlink(path: Path) -> bool:
        try:
            path.unlink()
            return True
        except OSError:
            return False


class EncodeDatasetCache:
    """``examples.encode_dataset``'s ``latent_cache`` over a disk cache, with an optional memory tier.

    encode_dataset calls ``get(key)`` and ``cache[key] = latent`` with
    ``key = (cache_key, content_hash, bucket)``. ``cache_key`` is not part of the disk key: the
    pixels handed to the VAE depend only on the picture and its bucket (``fit_to_bucket``), and the
    VAE/latent format are in the fingerprint. ``memory`` (e.g. the node's per-VAE dict) is checked
    first and filled from disk hits; trim it directly, this adapter has no length.
    """

    def __init__(self, disk: LatentDiskCache, memory: MutableMapping | None = None):
        self.disk = disk
        self.memory = memory

    def get(self, key, default=None):
        if self.memory is not None and key in self.memory:
            return self.memory[key]
        _, content_hash, bucket = key
        latent = self.disk.get(content_hash, bucket)
        if latent is None:
            return default
        if self.memory is not None:
            self.memory[key] = latent
        return latent

    def __setitem__(self, key, latent: torch.Tensor) -> None:
        if self.memory is not None:
            self.memory[key] = latent
        _, content_hash, bucket = key
        self.disk.put(content_hash, bucket, latent)


def vae_fingerprint(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[torch.Tensor],
                    extra: str = "", sample_tensors: int = 8, max_elements: int = 1 << 16) -> str:
    """A cheap identity of a VAE: names, shapes and dtypes of all tensors, bytes of a few.

    ``tensors``: a state dict, its ``.items()``, ``named_parameters()``, or bare tensors (named by
    position). Up to ``sample_tensors`` tensors, evenly spread over the sorted names, contribute a
    strided sample of at most ``max_elements`` values each, in their own dtype (an fp16 and an fp32
    copy of a VAE differ). ``extra`` folds in whatever else shapes the cached latents, e.g. the
    model's latent format and scale factor. Pass only the encoder's weights to share entries between
    VAEs that differ only in the decoder (SD1.5 ft-MSE / ft-EMA).
    """
    if isinstance(tensors, Mapping):
        named = list(tensors.items())
    else:
        named = [item if isinstance(item, tuple) else (str(i), item) for i, item in enumerate(tensors)]
    named = sorted(((str(name), tensor) for name, tensor in named if isinstance(tensor, torch.Tensor)),
                   key=lambda pair: pair[0])
    if not named:
        raise ValueError("vae_fingerprint needs at least one tensor")
    digest = hashlib.sha256(f"loralab-vae-fingerprint:1|{extra}".encode())
    for name, tensor in named:
        digest.update(f"|{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
    count = min(sample_tensors, len(named))
    picks = sorted({round(i * (len(named) - 1) / max(1, count - 1)) for i in range(count)})
    for index in picks:
        name, tensor = named[index]
        digest.update(f"|data:{name}:".encode())
        digest.update(_sample_bytes(tensor, max_elements))
    return digest.hexdigest()[:32]


def _sample_bytes(tensor: torch.Tensor, max_elements: int) -> bytes:
    if tensor.is_meta or tensor.numel() == 0:
        return b"meta" if tensor.is_meta else b""
    flat = tensor.detach().reshape(-1)
    stride = max(1, math.ceil(flat.numel() / max_elements))
    sample = flat[::stride].contiguous().cpu()
    if sample.dtype == torch.bool:
        sample = sample.to(torch.uint8)
    return sample.view(torch.uint8).numpy().tobytes()


def describe(stats: CacheStats) -> str:
    """One line for the run report."""
    text = f"latent disk cache: {stats.hits} hit(s), {stats.misses} miss(es), {stats.writes} written"
    if stats.corrupt:
        text += f", {stats.corrupt} corrupt entr{'y' if stats.corrupt == 1 else 'ies'} rewritten"
    if stats.evicted:
        text += f", {stats.evicted} evicted"
    if stats.not_cached:
        text += f", {stats.not_cached} not cached ({stats.errors[0] if stats.errors else 'see log'})"
    return text

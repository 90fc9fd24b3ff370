"""A model file's hashes as A1111 and kohya write them, computed once per file.

kohya's ``ss_sd_model_hash`` is A1111's old short hash: the first 8 hex digits of the SHA-256 of the
64 KiB at offset 1 MiB (sd-scripts ``model_hash``). ``ss_new_sd_model_hash`` is the SHA-256 of the whole
file (``calculate_sha256``), which A1111 shows as the model hash and Civitai looks checkpoints up by.

Hashing a 2–24 GB checkpoint takes seconds to minutes, so a result is kept (in memory, and in a JSON file
when one is given, as A1111 keeps its ``cache.json``) under the file's real path, size and modification
time: the same file is hashed once, and a file replaced in place is hashed again.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000
_BLOCK = 1 << 20


@dataclass(frozen=True)
class FileHashes:
    legacy: str      # 8 hex digits (ss_sd_model_hash)
    sha256: str      # 64 hex digits (ss_new_sd_model_hash)


def hash_file(path: str | Path) -> FileHashes:
    """Both hashes, reading the file once."""
    whole = hashlib.sha256()
    window = bytearray()
    offset = 0
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(_BLOCK), b""):
            start, end = max(LEGACY_OFFSET - offset, 0), min(LEGACY_OFFSET + LEGACY_LENGTH - offset, len(block))
            if start < end:
                window += block[start:end]
            whole.update(block)
            offset += len(block)
    return FileHashes(hashlib.sha256(bytes(window)).hexdigest()[:8], whole.hexdigest())


class HashCache:
    """Hashes by (real path, size, mtime); ``cache_file`` (optional) keeps them across restarts."""

    def __init__(self, cache_file: str | Path | None = None):
        self.cache_file = Path(cache_file) if cache_file else None
        self._known: dict[str, dict] | None = None
        self._lock = threading.Lock()

    def hashes(self, path: str | Path) -> FileHashes:
        real = os.path.realpath(path)
        stat = os.stat(real)
        stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        with self._lock:
            known = self._load().get(real)
            if known and all(known.get(key) == value for key, value in stamp.items()):
                return FileHashes(known["legacy"], known["sha256"])
        hashes = hash_file(real)
        with self._lock:
            self._load()[real] = {**stamp, **asdict(hashes)}
            self._store()
        return hashes

    def _load(self) -> dict[str, dict]:
        if self._known is None:
            self._known = {}
            if self.cache_file and self.cache_file.is_file():
                try:
                    loaded = json.loads(self.cache_file.read_text(encoding="utf-8"))
                    self._known = loaded if isinstance(loaded, dict) else {}
                except (OSError, ValueError):     # a damaged cache only costs a re-hash
                    self._known = {}
        return self._known

    def _store(self) -> None:
        if not self.cache_file:
            return
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.cache_file.with_name(f"{self.cache_file.name}.tmp-{os.getpid()}")
            temporary.write_text(json.dumps(self._known, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(temporary, self.cache_file)
        except OSError:       # an unwritable user folder: hashes are still right, only not remembered
            pass

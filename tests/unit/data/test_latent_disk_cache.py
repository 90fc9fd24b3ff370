"""trainer.latent_disk_cache: hits across runs, keys, corruption, atomic writes, LRU cap, fingerprints."""
import os
import time
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from lora_lab.trainer.data.encoded_dataset import encode_dataset
from lora_lab.trainer.data.latent_disk_cache import (EncodeDatasetCache, LatentDiskCache, describe,
                                                vae_fingerprint)

BUCKET = (512, 768)


def latent(seed=0, shape=(4, 96, 64)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_miss_put_hit_and_a_second_run_hits(tmp_path):
    cache = LatentDiskCache(tmp_path, "vae-a")
    assert cache.get("hash1", BUCKET) is None
    value = latent()
    assert cache.put("hash1", BUCKET, value)
    assert torch.equal(cache.get("hash1", BUCKET), value)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.writes) == (1, 1, 1)
    second_run = LatentDiskCache(tmp_path, "vae-a")
    got = second_run.get("hash1", BUCKET)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and torch.equal(got, value)
    assert "1 hit(s), 0 miss(es)" in describe(second_run.stats)


def test_every_part_of_the_key_matters(tmp_path):
    LatentDiskCache(tmp_path, "vae-a").put("hash1", BUCKET, latent())
    assert LatentDiskCache(tmp_path, "vae-b").get("hash1", BUCKET) is None
    cache = LatentDiskCache(tmp_path, "vae-a")
    assert cache.get("hash2", BUCKET) is None
    assert cache.get("hash1", (768, 512)) is None
    assert cache.get("hash1", [512, 768]) is not None          # a list bucket is the same key


def test_format_version_is_part_of_the_key(tmp_path, monkeypatch):
    from lora_lab.trainer.data import latent_disk_cache
    LatentDiskCache(tmp_path, "vae-a").put("hash1", BUCKET, latent())
    monkeypatch.setattr(latent_disk_cache, "FORMAT_VERSION", latent_disk_cache.FORMAT_VERSION + 1)
    assert LatentDiskCache(tmp_path, "vae-a").get("hash1", BUCKET) is None


def test_half_precision_storage_returns_float32(tmp_path):
    cache = LatentDiskCache(tmp_path, "vae-a", dtype=torch.float16)
    value = latent()
    cache.put("h", BUCKET, value)
    got = cache.get("h", BUCKET)
    assert got.dtype == torch.float32 and torch.allclose(got, value, atol=2e-3)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_corrupt_entry_is_a_miss_and_gets_rewritten(tmp_path, damage):
    cache = LatentDiskCache(tmp_path, "vae-a")
    cache.put("h", BUCKET, latent())
    path = cache.entry_path("h", BUCKET)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xff" * 50, "empty": b""}[damage])
    assert cache.get("h", BUCKET) is None
    assert cache.stats.corrupt == 1 and not path.exists()
    assert cache.put("h", BUCKET, latent(1))
    assert torch.equal(cache.get("h", BUCKET), latent(1))


def test_an_entry_under_the_wrong_name_is_not_served(tmp_path):
    cache = LatentDiskCache(tmp_path, "vae-a")
    cache.put("h1", BUCKET, latent())
    cache.entry_path("h2", BUCKET).write_bytes(cache.entry_path("h1", BUCKET).read_bytes())
    assert cache.get("h2", BUCKET) is None and cache.stats.corrupt == 1


def test_writes_leave_no_temporary_files_and_stale_ones_are_cleaned(tmp_path):
    cache = LatentDiskCache(tmp_path, "vae-a")
    for i in range(3):
        cache.put(f"h{i}", BUCKET, latent(i))
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".safetensors"] * 3
    stale, fresh = tmp_path / ".x.123.abcd.tmp", tmp_path / ".y.123.abcd.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    LatentDiskCache(tmp_path, "vae-a")
    assert not stale.exists() and fresh.exists()     # a fresh one may be another process writing


def test_non_finite_latents_are_not_cached(tmp_path):
    cache = LatentDiskCache(tmp_path, "vae-a")
    bad = latent()
    bad[0, 0, 0] = float("nan")
    assert cache.put("h", BUCKET, bad) is False
    assert cache.get("h", BUCKET) is None and cache.stats.not_cached == 1
    assert "NaN" in describe(cache.stats)


def test_disk_errors_never_escape(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    cache = LatentDiskCache(blocker / "cache", "vae-a")
    assert cache.put("h", BUCKET, latent()) is False
    assert cache.get("h", BUCKET) is None
    assert cache.stats.not_cached == 1 and cache.stats.errors
    with pytest.raises(ValueError):
        LatentDiskCache(tmp_path, "")


def test_size_cap_evicts_least_recently_used(tmp_path):
    probe = LatentDiskCache(tmp_path / "probe", "vae-a")
    probe.put("x", BUCKET, latent())
    entry_size = probe.total_bytes()
    cache = LatentDiskCache(tmp_path / "c", "vae-a", max_bytes=int(entry_size * 4.5))
    base = time.time() - 1000
    for i in range(3):
        cache.put(f"h{i}", BUCKET, latent(i))
        os.utime(cache.entry_path(f"h{i}", BUCKET), (base + i, base + i))
    assert cache.get("h0", BUCKET) is not None      # touching h0 makes h1 the oldest
    cache.put("h3", BUCKET, latent(3))
    assert cache.stats.evicted == 0
    cache.put("h4", BUCKET, latent(4))
    assert cache.stats.evicted >= 1
    assert not cache.entry_path("h1", BUCKET).exists()
    assert cache.entry_path("h0", BUCKET).exists() and cache.entry_path("h4", BUCKET).exists()
    assert cache.total_bytes() <= entry_size * 4.5 and cache.stats.evicted == 1


class FakeDataset:
    def __init__(self, n=3):
        self.images = [Image.new("RGB", (48 + 16 * i, 64), (40 * i, 90, 200)) for i in range(n)]
        self.items = [SimpleNamespace(width=im.width, height=im.height, content_hash=f"content{i}",
                                      caption=f"sks, picture {i}", repeats=1) for i, im in enumerate(self.images)]

    def load_image(self, index):
        return self.images[index]


def test_encode_dataset_takes_the_adapter_and_a_second_run_skips_the_vae(tmp_path):
    calls = []

    def encode_pixels(pixels):                       # (1,H,W,3) -> (1,4,H/8,W/8)
        calls.append(pixels.shape)
        pooled = torch.nn.functional.avg_pool2d(pixels.permute(0, 3, 1, 2), 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)

    def encode_caption(caption):
        return torch.zeros(1, 7, 16)

    dataset = FakeDataset()
    cold = LatentDiskCache(tmp_path, "vae-a")
    first = encode_dataset(dataset, 64, encode_pixels, encode_caption,
                           latent_cache=EncodeDatasetCache(cold, memory={}), cache_key="64")
    assert len(calls) == 3 and cold.stats.writes == 3 and cold.stats.misses == 3

    warm = LatentDiskCache(tmp_path, "vae-a")
    memory = {}
    second = encode_dataset(dataset, 64, encode_pixels, encode_caption,
                            latent_cache=EncodeDatasetCache(warm, memory=memory), cache_key="64")
    assert len(calls) == 3 and warm.stats.hits == 3 and len(memory) == 3
    for a, b in zip(first.examples, second.examples):
        assert torch.equal(a.latent, b.latent) and a.bucket == b.bucket

    # A third run in the same process is served from memory without reading the disk.
    third = encode_dataset(dataset, 64, encode_pixels, encode_caption,
                           latent_cache=EncodeDatasetCache(warm, memory=memory), cache_key="64")
    assert warm.stats.hits == 3 and len(calls) == 3 and len(third.examples) == 3


def test_adapter_without_memory(tmp_path):
    adapter = EncodeDatasetCache(LatentDiskCache(tmp_path, "vae-a"))
    key = ("512", "h", BUCKET)
    assert adapter.get(key) is None and adapter.get(key, "default") == "default"
    adapter[key] = latent()
    assert torch.equal(adapter.get(("768", "h", BUCKET)), latent())   # cache_key is not part of the disk key


def _vae(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.Conv2d(8, 4, 1))
    return model.to(dtype)


def test_vae_fingerprint_tells_vaes_apart_cheaply():
    a = _vae(0).state_dict()
    assert vae_fingerprint(a) == vae_fingerprint(_vae(0).state_dict())
    assert vae_fingerprint(a) == vae_fingerprint(list(reversed(list(a.items()))))   # order does not matter
    assert vae_fingerprint(a) != vae_fingerprint(_vae(1).state_dict())
    assert vae_fingerprint(a) != vae_fingerprint(a, extra="SDXL scale 0.13025")
    assert vae_fingerprint(a) != vae_fingerprint(_vae(0, torch.float16).state_dict())
    assert len(vae_fingerprint(_vae(0, torch.bfloat16).state_dict())) == 32
    nudged = {k: v.clone() for k, v in a.items()}
    nudged["3.bias"][0] += 1e-3
    assert vae_fingerprint(a) != vae_fingerprint(nudged)
    assert vae_fingerprint(list(a.values())) == vae_fingerprint(list(a.values()))
    with pytest.raises(ValueError):
        vae_fingerprint({})


def test_vae_fingerprint_samples_big_tensors():
    big = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    fingerprint = vae_fingerprint({"w": big}, max_elements=1 << 16)
    assert time.perf_counter() - started < 1.0
    changed = big.clone()
    changed[0, 0] += 1                               # element 0 is always in the strided sample
    assert vae_fingerprint({"w": changed}) != fingerprint
    with torch.inference_mode():
        frozen = big.clone()
    assert vae_fingerprint({"w": frozen}) == fingerprint

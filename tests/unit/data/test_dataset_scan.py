"""scan_folder, captions, repeats, bad files and IMAGE-batch datasets, on real files written with PIL."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps

from lora_lab.trainer.data.dataset import IMAGE_EXTENSIONS, Dataset, DatasetError, DatasetItem, dataset_from_pixels, steps_report
from lora_lab.trainer.data.folder_scan import clear_scan_cache, folder_signature, scan_folder


def picture(path: Path, size=(64, 48), color=(200, 30, 30), mode="RGB", **save_options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save_options)
    return path


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def by_key(dataset: Dataset) -> dict[str, DatasetItem]:
    return {item.key: item for item in dataset.items}


def skip_reason(dataset: Dataset, key: str) -> str:
    reasons = dict(dataset.skipped)
    assert key in reasons, f"{key} not skipped; skipped = {dataset.skipped}"
    return reasons[key]


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory) -> Path:
    """A 20000x20000 PNG: a 1-bit blank picture compresses to ~50 KB but would decode to 1.2 GB RGB."""
    path = tmp_path_factory.mktemp("bomb") / "huge.png"
    Image.new("1", (20000, 20000)).save(path)
    return path


# --- discovery ----------------------------------------------------------------------------------------
def test_finds_every_supported_format_recursively_in_any_case(tmp_path):
    picture(tmp_path / "a.png")
    picture(tmp_path / "b.JPG", format="JPEG")
    picture(tmp_path / "c.jpeg", size=(30, 20))
    picture(tmp_path / "deep" / "er" / "d.webp", size=(16, 16))
    picture(tmp_path / "e.BmP", format="BMP")
    dataset = scan_folder(str(tmp_path))
    assert [item.key for item in dataset.items] == ["a.png", "b.JPG", "c.jpeg", "deep/er/d.webp", "e.BmP"]
    items = by_key(dataset)
    assert (items["c.jpeg"].width, items["c.jpeg"].height) == (30, 20)
    assert items["deep/er/d.webp"].path == str(tmp_path.resolve() / "deep" / "er" / "d.webp")
    assert dataset.root == str(tmp_path.resolve())
    assert dataset.skipped == () and dataset.warnings == ()
    assert {os.path.splitext(item.key)[1].lower() for item in dataset.items} == IMAGE_EXTENSIONS


def test_progress_is_reported_in_order_for_every_picture(tmp_path):
    for index in range(5):
        picture(tmp_path / f"{index}.png")
    write(tmp_path / "broken.png", b"no")
    calls = []
    scan_folder(str(tmp_path), on_progress=lambda done, total: calls.append((done, total)))
    assert calls == [(done, 6) for done in range(1, 7)]


def test_order_is_natural_and_independent_of_creation_order(tmp_path):
    for name in ["img10.png", "IMG2.png", "img1.png", "b/x.png", "a.png"]:
        picture(tmp_path / name)
    keys = [item.key for item in scan_folder(str(tmp_path)).items]
    assert keys == ["a.png", "b/x.png", "img1.png", "IMG2.png", "img10.png"]


def test_content_hash_is_sha256_of_the_file_bytes(tmp_path):
    import hashlib
    path = picture(tmp_path / "a.png")
    item = scan_folder(str(tmp_path)).items[0]
    assert item.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_changed_file_is_hashed_again(tmp_path):
    path = picture(tmp_path / "a.png", color=(1, 2, 3))
    first = scan_folder(str(tmp_path)).items[0].content_hash
    picture(path, size=(65, 48), color=(9, 9, 9))
    assert scan_folder(str(tmp_path)).items[0].content_hash != first


# --- orientation, alpha, modes ------------------------------------------------------------------------------
def exif_rotated_jpeg(path: Path, orientation: int) -> Path:
    """A 60x40 JPEG stored with its left half red and right half blue, tagged with ``orientation``."""
    image = Image.new("RGB", (60, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 30, 40))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=exif.tobytes(), quality=95)
    return path


def test_exif_orientation_swaps_the_size_and_rotates_the_pixels(tmp_path):
    path = exif_rotated_jpeg(tmp_path / "phone.jpg", orientation=6)     # "rotate 90 clockwise to view"
    dataset = scan_folder(str(tmp_path))
    item = dataset.items[0]
    assert (item.width, item.height) == (40, 60)
    loaded = dataset.load_image(0)
    assert loaded.size == (40, 60) and loaded.mode == "RGB"
    top, bottom = loaded.getpixel((20, 5)), loaded.getpixel((20, 55))
    assert top[0] > 200 and top[2] < 60, "the red left half must end up on top"
    assert bottom[2] > 200 and bottom[0] < 60
    reference = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert np.abs(np.asarray(loaded, dtype=int) - np.asarray(reference, dtype=int)).max() == 0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillows_exif_transpose(tmp_path, orientation):
    path = exif_rotated_jpeg(tmp_path / "o.jpg", orientation)
    dataset = scan_folder(str(tmp_path))
    reference = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert (dataset.items[0].width, dataset.items[0].height) == reference.size
    assert np.array_equal(np.asarray(dataset.load_image(0)), np.asarray(reference))


def test_png_and_webp_exif_orientation_is_read_from_the_header(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    for name in ("tagged.png", "tagged.webp"):
        Image.new("RGB", (30, 10), (0, 128, 0)).save(tmp_path / name, exif=exif.tobytes())
    dataset = scan_folder(str(tmp_path))
    assert [(item.width, item.height) for item in dataset.items] == [(10, 30), (10, 30)]
    assert dataset.load_image(0).size == (10, 30) and dataset.load_image(1).size == (10, 30)


def test_alpha_is_flattened_onto_white(tmp_path):
    image = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 255))
    image.putpixel((2, 0), (0, 0, 0, 128))
    image.save(tmp_path / "rgba.png")
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 255, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    Image.new("LA", (1, 1), (0, 0)).save(tmp_path / "la.png")
    dataset = scan_folder(str(tmp_path))
    items = [item.key for item in dataset.items]
    rgba = dataset.load_image(items.index("rgba.png"))
    assert rgba.mode == "RGB"
    assert rgba.getpixel((0, 0)) == (255, 255, 255)
    assert rgba.getpixel((1, 0)) == (255, 0, 0)
    assert all(abs(channel - 127) <= 2 for channel in rgba.getpixel((2, 0)))   # half black over white
    assert dataset.load_image(items.index("p.png")).getpixel((0, 0)) == (255, 255, 255)
    assert dataset.load_image(items.index("p.png")).getpixel((1, 0)) == (0, 0, 255)
    assert dataset.load_image(items.index("la.png")).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    grey.save(tmp_path / "depth.png")
    loaded = scan_folder(str(tmp_path)).load_image(0)
    assert [loaded.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_load_image_max_side_gives_a_small_picture(tmp_path):
    picture(tmp_path / "big.jpg", size=(1600, 1200))
    thumb = scan_folder(str(tmp_path)).load_image(0, max_side=100)
    assert max(thumb.size) == 100 and thumb.size == (100, 75)


# --- bad files ------------------------------------------------------------------------------------------
def test_broken_files_are_skipped_with_reasons_and_the_rest_survive(tmp_path, bomb_png):
    good = picture(tmp_path / "good.png", size=(64, 64))
    good_jpeg = picture(tmp_path / "good.jpg", size=(256, 256))
    write(tmp_path / "truncated.png", good.read_bytes()[: len(good.read_bytes()) // 2])
    write(tmp_path / "truncated.jpg", good_jpeg.read_bytes()[:400])
    write(tmp_path / "empty.png", b"")
    write(tmp_path / "notes.png", "this is text, not a PNG")
    write(tmp_path / "readme.md", "# my dataset")
    os.symlink(bomb_png, tmp_path / "ignored-link.png")     # a link out of the folder is refused, not read
    huge_copy = tmp_path / "huge.png"
    huge_copy.write_bytes(bomb_png.read_bytes())

    dataset = scan_folder(str(tmp_path))
    assert [item.key for item in dataset.items] == ["good.jpg", "good.png"]
    assert "broken" in skip_reason(dataset, "truncated.png")
    assert "broken" in skip_reason(dataset, "truncated.jpg")
    assert skip_reason(dataset, "empty.png") == "empty file (0 bytes)"
    assert "not a picture" in skip_reason(dataset, "notes.png")
    assert "not a picture (.md)" in skip_reason(dataset, "readme.md")
    assert "outside the dataset folder" in skip_reason(dataset, "ignored-link.png")
    huge = skip_reason(dataset, "huge.png")
    assert "20000x20000" in huge and "400 megapixels" in huge and "limit" in huge and "downscale" in huge


@pytest.mark.parametrize("extension", ["png", "jpg", "webp", "bmp"])
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_pictures_cut_short_are_caught_at_scan_time(tmp_path, extension, keep):
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    whole = tmp_path / f"whole.{extension}"
    Image.fromarray(noise).save(whole)
    data = whole.read_bytes()
    write(tmp_path / f"cut.{extension}", data[: int(len(data) * keep)])
    dataset = scan_folder(str(tmp_path))
    assert [item.key for item in dataset.items] == [f"whole.{extension}"]
    assert skip_reason(dataset, f"cut.{extension}").startswith("broken or unreadable picture")


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["png", "jpg", "webp", "bmp"]),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8))
def test_damaged_bytes_never_sink_the_scan(extension, damage):
    """Flip bytes anywhere in a real file: the scan either uses it or skips it with a reason."""
    with tempfile.TemporaryDirectory() as folder:
        noise = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
        target = Path(folder) / f"damaged.{extension}"
        Image.fromarray(noise).save(target)
        data = bytearray(target.read_bytes())
        for offset, value in damage:
            data[offset % len(data)] = value
        target.write_bytes(bytes(data))
        picture(Path(folder) / "good.png", size=(8, 8))
        dataset = scan_folder(folder)
        assert "good.png" in by_key(dataset)
        assert ("damaged." + extension in by_key(dataset)) != ("damaged." + extension in dict(dataset.skipped))
        if "damaged." + extension in by_key(dataset):
            assert dataset.load_image([item.key for item in dataset.items].index("damaged." + extension)).mode == "RGB"


def test_pixel_limit_is_configurable_and_names_the_size(tmp_path):
    picture(tmp_path / "small.png", size=(10, 10))
    picture(tmp_path / "wide.png", size=(3000, 2000))
    dataset = scan_folder(str(tmp_path), max_pixels=5_000_000)
    assert [item.key for item in dataset.items] == ["small.png"]
    assert "3000x2000 is 6 megapixels, above the 5-megapixel limit" in skip_reason(dataset, "wide.png")


def test_scanning_reads_headers_without_decoding_full_size_pixels(tmp_path, monkeypatch):
    """PNGs are only checksum-verified; JPEGs decode at 1/8 scale: a folder of 12 MP photos stays cheap."""
    picture(tmp_path / "photo.jpg", size=(4000, 3000))
    picture(tmp_path / "render.png", size=(2000, 1500))
    clear_scan_cache()
    decoded = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        decoded.append((self.format, self.size))
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    dataset = scan_folder(str(tmp_path))
    assert dataset.num_images == 2
    assert decoded == [("JPEG", (500, 375))]


def test_fifo_and_hidden_files_never_block_or_count(tmp_path):
    picture(tmp_path / "a.png")
    os.mkfifo(tmp_path / "pipe.png")
    picture(tmp_path / "._a.png")          # macOS AppleDouble file with a picture's name
    write(tmp_path / ".DS_Store", b"\0\0\0\1Bud1")
    picture(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png")
    write(tmp_path / "Thumbs.db", b"\0")
    dataset = scan_folder(str(tmp_path))
    assert [item.key for item in dataset.items] == ["a.png"]
    assert skip_reason(dataset, "pipe.png") == "not a regular file"
    assert "hidden" in skip_reason(dataset, "._a.png")
    assert {rel for rel, _ in dataset.skipped} == {"pipe.png", "._a.png"}


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_skipped(tmp_path):
    picture(tmp_path / "a.png")
    locked = picture(tmp_path / "locked.png")
    locked.chmod(0)
    try:
        dataset = scan_folder(str(tmp_path))
    finally:
        locked.chmod(0o644)
    assert "permission denied" in skip_reason(dataset, "locked.png")


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match=r"No pictures in .* It is empty\.") as caught:
        scan_folder(str(tmp_path))
    assert "Put your training pictures" in caught.value.fix


def test_folder_with_only_other_files_says_what_it_holds(tmp_path):
    write(tmp_path / "a.txt", "caption without picture")
    write(tmp_path / "b.psd", b"8BPS")
    with pytest.raises(DatasetError, match=r"It holds 1 other file\(s\)"):
        scan_folder(str(tmp_path))


def test_only_broken_pictures_is_a_clear_error_listing_reasons(tmp_path, bomb_png):
    write(tmp_path / "empty.jpg", b"")
    write(tmp_path / "fake.png", "text")
    (tmp_path / "huge.png").write_bytes(bomb_png.read_bytes())
    with pytest.raises(DatasetError) as caught:
        scan_folder(str(tmp_path))
    message = str(caught.value)
    assert "None of the 3 picture(s)" in message
    assert "empty.jpg: empty file" in message and "huge.png: 20000x20000" in message and "fake.png" in message
    assert "Fix: Replace the broken files" in message


def test_missing_root_and_bad_arguments(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(str(tmp_path / "nope"))
    picture(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="default_repeats"):
        scan_folder(str(tmp_path), default_repeats=0)
    for extension in ["", "../x", "a/b", ".png", ". txt"]:
        with pytest.raises(DatasetError, match="Caption extension"):
            scan_folder(str(tmp_path), caption_extension=extension)
    assert scan_folder(str(tmp_path), caption_extension="caption").items[0].caption_path.endswith("a.caption")


# --- symbolic links ---------------------------------------------------------------------------------------
def test_links_inside_are_followed_links_outside_never_read(tmp_path):
    outside = tmp_path / "outside"
    secret = picture(outside / "secret.png")
    write(outside / "secret.txt", "private words")
    root = tmp_path / "root"
    picture(root / "a.png")
    picture(root / "shared" / "s.png")
    os.symlink(secret, root / "leak.png")
    os.symlink(outside, root / "leakdir")
    os.symlink(root / "shared", root / "alias")              # inside: followed once
    os.symlink(root, root / "shared" / "loop")               # a cycle must not hang
    os.symlink(outside / "secret.txt", root / "a.txt")       # a caption leading out is refused too
    os.symlink(root / "missing.png", root / "dangling.png")

    dataset = scan_folder(str(root))
    keys = [item.key for item in dataset.items]
    assert keys == ["a.png", "shared/s.png"]
    assert "already included" in skip_reason(dataset, "alias")
    assert "already included" in skip_reason(dataset, "shared/loop")
    assert "outside" in skip_reason(dataset, "leak.png")
    assert "outside" in skip_reason(dataset, "leakdir")
    assert "outside" in skip_reason(dataset, "a.txt")
    assert "broken" in skip_reason(dataset, "dangling.png")
    a = by_key(dataset)["a.png"]
    assert a.caption == "" and not a.has_caption
    assert a.caption_path is None, "captioning must never write through a link that leaves the folder"
    assert any("a.png" in warning and "caption" in warning for warning in dataset.warnings)
    assert "private" not in repr(dataset)


def test_load_image_refuses_a_file_swapped_for_an_outside_link_after_the_scan(tmp_path):
    root = tmp_path / "root"
    path = picture(root / "a.png")
    outside = picture(tmp_path / "other.png")
    dataset = scan_folder(str(root))
    path.unlink()
    os.symlink(outside, path)
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        dataset.load_image(0)


# --- repeats ------------------------------------------------------------------------------------------
def test_kohya_folders_set_repeats_and_concepts(tmp_path):
    for index in range(3):
        picture(tmp_path / "10_cat" / f"{index}.png")
    picture(tmp_path / "3_dog" / "d.png")
    picture(tmp_path / "3_dog" / "sub" / "e.png")           # nested: the nearest N_name folder counts
    picture(tmp_path / "loose.png")
    picture(tmp_path / "misc" / "m.png")
    dataset = scan_folder(str(tmp_path), default_repeats=2)
    items = by_key(dataset)
    assert (items["10_cat/0.png"].repeats, items["10_cat/0.png"].concept) == (10, "10_cat")
    assert (items["3_dog/sub/e.png"].repeats, items["3_dog/sub/e.png"].concept) == (3, "3_dog")
    assert (items["loose.png"].repeats, items["loose.png"].concept) == (2, "")
    assert (items["misc/m.png"].repeats, items["misc/m.png"].concept) == (2, "")
    assert dataset.total_repeats == 3 * 10 + 2 * 3 + 2 * 2


def test_kohya_ss_layout_and_a_picked_concept_folder(tmp_path):
    picture(tmp_path / "project" / "img" / "20_sks person" / "a.png")
    picture(tmp_path / "project" / "reg" / "1_person" / "r.png")
    dataset = scan_folder(str(tmp_path / "project"))
    items = by_key(dataset)
    assert items["img/20_sks person/a.png"].repeats == 20
    assert items["img/20_sks person/a.png"].concept == "img/20_sks person"
    assert any("'reg' folder" in warning for warning in dataset.warnings)
    picked = scan_folder(str(tmp_path / "project" / "img" / "20_sks person"))
    assert (picked.items[0].repeats, picked.items[0].concept) == (20, "20_sks person")


def test_zero_and_suspicious_repeats(tmp_path):
    picture(tmp_path / "0_off" / "a.png")
    picture(tmp_path / "2024_trip" / "b.png")
    dataset = scan_folder(str(tmp_path))
    assert "0 repeats" in skip_reason(dataset, "0_off/a.png")
    assert by_key(dataset)["2024_trip/b.png"].repeats == 2024
    assert any("2024_trip" in warning and "date" in warning for warning in dataset.warnings)


# --- captions -----------------------------------------------------------------------------------------
def test_captions_from_sidecars_in_every_encoding(tmp_path):
    for name in ["plain", "bom", "utf16", "latin", "blank", "none", "multi", "upper"]:
        picture(tmp_path / f"{name}.png")
    write(tmp_path / "plain.txt", "a red square")
    write(tmp_path / "bom.txt", b"\xef\xbb\xbfcaf\xc3\xa9 photo, sks")
    write(tmp_path / "utf16.txt", "\ufeffNotepad Unicode".encode("utf-16-le"))
    write(tmp_path / "latin.txt", "na\xefve caf\xe9".encode("cp1252"))
    write(tmp_path / "blank.txt", "  \n ")
    write(tmp_path / "multi.txt", "first line,\r\n  second   line\n\n")
    write(tmp_path / "upper.TXT", "upper-case extension")
    dataset = scan_folder(str(tmp_path))
    items = by_key(dataset)
    assert items["plain.png"].caption == "a red square" and items["plain.png"].has_caption
    assert items["bom.png"].caption == "café photo, sks"
    assert items["utf16.png"].caption == "Notepad Unicode"
    assert items["latin.png"].caption == "naïve café"
    assert items["multi.png"].caption == "first line, second line"
    assert items["upper.png"].caption == "upper-case extension"
    assert items["upper.png"].caption_path == str(tmp_path.resolve() / "upper.TXT")
    for uncaptioned in ("blank.png", "none.png"):
        assert items[uncaptioned].caption == "" and not items[uncaptioned].has_caption
    assert items["none.png"].caption_path == str(tmp_path.resolve() / "none.txt")
    latin_warnings = [warning for warning in dataset.warnings if warning.startswith("latin.txt")]
    assert len(latin_warnings) == 1 and "not UTF-8" in latin_warnings[0] and "re-save" in latin_warnings[0]
    assert not any(warning.startswith(("bom.txt", "utf16.txt", "plain.txt")) for warning in dataset.warnings)


def test_custom_caption_extension(tmp_path):
    picture(tmp_path / "a.png")
    write(tmp_path / "a.caption", "from the caption file")
    write(tmp_path / "a.txt", "not this one")
    item = scan_folder(str(tmp_path), caption_extension=".caption").items[0]
    assert item.caption == "from the caption file"
    assert item.caption_path.endswith("a.caption")


def test_binary_and_huge_captions_and_orphans_and_shared_sidecars(tmp_path):
    picture(tmp_path / "bin.png")
    write(tmp_path / "bin.txt", b"\x00\x01\x02binary")
    picture(tmp_path / "long.png")
    write(tmp_path / "long.txt", "word " * 20000)
    write(tmp_path / "lonely.txt", "no picture for me")
    picture(tmp_path / "twin.png")
    picture(tmp_path / "twin.jpg")
    write(tmp_path / "twin.txt", "shared")
    dataset = scan_folder(str(tmp_path))
    items = by_key(dataset)
    assert items["bin.png"].caption == "" and not items["bin.png"].has_caption
    assert any(warning.startswith("bin.txt") and "binary" in warning for warning in dataset.warnings)
    assert len(items["long.png"].caption) <= 64 * 1024
    assert any(warning.startswith("long.txt") and "longer than" in warning for warning in dataset.warnings)
    assert any("lonely.txt" in warning and "no picture" in warning for warning in dataset.warnings)
    assert any("twin.jpg and twin.png share the caption file twin.txt" in warning for warning in dataset.warnings)


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60),
       st.booleans())
def test_any_utf8_caption_reads_back_as_one_clean_line(text, with_bom):
    with tempfile.TemporaryDirectory() as folder:
        picture(Path(folder) / "a.png", size=(4, 4))
        write(Path(folder) / "a.txt", (b"\xef\xbb\xbf" if with_bom else b"") + text.encode("utf-8"))
        item = scan_folder(folder).items[0]
    assert item.caption == " ".join(text.split())
    assert item.has_caption == bool(text.split())


# --- the Dataset object ---------------------------------------------------------------------------------
def test_with_captions_is_immutable_and_counts_must_match(tmp_path):
    picture(tmp_path / "a.png")
    picture(tmp_path / "b.png")
    dataset = scan_folder(str(tmp_path))
    captioned = dataset.with_captions(["a cat\n", ""])
    assert [item.caption for item in dataset.items] == ["", ""]
    assert [(item.caption, item.has_caption) for item in captioned.items] == [("a cat", True), ("", False)]
    assert captioned.root == dataset.root and captioned is not dataset
    with pytest.raises(dataclasses.FrozenInstanceError):
        captioned.items = ()
    with pytest.raises(DatasetError, match="3 captions for 2 pictures"):
        dataset.with_captions(["a", "b", "c"])


def test_fingerprint_tracks_pictures_captions_and_repeats(tmp_path):
    path = picture(tmp_path / "a.png")
    first = scan_folder(str(tmp_path))
    assert scan_folder(str(tmp_path)).fingerprint() == first.fingerprint()
    assert first.with_captions(["new"]).fingerprint() != first.fingerprint()
    assert scan_folder(str(tmp_path), default_repeats=2).fingerprint() != first.fingerprint()
    picture(path, color=(0, 0, 0))
    assert scan_folder(str(tmp_path)).fingerprint() != first.fingerprint()


def test_folder_signature_changes_with_files_and_captions_only(tmp_path):
    picture(tmp_path / "a.png")
    before = folder_signature(str(tmp_path))
    assert folder_signature(str(tmp_path)) == before
    write(tmp_path / "a.txt", "a caption")
    with_caption = folder_signature(str(tmp_path))
    assert with_caption != before
    write(tmp_path / "a.txt", "a longer caption")
    assert folder_signature(str(tmp_path)) != with_caption
    picture(tmp_path / "sub" / "b.png")
    assert folder_signature(str(tmp_path)) not in (before, with_caption)


# --- IMAGE batches ---------------------------------------------------------------------------------------
def test_dataset_from_pixels_copies_out_of_inference_mode():
    with torch.inference_mode():
        batch = torch.rand(3, 8, 12, 3)
        dataset = dataset_from_pixels(batch, ["one", "", "three"], repeats=4)
    assert not dataset.pixels.is_inference()
    assert dataset.pixels.shape == (3, 8, 12, 3) and dataset.pixels.dtype == torch.float32
    assert [item.key for item in dataset.items] == ["image_0000", "image_0001", "image_0002"]
    assert [item.has_caption for item in dataset.items] == [True, False, True]
    assert dataset.total_repeats == 12 and dataset.root is None
    assert (dataset.items[0].width, dataset.items[0].height) == (12, 8)
    assert len({item.content_hash for item in dataset.items}) == 3
    assert all(item.path is None and item.caption_path is None for item in dataset.items)
    with torch.inference_mode():
        batch.zero_()
    assert dataset.pixels.abs().sum() > 0, "the dataset must own a copy"
    loaded = np.asarray(dataset.load_image(1), dtype=np.float32) / 255
    assert np.abs(loaded - dataset.pixels[1].numpy()).max() <= 0.5 / 255 + 1e-6


def test_dataset_from_pixels_captions_broadcast_and_mismatch():
    batch = torch.zeros(2, 4, 4, 3)
    assert [item.caption for item in dataset_from_pixels(batch, ["same"]).items] == ["same", "same"]
    assert not any(item.has_caption for item in dataset_from_pixels(batch, []).items)
    with pytest.raises(DatasetError, match="3 captions for 2 pictures"):
        dataset_from_pixels(batch, ["a", "b", "c"])
    with pytest.raises(DatasetError, match="IMAGE batch"):
        dataset_from_pixels(torch.zeros(4, 4, 3), [])
    with pytest.raises(DatasetError, match="repeats"):
        dataset_from_pixels(batch, [], repeats=0)


def test_dataset_from_pixels_flattens_alpha_and_expands_grey():
    rgba = torch.zeros(1, 1, 2, 4)
    rgba[0, 0, 1] = torch.tensor([1.0, 0, 0, 1])
    assert dataset_from_pixels(rgba, []).pixels[0, 0].tolist() == [[1, 1, 1], [1, 0, 0]]
    grey = torch.full((1, 2, 2, 1), 0.5)
    assert dataset_from_pixels(grey, []).pixels.shape == (1, 2, 2, 3)


# --- the report -----------------------------------------------------------------------------------------
def fake_dataset(counts_and_repeats, captioned=True) -> Dataset:
    items = []
    for concept, count, repeats in counts_and_repeats:
        for index in range(count):
            items.append(DatasetItem(key=f"{concept}/{index}.png", caption="c" if captioned else "", repeats=repeats,
                                     concept=concept, width=512, height=512, content_hash=str(index),
                                     has_caption=captioned))
    return Dataset(items=tuple(items), root="/data/set")


def test_report_does_the_kohya_arithmetic_users_do_by_hand():
    report = steps_report(fake_dataset([("10_me", 30, 10)]), batch_size=1, target_steps=3000)
    assert "30 picture(s) in /data/set: 30 captioned, 0 without a caption." in report
    assert "10_me: 30 x 10 repeats = 300" in report
    assert "Steps per epoch = pictures x repeats / batch size = 300 / 1 = 300; Train LoRA's report has the exact" in report
    assert "For 3000 steps: 10 epochs = 3000 steps." in report


def test_report_rounds_up_and_lists_folders_skips_and_warnings():
    dataset = dataclasses.replace(fake_dataset([("10_cat", 2, 10), ("3_dog", 1, 3), ("", 2, 1)], captioned=False),
                                  skipped=tuple((f"bad{i}.png", "empty file (0 bytes)") for i in range(20)),
                                  warnings=("latin.txt: not UTF-8",))
    report = steps_report(dataset, batch_size=2, target_steps=100, source="in 'mychar'")
    assert "5 picture(s) in 'mychar': 0 captioned, 5 without a caption." in report
    assert "Uncaptioned pictures need captions" in report
    assert "10_cat: 2 x 10 repeats = 20" in report and "3_dog: 1 x 3 repeats = 3" in report
    assert "pictures outside N_name folders: 2 x 1 repeat = 2" in report
    assert "Skipped (20):" in report and "bad0.png: empty file (0 bytes)" in report and "… and 5 more" in report
    assert "Warnings (1):" in report and "latin.txt: not UTF-8" in report
    assert "batch size = 25 / 2 = 13 (rounded up);" in report
    assert "For 100 steps: 8 epochs = 104 steps." in report
    assert "epochs" not in steps_report(dataset, batch_size=1, target_steps=0).split("Steps per epoch")[1]
    with pytest.raises(DatasetError):
        steps_report(dataset, batch_size=0, target_steps=0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.integers(1, 16), st.integers(1, 20000))
def test_report_epochs_reach_the_target_with_less_than_one_epoch_to_spare(repeats, batch_size, target):
    dataset = fake_dataset([(f"{r}_c{i}", 1, r) for i, r in enumerate(repeats)])
    report = steps_report(dataset, batch_size, target)
    per_epoch = int(re.search(r"batch size = \d+ / \d+ = (\d+)", report).group(1))
    epochs, total = map(int, re.search(r"steps: (\d+) epochs? = (\d+) steps", report).groups())
    assert per_epoch == math.ceil(sum(repeats) / batch_size)
    assert total == epochs * per_epoch and total >= target > total - per_epoch

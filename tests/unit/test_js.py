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

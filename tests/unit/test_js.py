"""The front end's pure logic (js/loss_chart.js) under node's own test runner."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_loss_chart_logic():
    result = subprocess.run(["node", "--test", str(REPO / "tests" / "js")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# pass 8" in result.stdout, result.stdout


def test_every_script_is_an_es_module_with_relative_imports():
    for script in (REPO / "js").glob("*.js"):
        text = script.read_text()
        for line in text.splitlines():
            if line.startswith("import "):
                assert "from \"./" in line or "from \"../../scripts/" in line, (script.name, line)

#!/usr/bin/env bash
# The test command: sets up the environment if needed, then runs the whole suite against a real
# ComfyUI (COMFYUI_ROOT, or the embedded 2024-03). Extra arguments go to pytest.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LORALAB_VENV:-$REPO/.venv}"
bash "$REPO/tools/setup_env.sh" || exit 1
mkdir -p "$REPO/test-artifacts"
cd "$REPO"
start=$(date +%s)
# pytest's rootdir is tests/ (see tests/pytest.ini); without a path of the caller's, name the suite
# explicitly, or pytest would collect the repository root — a package whose __init__ imports ComfyUI.
paths=()
for arg in "$@"; do [ -e "${arg%%::*}" ] && paths+=("$arg"); done
[ ${#paths[@]} -eq 0 ] && set -- "$@" tests
"$VENV/bin/python" -m pytest -c tests/pytest.ini "$@" --junitxml=test-artifacts/junit.xml 2>&1 | tee test-artifacts/pytest.log
rc=${PIPESTATUS[0]}
elapsed=$(( $(date +%s) - start ))
summary="$(grep -E '(passed|failed|error|no tests ran).* in [0-9.]+s' test-artifacts/pytest.log | tail -1 | tr -d '=')"
if [ "$rc" -eq 5 ]; then
  echo "LoRA Lab tests: NO TESTS RAN (pytest exit 5) — treated as a failure"; exit 1
fi
echo "LoRA Lab tests:${summary:- (no summary)} (wall ${elapsed}s), exit $rc, against $("$VENV/bin/python" -c 'import sys; sys.path.insert(0, "tests/support"); import comfyui_home as h; r = h.find_comfyui_root(); print(h.comfyui_version_label(r))')"
exit "$rc"

#!/usr/bin/env bash
# The main job on embedded defaults: set up .venv + a real ComfyUI, then run the demo graph through the API.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/tools/setup_env.sh"
exec "${LORALAB_VENV:-$REPO/.venv}/bin/python" "$REPO/tools/run_demo.py" "$@"

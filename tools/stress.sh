#!/usr/bin/env bash
# Run the training and pedal tests N times in a row, each time in a fresh pytest process (fresh ComfyUI
# overlay, fresh loras folder), and count the runs that failed. A test that fails once in N is flaky.
#   bash tools/stress.sh 10                      # the training and pedal tests, 10 times
#   bash tools/stress.sh 10 -k "resumed or same_seed"   # extra arguments go to pytest
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LORALAB_VENV:-$REPO/.venv}"
runs="${1:-10}"; shift || true
bash "$REPO/tools/setup_env.sh" >/dev/null || exit 1
cd "$REPO"
mkdir -p test-artifacts/stress
targets=(tests/comfy/test_train_lora.py tests/comfy/test_network_shapes.py tests/comfy/test_text_encoder_lora.py
         tests/comfy/test_stack_nodes.py tests/comfy/test_pedalboard.py tests/unit/training tests/unit/lora)
failed=0
for run in $(seq 1 "$runs"); do
  log="test-artifacts/stress/run$run.log"
  if "$VENV/bin/python" -m pytest -c tests/pytest.ini -q -m "not server" "${targets[@]}" "$@" > "$log" 2>&1; then
    echo "[stress] run $run/$runs: $(grep -E ' passed' "$log" | tail -1 | tr -d '=')"
  else
    failed=$((failed + 1))
    echo "[stress] run $run/$runs FAILED: $(grep -E '^(FAILED|ERROR)' "$log" | tr '\n' ' ') (log: $log)"
  fi
done
echo "[stress] $failed of $runs runs failed"
[ "$failed" -eq 0 ]

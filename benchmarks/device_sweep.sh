#!/usr/bin/env bash
# One GPU call for the accuracy evidence of issue 5: build in place, start the accuracy sweep
# (benchmarks/accuracy_sweep.sh, knobs passed through: DATASETS SEEDS METHODS EPOCHS PATIENCE JOBS
# RUN_TIMEOUT EXTRA_ARGS) in the background, run the CUDA tests meanwhile (their timing does not
# matter, the sweep's per-epoch times are marked with concurrent_runs anyway), wait, pack the logs.
#
#   JOBS=24 EPOCHS=20 PATIENCE=5 bash benchmarks/device_sweep.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$(mktemp -d /tmp/blossomrec-sweep.XXXXXX)}
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
mkdir -p "$OUT/logs"
t0=$SECONDS
if ! "$PY" setup.py build_ext --inplace >"$OUT/logs/build.log" 2>&1; then
  tail -n 40 "$OUT/logs/build.log"; exit 1
fi
echo "build: $((SECONDS - t0)) s"
CARD=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0).lower().replace("nvidia ", "").replace(" ", "-"))')
export RESULTS="$OUT/accuracy-$CARD-$(date -u +%Y%m%d).jsonl"
OUT="$OUT" bash benchmarks/accuracy_sweep.sh >"$OUT/sweep.log" 2>&1 &
sweep=$!
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  "$PY" -m pytest python_tests -m cuda -q -ra >"$OUT/tests.log" 2>&1
  echo "tests ($((SECONDS - t0)) s): $(tail -n 1 "$OUT/tests.log")"
  grep -E "^FAILED" "$OUT/tests.log" | head -n 20
fi
wait $sweep
echo "sweep done at $((SECONDS - t0)) s"
cat "$OUT/sweep.log"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"

#!/usr/bin/env bash
# One call on a GPU machine: environment, build, CUDA tests, optional sanitizers, benchmark, plots.
#
#   bash benchmarks/device_run.sh                      # everything with defaults
#   SKIP_TESTS=1 BENCH_ARGS="--quick --shapes S1,S4" bash benchmarks/device_run.sh
#   SANITIZE=1 SKIP_BENCH=1 bash benchmarks/device_run.sh
#
# Steps, each logged under $OUT (default: a temp folder when run outside the device tool):
#   1. env.txt      nvidia-smi, python, torch, nvcc versions
#   2. build.log    python setup.py build_ext --inplace (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0):
#                   against the installed torch, reusing build/ on a warm machine
#   3. tests.log    pytest -m cuda (FULL_TESTS=1: the whole suite), junit xml
#   4. sanitizer.log  SANITIZE=1: compute-sanitizer memcheck and racecheck on the demo's check batch
#                   (all three kernels, forward and backward), on SANITIZE_SCRIPT (a python script,
#                   e.g. benchmarks/fused_smoke.py) and on SANITIZE_PYTEST (pytest test ids, e.g.
#                   "python_tests/test_ops_cuda.py::test_x[0]"; both empty by default)
#   5. bench-<card>-<date>.jsonl  benchmarks/bench_attention.py $BENCH_ARGS, appended to
#                   benchmarks/results/ and copied to $OUT
#   6. plots/*.png  benchmarks/plot.py of this run
# At most 8 files come back from $OUT: the logs are packed into logs.tar.gz (env.txt and tests.log
# stay readable beside it), and the plots too if they would push the count over 8.
#
# Env flags: SKIP_BUILD=1 SKIP_TESTS=1 SKIP_BENCH=1 SANITIZE=1 FULL_TESTS=1 BENCH_ARGS="..."
# MODULE_ARGS="..." (benchmarks/bench_module.py, e.g. "--sizes 4096,16384") EPOCH_SECONDS=1 (with
# epoch_seconds.sh's MODES / CONFIGS)
# TEST_ARGS="..." (extra pytest arguments, e.g. -k fused) TEST_TIMEOUT (seconds, default 420)
# PROFILE=1 PROFILE_ARGS="..." (benchmarks/profile_kernels.py) NCU=1 NCU_ARGS="..." NCU_LAUNCHES=N
# NCU_SECTIONS="--section ..." NCU_KERNELS="regex:..." (which kernels Nsight Compute captures)
# SANITIZE_PYTEST="test ids" SANITIZE_SCRIPT=path SANITIZE_DEMO=0 (skip the demo batch) MAX_JOBS TORCH_CUDA_ARCH_LIST BLOSSOMREC_DATA (default .data: the
# git-ignored copy of ../shared/data, which does not travel to the device otherwise; name it in carry).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$(mktemp -d /tmp/blossomrec-device.XXXXXX)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export BLOSSOMREC_DATA=${BLOSSOMREC_DATA:-.data}
export PYTHONUNBUFFERED=1
LOGS="$OUT/logs"
mkdir -p "$LOGS"

declare -a STEPS=()
record() { STEPS+=("$(printf '%-12s %-28s %5ss' "$1" "$2" "$3")"); }

# ---------------------------------------------------------------------------------------------------
# 1. Environment
# ---------------------------------------------------------------------------------------------------
t0=$SECONDS
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname) ($(nproc) cores)"
  nvidia-smi 2>&1 || echo "nvidia-smi failed"
  echo
  "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"sm_{p.major}{p.minor}", p.multi_processor_count,
          "SMs", round(p.total_memory / 2**30, 1), "GiB")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
EOF
  echo
  nvcc --version 2>&1 | tail -n 2
  echo "data: BLOSSOMREC_DATA=$BLOSSOMREC_DATA ($(ls "$BLOSSOMREC_DATA" 2>/dev/null | tr '\n' ' ' || echo missing))"
} >"$OUT/env.txt" 2>&1
CARD=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo unknown)
CARD_SLUG=$(echo "$CARD" | tr '[:upper:]' '[:lower:]' | sed -e 's/nvidia//' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
record env "ok ($CARD)" $((SECONDS - t0))

# ---------------------------------------------------------------------------------------------------
# 2. Build
# ---------------------------------------------------------------------------------------------------
BUILD_OK=1
if [ "${SKIP_BUILD:-0}" != "1" ]; then
  t0=$SECONDS
  # In place rather than `pip install -e .`: pip's editable build compiles in a fresh temporary
  # folder every time, while build_ext --inplace keeps build/temp.* and ninja recompiles only what
  # changed on a warm machine. No build isolation either way: compile against the torch installed.
  if "$PY" setup.py build_ext --inplace >"$LOGS/build.log" 2>&1 \
      && "$PY" -c 'import blossomrec_cuda as b, sys; sys.exit(0 if b.WITH_CUDA else 1)' >>"$LOGS/build.log" 2>&1; then
    record build ok $((SECONDS - t0))
  else
    BUILD_OK=0
    record build "FAILED (logs/build.log)" $((SECONDS - t0))
    echo "--- build failed; the end of build.log:"
    tail -n 60 "$LOGS/build.log"
  fi
else
  record build skipped 0
fi

# ---------------------------------------------------------------------------------------------------
# 3. Tests
# ---------------------------------------------------------------------------------------------------
TEST_SUMMARY="not run"
if [ "${SKIP_TESTS:-0}" != "1" ] && [ $BUILD_OK -eq 1 ]; then
  t0=$SECONDS
  selection=(-m cuda)
  [ "${FULL_TESTS:-0}" = "1" ] && selection=()
  # shellcheck disable=SC2086
  timeout "${TEST_TIMEOUT:-420}" "$PY" -m pytest python_tests "${selection[@]}" -q -ra ${TEST_ARGS:-} \
    --junitxml="$LOGS/junit.xml" >"$OUT/tests.log" 2>&1
  rc=$?
  TEST_SUMMARY=$(tail -n 1 "$OUT/tests.log")
  record tests "$([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)")" $((SECONDS - t0))
else
  record tests skipped 0
fi

# ---------------------------------------------------------------------------------------------------
# 4. Sanitizers
# ---------------------------------------------------------------------------------------------------
if [ "${SANITIZE:-0}" = "1" ] && [ $BUILD_OK -eq 1 ]; then
  t0=$SECONDS
  san_rc=0
  # The caching allocator hides out-of-bounds accesses inside its blocks; allocate plainly instead.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  for tool in memcheck racecheck; do
    if [ "${SANITIZE_DEMO:-1}" = "1" ]; then
      echo "=== compute-sanitizer --tool $tool: demo check batch ===" >>"$LOGS/sanitizer.log"
      compute-sanitizer --tool "$tool" --error-exitcode 97 --target-processes all \
        "$PY" -m blossomrec_cuda.demo --device cuda --check-only >>"$LOGS/sanitizer.log" 2>&1 || san_rc=1
    fi
    if [ -n "${SANITIZE_SCRIPT:-}" ]; then
      echo "=== compute-sanitizer --tool $tool: ${SANITIZE_SCRIPT} ===" >>"$LOGS/sanitizer.log"
      PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" compute-sanitizer --tool "$tool" --error-exitcode 97 \
        --target-processes all "$PY" "$SANITIZE_SCRIPT" >>"$LOGS/sanitizer.log" 2>&1 || san_rc=1
    fi
    if [ -n "${SANITIZE_PYTEST:-}" ]; then
      echo "=== compute-sanitizer --tool $tool: pytest ${SANITIZE_PYTEST} ===" >>"$LOGS/sanitizer.log"
      # shellcheck disable=SC2086
      BLOSSOMREC_UNDER_SANITIZER=1 compute-sanitizer --tool "$tool" --error-exitcode 97 --target-processes all \
        "$PY" -m pytest -q -x -p no:cacheprovider $SANITIZE_PYTEST >>"$LOGS/sanitizer.log" 2>&1 || san_rc=1
    fi
  done
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS/sanitizer.log" | sort | uniq -c
  record sanitize "$([ $san_rc -eq 0 ] && echo ok || echo "FAILED (logs/sanitizer.log)")" $((SECONDS - t0))
else
  record sanitize skipped 0
fi

# ---------------------------------------------------------------------------------------------------
# 4b. Per-kernel profile (PROFILE=1: torch.profiler tables; NCU=1: Nsight Compute sections of the
#     attention kernels, hardware counters where the machine allows them)
# ---------------------------------------------------------------------------------------------------
if [ $BUILD_OK -eq 1 ] && { [ "${PROFILE:-0}" = "1" ] || [ "${NCU:-0}" = "1" ]; }; then
  t0=$SECONDS
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build of this checkout
  # shellcheck disable=SC2086
  [ "${PROFILE:-0}" = "1" ] && "$PY" benchmarks/profile_kernels.py ${PROFILE_ARGS:-} \
    >"$LOGS/profile.log" 2>&1
  if [ "${NCU:-0}" = "1" ]; then
    # shellcheck disable=SC2086
    ncu --clock-control none ${NCU_SECTIONS:---section SpeedOfLight --section Occupancy \
      --section LaunchStats --section WarpStateStats --section SchedulerStats} \
      -k "${NCU_KERNELS:-regex:sparse_attention|select_blocks}" \
      --launch-count "${NCU_LAUNCHES:-12}" "$PY" benchmarks/profile_kernels.py --iters 1 \
      ${NCU_ARGS:---shapes S2 --dims 16 --fwd-only} >"$LOGS/ncu.log" 2>&1
  fi
  record profile "done (logs/profile.log, logs/ncu.log)" $((SECONDS - t0))
fi

# ---------------------------------------------------------------------------------------------------
# 5. Benchmark
# ---------------------------------------------------------------------------------------------------
RESULTS=""
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  t0=$SECONDS
  RESULTS="benchmarks/results/bench-${CARD_SLUG}-$(date -u +%Y%m%d).jsonl"
  RUN_ID="$(date -u +%Y%m%d-%H%M%S)-${CARD_SLUG}"
  # shellcheck disable=SC2086
  "$PY" benchmarks/bench_attention.py ${BENCH_ARGS:-} --out "$RESULTS" --run-id "$RUN_ID" \
    >"$LOGS/bench.log" 2>&1
  rc=$?
  [ -f "$RESULTS" ] && cp "$RESULTS" "$OUT/"
  record bench "$([ $rc -eq 0 ] && echo ok || echo "FAILED (logs/bench.log)")" $((SECONDS - t0))

  # -------------------------------------------------------------------------------------------------
  # 6. Plots
  # -------------------------------------------------------------------------------------------------
  t0=$SECONDS
  if [ -f "$RESULTS" ] && "$PY" benchmarks/plot.py "$RESULTS" --run "$RUN_ID" --out-dir "$OUT/plots" \
      >>"$LOGS/bench.log" 2>&1; then
    record plots ok $((SECONDS - t0))
  else
    record plots "FAILED (logs/bench.log)" $((SECONDS - t0))
  fi
else
  record bench skipped 0
fi

# ---------------------------------------------------------------------------------------------------
# 7. Module and training-step benchmark (MODULE_ARGS set: benchmarks/bench_module.py with them,
#    rows appended to benchmarks/results/bench-module-<card>-<date>.jsonl and copied to $OUT)
#    and seconds per epoch (EPOCH_SECONDS=1: benchmarks/epoch_seconds.sh with its MODES / CONFIGS;
#    needs the data sets: carry .data)
# ---------------------------------------------------------------------------------------------------
if [ -n "${MODULE_ARGS:-}" ] && [ $BUILD_OK -eq 1 ]; then
  t0=$SECONDS
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  MODULE_RESULTS="benchmarks/results/bench-module-${CARD_SLUG}-$(date -u +%Y%m%d).jsonl"
  # shellcheck disable=SC2086
  "$PY" benchmarks/bench_module.py $MODULE_ARGS --out "$MODULE_RESULTS" \
    --run-id "m-$(date -u +%Y%m%d-%H%M%S)" >"$LOGS/bench-module.log" 2>&1
  rc=$?
  [ -f "$MODULE_RESULTS" ] && cp "$MODULE_RESULTS" "$OUT/"
  record module "$([ $rc -eq 0 ] && echo ok || echo "FAILED (logs/bench-module.log)")" $((SECONDS - t0))
fi
if [ "${EPOCH_SECONDS:-0}" = "1" ] && [ $BUILD_OK -eq 1 ]; then
  t0=$SECONDS
  mkdir -p "$LOGS/epochs"
  OUT="$LOGS/epochs" bash benchmarks/epoch_seconds.sh >"$LOGS/epochs.log" 2>&1
  rc=$?
  [ -f "$LOGS/epochs/epoch-seconds.jsonl" ] && cp "$LOGS/epochs/epoch-seconds.jsonl" "$OUT/"
  record epochs "$([ $rc -eq 0 ] && echo ok || echo "FAILED (logs/epochs.log)")" $((SECONDS - t0))
fi

# ---------------------------------------------------------------------------------------------------
# Pack: at most 8 files come back from $OUT.
# ---------------------------------------------------------------------------------------------------
if [ -n "$(ls -A "$LOGS")" ]; then
  tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs
fi
rm -rf "$LOGS"
count=$(find "$OUT" -type f | wc -l)
if [ "$count" -gt 8 ] && [ -d "$OUT/plots" ]; then
  tar -czf "$OUT/plots.tar.gz" -C "$OUT" plots && rm -rf "$OUT/plots"
fi

# ---------------------------------------------------------------------------------------------------
# Summary (last, so that the tool's output tail holds it)
# ---------------------------------------------------------------------------------------------------
if [ -n "$RESULTS" ] && [ -f "$RESULTS" ]; then
  "$PY" benchmarks/bench_attention.py --print-table "$RESULTS" --table-run "$RUN_ID"
fi
echo
echo "=== device_run summary: $CARD ==="
for line in "${STEPS[@]}"; do echo "$line"; done
echo "tests: $TEST_SUMMARY"
if [ -n "$RESULTS" ] && [ -f "$RESULTS" ]; then echo "results: $RESULTS (copied to \$OUT)"; fi
echo "files in \$OUT: $(cd "$OUT" && find . -type f | sed 's|^\./||' | sort | tr '\n' ' ')"

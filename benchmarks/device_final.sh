#!/usr/bin/env bash
# One GPU call within a deadline: benchmarks/device_run.sh (its env flags pass through: build,
# SANITIZE, BENCH_ARGS, ...), then the accuracy sweep (benchmarks/accuracy_sweep.sh knobs) in the
# time left before DEADLINE seconds (default 570) since the start; runs still going then are cut
# (they record nothing). The sweep's results and logs come back packed as sweep.tar.gz.
#
#   SKIP_TESTS=1 SANITIZE=1 BENCH_ARGS="--quick" DATASETS=ml50 JOBS=6 bash benchmarks/device_final.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$(mktemp -d /tmp/blossomrec-final.XXXXXX)}
export OUT
DEADLINE=${DEADLINE:-570}
bash benchmarks/device_run.sh
left=$(( DEADLINE - SECONDS - 10 ))
if [ -n "${DATASETS:-}" ] && [ "$left" -gt 60 ]; then
  mkdir -p "$OUT/sweep"
  CARD=$(python3 -c 'import torch; print(torch.cuda.get_device_name(0).lower().replace("nvidia ", "").replace(" ", "-"))')
  echo "=== accuracy sweep, $left s left"
  OUT="$OUT/sweep" RESULTS="$OUT/sweep/accuracy-$CARD-$(date -u +%Y%m%d).jsonl" RUN_TIMEOUT=$left \
    bash benchmarks/accuracy_sweep.sh 2>&1 | grep "^===\|results"
  tar -czf "$OUT/sweep.tar.gz" -C "$OUT" sweep && rm -rf "$OUT/sweep"
else
  echo "=== no accuracy sweep (DATASETS empty or $left s left)"
fi

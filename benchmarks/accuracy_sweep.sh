#!/usr/bin/env bash
# Accuracy sweep of issue 5 on a GPU: BlossomRec on the CUDA ops, the same model on reference.py's
# ops, and dense SASRec, per dataset and seed; one JSON line per run (metrics, wall time per epoch).
#
#   DATASETS="beauty games ml50 ml200" SEEDS="0 1" EPOCHS=200 PATIENCE=15 bash benchmarks/accuracy_sweep.sh
#
# Knobs: DATASETS (beauty, games, ml50, ml200 = MovieLens with max length 50 / 200), SEEDS, EPOCHS,
# PATIENCE, METHODS ("ops reference dense"), RUNS (an explicit list instead of the three loops:
# "games:1:dense ml200:0:ops ..."), RUN_TIMEOUT (seconds per run), EXTRA_ARGS (passed on to
# the train command), CKPT_ROOT (a folder: each run checkpoints every epoch to its own
# $CKPT_ROOT/<dataset>-seed<seed>-<method> and resumes from there, so a run cut by RUN_TIMEOUT or by
# the end of a device call continues where it stopped when the same command runs again on the same
# machine; its log is appended to; use a git-ignored folder such as checkpoints/, which stays on a
# warm device machine between calls), BLOSSOMREC_DATA (the data
# folder, default .data: the git-ignored copy of ../shared/data that travels to the device), OUT,
# JOBS (runs at the same time on the one device, default 1). With JOBS > 1 the three methods of a
# (dataset, seed) are queued next to each other so that they share the device with the same
# neighbours, and every row records concurrent_runs: compare per-epoch times only between rows with
# the same value. Each run's log goes to $OUT/logs (or runs/logs-accuracy, git-ignored).
# GPU memory bounds JOBS too: a MovieLens-200 run on the reference ops holds about 39 GiB
# (reference.py's dense masks), the others 0.5-4 GiB; 18 runs with three such runs on one H200
# ran out of memory at start-up (benchmarks/results/logs-accuracy-h200-20261130/oom-first-attempt/,
# git history at 2b6f2c9), two fit.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
DATA=${BLOSSOMREC_DATA:-.data}
DATASETS=${DATASETS:-beauty games ml50 ml200}
SEEDS=${SEEDS:-0 1}
EPOCHS=${EPOCHS:-200}
PATIENCE=${PATIENCE:-15}
METHODS=${METHODS:-ops reference dense}
RUN_TIMEOUT=${RUN_TIMEOUT:-3600}
CARD=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0).lower().replace("nvidia ", "").replace(" ", "-") if torch.cuda.is_available() else "cpu")')
RESULTS=${RESULTS:-benchmarks/results/accuracy-${CARD}-$(date -u +%Y%m%d).jsonl}
mkdir -p "$(dirname "$RESULTS")"

LOGDIR=${OUT:+$OUT/logs}
LOGDIR=${LOGDIR:-runs/logs-accuracy}
mkdir -p "$LOGDIR"
JOBS=${JOBS:-1}
export BLOSSOMREC_CONCURRENT_RUNS=$JOBS
# Concurrent runs share the CPU cores too: without a cap each would start one thread per core.
threads=$(( $(nproc) / JOBS )); [ "$threads" -ge 1 ] || threads=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}

run_one() {  # dataset seed method
  local ds=$1 seed=$2 method=$3 args m
  case $ds in
    beauty) args=(--data "$DATA/amazon-beauty.txt" --format user-items --max-len 50) ;;
    games) args=(--data "$DATA/amazon-video-games.txt" --format user-item-pairs --max-len 50) ;;
    ml50) args=(--data "$DATA/ml-latest-small" --format movielens --max-len 50) ;;
    ml200) args=(--data "$DATA/ml-latest-small" --format movielens --max-len 200) ;;
    *) echo "unknown dataset $ds" >&2; return 2 ;;
  esac
  case $method in
    ops) m=(--attention blossom --backend ops) ;;
    reference) m=(--attention blossom --backend reference) ;;
    dense) m=(--attention dense) ;;
    *) echo "unknown method $method" >&2; return 2 ;;
  esac
  local log="$LOGDIR/$ds-seed$seed-$method.log" t0=$SECONDS ckpt=()
  if [ -n "${CKPT_ROOT:-}" ]; then
    ckpt=(--checkpoint-dir "$CKPT_ROOT/$ds-seed$seed-$method" --resume)
  else
    : >"$log"  # a fresh run starts a fresh log; a resumed one appends to its earlier part
  fi
  # shellcheck disable=SC2086
  timeout "$RUN_TIMEOUT" "$PY" -m blossomrec_cuda.rec.train "${args[@]}" "${m[@]}" --seed "$seed" \
    --epochs "$EPOCHS" --patience "$PATIENCE" --no-progress --jsonl "$RESULTS" "${ckpt[@]}" \
    ${EXTRA_ARGS:-} >>"$log" 2>&1
  local rc=$?
  echo "=== $ds seed $seed $method: exit $rc, $((SECONDS - t0)) s ($log)"
  [ $rc -eq 0 ] || tail -n 5 "$log"
}

if [ -n "${RUNS:-}" ]; then
  runs=$RUNS
else
  runs=""
  for ds in $DATASETS; do
    for seed in $SEEDS; do
      for method in $METHODS; do runs="$runs $ds:$seed:$method"; done
    done
  done
fi
for r in $runs; do
  IFS=: read -r ds seed method <<<"$r"
  run_one "$ds" "$seed" "$method" &
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
done
wait
[ -n "${OUT:-}" ] && [ -f "$RESULTS" ] && [ "$(dirname "$(realpath "$RESULTS")")" != "$(realpath "$OUT")" ] && cp "$RESULTS" "$OUT/"
echo "results: $RESULTS"

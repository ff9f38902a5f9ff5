#!/usr/bin/env bash
# Seconds per training epoch, BlossomRec against SASRec, one run at a time on one GPU (issue 14's
# rows): the training command for 2 epochs per (data set, max length, model, mode); the second
# epoch's `train_seconds` is the number (the first one carries cuDNN / compile warm-up).
#
#   OUT=/tmp/e bash benchmarks/epoch_seconds.sh                 # every config, eager and compiled
#   MODES=eager CONFIGS="ml-latest-small:200" bash benchmarks/epoch_seconds.sh
#
# Env: DATA (folder of ../shared/data's files, default .data), MODES ("eager compiled"), CONFIGS
# ("name:max_len" pairs), AMP (bf16), EPOCHS (2). Writes $OUT/epoch-seconds.jsonl (the training
# command's result rows) and prints one table.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$(mktemp -d /tmp/blossomrec-epochs.XXXXXX)}
DATA=${DATA:-.data}
MODES=${MODES:-eager compiled}
CONFIGS=${CONFIGS:-amazon-beauty:50 amazon-video-games:50 ml-latest-small:50 ml-latest-small:200 ml-latest-small:1000}
AMP=${AMP:-bf16}
EPOCHS=${EPOCHS:-2}
PY=${PYTHON:-python3}
JSONL="$OUT/epoch-seconds.jsonl"
mkdir -p "$OUT"
for cfg in $CONFIGS; do
  name=${cfg%%:*}; len=${cfg##*:}
  path="$DATA/$name"; [ -e "$path.txt" ] && path="$path.txt"
  for mode in $MODES; do
    flag=""; [ "$mode" = "compiled" ] && flag="--compile"
    for attn in dense blossom; do
      echo "== $name max_len=$len $attn $mode" >&2
      "$PY" -m blossomrec_cuda.rec.train --data "$path" --max-len "$len" --attention "$attn" \
        --epochs "$EPOCHS" --eval-every "$EPOCHS" --amp "$AMP" $flag --no-progress \
        --jsonl "$JSONL" > "$OUT/train-$name-$len-$attn-$mode.log" 2>&1 \
        || { echo "failed: see $OUT/train-$name-$len-$attn-$mode.log" >&2; tail -5 "$OUT/train-$name-$len-$attn-$mode.log" >&2; }
    done
  done
done
"$PY" - "$JSONL" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
table = {}
for r in rows:
    c = r["config"]
    key = (r["dataset"], c["max_len"], "compiled" if c["compile"] else "eager")
    table.setdefault(key, {})[r["model"]] = r["history"][-1]["train_seconds"]
print(f"{'data set':<20} {'len':>5} {'mode':<9} {'SASRec s':>9} {'BlossomRec s':>13} {'ratio':>6}")
for (ds, n, mode), t in table.items():
    s, b = t.get("SASRec"), t.get("BlossomRec")
    ratio = f"{b / s:.2f}x" if s and b else "-"
    print(f"{ds:<20} {n:>5} {mode:<9} {s or float('nan'):>9.2f} {b or float('nan'):>13.2f} {ratio:>6}")
PYEOF

#!/usr/bin/env bash
# Issue 16's run: the training command on 1 and on WORLDS processes (DistributedDataParallel; NCCL
# on GPUs, one per process; gloo with DEVICE=cpu), the same global batch, BlossomRec and SASRec,
# and rows of training throughput and scaling efficiency.
#
#   OUT=/tmp/ddp bash benchmarks/train_ddp.sh        # on a 2-GPU machine: MovieLens 200, Beauty 50
#   DEVICE=cpu MAX_USERS=150 EPOCHS=1 CONFIGS="ml-latest-small:20" bash benchmarks/train_ddp.sh
#
# Env: DATA (default .data), CONFIGS ("name:max_len" pairs), WORLDS ("1 2"), EPOCHS (3), AMP (bf16
# on CUDA, off on the CPU), DEVICE (cuda), MAX_USERS (all), MODELS ("dense blossom"). Every run
# checks after each epoch that all ranks' parameters are bitwise equal (the command raises if not:
# history[].ranks_in_sync). Writes $OUT/train-ddp-runs.jsonl (the command's result rows) and
# $OUT/train-ddp.jsonl (method "train_ddp": world_size, examples_per_s, scaling_efficiency against
# world_size 1, the test metrics, the loss per epoch and the command that ran), and prints a table.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$(mktemp -d /tmp/blossomrec-ddp.XXXXXX)}
DATA=${DATA:-.data}
CONFIGS=${CONFIGS:-ml-latest-small:200 amazon-beauty:50}
WORLDS=${WORLDS:-1 2}
EPOCHS=${EPOCHS:-3}
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS:-dense blossom}
if [ "$DEVICE" = "cpu" ]; then AMP=${AMP:-off}; else AMP=${AMP:-bf16}; fi
PY=${PYTHON:-python3}
RUNS="$OUT/train-ddp-runs.jsonl"
mkdir -p "$OUT"
: > "$OUT/commands.txt"
: > "$RUNS"  # this invocation's runs only (a rerun into the same OUT starts afresh)
for cfg in $CONFIGS; do
  name=${cfg%%:*}; len=${cfg##*:}
  path="$DATA/$name"; [ -e "$path.txt" ] && path="$path.txt"
  extra=(); [ -n "${MAX_USERS:-}" ] && extra=(--max-users "$MAX_USERS")
  for attn in $MODELS; do
    for w in $WORLDS; do
      cmd=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$w"
           -m blossomrec_cuda.rec.train --data "$path" --max-len "$len" --attention "$attn"
           --epochs "$EPOCHS" --amp "$AMP" --device "$DEVICE" --no-progress --jsonl "$RUNS"
           "${extra[@]}")
      echo "${cmd[*]}" >> "$OUT/commands.txt"
      echo "== $name max_len=$len $attn world=$w" >&2
      OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "${cmd[@]}" > "$OUT/train-$name-$len-$attn-w$w.log" 2>&1 \
        || { echo "failed: $OUT/train-$name-$len-$attn-w$w.log" >&2; tail -5 "$OUT/train-$name-$len-$attn-w$w.log" >&2; }
    done
  done
done
"$PY" - "$RUNS" "$OUT/train-ddp.jsonl" "$OUT/commands.txt" <<'PYEOF'
import json, sys
import os
runs = [json.loads(l) for l in open(sys.argv[1])] if os.path.exists(sys.argv[1]) else []
if not runs:
    sys.exit("no run finished: see the train-*.log files")
commands = open(sys.argv[3]).read().splitlines()
base = {}
for r in runs:
    if r["world_size"] == 1:
        base[(r["dataset"], r["config"]["max_len"], r["model"])] = r["examples_per_s"]
rows = []
for r in runs:
    key = (r["dataset"], r["config"]["max_len"], r["model"])
    one = base.get(key)
    w = r["world_size"]
    cmd = next((c for c in commands if f"--nproc_per_node {w} " in c and
                f"--data {r['config']['data']} " in c and
                f"--attention {r['attention']} " in c and f"--max-len {key[1]} " in c), None)
    rows.append(dict(method="train_ddp", model=r["model"], dataset=key[0], max_len=key[1],
                     world_size=w, examples_per_s=r["examples_per_s"],
                     scaling_efficiency=(r["examples_per_s"] / (w * one)) if one else None,
                     test_ndcg10_sampled=r["test"]["sampled"]["ndcg@10"],
                     test_ndcg10_full=r["test"]["full"]["ndcg@10"],
                     train_loss=[h["train_loss"] for h in r["history"]],
                     ranks_in_sync=all(h.get("ranks_in_sync", True) for h in r["history"]),
                     device=r.get("device_name"), torch=r["torch"], commit=r["commit"],
                     batch_size=r["config"]["batch_size"], command=cmd))
with open(sys.argv[2], "a") as f:
    for row in rows:
        f.write(json.dumps(row) + "\n")
print(f"{'data set':<18} {'len':>4} {'model':<11} {'world':>5} {'examples/s':>11} {'eff.':>6} "
      f"{'NDCG@10':>8}  losses")
for row in rows:
    eff = f"{row['scaling_efficiency']:.2f}" if row["scaling_efficiency"] else "-"
    print(f"{row['dataset']:<18} {row['max_len']:>4} {row['model']:<11} {row['world_size']:>5} "
          f"{row['examples_per_s']:>11.0f} {eff:>6} {row['test_ndcg10_sampled']:>8.4f}  "
          + " ".join(f"{x:.4f}" for x in row["train_loss"]))
PYEOF

#!/usr/bin/env bash
# Training throughput and peak RSS of `strata train` against the PyTorch peer (bench/torch_train.py)
# on the same model shapes, batch, threads and OpenBLAS environment, in one run. Random token
# batches (vocab 8192); weights random. Prints a Markdown table and writes JSON lines to OUT.
#   bench/train_bench.sh STRATA_BINARY [OUT.jsonl] [SIZES]   SIZES: any of 10m,50m,200m (default all)
# Environment: THREADS (default 2), BATCH (8), SEQ (256), STEPS (4; the first is not timed),
# SNAPSHOT_EVERY (0: training alone; the snapshot benchmark measures snapshots),
# PRECISIONS (f32: any of f32,bf16; each size runs strata and the peer in each, one after the
# other: strata --precision bf16 against PyTorch's bf16 autocast).
set -euo pipefail
case "${1:-}" in -h|--help|"") sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
STRATA="$1"; OUT="${2:-/tmp/train_bench.jsonl}"; SIZES="${3:-10m,50m,200m}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
THREADS="${THREADS:-2}"; BATCH="${BATCH:-8}"; SEQ="${SEQ:-256}"; STEPS="${STEPS:-4}"
PRECISIONS="${PRECISIONS:-f32}"
VOCAB=8192
WORK="$(mktemp -d /tmp/strata-train-bench-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
: > "$OUT"

source "$HERE/model_sizes.sh"
config() {  # config NAME -> writes $WORK/NAME.json (vocab_size 8192: no tokenizer)
  bench_model_config "$1" > "$WORK/$1.json"
}

# Random pre-tokenized corpus (int32 ids).
/usr/bin/python3 -c "
import numpy as np
np.random.default_rng(0).integers(0, $VOCAB, 2_000_000, dtype=np.int32).astype('<i4').tofile('$WORK/tokens.i32')"

echo "| model | params | precision | system | tokens/s | step s | peak RSS | strata memory report (16 B/param + anchors + workspaces) | RSS / report |"
echo "|---|---|---|---|---|---|---|---|---|"
IFS=, read -ra sizes <<< "$SIZES"
IFS=, read -ra precisions <<< "$PRECISIONS"
for size in "${sizes[@]}"; do
  config "$size"
  for prec in "${precisions[@]}"; do
  "$STRATA" train --config "$WORK/$size.json" --data "$WORK/tokens.i32" --steps "$STEPS" \
    --batch "$BATCH" --seq "$SEQ" --threads "$THREADS" --warmup 1 --json \
    --snapshot-every "${SNAPSHOT_EVERY:-0}" --memory-report --precision "$prec" \
    > "$WORK/strata.jsonl" 2> "$WORK/strata.err" || { cat "$WORK/strata.err"; exit 1; }
  /usr/bin/python3 "$HERE/torch_train.py" --config "$WORK/$size.json" --vocab "$VOCAB" \
    --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --threads "$THREADS" --precision "$prec" \
    > "$WORK/torch.json"
  /usr/bin/python3 - "$size" "$WORK" "$OUT" "$THREADS" "$BATCH" "$SEQ" "$prec" <<'PY'
import json, statistics, sys, re
size, w, out, threads, batch, seq, prec = sys.argv[1:]
rows = [json.loads(l) for l in open(f"{w}/strata.jsonl") if l.strip()]
steady = rows[1:] if len(rows) > 1 else rows
st_s = statistics.median(r["step_s"] for r in steady)
err = open(f"{w}/strata.err").read()
params = int(re.search(r"strata train: (\d+) parameters", err).group(1))
units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
tm = re.search(r"^\s*total\s+([\d.]+) (\w+)", err, re.M)
report = float(tm.group(1)) * units[tm.group(2)] if tm else float("nan")
s = {"system": "strata", "model": size, "params": params, "tokens_per_s": int(batch) * int(seq) / st_s,
     "step_s": st_s, "peak_rss_bytes": max(rows[-1]["peak_rss_bytes"]),
     "threads": int(threads), "batch": int(batch), "seq": int(seq), "precision": prec,
     "memory_report_bytes": report}
t = json.load(open(f"{w}/torch.json"))
t.update({"system": "pytorch", "model": size, "batch": int(batch), "seq": int(seq),
          "precision": prec})
with open(out, "a") as f:
    f.write(json.dumps(s) + "\n" + json.dumps(t) + "\n")
gib = 1 << 30
for r in (s, t):
    extra = (f" {report / gib:.2f} GiB | {r['peak_rss_bytes'] / report:.2f} |"
             if r is s else " | |")
    print(f"| {size} | {r['params'] / 1e6:.1f}M | {prec} | {r['system']} | "
          f"{r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['peak_rss_bytes'] / gib:.2f} GiB |{extra}")
print(f"| {size} | | {prec} | strata / pytorch | {s['tokens_per_s'] / t['tokens_per_s']:.2f}x "
      f"| | | | |")
PY
  done
done

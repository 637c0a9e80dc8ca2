#!/usr/bin/env bash
# AdamW overlapped with the backward (the default with --clip 0) against AdamW after the backward
# (--no-optimizer-overlap), same model, batch, data and threads, interleaved runs. Prints the
# median step time, the optimizer time left after the backward, and the losses' equality.
#   bench/optimizer_overlap_bench.sh STRATA_BINARY [SIZE] [RANKS]   SIZE: 10m, 50m (default), 200m
# Environment: THREADS (per rank; default 2 / RANKS), BATCH (8), SEQ (256), STEPS (5; the first is
# not timed), REPEAT (2: runs of each mode, interleaved).
set -euo pipefail
case "${1:-}" in -h|--help|"") sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
STRATA="$1"; SIZE="${2:-50m}"; RANKS="${3:-1}"
THREADS="${THREADS:-$((2 / RANKS > 0 ? 2 / RANKS : 1))}"; BATCH="${BATCH:-8}"; SEQ="${SEQ:-256}"
STEPS="${STEPS:-5}"; REPEAT="${REPEAT:-2}"
WORK="$(mktemp -d /tmp/strata-overlap-bench-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
source "$(dirname "${BASH_SOURCE[0]}")/model_sizes.sh"
CFG="$(bench_model_config "$SIZE")"
echo "$CFG" > "$WORK/config.json"
/usr/bin/python3 -c "
import numpy as np
np.random.default_rng(0).integers(0, 8192, 1_000_000, dtype=np.int32).astype('<i4').tofile('$WORK/tokens.i32')"
ARGS=(--config "$WORK/config.json" --data "$WORK/tokens.i32" --steps "$STEPS" --batch "$BATCH"
      --seq "$SEQ" --threads "$THREADS" --warmup 1 --clip 0 --snapshot-every 0 --json)
launch() { if [[ "$RANKS" -gt 1 ]]; then mpirun --oversubscribe -np "$RANKS" "$STRATA" train "$@"; else "$STRATA" train "$@"; fi; }
for i in $(seq 1 "$REPEAT"); do
  launch "${ARGS[@]}" > "$WORK/on$i.jsonl" 2> /dev/null
  launch "${ARGS[@]}" --no-optimizer-overlap > "$WORK/off$i.jsonl" 2> /dev/null
done
/usr/bin/python3 - "$WORK" "$REPEAT" "$SIZE" "$RANKS" "$THREADS" <<'PY'
import json, statistics, sys
w, repeat, size, ranks, threads = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
def rows(name):
    return [json.loads(l) for l in open(f"{w}/{name}.jsonl") if l.strip()]
res = {}
for mode in ("on", "off"):
    runs = [rows(f"{mode}{i}") for i in range(1, repeat + 1)]
    step = min(statistics.median(r["step_s"] for r in run[1:]) for run in runs)
    opt = min(statistics.median(r["optimizer_s"] for r in run[1:]) for run in runs)
    res[mode] = (step, opt, [r["loss"] for r in runs[0]])
same = res["on"][2] == res["off"][2]
print(f"{size}, {ranks} rank(s) x {threads} thread(s), --clip 0: step {res['off'][0]:.3f} s with AdamW "
      f"after the backward (optimizer {res['off'][1]:.3f} s), {res['on'][0]:.3f} s overlapped "
      f"(optimizer left after the backward {res['on'][1]:.3f} s): "
      f"{(res['off'][0] / res['on'][0] - 1) * 100:+.1f}% throughput; losses identical: {same}")
PY

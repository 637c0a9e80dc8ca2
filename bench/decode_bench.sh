#!/usr/bin/env bash
# Decode benchmark of `strata infer` on a TinyLlama-1.1B-shaped model, in one run, against the
# bandwidth floor and the PyTorch peer (issue #3, item 7):
#   - `strata bench membw` right before each run (the median pass; bandwidth drifts), with the
#     ranks and threads that run uses;
#   - star allreduce latency of one decode message (hidden floats) per rank count;
#   - for N ranks x dtype x window: TTFT on the prompt, prefill and decode tokens/s, peak RSS
#     and weight wait per rank, and decode as a fraction of the floor
#       floor tokens/s = 1 / (max over ranks of bytes read per token / rank bandwidth
#                             + 2 * layers * allreduce latency);
#   - the PyTorch peer (bench/torch_decode.py, f32, same threads) on the same model.
#
#   bench/decode_bench.sh STRATA_BINARY WORKDIR [OUT.jsonl]
# WORKDIR gets the model (bench/make_bench_model.py, ~4.4 GB) and its shards (kept between runs).
# Environment: RANKS (default "1 2 4"), DTYPES ("f32 q8_0"), WINDOWS ("0 2 4"), MODES ("map"),
# TOKENS (32), THREADS (cores; ranks get THREADS / N each), PEER (1: run the PyTorch peer).
# The shards are read once before timing so that every run finds them in page cache.
set -euo pipefail
STRATA="$1"; WORK="$2"; OUT="${3:-$WORK/decode_bench.jsonl}"
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$SRC/scripts/common.sh"
RANKS="${RANKS:-1 2 4}"; DTYPES="${DTYPES:-f32 q8_0}"; WINDOWS="${WINDOWS:-0 2 4}"
MODES="${MODES:-map}"; TOKENS="${TOKENS:-32}"; THREADS="${THREADS:-$(nproc)}"; PEER="${PEER:-1}"
mkdir -p "$WORK"
: > "$OUT"

if [[ ! -f "$WORK/tl/tokenizer.model" ]]; then
  /usr/bin/python3 "$SRC/tests/reference/make_tiny_llama.py" --out "$WORK/tl" > /dev/null
fi
if [[ ! -f "$WORK/model/config.json" ]]; then
  echo "decode_bench: writing the TinyLlama-shaped model to $WORK/model" >&2
  /usr/bin/python3 "$SRC/bench/make_bench_model.py" --out "$WORK/model" \
    --tokenizer "$WORK/tl/tokenizer.model" >&2
fi
for n in $RANKS; do
  for d in $DTYPES; do
    if [[ ! -d "$WORK/shards-$n-$d" ]]; then
      echo "decode_bench: sharding for $n ranks, $d" >&2
      "$STRATA" shard --model "$WORK/model" --ranks "$n" --dtype "$d" --out "$WORK/shards-$n-$d" >&2
    fi
  done
done
# 129 tokens with the test tokenizer (the same prompt as BENCHMARKS.md section 7).
PROMPT="$(head -c 136 /usr/share/common-licenses/GPL-3 | tr '\n' ' ')"

echo "decode_bench: OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset} OPENBLAS_L2_SIZE=${OPENBLAS_L2_SIZE:-unset} threads=$THREADS" >&2
for n in $RANKS; do
  t=$(( THREADS / n )); (( t >= 1 )) || t=1
  # Open MPI binds each rank to one core when it starts two or fewer: a rank with several
  # threads must be let loose, or its threads share one core.
  BIND=(); (( t > 1 )) && BIND=(--bind-to none)

  if (( n > 1 )); then
    mpirun -np "$n" "$STRATA" bench allreduce --algorithms star --transport mpi --sizes 8192 \
      --iters 200 --json 2>/dev/null \
      | /usr/bin/python3 -c "import json,sys; d=json.load(sys.stdin); r=d['results'][0]; print(json.dumps({'kind':'allreduce','ranks':r['ranks'],'latency_us_median':r['latency_us_median']}))" >> "$OUT"
  fi
  for d in $DTYPES; do
    cat "$WORK/shards-$n-$d"/rank-*.shard > /dev/null   # into page cache
    for w in $WINDOWS; do
      for mode in $MODES; do
        [[ "$w" == 0 && "$mode" != "$(echo $MODES | cut -d' ' -f1)" ]] && continue
        # Bandwidth drifts with host load within minutes: measure it right before each run.
        mpirun -np "$n" "${BIND[@]}" "$STRATA" bench membw --threads "$t" --json 2>/dev/null \
          | tail -1 > "$WORK/membw.json"
        mpirun -np "$n" "${BIND[@]}" -x STRATA_NUM_THREADS="$t" "$STRATA" infer --shards "$WORK/shards-$n-$d" \
          --prompt "$PROMPT" --max-tokens "$TOKENS" --greedy --window "$w" --window-mode "$mode" \
          --json 2> "$WORK/infer.err" | tail -1 \
          | /usr/bin/python3 -c "
import json, sys
d = json.load(sys.stdin); d.pop('text', None)
m = json.load(open('$WORK/membw.json'))
d.update(kind='infer', dtype='$d', threads_per_rank=$t, membw_gbps=m['rank_gbps_median'])
print(json.dumps(d))" >> "$OUT" || { cat "$WORK/infer.err" >&2; exit 1; }
      done
    done
  done
done
if [[ "$PEER" == 1 ]]; then
  /usr/bin/python3 "$SRC/bench/torch_decode.py" --model "$WORK/model" --prompt-tokens 128 \
    --max-tokens "$TOKENS" --threads "$THREADS" \
    | /usr/bin/python3 -c "import json,sys; d=json.load(sys.stdin); d['kind']='torch'; print(json.dumps(d))" >> "$OUT"
fi

/usr/bin/python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ar = {r["ranks"]: r["latency_us_median"] for r in rows if r["kind"] == "allreduce"}
LAYERS = 22
gib = 1 << 30
print("| ranks × threads | dtype | window | mode | TTFT ms | prefill tok/s | decode tok/s | read GB/s per rank (membw, just before) | floor tok/s | % of floor | peak RSS per rank (GiB) | RSS bound 1.2 × budget + 64 MiB (GiB) | weight wait ms |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["kind"] != "infer":
        continue
    n = r["ranks"]
    per_rank_s = [b / (g * 1e9) for b, g in zip(r["weight_bytes_per_token"], r["membw_gbps"])]
    floor_s = max(per_rank_s) + 2 * LAYERS * ar.get(n, 0.0) / 1e6
    floor = 1 / floor_s
    rss = " / ".join(f"{x / gib:.2f}" for x in r["peak_rss_bytes"])
    wait = " / ".join(f"{x:.0f}" for x in r["weight_wait_ms"])
    bound = " / ".join(f"{(1.2 * x + (64 << 20)) / gib:.2f}" for x in r["memory_budget_bytes"])
    print(f"| {n} × {r['threads_per_rank']} | {r['dtype']} | {r['window']} | {r['window_mode']} | "
          f"{r['ttft_ms']:.0f} | {r['prefill_tokens_per_s']:.1f} | **{r['decode_tokens_per_s']:.2f}** | "
          f"{' / '.join(f'{g:.1f}' for g in r['membw_gbps'])} | {floor:.2f} | {100 * r['decode_tokens_per_s'] / floor:.0f}% | {rss} | {bound} | {wait} |")
for r in rows:
    if r["kind"] == "torch":
        print(f"| PyTorch peer 1 × {r.get('threads', '?')} | f32 | all in RAM | – | {r['ttft_ms']:.0f} | "
              f"{r.get('prefill_tokens_per_s', 0):.1f} | **{r['decode_tokens_per_s']:.2f}** | | | | | | |")
print()
for n, a in sorted(ar.items()):
    print(f"- {n} ranks: star allreduce of 8 KiB (one decode message) {a:.1f} µs")
PY

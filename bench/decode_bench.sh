#!/usr/bin/env bash
# Decode benchmark of `strata infer` on a TinyLlama-1.1B-shaped model, in one run, against the
# bandwidth floor and the PyTorch peer (issue #3, item 7). For N ranks x dtype:
#   - the floor: a resident (W = 0) run with --probe-bandwidth, where after every decode token
#     all ranks stream-read a buffer of their weight bytes per token with their threads
#     (`strata bench membw`'s probe, outside the decode timing), so decode and the bandwidth it
#     is held to are measured at the same moments: bandwidth here drifts 2x within seconds, and
#     probes run before and after a whole run disagreed with each other by that much;
#       floor tokens/s = 1 / (max over ranks of bytes read per token / rank bandwidth
#                             + 2 * layers * star allreduce latency of one decode message),
#     rank bandwidth = all probe bytes / all probe pass time (probe_gbps_time_weighted), the
#     same sum over the run's moments that decode's time is; the table also shows the floor
#     from the median pass, which overstates it when bandwidth dips within a run;
#   - for each window W: TTFT on the prompt, prefill and decode tokens/s, peak RSS and weight
#     wait per rank, and decode against the W = 0 run of the same repeat (without the probe);
#   - the PyTorch peer (bench/torch_decode.py, f32, same threads) on the same model.
#
#   bench/decode_bench.sh STRATA_BINARY WORKDIR [OUT.jsonl]
# WORKDIR gets the model (bench/make_bench_model.py, ~4.4 GB) and its shards (kept between runs).
# Environment: RANKS (default "1 2 4"), DTYPES ("f32 q8_0"), WINDOWS ("0 2 4"), MODES ("map"),
# TOKENS (32), THREADS (cores; ranks get THREADS / N each), PEER (1: run the PyTorch peer),
# REPEATS (3: each row runs this many times, alternating with the other windows; the tables
# show medians and every run's figure).
# Before each rank count x dtype the shards' page cache is dropped and read back (2 MiB folios),
# so every run finds them cached.
set -euo pipefail
STRATA="$1"; WORK="$2"; OUT="${3:-$WORK/decode_bench.jsonl}"
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$SRC/scripts/common.sh"
RANKS="${RANKS:-1 2 4}"; DTYPES="${DTYPES:-f32 q8_0}"; WINDOWS="${WINDOWS:-0 2 4}"
MODES="${MODES:-map}"; TOKENS="${TOKENS:-32}"; THREADS="${THREADS:-$(nproc)}"; PEER="${PEER:-1}"
REPEATS="${REPEATS:-3}"
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
# CPU time the hypervisor gave to others while this VM wanted it (/proc/stat's steal column,
# all CPUs, in clock ticks). On a VM it is the noise decode suffers most from: a rank, or one of
# a rank's threads, that loses its core holds up every other at the next allreduce or join. The
# tables show it per run (over the whole mpirun: load, prefill and decode), so a slow run can be
# told from a slow build.
steal_ticks() { awk '/^cpu /{print $9}' /proc/stat; }
CLK_TCK=$(getconf CLK_TCK)
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
    # Into page cache, afresh: drop what earlier writes or reads left (dd's nocache advice) and
    # read it back, so the cache holds 2 MiB folios that the resident mapping can map whole
    # (docs/DECISIONS.md, "Shard blocks aligned to 2 MiB"); the floor table shows the share.
    for f in "$WORK/shards-$n-$d"/rank-*.shard; do dd if="$f" iflag=nocache count=0 status=none; done
    cat "$WORK/shards-$n-$d"/rank-*.shard > /dev/null
    for ((rep = 1; rep <= REPEATS; ++rep)); do
      for w in $WINDOWS; do
        for mode in $MODES; do
          [[ "$w" == 0 && "$mode" != "$(echo $MODES | cut -d' ' -f1)" ]] && continue
          extra=(); kinds=(infer)
          [[ "$w" == 0 ]] && kinds=(infer floor)
          for kind in "${kinds[@]}"; do
            [[ "$kind" == floor ]] && extra=(--probe-bandwidth)
            steal0=$(steal_ticks)
            mpirun -np "$n" "${BIND[@]}" -x STRATA_NUM_THREADS="$t" "$STRATA" infer \
              --shards "$WORK/shards-$n-$d" --prompt "$PROMPT" --max-tokens "$TOKENS" --greedy \
              --window "$w" --window-mode "$mode" "${extra[@]}" --json 2> "$WORK/infer.err" \
              | tail -1 > "$WORK/infer.json" || { cat "$WORK/infer.err" >&2; exit 1; }
            steal=$(( $(steal_ticks) - steal0 ))
            /usr/bin/python3 -c "
import json
d = json.load(open('$WORK/infer.json')); d.pop('text', None)
d.update(kind='$kind', dtype='$d', threads_per_rank=$t, repeat=$rep,
         steal_s=$steal / $CLK_TCK)
print(json.dumps(d))" >> "$OUT"
          done
        done
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
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ar = {r["ranks"]: r["latency_us_median"] for r in rows if r["kind"] == "allreduce"}
LAYERS = 22
gib = 1 << 30
med = statistics.median

def floor_tps(r, key="probe_gbps_time_weighted"):
    per_rank_s = [b / (g * 1e9) for b, g in zip(r["weight_bytes_per_token"], r[key])]
    return 1 / (max(per_rank_s) + 2 * LAYERS * ar.get(r["ranks"], 0.0) / 1e6)

def groups(kind):
    g = {}
    for r in rows:
        if r["kind"] == kind:
            g.setdefault((r["ranks"], r["threads_per_rank"], r["dtype"], r["window"], r["window_mode"]), []).append(r)
    return g

def runs(xs, fmt="{:.0f}"):
    return ", ".join(fmt.format(x) for x in xs)

def steal(rs):  # rows from before the column have none
    return runs([r["steal_s"] for r in rs if "steal_s" in r], "{:.1f}") or "–"

print("Floor (resident, W = 0, probe between tokens):")
print()
print("| ranks × threads | dtype | runs | weights in 2 MiB pages | decode tok/s | read GB/s per rank: time-weighted (median pass) | floor tok/s | % of floor (each run) | % of a floor from the median pass (each run) | CPU steal s (each run) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (n, t, dtype, window, mode), rs in groups("floor").items():
    pct = [100 * r["decode_tokens_per_s"] / floor_tps(r) for r in rs]
    pct_med = [100 * r["decode_tokens_per_s"] / floor_tps(r, "probe_gbps") for r in rs]
    gbps = " / ".join(f"{med(r['probe_gbps_time_weighted'][i] for r in rs):.1f} "
                      f"({med(r['probe_gbps'][i] for r in rs):.1f})" for i in range(n))
    huge = " / ".join(f"{100 * min(r['huge_mapped_fraction'][i] for r in rs):.0f}%" for i in range(n))
    print(f"| {n} × {t} | {dtype} | {len(rs)} | {huge} | {med(r['decode_tokens_per_s'] for r in rs):.2f} | {gbps} | "
          f"{med(floor_tps(r) for r in rs):.2f} | **{med(pct):.0f}%** ({runs(pct)}) | {med(pct_med):.0f}% ({runs(pct_med)}) | "
          f"{steal(rs)} |")
print()
print("Windows (no probe; W / W = 0 pairs runs of the same repeat):")
print()
print("| ranks × threads | dtype | window | mode | runs | TTFT ms | prefill tok/s | decode tok/s (each run) | W / W = 0 (each run) | peak RSS per rank (GiB) | RSS bound 1.2 × budget + 64 MiB (GiB) | weight wait ms | CPU steal s (each run) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
base = {(r["ranks"], r["dtype"], r["repeat"]): r["decode_tokens_per_s"] for r in rows
        if r["kind"] == "infer" and r["window"] == 0}
for (n, t, dtype, window, mode), rs in groups("infer").items():
    tps = [r["decode_tokens_per_s"] for r in rs]
    ratio = [r["decode_tokens_per_s"] / base[(n, dtype, r["repeat"])] for r in rs
             if (n, dtype, r["repeat"]) in base]
    rss = " / ".join(f"{max(r['peak_rss_bytes'][i] for r in rs) / gib:.2f}" for i in range(n))
    wait = " / ".join(f"{med(r['weight_wait_ms'][i] for r in rs):.0f}" for i in range(n))
    bound = " / ".join(f"{(1.2 * x + (64 << 20)) / gib:.2f}" for x in rs[-1]["memory_budget_bytes"])
    ratio_s = f"**{med(ratio):.2f}** ({runs(ratio, '{:.2f}')})" if window != 0 else "–"
    print(f"| {n} × {t} | {dtype} | {window} | {mode} | {len(rs)} | {med(r['ttft_ms'] for r in rs):.0f} | "
          f"{med(r['prefill_tokens_per_s'] for r in rs):.1f} | **{med(tps):.2f}** ({runs(tps, '{:.1f}')}) | "
          f"{ratio_s} | {rss} | {bound} | {wait} | {steal(rs)} |")
for r in rows:
    if r["kind"] == "torch":
        print(f"| PyTorch peer 1 × {r.get('threads', '?')} | f32 | all in RAM | – | 1 | {r['ttft_ms']:.0f} | "
              f"{r.get('prefill_tokens_per_s', 0):.1f} | **{r['decode_tokens_per_s']:.2f}** | | | | | |")
print()
for n, a in sorted(ar.items()):
    print(f"- {n} ranks: star allreduce of 8 KiB (one decode message) {a:.1f} µs")
PY

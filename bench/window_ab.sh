#!/usr/bin/env bash
# A/B of two strata builds in map mode (BENCHMARKS.md §16): for each "RANKS:DTYPE" in CONFIGS,
# REPS rounds of OLD at W = 4, NEW at W = 4 and OLD at W = 0 (resident), 32 greedy tokens, one
# line of decode tok/s and CPU steal ticks per run. WORK holds decode_bench.sh's shards.
#   bench/window_ab.sh OLD_BINARY NEW_BINARY [WORK]   (env: REPS=6, CONFIGS="1:f32 2:f32")
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
OLD=$1; NEW=$2; WORK=${3:-/tmp/db}; REPS=${REPS:-6}; CONFIGS=${CONFIGS:-"1:f32 2:f32"}
PROMPT="$(head -c 136 /usr/share/common-licenses/GPL-3 | tr '\n' ' ')"
steal() { awk '/^cpu /{print $9}' /proc/stat; }
for cfg in $CONFIGS; do
  n=${cfg%%:*}; d=${cfg##*:}; t=$((2 / n)); BIND=(); ((t > 1)) && BIND=(--bind-to none)
  cat $WORK/shards-$n-$d/rank-*.shard > /dev/null
  for ((r = 1; r <= REPS; ++r)); do
    for spec in "old:$OLD:4" "new:$NEW:4" "old:$OLD:0"; do
      IFS=: read name bin w <<< "$spec"
      s0=$(steal)
      tps=$(mpirun -np $n "${BIND[@]}" -x STRATA_NUM_THREADS=$t $bin infer --shards $WORK/shards-$n-$d \
        --prompt "$PROMPT" --max-tokens 32 --greedy --window $w --window-mode map --json 2>/dev/null | tail -1 |
        /usr/bin/python3 -c "import json,sys; print(round(json.load(sys.stdin)['decode_tokens_per_s'],3))")
      echo "$n x $t $d rep $r $name W$w $tps steal $(( $(steal) - s0 ))"
    done
  done
done

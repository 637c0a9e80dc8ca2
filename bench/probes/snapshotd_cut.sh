#!/usr/bin/env bash
# Probe behind BENCHMARKS §11 (a snapshotd cut off its peers): 3 namespace nodes x 2 ranks,
# node 2's snapshotd cut off by ip rule prohibit after step 30 for CUT_S seconds; then a crash
# and the resume, and the snapshotd log lines. STEPS, CUT_S, PEER (timeout s), STRATA.
# EC mode (3 netns nodes, 2 ranks each): node 2's snapshotd cut off from its peers (ip rule prohibit on the snapshotd port) while MPI keeps working
set -uo pipefail
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
STRATA=${STRATA:-$(cd "$(dirname "$0")/../.." && pwd)/build/launcher/strata}; SRC=$(cd "$(dirname "$0")/../.." && pwd)
TAG=h8x; export STRATA_NETNS_PREFIX="$TAG-h" STRATA_NETNS_STATE="/tmp/strata-netns-$TAG"
CLUSTER="$SRC/scripts/netns-cluster.sh"
WORK=/tmp/h7/p; rm -rf $WORK; mkdir -p $WORK
"$CLUSTER" up 3 > /dev/null
/usr/bin/python3 "$SRC/tests/reference/make_tiny_llama.py" --out "$WORK/model" > /dev/null
for i in 1 2 3; do cat "$SRC/README.md"; done > "$WORK/corpus.txt"
STEPS=${STEPS:-3000}
ARGS=(--model "$WORK/model" --data "$WORK/corpus.txt" --steps $STEPS --batch 6 --seq 32 --lr 3e-3 --warmup 1 --json --threads 1)
launch() { timeout 400 "$CLUSTER" run 3 2 -- "$STRATA" train "${ARGS[@]}" "$@"; }
run="$TAG-r$$"; t0=$(date +%s.%N)
STRATA_SNAPSHOTD_PEER_TIMEOUT_S=${PEER:-30} launch --run $run --fail-at-step $((STEPS-50)) --fail-rank 2 > $WORK/live.jsonl 2> $WORK/live.err &
bg=$!
until [[ $(grep -c '"step"' $WORK/live.jsonl 2>/dev/null || true) -ge 30 ]]; do kill -0 $bg 2>/dev/null || break; sleep 0.02; done
port=$(sed -n 's/.*snapshotd peers [0-9.]*:\([0-9]*\),.*/\1/p' $WORK/live.err | head -1)
echo "cut at step $(grep -c '"step"' $WORK/live.jsonl), port $port"
ip netns exec ${STRATA_NETNS_PREFIX}1 ip rule add to 198.18.0.2 ipproto tcp dport $port prohibit
ip netns exec ${STRATA_NETNS_PREFIX}3 ip rule add to 198.18.0.2 ipproto tcp dport $port prohibit
ip netns exec ${STRATA_NETNS_PREFIX}2 ip rule add ipproto tcp dport $port prohibit
sleep ${CUT_S:-45}
healed=$(grep -c '"step"' $WORK/live.jsonl); echo "healed at step $healed"
for i in 1 2 3; do ip netns exec ${STRATA_NETNS_PREFIX}$i ip rule del prio 32765; done
wait $bg; rc=$?; t1=$(date +%s.%N)
echo "rc=$rc wall=$(echo "$t1-$t0"|bc) steps=$(grep -c '"step"' $WORK/live.jsonl)"
grep -v '^{' $WORK/live.err | grep -v "^step\|^---\|^ \|^$" | tail -6
STRATA_SNAPSHOTD_PEER_TIMEOUT_S=${PEER:-30} launch --run $run --resume auto > $WORK/res.jsonl 2> $WORK/res.err; echo "resume rc=$?"; grep -i "resumed" $WORK/res.err
grep -h "cannot commit\|committed across the group again\|withdrawn" /tmp/strata-snapshotd-$run*.log | cut -c1-250 | head
python3 - $WORK/live.jsonl <<'PY'
import json,sys
rows=[json.loads(l) for l in open(sys.argv[1])]
t=sorted(r['tokens_per_s'] for r in rows); med=t[len(t)//2]
print("median tok/s",med,"slow steps",[(r['step'],round(r['tokens_per_s'])) for r in rows if r['tokens_per_s']<0.1*med][:10])
PY
for i in 1 2 3; do ip netns exec "${STRATA_NETNS_PREFIX}$i" "$STRATA" chaos kill-node --run "$run" --shm-tag "n$((i-1))" >/dev/null 2>&1; done
"$CLUSTER" down 3 > /dev/null

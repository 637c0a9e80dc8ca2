#!/usr/bin/env bash
# Node loss on a job of 3 "nodes" (network namespaces, scripts/netns-cluster.sh), 2 ranks each,
# snapshots erasure-coded across the nodes (strata train's default for 3 nodes: k=2, m=1). Each
# scenario takes whole nodes down in the middle of training (strata chaos kill-node: every
# process of the run in the namespace, its snapshotd included, and its shared memory), relaunches
# with --resume auto and checks the loss of every later step and the saved model byte for byte
# against an unbroken run:
#  1. one node lost: its snapshot is rebuilt by erasure decoding from the 2 surviving nodes;
#  2. two nodes lost (more than m): the relaunch falls back to the version persisted on disk,
#     and says why;
#  3. a rank crashes and the snapshotd of its node is SIGKILLed too (strata chaos
#     kill-snapshotd): the node's new snapshotd recovers the version from the shared memory left
#     behind;
#  4. a rank crashes and a byte of a committed snapshot on its node is corrupted (strata chaos
#     corrupt): the resume's checksum catches it and the node's snapshotd repairs the bytes from
#     the other nodes' parity;
#  5. a snapshotd is SIGKILLed while training runs: the node's ranks start a new one and
#     snapshots go on being erasure-coded, so a later rank crash resumes from a version taken
#     after the kill;
#  6. (only with STRATA_TEST_SNAPSHOTD_CUT=1) node 2's snapshotd is cut off from its peers while
#     MPI keeps working (an `ip rule ... prohibit` on the snapshotd port in every namespace):
#     training goes on with snapshots kept on each node, erasure coding resumes once the cut is
#     lifted, and a later rank crash resumes from a version taken after that, with the losses of
#     an unbroken run. Not in CI yet: in about one run in eight here the group did not recover
#     after the cut was lifted, training stopped and the run hit its 120 s timeout (not
#     understood yet; the mechanism itself is covered by snapshot_ec_test's UnreachablePeer /
#     SilentPeer cases, which are in CI).
# Exits 77 (CTest: skipped) when network namespaces cannot be created here.
#   train_ec_fault_test.sh STRATA_BINARY SOURCE_DIR
set -euo pipefail
STRATA="$1"; SRC="$2"
NODES=3; SLOTS=2; STEPS=150
TAG="ec$$"
export STRATA_NETNS_PREFIX="$TAG-h" STRATA_NETNS_STATE="/tmp/strata-netns-$TAG"
CLUSTER="$SRC/scripts/netns-cluster.sh"
WORK="$(mktemp -d /tmp/strata-train-ec-fault-XXXXXX)"
RUNS=("$TAG-a" "$TAG-b" "$TAG-c" "$TAG-d" "$TAG-e" "$TAG-f")
BG=""  # pid of a launch running in the background

cleanup() {
  set +e
  if [[ -n "$BG" ]]; then kill "$BG" 2> /dev/null; wait "$BG" 2> /dev/null; fi
  if [[ -d "$STRATA_NETNS_STATE" ]]; then
    for i in $(seq 1 $NODES); do
      for run in "${RUNS[@]}"; do
        ip netns exec "$STRATA_NETNS_PREFIX$i" "$STRATA" chaos kill-node --run "$run" \
          --shm-tag "n$((i - 1))" > /dev/null 2>&1
      done
    done
    "$CLUSTER" down $NODES > /dev/null 2>&1
  fi
  for run in "${RUNS[@]}"; do rm -f /tmp/strata-snapshotd-"$run".*; done
  rm -rf "$WORK"
}
trap cleanup EXIT

if [[ $(id -u) -ne 0 ]] || ! ip netns add "$TAG-probe" 2> /dev/null; then
  echo "train_ec_fault_test: cannot create network namespaces here (needs root and iproute2); skipped"
  exit 77
fi
ip netns del "$TAG-probe"
"$CLUSTER" up $NODES > /dev/null

/usr/bin/python3 "$SRC/tests/reference/make_tiny_llama.py" --out "$WORK/model" > /dev/null
for i in 1 2 3; do cat "$SRC/README.md"; done > "$WORK/corpus.txt"
ARGS=(--model "$WORK/model" --data "$WORK/corpus.txt" --steps $STEPS --batch 6 --seq 32
      --lr 3e-3 --warmup 1 --json --threads 1)
launch() { timeout 120 "$CLUSTER" run $NODES $SLOTS -- "$STRATA" train "${ARGS[@]}" "$@"; }

launch --snapshot-every 0 --save "$WORK/full" > "$WORK/full.jsonl" 2> "$WORK/full.err" ||
  { cat "$WORK/full.err"; exit 1; }

# broken RUN NAME NODE... [-- extra args]: trains in the background and, once step 5 is done,
# takes the given nodes (1-based namespaces) down; the launch must fail.
broken() {
  local run="$1" name="$2"; shift 2
  local nodes=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do nodes+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift
  launch --run "$run" "$@" > "$WORK/$name.jsonl" 2> "$WORK/$name.err" &
  BG=$!
  local deadline=$((SECONDS + 60))
  until [[ $(grep -c '"step"' "$WORK/$name.jsonl" 2> /dev/null || true) -ge 5 ]]; do
    kill -0 "$BG" 2> /dev/null || break
    ((SECONDS < deadline)) || break
    sleep 0.01
  done
  for i in "${nodes[@]}"; do
    ip netns exec "$STRATA_NETNS_PREFIX$i" "$STRATA" chaos kill-node --run "$run" >> "$WORK/$name.chaos"
  done
  if wait "$BG"; then
    BG=""
    echo "train_ec_fault_test: $name: the run finished before nodes ${nodes[*]} went down"
    cat "$WORK/$name.err"; exit 1
  fi
  BG=""
  local done_steps
  done_steps=$(grep -c '"step"' "$WORK/$name.jsonl" || true)
  echo "train_ec_fault_test: $name: nodes ${nodes[*]} taken down after step $done_steps of $STEPS:"
  sed 's/^/  /' "$WORK/$name.chaos"
}
crash() {  # crash RUN NAME STEP RANK: rank RANK is SIGKILLed after step STEP; the launch fails
  local run="$1" name="$2" step="$3" rank="$4"
  if launch --run "$run" --fail-at-step "$step" --fail-rank "$rank" \
      > "$WORK/$name.jsonl" 2> "$WORK/$name.err"; then
    echo "train_ec_fault_test: $name: the run survived its rank crash"; cat "$WORK/$name.err"; exit 1
  fi
}
resume() {  # resume RUN NAME [extra args]
  local run="$1" name="$2"; shift 2
  launch --run "$run" --resume auto --save "$WORK/$name" "$@" \
    > "$WORK/$name.jsonl" 2> "$WORK/$name.err" ||
    { cat "$WORK/$name.err" "$WORK"/*.chaos /tmp/strata-snapshotd-"$run".log;
      [[ -d "$WORK/disk" ]] && find "$WORK/disk" | sort; exit 1; }
}
same_as_full() {  # same_as_full NAME PATTERN: resumed with PATTERN in the message, then identical
  local name="$1" pattern="$2" step
  step=$(sed -n 's/.* resumed after step \([0-9]*\) from .*/\1/p' "$WORK/$name.err" | head -1)
  [[ -n "$step" ]] && grep -q "resumed after step $step from .*$pattern" "$WORK/$name.err" ||
    { echo "train_ec_fault_test: $name did not resume from $pattern:"; cat "$WORK/$name.err";
      cat "$WORK"/*.chaos /tmp/strata-snapshotd-"$TAG"-*.log; exit 1; }
  /usr/bin/python3 - "$WORK/full.jsonl" "$WORK/$name.jsonl" "$step" "$STEPS" <<'PY'
import json, sys
full = {r["step"]: r["loss"] for r in map(json.loads, open(sys.argv[1]))}
got = {r["step"]: r["loss"] for r in map(json.loads, open(sys.argv[2]))}
first, steps = int(sys.argv[3]) + 1, int(sys.argv[4])
assert sorted(got) == list(range(first, steps + 1)), sorted(got)
for s, loss in got.items():
    assert loss == full[s], f"step {s}: {loss!r} after the resume, {full[s]!r} unbroken"
PY
  cmp "$WORK/full/model.safetensors" "$WORK/$name/model.safetensors" ||
    { echo "train_ec_fault_test: $name's final weights differ from the unbroken run's"; exit 1; }
  echo "train_ec_fault_test: $name resumed after step $step ($pattern): losses of steps" \
       "$((step + 1))..$STEPS and final weights identical to the unbroken run"
}

# 1. One node of three lost: rebuilt from the other two (data + parity).
broken "$TAG-a" one-node-lost 2
resume "$TAG-a" one-node-rebuilt
same_as_full one-node-rebuilt "node 1 rebuilt by erasure decoding from 2 surviving nodes"
grep "rebuilt by erasure decoding (k=2 m=1" "$WORK/one-node-rebuilt.err" ||
  { echo "train_ec_fault_test: no rebuild details"; cat "$WORK/one-node-rebuilt.err"; exit 1; }

# 2. Two nodes of three lost, more than the one parity node covers: back to disk.
DISK=(--snapshot-dir "$WORK/disk" --persist-every 2)
broken "$TAG-b" two-nodes-lost 2 3 -- "${DISK[@]}"
resume "$TAG-b" two-nodes-disk "${DISK[@]}"
same_as_full two-nodes-disk "disk"
grep "resumed from disk because nodes 1,2 lost their snapshot memory" "$WORK/two-nodes-disk.err" ||
  { echo "train_ec_fault_test: the disk fallback did not say why"; cat "$WORK/two-nodes-disk.err"; exit 1; }
# 3. A rank of node 2 crashes, then node 2's snapshotd is killed as well.
crash "$TAG-c" rank-crash 5 2
ip netns exec "${STRATA_NETNS_PREFIX}2" "$STRATA" chaos kill-snapshotd --run "$TAG-c" --shm-tag n1
resume "$TAG-c" snapshotd-killed
same_as_full snapshotd-killed "snapshotd memory"

# 4. A rank of node 2 crashes and a byte of its node's snapshot rots: repaired from parity.
crash "$TAG-d" rank-crash-2 5 3
ip netns exec "${STRATA_NETNS_PREFIX}2" "$STRATA" chaos corrupt --run "$TAG-d" --shm-tag n1 \
  --rank 3 --section adam_m --byte 100
resume "$TAG-d" corrupt-repaired
same_as_full corrupt-repaired "snapshotd memory"
grep "rank 3: .*section 'adam_m'.*rebuilt in place by erasure decoding (k=2 m=1) from nodes 0,2" \
    "$WORK/corrupt-repaired.err" ||
  { echo "train_ec_fault_test: the corrupted snapshot was not reported repaired";
    cat "$WORK/corrupt-repaired.err"; exit 1; }
# 5. Node 2's snapshotd dies while the job trains on; a rank crashes much later.
launch --run "$TAG-e" --fail-at-step 120 --fail-rank 2 > "$WORK/live.jsonl" 2> "$WORK/live.err" &
BG=$!
until [[ $(grep -c '"step"' "$WORK/live.jsonl" 2> /dev/null || true) -ge 20 ]]; do
  kill -0 "$BG" 2> /dev/null || break
  sleep 0.01
done
killed_after=$(grep -c '"step"' "$WORK/live.jsonl" || true)  # the kill lands after this step
ip netns exec "${STRATA_NETNS_PREFIX}2" "$STRATA" chaos kill-snapshotd --run "$TAG-e" --shm-tag n1
if wait "$BG"; then
  BG=""; echo "train_ec_fault_test: the run survived its rank crash"; cat "$WORK/live.err"; exit 1
fi
BG=""
resume "$TAG-e" live-snapshotd-killed
same_as_full live-snapshotd-killed "snapshotd memory"
step=$(sed -n 's/.* resumed after step \([0-9]*\) from .*/\1/p' "$WORK/live-snapshotd-killed.err" | head -1)
((step > killed_after + 10)) ||
  { echo "train_ec_fault_test: snapshots stopped when node 2's snapshotd was killed after step" \
         "$killed_after (resumed after step $step)"; cat "$WORK/live.err"; exit 1; }
echo "train_ec_fault_test: node 2's snapshotd killed after step $killed_after; snapshots went on" \
     "(resumed after step $step)"

if [[ "${STRATA_TEST_SNAPSHOTD_CUT:-0}" != 1 ]]; then
  echo "train_ec_fault_test: passed (scenario 6, the snapshotd cut, runs with STRATA_TEST_SNAPSHOTD_CUT=1)"
  exit 0
fi
# 6. Node 2's snapshotd cut off from the other snapshotds (not from MPI) for a while.
LONG_STEPS=1500
LONG=(--model "$WORK/model" --data "$WORK/corpus.txt" --steps $LONG_STEPS --batch 6 --seq 32
      --lr 3e-3 --warmup 1 --json --threads 1)
timeout 120 "$CLUSTER" run $NODES $SLOTS -- "$STRATA" train "${LONG[@]}" --snapshot-every 0 \
  > "$WORK/long-full.jsonl" 2> /dev/null
STRATA_SNAPSHOTD_PEER_TIMEOUT_S=2 timeout 120 "$CLUSTER" run $NODES $SLOTS -- "$STRATA" train \
  "${LONG[@]}" --run "$TAG-f" --fail-at-step 1400 --fail-rank 2 \
  > "$WORK/cut.jsonl" 2> "$WORK/cut.err" &
BG=$!
until [[ $(grep -c '"step"' "$WORK/cut.jsonl" 2> /dev/null || true) -ge 30 ]]; do
  kill -0 "$BG" 2> /dev/null || break
  sleep 0.01
done
port=$(sed -n 's/.*snapshotd peers [0-9.]*:\([0-9]*\),.*/\1/p' "$WORK/cut.err" | head -1)
[[ -n "$port" ]] || { echo "train_ec_fault_test: no snapshotd port in:"; cat "$WORK/cut.err"; exit 1; }
for i in 1 3; do
  ip netns exec "$STRATA_NETNS_PREFIX$i" ip rule add to 198.18.0.2 ipproto tcp dport "$port" prohibit
done
ip netns exec "${STRATA_NETNS_PREFIX}2" ip rule add ipproto tcp dport "$port" prohibit
cut_at=$(grep -c '"step"' "$WORK/cut.jsonl" || true)
until [[ $(grep -c '"step"' "$WORK/cut.jsonl" 2> /dev/null || true) -ge $((cut_at + 300)) ]]; do
  kill -0 "$BG" 2> /dev/null || break
  sleep 0.01
done
healed_at=$(grep -c '"step"' "$WORK/cut.jsonl" || true)
for i in 1 2 3; do
  ip netns exec "$STRATA_NETNS_PREFIX$i" ip rule del ipproto tcp dport "$port" prohibit 2> /dev/null ||
    ip netns exec "$STRATA_NETNS_PREFIX$i" ip rule del to 198.18.0.2 ipproto tcp dport "$port" prohibit
done
rc=0; wait "$BG" || rc=$?
BG=""
if ((rc == 0 || rc == 124)); then
  echo "train_ec_fault_test: the run with the cut $([[ $rc == 0 ]] && echo "survived its rank crash" ||
        echo "did not finish within 120 s (snapshots slowed training down)"):"
  cat "$WORK/cut.err"; cat /tmp/strata-snapshotd-"$TAG-f".*log; exit 1
fi
((healed_at > cut_at + 200 && healed_at < 1400)) ||
  { echo "train_ec_fault_test: training stopped while the snapshotds were cut off (cut after step" \
         "$cut_at, $healed_at steps when lifted)"; cat "$WORK/cut.err"; exit 1; }
grep -q "cannot commit across the group" /tmp/strata-snapshotd-"$TAG-f".*log ||
  { echo "train_ec_fault_test: no snapshotd noticed the cut"; cat /tmp/strata-snapshotd-"$TAG-f".*log; exit 1; }
STRATA_SNAPSHOTD_PEER_TIMEOUT_S=2 timeout 120 "$CLUSTER" run $NODES $SLOTS -- "$STRATA" train \
  "${LONG[@]}" --run "$TAG-f" --resume auto > "$WORK/cut-resumed.jsonl" 2> "$WORK/cut-resumed.err" ||
  { echo "train_ec_fault_test: the resume after the cut failed:"; cat "$WORK/cut-resumed.err";
    cat /tmp/strata-snapshotd-"$TAG-f".*log; exit 1; }
step=$(sed -n 's/.* resumed after step \([0-9]*\) from snapshotd memory.*/\1/p' "$WORK/cut-resumed.err" | head -1)
[[ -n "$step" ]] && ((step > healed_at)) ||
  { echo "train_ec_fault_test: erasure-coded snapshots did not resume after the cut was lifted" \
         "at step $healed_at:"; cat "$WORK/cut-resumed.err"; exit 1; }
/usr/bin/python3 - "$WORK/long-full.jsonl" "$WORK/cut.jsonl" "$WORK/cut-resumed.jsonl" "$step" "$LONG_STEPS" <<'PY'
import json, sys
full = {r["step"]: r["loss"] for r in map(json.loads, open(sys.argv[1]))}
before = {r["step"]: r["loss"] for r in map(json.loads, open(sys.argv[2]))}
after = {r["step"]: r["loss"] for r in map(json.loads, open(sys.argv[3]))}
first, steps = int(sys.argv[4]) + 1, int(sys.argv[5])
assert sorted(after) == list(range(first, steps + 1)), sorted(after)
for s, loss in list(before.items()) + list(after.items()):
    assert loss == full[s], f"step {s}: {loss!r}, unbroken {full[s]!r}"
PY
echo "train_ec_fault_test: snapshotds cut off after step $cut_at, lifted after step $healed_at;" \
     "training went on, and resumed after step $step with the losses of an unbroken run"
echo "train_ec_fault_test: passed"

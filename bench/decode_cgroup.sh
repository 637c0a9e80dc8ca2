#!/usr/bin/env bash
# The edge case for real (issue #3): 2 ranks, each confined by a memory cgroup (v1 controller,
# which charges page cache too) to W blocks + resident tensors + KV cache + 256 MiB, generate
# from the f32 TinyLlama-shaped model (~4.4 GB, far beyond the limit). The disk, not memory, is
# then the floor: the script measures the disk's O_DIRECT read bandwidth in the same run and
# prints the decode speed next to the decode floor it implies.
#
#   bench/decode_cgroup.sh STRATA_BINARY SHARD_DIR [OUT.json]
# SHARD_DIR: `strata shard --ranks 2` output (decode_bench.sh leaves WORKDIR/shards-2-f32).
# Environment: WINDOW (4), TOKENS (16), MODE (copy), DIRECT (1: --direct-io), SLACK_MIB (256).
# Needs root and /sys/fs/cgroup/memory (cgroup v1 memory controller); removes its groups.
set -euo pipefail
STRATA="$1"; SHARDS="$2"; OUT="${3:-/tmp/decode_cgroup.json}"
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$SRC/scripts/common.sh"
WINDOW="${WINDOW:-4}"; TOKENS="${TOKENS:-16}"; MODE="${MODE:-copy}"; DIRECT="${DIRECT:-1}"
SLACK_MIB="${SLACK_MIB:-256}"
CG=/sys/fs/cgroup/memory
[[ -w "$CG" ]] || { echo "decode_cgroup: $CG is not writable (needs root and cgroup v1 memory)" >&2; exit 2; }
TAG="strata-decode-$$"
WORK="$(mktemp -d /tmp/strata-decode-cg-XXXXXX)"
cleanup() {
  for r in 0 1; do
    if [[ -d "$CG/$TAG-r$r" ]]; then
      # Move anything left back to the root group so the group can go.
      while read -r p; do echo "$p" > "$CG/cgroup.procs" 2>/dev/null || true; done < "$CG/$TAG-r$r/cgroup.procs"
      rmdir "$CG/$TAG-r$r" 2>/dev/null || true
    fi
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
PROMPT="$(head -c 136 /usr/share/common-licenses/GPL-3 | tr '\n' ' ')"
DIO=(); [[ "$DIRECT" == 1 ]] && DIO=(--direct-io)

# 1. Each rank's budget (W largest blocks + resident + KV), from a 1-token run.
mpirun -np 2 "$STRATA" infer --shards "$SHARDS" --prompt "x" --max-tokens 1 --greedy \
  --window "$WINDOW" --window-mode "$MODE" "${DIO[@]}" --json 2> "$WORK/probe.err" | tail -1 > "$WORK/probe.json" \
  || { cat "$WORK/probe.err" >&2; exit 1; }
read -r B0 B1 < <(/usr/bin/python3 -c "import json; d=json.load(open('$WORK/probe.json')); print(*d['memory_budget_bytes'])")
L0=$(( B0 + SLACK_MIB * 1048576 )); L1=$(( B1 + SLACK_MIB * 1048576 ))

# 2. The disk's read bandwidth for this file, without the page cache.
/usr/bin/python3 -c "
import os, sys
for f in sys.argv[1:]:
    fd = os.open(f, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
" "$SHARDS"/rank-*.shard   # the shards leave the page cache: the run starts cold
# Both ranks read at once, so the disk is measured that way too: one O_DIRECT dd per shard file
# (whole file, 8 MiB requests) in parallel; the aggregate is what the two ranks share. Measured
# before the run (cold) and after it (the state the run's later tokens saw: a virtual disk may be
# served from the host's cache once read).
disk_gbps() {
  for r in 0 1; do
    dd if="$SHARDS/rank-$r.shard" of=/dev/null bs=8M iflag=direct 2> "$WORK/dd$r.txt" &
  done
  wait
  cat "$WORK"/dd0.txt "$WORK"/dd1.txt | awk '/copied/ {b += $1; if ($(NF-3) > t) t = $(NF-3)} END {print b / t / 1e9}'
}
DISK_COLD=$(disk_gbps)

# 3. The confined run: each rank moves itself into its group before exec.
for r in 0 1; do
  mkdir "$CG/$TAG-r$r"
  v=$L0; [[ $r == 1 ]] && v=$L1
  echo "$v" > "$CG/$TAG-r$r/memory.limit_in_bytes"
done
cat > "$WORK/confine.sh" <<EOF
#!/bin/sh
echo \$\$ > "$CG/$TAG-r\${OMPI_COMM_WORLD_RANK}/cgroup.procs" || exit 97
exec "\$@"
EOF
chmod +x "$WORK/confine.sh"
mpirun -np 2 -x STRATA_NUM_THREADS=1 "$WORK/confine.sh" "$STRATA" infer --shards "$SHARDS" \
  --prompt "$PROMPT" --max-tokens "$TOKENS" --greedy --window "$WINDOW" --window-mode "$MODE" \
  "${DIO[@]}" --json 2> "$WORK/run.err" | tail -1 > "$WORK/run.json" \
  || { cat "$WORK/run.err" >&2; exit 1; }
DISK_GBPS=$(disk_gbps)
MAX0=$(cat "$CG/$TAG-r0/memory.max_usage_in_bytes"); MAX1=$(cat "$CG/$TAG-r1/memory.max_usage_in_bytes")

/usr/bin/python3 - "$WORK/run.json" "$OUT" "$L0" "$L1" "$MAX0" "$MAX1" "$DISK_GBPS" "$WINDOW" "$MODE" "$DIRECT" "$DISK_COLD" <<'PY'
import json, sys
run, out, l0, l1, m0, m1, disk, w, mode, direct, cold = sys.argv[1:]
d = json.load(open(run)); d.pop("text", None)
gib = 1 << 30
disk = float(disk)
# Disk floor: the slower rank's bytes per token at the disk bandwidth (both ranks share the disk).
floor = disk * 1e9 / sum(d["weight_bytes_per_token"])
res = {"kind": "infer_cgroup", "window": int(w), "mode": mode, "direct_io": direct == "1",
       "cgroup_limit_bytes": [int(l0), int(l1)], "cgroup_max_usage_bytes": [int(m0), int(m1)],
       "disk_read_gbps": disk, "disk_read_gbps_cold": float(cold),
       "disk_floor_tokens_per_s": floor, **d}
open(out, "w").write(json.dumps(res) + "\n")
print(f"| 2 × 1 | f32 | {w} ({mode}{', O_DIRECT' if direct == '1' else ''}) | "
      f"{int(l0) / gib:.2f} / {int(l1) / gib:.2f} | {int(m0) / gib:.2f} / {int(m1) / gib:.2f} | "
      f"{' / '.join(f'{x / gib:.2f}' for x in d['peak_rss_bytes'])} | {d['ttft_ms']:.0f} | "
      f"**{d['decode_tokens_per_s']:.2f}** | {float(cold):.2f} / {disk:.2f} GB/s | {floor:.2f} |")
PY

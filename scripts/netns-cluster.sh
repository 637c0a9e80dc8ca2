#!/usr/bin/env bash
# Several "nodes" on one machine: network namespaces joined by a bridge, addresses in the
# benchmarking range 198.18.0.0/15, and an Open MPI launch agent that starts ranks inside them.
#
#   scripts/netns-cluster.sh up N [RATE]     create nodes strata-h1..strata-hN (198.18.0.1..N);
#                                            RATE (e.g. 1gbit) shapes each node's link with tbf
#   scripts/netns-cluster.sh run N SLOTS -- CMD...
#                                            mpirun N*SLOTS ranks across the nodes, SLOTS per node
#   scripts/netns-cluster.sh down N          delete the namespaces (and with them their links)
#
# Example:
#   scripts/netns-cluster.sh up 4
#   scripts/netns-cluster.sh run 4 1 -- build/launcher/strata bench allreduce --transport tcp
#   scripts/netns-cluster.sh down 4
# netem is not available on every kernel, so link latency is emulated by the tcp transport
# instead: STRATA_LINK_DELAY_US=1000 (reported as EMULATED in results). Needs root.
# STRATA_NETNS_PREFIX (default strata-h) and STRATA_NETNS_STATE name the nodes and the state
# folder, so that a test can run its own cluster next to someone else's.
set -euo pipefail
STATE="${STRATA_NETNS_STATE:-/tmp/strata-netns}"
PREFIX="${STRATA_NETNS_PREFIX:-strata-h}"
if [[ "$PREFIX" == strata-h ]]; then SWITCH=strata-sw; else SWITCH="${PREFIX}sw"; fi

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 2 ]] || usage
cmd="$1"; n="$2"; shift 2
[[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 && "$n" -le 200 ]] || { echo "N must be 1..200" >&2; exit 2; }

up() {
  local rate="${1:-}"
  ip netns add "$SWITCH"
  ip -n "$SWITCH" link add br0 type bridge
  ip -n "$SWITCH" link set br0 up
  for i in $(seq 1 "$n"); do
    local h="$PREFIX$i"
    ip netns add "$h"
    ip link add veth0 netns "$h" type veth peer name "p$i" netns "$SWITCH"
    ip -n "$SWITCH" link set "p$i" master br0
    ip -n "$SWITCH" link set "p$i" up
    ip -n "$h" addr add "198.18.0.$i/24" dev veth0
    ip -n "$h" link set veth0 up
    ip -n "$h" link set lo up
    if [[ -n "$rate" ]]; then
      ip netns exec "$h" tc qdisc add dev veth0 root tbf rate "$rate" burst 256kb latency 50ms
    fi
  done
  mkdir -p "$STATE"
  # Each node gets its own UTS namespace and host name; otherwise Open MPI's shared-memory
  # segments of different "nodes" collide.
  cat > "$STATE/agent" <<'AGENT'
#!/bin/sh
host="$1"; shift
exec ip netns exec "$host" unshare --uts /bin/sh -c "hostname $host; $*"
AGENT
  chmod +x "$STATE/agent"
  echo "netns-cluster: $n nodes up: ${PREFIX}1..${PREFIX}$n at 198.18.0.1..$n${rate:+, links shaped to $rate}"
}

down() {
  for i in $(seq 1 "$n"); do ip netns del "$PREFIX$i" 2>/dev/null || true; done
  ip netns del "$SWITCH" 2>/dev/null || true
  rm -rf "$STATE"
  echo "netns-cluster: down"
}

run() {
  local slots="$1"; shift
  [[ "${1:-}" == "--" ]] && shift
  [[ -x "$STATE/agent" ]] || { echo "netns-cluster: run 'up $n' first" >&2; exit 1; }
  local hf="$STATE/hostfile"
  : > "$hf"
  for i in $(seq 1 "$n"); do echo "$PREFIX$i slots=$slots" >> "$hf"; done
  local env_args=()
  for v in $(env | grep -o '^STRATA_[A-Z_]*' || true); do env_args+=(-x "$v"); done
  # --bind-to none: each node's orted would bind its ranks as if it had the machine to itself,
  # so every node's rank 0 landed on core 0 of the one machine they all share.
  ip netns exec "${PREFIX}1" mpirun --allow-run-as-root --hostfile "$hf" -np $((n * slots)) \
    --bind-to none --mca plm_rsh_agent "$STATE/agent" \
    --mca oob_tcp_if_include 198.18.0.0/24 --mca btl_tcp_if_include 198.18.0.0/24 \
    --mca btl tcp,self --mca mpi_yield_when_idle 1 \
    -x STRATA_TCP_IFNAME=veth0 "${env_args[@]}" "$@"
}

case "$cmd" in
  up) up "${1:-}" ;;
  down) down ;;
  run) [[ $# -ge 2 ]] || usage; run "$@" ;;
  *) usage ;;
esac

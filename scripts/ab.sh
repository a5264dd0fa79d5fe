#!/usr/bin/env bash
# Compares two kvd builds by running them side by side (make ab): two
# local 3-node clusters at once (scripts/bench-cluster.sh, ports 12379-14381
# and 22379-24381; the second overlaps make cluster's 22379, so stop that
# first), one per build, each with its own kvctl bench, for the same
# duration; then again with the ports swapped.
#
# Why side by side: this VM's speed drifts by a third or more within an
# hour, so two builds measured one after the other differ by more than
# most changes do. Run at the same time, both clusters see the same
# drift, and the ratio of their throughputs is steady to a few per cent
# (a change that made no difference measured -3..+1 %, one that did
# +15/+16 %). Each cluster gets about half the machine, so the absolute
# figures are not make bench's. The two compete for the CPU and the
# disk, so a change to how much a node blocks (rather than to the work
# it does per request) moves its share and shows here as a gain that
# single-cluster runs do not see: a WAL fdatasync moved off the writer's
# path measured +13..+19% here and -2..+3% in interleaved make-bench-
# style runs. Check such changes with one cluster at a time.
#
# Usage: scripts/ab.sh DIR_A DIR_B [kvctl bench arguments]
#   DIR_A, DIR_B: directories holding a kvd binary each (e.g. from
#   `go build -o /tmp/a/kvd ./cmd/kvd` at two commits), and a kvctl too
#   when the client is what changed: a side's own kvctl drives it.
#   Default bench: put --clients 100 --conns 10 --duration 30s.
# Environment: ROUNDS (default 2; each round runs both orders), KVCTL
# (default ./bin/kvctl: the client of a side whose directory has none).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n "2,22p" "$0" >&2; exit 2; }
A=$1 B=$2
shift 2
[ $# -gt 0 ] || set -- put --clients 100 --conns 10 --duration 30s
KVCTL=${KVCTL:-./bin/kvctl}
ROUNDS=${ROUNDS:-2}
for f in "$A/kvd" "$B/kvd" "$KVCTL"; do
  [ -x "$f" ] || { echo "ab: no $f (make build, or build kvd into the directories)" >&2; exit 2; }
done
command -v jq >/dev/null || { echo "ab: needs jq" >&2; exit 2; }

ROOT=$(mktemp -d -t kvd-ab.XXXXXX)
NAME=ab
WORK=$ROOT
P=1
# shellcheck source=scripts/bench-cluster.sh
. scripts/bench-cluster.sh
trap on_exit INT TERM EXIT

# start DIR P: a 3-node cluster of DIR/kvd on ports P(N+1)379..P(N+1)381,
# data and logs in ROOT/P.
start() {
  BIN=$1 P=$2 WORK=$ROOT/$2
  start_nodes
  WORK=$ROOT
}

# kvctl DIR: the client that drives DIR's cluster.
kvctl() { if [ -x "$1/kvctl" ]; then echo "$1/kvctl"; else echo "$KVCTL"; fi; }

report() { jq -r '"\(.ops_per_sec | round) ops/s  p50 \(.latency_ms.p50 * 100 | round / 100) ms  p99 \(.latency_ms.p99 * 100 | round / 100) ms  errors \(.errors)"' "$1"; }

echo "ab: A=$A B=$B, kvctl bench $*" >&2
for r in $(seq 1 "$ROUNDS"); do
  for order in AB BA; do
    if [ $order = AB ]; then x=$A y=$B; else x=$B y=$A; fi
    start "$x" 1
    start "$y" 2
    "$(kvctl "$x")" --endpoints "$(endpoints 1)" -o json bench "$@" >"$WORK/x.json" &
    bx=$!
    "$(kvctl "$y")" --endpoints "$(endpoints 2)" -o json bench "$@" >"$WORK/y.json" &
    by=$!
    wait $bx $by
    if [ $order = AB ]; then ra=$WORK/x.json rb=$WORK/y.json; else ra=$WORK/y.json rb=$WORK/x.json; fi
    a=$(jq '.ops_per_sec' "$ra") b=$(jq '.ops_per_sec' "$rb")
    echo "round $r/$order  A: $(report "$ra")   B: $(report "$rb")   B/A $(awk -v a="$a" -v b="$b" 'BEGIN { printf "%+.1f%%", (b / a - 1) * 100 }')"
    stop_nodes 2>/dev/null
    rm -rf "$ROOT/1" "$ROOT/2"
  done
done

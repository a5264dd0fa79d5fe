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
# MODE=interleaved runs one cluster at a time instead, the builds
# alternating (A B, then B A, ROUNDS times), each for the same bench on
# fresh data; it prints each run's throughput and CPU per operation
# (the three nodes', then the client's, in microseconds), and at the end
# the median of B/A over the adjacent pairs. Use it for changes to
# blocking or batching; it needs more rounds (ROUNDS=5 or more), as
# runs one after the other see the VM's drift.
#
# Usage: scripts/ab.sh DIR_A DIR_B [kvctl bench arguments]
#   DIR_A, DIR_B: directories holding a kvd binary each (e.g. from
#   `go build -o /tmp/a/kvd ./cmd/kvd` at two commits), and a kvctl too
#   when the client is what changed: a side's own kvctl drives it.
#   Default bench: put --clients 100 --conns 10 --duration 30s. With
#   bench watch, the rate compared is events delivered per second.
# Environment: ROUNDS (default 2; each round runs both orders), KVCTL
# (default ./bin/kvctl: the client of a side whose directory has none).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n "2,30p" "$0" >&2; exit 2; }
A=$1 B=$2
shift 2
[ $# -gt 0 ] || set -- put --clients 100 --conns 10 --duration 30s
KVCTL=${KVCTL:-./bin/kvctl}
ROUNDS=${ROUNDS:-2}
for f in "$A/kvd" "$B/kvd"; do
  [ -x "$f" ] || { echo "ab: no $f (build kvd into the directories)" >&2; exit 2; }
done
# The shared client is needed only by a side without its own.
for d in "$A" "$B"; do
  [ -x "$d/kvctl" ] || [ -x "$KVCTL" ] || { echo "ab: no $d/kvctl and no $KVCTL (make build, or set KVCTL)" >&2; exit 2; }
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

# A report's rate, latency and errors; bench watch names them otherwise
# (events delivered per second, delivery latency, events missing).
RATE='(.ops_per_sec // .events_per_sec)'
report() { jq -r "(.latency_ms // .delivery_latency_ms) as \$l | \"\\($RATE | round) ops/s  p50 \\(\$l.p50 * 100 | round / 100) ms  p99 \\(\$l.p99 * 100 | round / 100) ms  errors \\(.errors // .events_missing)\"" "$1"; }

# ticks PID...: CPU time (user + system) of the processes, in clock ticks.
ticks() { local p t=0; for p in "$@"; do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done; echo "$t"; }

# interleaved: one cluster at a time, A and B alternating.
interleaved() {
  local hz r order side dir t0 t1 ops client ratios="" TIMEFORMAT='%U %S' # bash's time: user and system seconds
  hz=$(getconf CLK_TCK)
  echo "ab: A=$A B=$B, one cluster at a time, kvctl bench $*" >&2
  for r in $(seq 1 "$ROUNDS"); do
    for order in AB BA; do
      for side in ${order:0:1} ${order:1:1}; do
        if [ "$side" = A ]; then dir=$A; else dir=$B; fi
        start "$dir" 1
        t0=$(ticks "${pids[@]}")
        client=$({ time "$(kvctl "$dir")" --endpoints "$(endpoints 1)" -o json bench "$@" >"$WORK/$side.json" 2>"$WORK/$side.err"; } 2>&1)
        t1=$(ticks "${pids[@]}")
        ops=$(jq '(.ops // .events_delivered) + (.prefilled // 0)' "$WORK/$side.json")
        echo "round $r/$order  $side: $(report "$WORK/$side.json")  CPU us/op nodes $(awk -v d=$((t1 - t0)) -v hz="$hz" -v o="$ops" 'BEGIN { printf "%.0f", d / hz * 1e6 / o }') client $(awk -v c="$client" -v o="$ops" 'BEGIN { split(c, t, " "); printf "%.0f", (t[1] + t[2]) * 1e6 / o }')"
        stop_nodes 2>/dev/null
        rm -rf "$ROOT/1"
      done
      # B/A of this pair, run back to back.
      ratios+="$(jq -n --slurpfile a "$WORK/A.json" --slurpfile b "$WORK/B.json" "(\$b[0] | $RATE) / (\$a[0] | $RATE)")"$'\n'
    done
  done
  printf '%s' "$ratios" | sort -g | awk '{ r[++n] = $1 } END { m = (n % 2) ? r[(n + 1) / 2] : (r[n / 2] + r[n / 2 + 1]) / 2; printf "median B/A over %d pairs: %+.1f%% (range %+.1f%% .. %+.1f%%)\n", n, (m - 1) * 100, (r[1] - 1) * 100, (r[n] - 1) * 100 }'
}

if [ "${MODE:-}" = interleaved ]; then
  interleaved "$@"
  exit 0
fi

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
    a=$(jq "$RATE" "$ra") b=$(jq "$RATE" "$rb")
    echo "round $r/$order  A: $(report "$ra")   B: $(report "$rb")   B/A $(awk -v a="$a" -v b="$b" 'BEGIN { printf "%+.1f%%", (b / a - 1) * 100 }')"
    stop_nodes 2>/dev/null
    rm -rf "$ROOT/1" "$ROOT/2"
  done
done

#!/usr/bin/env bash
# Compares two kvd builds by running them side by side (make ab): two
# local 3-node clusters at once, one per build, each with its own kvctl
# bench, for the same duration; then again with the ports swapped.
#
# Why side by side: this VM's speed drifts by a third or more within an
# hour, so two builds measured one after the other differ by more than
# most changes do. Run at the same time, both clusters see the same
# drift, and the ratio of their throughputs is steady to a few per cent
# (a change that made no difference measured -2..+1 %, one that did
# +15/+16 %). Each cluster gets about half the machine, so the absolute
# figures are not make bench's.
#
# Usage: scripts/ab.sh DIR_A DIR_B [kvctl bench arguments]
#   DIR_A, DIR_B: directories holding a kvd binary each (e.g. from
#   `go build -o /tmp/a/kvd ./cmd/kvd` at two commits).
#   Default bench: put --clients 100 --conns 10 --duration 30s.
# Environment: ROUNDS (default 2; each round runs both orders), KVCTL
# (default ./bin/kvctl, one client binary for both sides).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '2,19p' "$0" >&2; exit 2; }
A=$1 B=$2
shift 2
[ $# -gt 0 ] || set -- put --clients 100 --conns 10 --duration 30s
KVCTL=${KVCTL:-./bin/kvctl}
ROUNDS=${ROUNDS:-2}
for f in "$A/kvd" "$B/kvd" "$KVCTL"; do
  [ -x "$f" ] || { echo "ab: no $f (make build, or build kvd into the directories)" >&2; exit 2; }
done
command -v jq >/dev/null || { echo "ab: needs jq" >&2; exit 2; }

WORK=$(mktemp -d -t kvd-ab.XXXXXX)
pids=()
stop_all() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
on_exit() {
  local rc=$?
  trap - INT TERM EXIT
  stop_all
  if [ "$rc" -eq 0 ]; then rm -rf "$WORK"; else echo "ab: failed (exit $rc); node logs kept in $WORK" >&2; fi
  exit "$rc"
}
trap on_exit INT TERM EXIT

# start DIR P: a 3-node cluster of DIR/kvd on ports P(N+1)379..P(N+1)381.
start() {
  local dir=$1 p=$2 id b i
  local initial="1=127.0.0.1:${p}2380,2=127.0.0.1:${p}3380,3=127.0.0.1:${p}4380"
  for id in 1 2 3; do
    b=$p$((1 + id))
    if (exec 3<>"/dev/tcp/127.0.0.1/${b}379") 2>/dev/null; then
      echo "ab: port ${b}379 is in use" >&2
      exit 1
    fi
    "$dir/kvd" --id "$id" --data-dir "$WORK/$p/data$id" --listen-client "127.0.0.1:${b}379" \
      --listen-peer "127.0.0.1:${b}380" --listen-metrics "127.0.0.1:${b}381" \
      --initial-cluster "$initial" >"$WORK/kvd-$p-$id.log" 2>&1 &
    pids+=("$!")
  done
  for id in 1 2 3; do
    b=$p$((1 + id))
    for i in $(seq 1 300); do
      curl -sf "http://127.0.0.1:${b}381/readyz" >/dev/null 2>&1 && break
      [ "$i" = 300 ] && { echo "ab: $dir/kvd node $id not ready after 30s" >&2; exit 1; }
      sleep 0.1
    done
  done
}

report() { jq -r '"\(.ops_per_sec | round) ops/s  p50 \(.latency_ms.p50 * 100 | round / 100) ms  p99 \(.latency_ms.p99 * 100 | round / 100) ms  errors \(.errors)"' "$1"; }

echo "ab: A=$A B=$B, kvctl bench $*" >&2
for r in $(seq 1 "$ROUNDS"); do
  for order in AB BA; do
    if [ $order = AB ]; then x=$A y=$B; else x=$B y=$A; fi
    mkdir -p "$WORK/1" "$WORK/5"
    start "$x" 1
    start "$y" 5
    "$KVCTL" --endpoints 127.0.0.1:12379,127.0.0.1:13379,127.0.0.1:14379 -o json bench "$@" >"$WORK/x.json" &
    bx=$!
    "$KVCTL" --endpoints 127.0.0.1:52379,127.0.0.1:53379,127.0.0.1:54379 -o json bench "$@" >"$WORK/y.json" &
    by=$!
    wait $bx $by
    if [ $order = AB ]; then ra=$WORK/x.json rb=$WORK/y.json; else ra=$WORK/y.json rb=$WORK/x.json; fi
    a=$(jq '.ops_per_sec' "$ra") b=$(jq '.ops_per_sec' "$rb")
    echo "round $r/$order  A: $(report "$ra")   B: $(report "$rb")   B/A $(awk -v a="$a" -v b="$b" 'BEGIN { printf "%+.1f%%", (b / a - 1) * 100 }')"
    stop_all
    rm -rf "$WORK/1" "$WORK/5"
  done
done

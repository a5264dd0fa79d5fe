#!/usr/bin/env bash
# Writes cmd/kvd/default.pgo (make pgo): the CPU profile that `go build`
# uses for profile-guided optimization of kvd (go build -pgo=auto, the
# default, takes default.pgo from the main package's directory).
#
# It builds kvd without a profile (so the new one does not depend on the
# old), starts a local 3-node cluster (scripts/bench-cluster.sh, ports
# 12379-14381), runs make bench's workloads one after another, profiles
# every node during each, and merges the profiles. The workloads weigh
# in by the CPU they use, as they would in a profile taken in production.
#
# Environment: PROFILE_SECONDS (default 20: per workload and node),
# OUT (default cmd/kvd/default.pgo).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${PROFILE_SECONDS:-20}
OUT=${OUT:-cmd/kvd/default.pgo}
command -v curl >/dev/null || { echo "pgo.sh: needs curl" >&2; exit 2; }

WORK=$(mktemp -d -t kvd-pgo.XXXXXX)
NAME=pgo
P=1
BIN=$WORK/bin
mkdir -p "$BIN"
cleanup_hook() { rm -rf "$WORK/bin" "$WORK/profiles"; }
# shellcheck source=scripts/bench-cluster.sh
. scripts/bench-cluster.sh
trap on_exit INT TERM EXIT

echo "pgo: building kvd and kvctl without a profile" >&2
CGO_ENABLED=0 ${GO:-go} build -pgo=off -o "$BIN/kvd" ./cmd/kvd
CGO_ENABLED=0 ${GO:-go} build -pgo=off -o "$BIN/kvctl" ./cmd/kvctl
start_nodes

# The workloads of make bench (scripts/bench.sh) that keep a cluster
# busy, each run a little longer than it is profiled.
workloads=(
  "put --clients 100 --conns 10 --key-space 50000"
  "put --clients 100 --conns 10 --key-space 1"
  "get --clients 100 --conns 10 --key-space 10000"
  "get --clients 100 --conns 10 --key-space 10000 --consistency serializable"
)
mkdir -p "$WORK/profiles"
i=0
for w in "${workloads[@]}"; do
  i=$((i + 1))
  echo "pgo: profiling kvctl bench $w" >&2
  # shellcheck disable=SC2086 # the workload is a list of arguments
  "$BIN/kvctl" --endpoints "$ENDPOINTS" -o json bench $w --progress --duration "$((SECONDS_EACH + 4))s" \
    >"$WORK/bench$i.json" 2>"$WORK/bench$i.progress" &
  bench=$!
  # Profile the measured phase: kvctl's first progress line comes a
  # second into it, after the prefill of the get workloads.
  waited=0
  until grep -q 'ops/s' "$WORK/bench$i.progress"; do
    kill -0 "$bench" 2>/dev/null || { cat "$WORK/bench$i.progress" >&2; echo "pgo: kvctl bench $w ended early" >&2; exit 1; }
    ((waited++ < 1200)) || { echo "pgo: kvctl bench $w showed no progress in 2 minutes" >&2; exit 1; }
    sleep 0.1 # poll interval
  done
  fetches=()
  for id in 1 2 3; do
    curl -sf "http://127.0.0.1:${P}$((1 + id))381/debug/pprof/profile?seconds=$SECONDS_EACH" -o "$WORK/profiles/w$i-n$id.pprof" &
    fetches+=("$!")
  done
  for f in "${fetches[@]}"; do wait "$f"; done
  wait "$bench"
done
stop_nodes

${GO:-go} tool pprof -proto "$WORK"/profiles/*.pprof >"$OUT.tmp" 2>/dev/null
mv "$OUT.tmp" "$OUT"
echo "pgo: wrote $OUT ($(wc -c <"$OUT") bytes) from ${#workloads[@]} workloads × 3 nodes × ${SECONDS_EACH}s" >&2

#!/usr/bin/env bash
# Runs a local 3-node kvd cluster with each node in a memory cgroup capped
# at CAP (default 150M, the budget of docs/benchmarks.md), writes TOTAL
# (default 1,000,000) distinct keys with kvctl bench, and writes
# docs/memory.md: whether every node survived, its peak and final memory,
# and the throughput under the cap (make bench-memory).
#
# Why a cap: a node maps its bbolt file, and pages it has read stay
# counted in its VmRSS while memory is plentiful, so VmRSS without a cap
# tracks the data size (about 460 MiB after a million 256-byte values).
# Those pages are clean page cache the kernel takes back under pressure.
# The cgroup limit counts them too, so a node that completes the run
# under it has done the work in CAP, page cache included.
#
# Needs root and a cgroup memory controller (v1 or v2). Uses the cluster
# and ports of make bench (scripts/bench-cluster.sh) and stops the cluster and
# removes its cgroups on exit, success or failure.
#
# Environment: BIN (default ./bin), OUT (default docs/memory.md), CAP,
# PORT_PREFIX (default 1, as make bench),
# TOTAL.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-./bin}
OUT=${OUT:-docs/memory.md}
CAP=${CAP:-150M}
TOTAL=${TOTAL:-1000000}
command -v jq >/dev/null || { echo "bench-memory: needs jq (apt-get install jq)" >&2; exit 2; }
[ -x "$BIN/kvd" ] && [ -x "$BIN/kvctl" ] || { echo "bench-memory: no $BIN/kvd or $BIN/kvctl; run make build" >&2; exit 2; }

# cgroup v1 (memory.limit_in_bytes) or v2 (memory.max).
if [ -w /sys/fs/cgroup/memory ] && [ -e /sys/fs/cgroup/memory/memory.limit_in_bytes ]; then
  CGROOT=/sys/fs/cgroup/memory LIMIT=memory.limit_in_bytes PEAK=memory.max_usage_in_bytes
elif [ -w /sys/fs/cgroup ] && grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
  CGROOT=/sys/fs/cgroup LIMIT=memory.max PEAK=memory.peak
  grep -qw memory /sys/fs/cgroup/cgroup.subtree_control || echo +memory >/sys/fs/cgroup/cgroup.subtree_control
else
  echo "bench-memory: needs root and a writable cgroup memory controller" >&2
  exit 2
fi

WORK=$(mktemp -d -t kvd-memory.XXXXXX)
NAME=bench-memory
P=${PORT_PREFIX:-1}
# shellcheck source=scripts/bench-cluster.sh
. scripts/bench-cluster.sh
cgroups=()
cleanup_hook() {
  local cg
  for cg in "${cgroups[@]}"; do rmdir "$cg" 2>/dev/null || true; done
}
trap on_exit INT TERM EXIT

# in_cgroup ID COMMAND... runs COMMAND as node ID's process in its own
# memory cgroup: the shell joins the cgroup, then becomes COMMAND, so kvd
# never runs outside it.
in_cgroup() {
  local cg=${cgroups[$(($1 - 1))]}
  shift
  exec sh -c 'echo $$ >"$1/cgroup.procs"; shift; exec "$@"' sh "$cg" "$@"
}
for id in 1 2 3; do
  cg=$CGROOT/kvd-memory-$$-$id
  mkdir "$cg"
  cgroups+=("$cg")
  echo "$CAP" >"$cg/$LIMIT"
done
start_nodes in_cgroup
echo "bench-memory: each node capped at $CAP" >&2

args="put --clients 100 --conns 10 --total $TOTAL"
echo "bench-memory: kvctl bench $args" >&2
"$BIN/kvctl" --endpoints "$ENDPOINTS" --timeout 10s -o json bench $args >"$WORK/run.json"
jq -r '"bench-memory: \(.ops) ops, \(.ops_per_sec | round) ops/s, p99 \(.latency_ms.p99 * 100 | round / 100) ms, errors \(.errors)"' "$WORK/run.json" >&2

# The first and the last key written must read back.
last=$(printf '%08d' $((TOTAL - 1)))
for k in 00000000 "$last"; do
  "$BIN/kvctl" --endpoints "$ENDPOINTS" get "$k" >/dev/null || { echo "bench-memory: key $k does not read back" >&2; exit 1; }
done

rows=""
all_alive=yes
for id in 1 2 3; do
  p=${pids[$((id - 1))]}
  cg=${cgroups[$((id - 1))]}
  if kill -0 "$p" 2>/dev/null; then
    status=$(awk '/^(VmRSS|RssAnon|RssFile):/ { printf "%d | ", $2 / 1024 }' "/proc/$p/status")
    alive=yes
  else
    status="– | – | – | "
    alive=no
    all_alive=no
  fi
  peak=$(($(cat "$cg/$PEAK") / 1048576))
  db=$(du -sm "$WORK/data$id" | cut -f1)
  rows+="| kvd $id | $alive | $peak | ${status}$db |"$'\n'
done

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  commit="$commit (plus uncommitted changes)"
fi
mkdir -p "$(dirname "$OUT")"
cat >"$OUT" <<MD
# kvd memory under a cap

Each node of a local 3-node cluster runs in its own memory cgroup
capped at $CAP ($LIMIT), which counts the page cache of its bbolt file as
well as what the process allocates, while \`kvctl bench $args\` writes
$TOTAL distinct 8-byte keys with 256-byte values. Written by \`make
bench-memory\` (scripts/bench-memory.sh).

- Date: $(date -u '+%Y-%m-%d %H:%M UTC')
- Commit: $commit
- Machine: $(nproc) CPUs, $(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) memory, $(uname -sr)
- Every node survived: $all_alive

| workload | ops/s | p50 ms | p99 ms | errors |
|---|---:|---:|---:|---:|
$(jq -r '"| \(.ops) distinct puts, 100 clients over 10 connections | \(.ops_per_sec | round) | \(.latency_ms.p50 * 100 | round / 100) | \(.latency_ms.p99 * 100 | round / 100) | \(.errors) |"' "$WORK/run.json")

After the run (MiB; peak is the cgroup's, page cache included):

| node | alive | peak | VmRSS | RssAnon | RssFile | data dir |
|---|---|---:|---:|---:|---:|---:|
$rows
RssAnon is what kvd allocates (Go heap, stacks, buffers); RssFile is the
resident part of its mapped files: the bbolt file and kvd's own
executable. VmRSS can exceed the cgroup's peak by pages charged to
another cgroup, such as the executable's, cached before the node
started. Without a cap the kernel
leaves read pages mapped while memory is free, so VmRSS then tracks the
data size (about 460 MiB after a million puts); the pages are clean and
are given back under pressure, which is what the cap shows. Throughput
under the cap is lower than without it (compare docs/benchmarks.md):
pages the cap evicted are read again from disk.

    make bench-memory                   # CAP=150M TOTAL=1000000
    CAP=120M TOTAL=200000 make bench-memory
MD
echo "bench-memory: wrote $OUT" >&2
cat "$OUT"
[ "$all_alive" = yes ]

#!/usr/bin/env bash
# Benchmarks a local 3-node kvd cluster with kvctl bench (make bench) and
# writes docs/benchmarks.md.
#
# The cluster (scripts/bench-cluster.sh) uses its own ports (client 12379, 13379,
# 14379; peer and metrics one and two above) and a temporary data dir, so
# it does not clash with `make cluster`. It is stopped on exit, success or
# failure.
#
# Environment: BIN (default ./bin), OUT (default docs/benchmarks.md),
# SCALE (default 1; multiplies every --total, e.g. SCALE=0.1 for a smoke run),
# PORT_PREFIX (default 1: ports 1N379..1N381 for node N).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-./bin}
OUT=${OUT:-docs/benchmarks.md}
SCALE=${SCALE:-1}
P=${PORT_PREFIX:-1}
command -v jq >/dev/null || { echo "bench.sh: needs jq (apt-get install jq)" >&2; exit 2; }
[ -x "$BIN/kvd" ] && [ -x "$BIN/kvctl" ] || { echo "bench.sh: no $BIN/kvd or $BIN/kvctl; run make build" >&2; exit 2; }

WORK=$(mktemp -d -t kvd-bench.XXXXXX)
NAME=bench
# shellcheck source=scripts/bench-cluster.sh
. scripts/bench-cluster.sh
trap on_exit INT TERM EXIT
start_nodes

scaled() { awk -v n="$1" -v s="$SCALE" 'BEGIN { v = int(n * s); print (v < 1 ? 1 : v) }'; }

# name | kvctl bench arguments (totals scaled by SCALE)
workloads=(
  "sequential put, 1 client|put --clients 1 --conns 1 --total $(scaled 5000)"
  "put, 100 clients over 10 connections, $(scaled 50000) distinct keys|put --clients 100 --conns 10 --total $(scaled 50000)"
  "put, 100 clients, one key|put --clients 100 --conns 10 --total $(scaled 30000) --key-space 1"
  "linearizable get, 100 clients|get --clients 100 --conns 10 --total $(scaled 100000) --key-space 10000"
  "serializable get, 100 clients|get --clients 100 --conns 10 --total $(scaled 100000) --key-space 10000 --consistency serializable"
)

# msum NAME...: each metric summed over the three nodes' /metrics, one per line.
msum() {
  local text="" id
  for id in 1 2 3; do
    text+=$(curl -sf "http://127.0.0.1:$P$((1 + id))381/metrics")$'\n'
  done
  local name
  for name in "$@"; do
    awk -v n="$name" '$1 == n || index($1, n "{") == 1 { s += $2 } END { printf "%.0f\n", s }' <<<"$text"
  done
}
amort_metrics=(kvd_request_batch_items_total kvd_request_batches_total
  kvd_raft_proposals_total kvd_raft_proposal_batches_total
  kvd_storage_entries_total kvd_storage_fsyncs_total
  kvd_transport_messages_sent_total kvd_transport_batches_sent_total
  kvd_raft_linearizable_reads_total kvd_raft_read_index_rounds_total
  kvd_raft_leader_check_rounds_total)
# ratio A B: A/B to one decimal, or "–" when B is 0.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1f", a / b; else printf "–" }'; }

rows=""
amort=""
i=0
for w in "${workloads[@]}"; do
  name=${w%%|*}
  args=${w#*|}
  i=$((i + 1))
  echo "bench: [$i/${#workloads[@]}] kvctl bench $args" >&2
  # shellcheck disable=SC2086 # args is a word list on purpose
  mapfile -t m0 < <(msum "${amort_metrics[@]}")
  "$BIN/kvctl" --endpoints "$ENDPOINTS" --timeout 10s -o json bench $args >"$WORK/run$i.json"
  mapfile -t m1 < <(msum "${amort_metrics[@]}")
  d=()
  for j in "${!m0[@]}"; do d+=($((m1[j] - m0[j]))); done
  r="$WORK/run$i.json"
  ops=$(jq '.ops + (.prefilled // 0)' "$r")
  amort+="| $name | $(ratio "${d[0]}" "${d[1]}") | $(ratio "${d[2]}" "${d[3]}") | $(ratio "${d[4]}" "${d[5]}") | $(ratio "${d[6]}" "${d[7]}") | $(ratio "${d[6]}" "$ops") | $(ratio "${d[8]}" "$((d[9] + d[10]))") |"$'\n'
  jq -r '"bench:   \(.ops) ops, \(.ops_per_sec | round) ops/s, p50 \(.latency_ms.p50 * 100 | round / 100) ms, p99 \(.latency_ms.p99 * 100 | round / 100) ms, errors \(.errors)"' "$r" >&2
  rows+=$(jq -r --arg name "$name" --arg cmd "bench $args" \
    '"| \($name) | `\($cmd)` | \(.ops_per_sec | round) | \(.latency_ms.p50 * 100 | round / 100) | \(.latency_ms.p99 * 100 | round / 100) | \(.latency_ms.p99_9 * 100 | round / 100) | \(.errors) |"' "$r")
  rows+=$'\n'
done

rss=""
for id in 1 2 3; do
  kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/${pids[$((id - 1))]}/status")
  rss+="| kvd $id | $((kb / 1024)) MiB |"$'\n'
done

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  commit="$commit (plus uncommitted changes)"
fi
model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
mem=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)

mkdir -p "$(dirname "$OUT")"
cat >"$OUT" <<MD
# kvd benchmarks

Measured with \`kvctl bench\` against a local 3-node cluster (16 data
shards, 3 replicas each, every node on this machine, data on its local
disk), 8-byte keys and 256-byte values, closed loop. Written by
\`make bench\` (scripts/bench.sh); numbers move between runs by some
per cent, so compare runs made on the same machine. Two VMs of the same
kind (2 vCPUs, AMD EPYC) have measured the same code up to a third apart
(linearizable gets 20,200 vs 13,207 ops/s on two days), and on 2026-11-24
one ran everything about three times slower than the day before (12-18%
steal, fdatasync 0.55 ms instead of ~0.22). Even one VM drifts: on
2026-11-24 the same build measured 6,415 and then 10,178 distinct-key
puts per second an hour apart, and three make bench runs of another within
ten minutes measured linearizable gets at 19,429, 26,070 and 21,639 ops/s.
To compare two commits, run them side by side with \`make ab\` (README,
Benchmarks), which cancels the drift.

- Date: $(date -u '+%Y-%m-%d %H:%M UTC')
- Commit: $commit
- Machine: $(nproc) CPUs ($model), $mem memory, $(uname -sr)
- Scale: totals × $SCALE

| workload | command | ops/s | p50 ms | p99 ms | p99.9 ms | errors |
|---|---|---:|---:|---:|---:|---:|
$rows
The get workloads first write their 10,000 keys (not measured). Latency is
per successful operation, from the client's call to its answer, and
includes the client's retries.

How the work was shared out: the change of each node counter during a
workload (its prefill included), summed over the three nodes.

| workload | requests per client message | proposals per Raft batch | entries per fsync | messages per transport batch | messages per operation | reads per read round |
|---|---:|---:|---:|---:|---:|---:|
$amort
Requests per client message is \`kvd_request_batch_items_total /
kvd_request_batches_total\` (the client's \`Batch\` stream); an fsync is a
WAL record's fdatasync or a bbolt commit; messages per operation
counts every message the nodes sent each other (appends, their answers,
heartbeats, leadership checks) over the workload's operations, prefill
included. A read round is one leadership check, which confirms the
waiting reads of every shard a node leads at once, or one of raft's own
ReadIndex rounds (a shard whose leader is new).

Resident memory of each node after the runs (VmRSS):

| node | VmRSS |
|---|---:|
$rss
These runs are short. Memory after 1,000,000 puts, with each node capped
at 150 MiB page cache included, is in docs/memory.md (\`make bench-memory\`).

## Reproduce

    make bench                 # builds, runs the table above, rewrites this file
    SCALE=0.1 make bench       # a quick smoke run with a tenth of the operations

Or against any cluster: \`kvctl --endpoints HOST:PORT bench put --clients 100 --conns 10 --total 50000\`
(see \`kvctl bench put --help\`; \`-o json\` for scripts).

Where the time goes: \`kvctl bench ... --cpuprofile client.pprof\` profiles the
client during the measured phase, and \`curl -o node.pprof
'http://127.0.0.1:12381/debug/pprof/profile?seconds=15'\` a node meanwhile;
read both with \`go tool pprof -top\`.

Hot-path microbenchmarks (no cluster): \`go test -run '^$' -bench . ./storage ./fsm ./hashring ./transport ./server\`
(group commit with fsync, apply of a put, ring lookup, peer batch encode/decode, a put
through one in-process node).
MD
echo "bench: wrote $OUT" >&2
cat "$OUT"

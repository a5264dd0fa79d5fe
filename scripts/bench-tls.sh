#!/usr/bin/env bash
# What TLS costs: kvctl bench put and get against a local 3-node cluster,
# RUNS times each, without TLS and with peer and client mutual TLS
# (certificates from kvd cert). Prints one line per run; the figures in
# docs/benchmarks.md come from it.
#
# Environment: BIN (default ./bin), MODES (default "plain tls"), RUNS
# (default 3), TOTAL (operations per run, default 20000), CLIENTS
# (default 16), PORT_BASE (default 33100: node N listens on PORT_BASE+10N
# for clients, +1 peers, +2 metrics).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-./bin}
RUNS=${RUNS:-3}
TOTAL=${TOTAL:-20000}
CLIENTS=${CLIENTS:-16}
BASE=${PORT_BASE:-33100}
command -v jq >/dev/null || { echo "bench-tls.sh: needs jq" >&2; exit 2; }
[ -x "$BIN/kvd" ] && [ -x "$BIN/kvctl" ] || { echo "bench-tls.sh: no $BIN/kvd or $BIN/kvctl; run make build" >&2; exit 2; }

WORK=$(mktemp -d -t kvd-bench-tls.XXXXXX)
pids=()
stop_nodes() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
trap 'stop_nodes; rm -rf "$WORK"' EXIT INT TERM

"$BIN/kvd" cert ca --dir "$WORK/certs" >/dev/null
for id in 1 2 3; do "$BIN/kvd" cert node --dir "$WORK/certs" --id "$id" >/dev/null; done
"$BIN/kvd" cert client --dir "$WORK/certs" --name bench >/dev/null
C=$WORK/certs

port() { echo $((BASE + 10 * $1 + $2)); }
initial="1=127.0.0.1:$(port 1 1),2=127.0.0.1:$(port 2 1),3=127.0.0.1:$(port 3 1)"
endpoints="127.0.0.1:$(port 1 0),127.0.0.1:$(port 2 0),127.0.0.1:$(port 3 0)"

# start MODE: a fresh cluster, plain or tls.
start() {
  local id tls=() i
  rm -rf "$WORK/data"
  for id in 1 2 3; do
    tls=()
    if [ "$1" = tls ]; then
      tls=(--peer-cert "$C/node-$id.crt" --peer-key "$C/node-$id.key" --peer-ca "$C/ca.crt"
        --client-cert "$C/node-$id.crt" --client-key "$C/node-$id.key" --client-ca "$C/ca.crt")
    fi
    "$BIN/kvd" --id "$id" --data-dir "$WORK/data/$id" --listen-client "127.0.0.1:$(port "$id" 0)" \
      --listen-peer "127.0.0.1:$(port "$id" 1)" --listen-metrics "127.0.0.1:$(port "$id" 2)" \
      --initial-cluster "$initial" "${tls[@]}" >"$WORK/kvd$id.log" 2>&1 &
    pids+=("$!")
  done
  for id in 1 2 3; do
    for i in $(seq 1 300); do
      curl -sf "http://127.0.0.1:$(port "$id" 2)/readyz" >/dev/null 2>&1 && break
      [ "$i" = 300 ] && { echo "bench-tls.sh: kvd $id not ready; log:" >&2; tail -20 "$WORK/kvd$id.log" >&2; exit 1; }
      sleep 0.1
    done
  done
}

echo "mode op run ops/s p50_ms p99_ms"
for mode in ${MODES:-plain tls}; do
  start "$mode"
  kv=("$BIN/kvctl" --endpoints "$endpoints")
  [ "$mode" = tls ] && kv+=(--cacert "$C/ca.crt" --cert "$C/client-bench.crt" --key "$C/client-bench.key")
  for run in $(seq 1 "$RUNS"); do
    for op in put get; do
      "${kv[@]}" bench "$op" --clients "$CLIENTS" --conns 3 --total "$TOTAL" -o json |
        jq -r --arg m "$mode" --arg o "$op" --arg r "$run" \
          '"\($m) \($o) \($r) \(.ops_per_sec | floor) \(.latency_ms.p50) \(.latency_ms.p99)"'
    done
  done
  stop_nodes
done

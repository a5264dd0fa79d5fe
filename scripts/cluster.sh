#!/usr/bin/env bash
# Runs a 3-node kvd cluster as local processes (make cluster).
# Client ports 2379, 22379, 32379; data under ./data/; logs prefixed by node.
# Ctrl-C stops all three.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-./bin}
DATA=${DATA:-./data}
INITIAL=1=127.0.0.1:2380,2=127.0.0.1:22380,3=127.0.0.1:32380
pids=()

stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping kvd nodes (pids ${pids[*]:-none})"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap stop INT TERM EXIT

mkdir -p "$DATA"
for id in 1 2 3; do
  base=$([ "$id" = 1 ] && echo "" || echo "$id")
  "$BIN/kvd" --id "$id" --data-dir "$DATA/$id" \
    --listen-client "127.0.0.1:${base}2379" \
    --listen-peer "127.0.0.1:${base}2380" \
    --listen-metrics "127.0.0.1:${base}2381" \
    --initial-cluster "$INITIAL" > >(sed -u "s/^/[kvd$id] /") 2>&1 &
  pids+=("$!")
done

cat <<MSG
kvd: 3-node cluster starting (data in $DATA/).
  export KVCTL_ENDPOINTS=127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379
  $BIN/kvctl put greeting hello
  $BIN/kvctl get greeting
  $BIN/kvctl get --prefix gree
  $BIN/kvctl cluster status
Press Ctrl-C to stop all three nodes.
MSG
wait

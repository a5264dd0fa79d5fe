#!/usr/bin/env bash
# Runs a 3-node kvd cluster as local processes (make cluster).
# Client ports 2379, 22379, 32379; data under ./data/; logs prefixed by node.
# It says when a node exits and how. Ctrl-C (or SIGTERM) stops the three
# kvd processes it started, and nothing else; the data stays.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-./bin}
DATA=${DATA:-./data}
INITIAL=1=127.0.0.1:2380,2=127.0.0.1:22380,3=127.0.0.1:32380
pids=()     # the kvd processes, by node: pids[id-1]
watchers=() # one subshell per node, reporting its exit

for b in kvd kvctl; do
  if [ ! -x "$BIN/$b" ]; then
    echo "cluster.sh: $BIN/$b not found; run 'make build' (or 'make cluster', which builds first)" >&2
    exit 2
  fi
done

# describe says how a process with exit status $1 ended.
describe() {
  local code=$1
  case $code in
    0) echo "exited cleanly (status 0)" ;;
    1) echo "exited with status 1 (it failed; its last log line says why)" ;;
    2) echo "exited with status 2 (bad usage or configuration, a port in use, or the wrong data dir; its last log line says which)" ;;
    3) echo "exited with status 3 (the node failed while running and must be restarted; its last log line says why)" ;;
    *) if [ "$code" -gt 128 ]; then
         echo "was killed by signal $((code - 128)) (SIG$(kill -l $((code - 128)) 2>/dev/null || echo '?'))"
       else
         echo "exited with status $code"
       fi ;;
  esac
}

stopping=
stop() {
  trap - INT TERM
  stopping=1
  echo
  echo "cluster.sh: stopping the kvd nodes it started: ${pids[*]:+pids ${pids[*]}} (SIGTERM, then waiting for each)"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for w in "${watchers[@]}"; do wait "$w" 2>/dev/null || true; done
  echo "cluster.sh: all stopped; data kept in $DATA/"
  exit 0
}
trap stop INT TERM

mkdir -p "$DATA"
for id in 1 2 3; do
  base=$([ "$id" = 1 ] && echo "" || echo "$id")
  pidfile="$DATA/.kvd$id.pid"
  rm -f "$pidfile"
  # The watcher runs kvd and reports how it ended. The log filter ignores
  # Ctrl-C, so a node shutting down can still write its last lines (with
  # the filter gone, a write would kill it with SIGPIPE).
  (
    trap '' INT
    "$BIN/kvd" --id "$id" --data-dir "$DATA/$id" \
      --listen-client "127.0.0.1:${base}2379" \
      --listen-peer "127.0.0.1:${base}2380" \
      --listen-metrics "127.0.0.1:${base}2381" \
      --initial-cluster "$INITIAL" > >(trap '' INT TERM; exec sed -u "s/^/[kvd$id] /") 2>&1 &
    kpid=$!
    echo "$kpid" > "$pidfile"
    code=0
    wait "$kpid" || code=$?
    echo "cluster.sh: kvd$id (pid $kpid) $(describe "$code")"
  ) &
  watchers+=("$!")
  while [ ! -s "$pidfile" ]; do sleep 0.01; done
  pids+=("$(cat "$pidfile")")
  rm -f "$pidfile"
  echo "cluster.sh: started kvd$id (pid ${pids[${#pids[@]}-1]}): client 127.0.0.1:${base}2379, peer 127.0.0.1:${base}2380, metrics http://127.0.0.1:${base}2381, data $DATA/$id"
done

cat <<MSG
kvd: 3-node cluster starting (data in $DATA/).
  export KVCTL_ENDPOINTS=127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379
  $BIN/kvctl put greeting hello
  $BIN/kvctl get greeting
  $BIN/kvctl get --prefix gree
  $BIN/kvctl cluster status
Press Ctrl-C to stop the three kvd processes above (pids ${pids[*]}); nothing else is stopped, and $DATA/ is kept.
MSG

# Wait for the watchers; one that returns means its node exited (and
# said how). The script stays until Ctrl-C, so a killed node can be
# restarted by hand and the others keep their log stream.
for w in "${watchers[@]}"; do wait "$w" 2>/dev/null || true; done
[ -n "$stopping" ] || echo "cluster.sh: every node has exited; nothing left to stop"

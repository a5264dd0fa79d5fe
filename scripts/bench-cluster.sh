# shellcheck shell=bash
# The local 3-node clusters of make bench, make bench-memory and make ab;
# sourced, not run. Set NAME (the prefix of messages), BIN, P (port
# prefix) and WORK (data dirs and logs) first. start_nodes reads BIN, P
# and WORK when it is called, so a script can start clusters of two
# builds on two port prefixes (make ab); ENDPOINTS is the cluster on the
# P set when this file is sourced.
#
# Node N listens on ports P(N+1)379 (clients), P(N+1)380 (peers) and
# P(N+1)381 (metrics): 12379-14381 with P=1, which stays clear of `make
# cluster` (2379, 22379, 32379) and below Linux's ephemeral range
# (32768-60999), so no outgoing connection holds them by chance.
#
# stop_nodes stops every node started. trap on_exit INT TERM EXIT does
# that too, runs the caller's cleanup_hook when it defines one, and keeps
# WORK (with the node logs) only when the script failed.

# endpoints P: the client addresses of the cluster on port prefix P.
endpoints() { echo "127.0.0.1:${1}2379,127.0.0.1:${1}3379,127.0.0.1:${1}4379"; }
ENDPOINTS=$(endpoints "$P")
pids=()

# start_nodes [LAUNCHER] starts kvd 1, 2 and 3 in the background, each
# through "LAUNCHER ID COMMAND..." when given (a function that ends by
# exec'ing COMMAND), and returns once every node is ready.
start_nodes() {
  local launcher=${1:-} id base port i first=${#pids[@]} pprof=()
  local initial=1=127.0.0.1:${P}2380,2=127.0.0.1:${P}3380,3=127.0.0.1:${P}4380
  mkdir -p "$WORK"
  # pprof for profiling the nodes under load, from builds that have the
  # flag (make ab compares with older ones, which serve it always).
  # (The help is read whole first: grep -q would stop reading at the
  # match, and under pipefail kvd's SIGPIPE would fail the test.)
  local help
  help=$("$BIN/kvd" --help 2>&1 || true)
  if [[ $help == *--enable-pprof* ]]; then pprof=(--enable-pprof); fi
  for id in 1 2 3; do
    base=$P$((1 + id))
    for port in "${base}379" "${base}380" "${base}381"; do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "$NAME: port $port is in use; stop what listens there or set PORT_PREFIX" >&2
        exit 1
      fi
    done
    ${launcher:+"$launcher" "$id"} "$BIN/kvd" --id "$id" --data-dir "$WORK/data$id" \
      --listen-client "127.0.0.1:${base}379" \
      --listen-peer "127.0.0.1:${base}380" \
      --listen-metrics "127.0.0.1:${base}381" "${pprof[@]}" \
      --initial-cluster "$initial" >"$WORK/kvd$id.log" 2>&1 &
    pids+=("$!")
  done
  echo "$NAME: 3-node cluster starting (pids ${pids[*]:$first}, data in $WORK)" >&2
  for id in 1 2 3; do
    base=$P$((1 + id))
    for i in $(seq 1 300); do
      curl -sf "http://127.0.0.1:${base}381/readyz" >/dev/null 2>&1 && break
      kill -0 "${pids[$((first + id - 1))]}" 2>/dev/null || { echo "$NAME: kvd $id exited; log:" >&2; tail -20 "$WORK/kvd$id.log" >&2; exit 1; }
      [ "$i" = 300 ] && { echo "$NAME: kvd $id not ready after 30s" >&2; exit 1; }
      sleep 0.1
    done
  done
  echo "$NAME: cluster ready" >&2
}

stop_nodes() {
  local p
  if [ ${#pids[@]} -gt 0 ]; then
    echo "$NAME: stopping nodes (pids ${pids[*]})" >&2
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  fi
  pids=()
}

on_exit() {
  local rc=$?
  trap - INT TERM EXIT
  stop_nodes
  if declare -F cleanup_hook >/dev/null; then
    cleanup_hook
  fi
  if [ "$rc" -ne 0 ]; then
    echo "$NAME: failed (exit $rc); node logs kept in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}

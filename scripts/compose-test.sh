#!/usr/bin/env bash
# End-to-end test of the docker compose deployment (make compose-test).
#
# Builds kvd:dev, starts deploy/docker-compose.yml as project "kvdtest" and
# checks, with bounded waits only:
#   1. all three containers become healthy (mutual TLS, certificates from
#      the one-shot certs service); kvctl without certificates exits 3;
#      put/get/prefix scan from the host with them
#   2. docker kill of the node leading the most shards while a writer loop
#      runs: writes resume (the longest gap between acks is logged);
#      docker start: the node catches up
#   3. docker network disconnect of one node: the majority serves writes and
#      linearizable reads; the isolated node refuses linearizable reads and
#      writes with exit code 3 (never a stale linearizable read); reconnect:
#      it converges
#   4. compose down (volumes kept) and up: every acknowledged write is
#      there, and no container had an anonymous volume for down to leave
# and removes every container, network and volume of the project on exit,
# pass or fail.
#
# Skips (exit 0, one line) when no Docker engine answers or no compose is
# installed. Env: KVD_COMPOSE_PROJECT (default kvdtest), KVD_SKIP_COMPOSE_TEST=1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

say() { printf '%s compose-test: %s\n' "$(date +%T)" "$*"; }
fail() { say "FAIL: $*"; exit 1; }

if [ "${KVD_SKIP_COMPOSE_TEST:-}" = 1 ]; then
  echo "compose-test: skipped (KVD_SKIP_COMPOSE_TEST=1)"; exit 0
fi
if ! command -v docker >/dev/null 2>&1 || ! timeout 20 docker info >/dev/null 2>&1; then
  echo "compose-test: skipped (no Docker engine answers to 'docker info')"; exit 0
fi
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
else
  echo "compose-test: skipped (Docker engine answers but neither 'docker compose' nor 'docker-compose' is installed)"; exit 0
fi
for t in curl jq flock; do command -v $t >/dev/null 2>&1 || fail "$t is needed"; done

PROJECT=${KVD_COMPOSE_PROJECT:-kvdtest}
case $PROJECT in kvd*) ;; *) fail "KVD_COMPOSE_PROJECT must start with kvd, got $PROJECT" ;; esac
FILE=$ROOT/deploy/docker-compose.yml
KVCTL=$ROOT/deploy/.build/kvctl
T0=$(date +%s)

# One run at a time on this machine: the project name and ports are shared.
exec 9>"/tmp/kvd-compose-test-$PROJECT.lock"
flock -w 600 9 || fail "another compose-test holds /tmp/kvd-compose-test-$PROJECT.lock"

TMP=$(mktemp -d /tmp/kvd-compose-test.XXXXXX)
WRITER_PID=
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$FILE" "$@"; }

cleanup() {
  local rc=$?
  set +e
  if [ -n "$WRITER_PID" ]; then touch "$TMP/stop"; kill "$WRITER_PID" 2>/dev/null; wait "$WRITER_PID" 2>/dev/null; fi
  if [ $rc -ne 0 ]; then
    say "failed (rc=$rc); last logs of each node:"
    for s in kvd1 kvd2 kvd3; do
      c=$(cid "$s" 2>/dev/null)
      [ -n "$c" ] && { echo "--- $s"; docker logs --tail 15 "$c" 2>&1; }
    done
  fi
  compose down -v --remove-orphans --timeout 5 >/dev/null 2>&1
  # Belt and braces: anything of the project compose did not remove.
  docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | xargs -r docker rm -fv >/dev/null 2>&1
  docker network ls -q --filter "label=com.docker.compose.project=$PROJECT" | xargs -r docker network rm >/dev/null 2>&1
  docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | xargs -r docker volume rm -f >/dev/null 2>&1
  left=$( { docker ps -a --format '{{.Names}}'; docker network ls --format '{{.Name}}'; docker volume ls --format '{{.Name}}'; } | grep "^${PROJECT}[_-]" )
  [ -n "$left" ] && say "WARNING: left behind: $left"
  rm -rf "$TMP"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Container id of a service (v1 names them P_kvd1_1, v2 P-kvd1-1).
cid() {
  docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1" | head -1
}
ip_of() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$(cid "$1")"; }
now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }

# A run that was killed before its cleanup may have left the project behind.
"${COMPOSE[@]}" -p "$PROJECT" -f "$FILE" down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true

# Host ports: the compose defaults unless taken (a user's cluster, say).
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {
  local p=$1
  while ! port_free "$p"; do p=$((p + 7)); done
  echo "$p"
}
export KVD1_PORT=$(pick_port 42379) KVD2_PORT=$(pick_port 42479) KVD3_PORT=$(pick_port 42579)
export KVD1_METRICS_PORT=$(pick_port 42381) KVD2_METRICS_PORT=$(pick_port 42481) KVD3_METRICS_PORT=$(pick_port 42581)
export KVD_PUBLISH_ADDR=127.0.0.1 KVD_HEALTH_INTERVAL=1s
declare -A HOSTPORT=([kvd1]=$KVD1_PORT [kvd2]=$KVD2_PORT [kvd3]=$KVD3_PORT)
ALL_EPS=127.0.0.1:$KVD1_PORT,127.0.0.1:$KVD2_PORT,127.0.0.1:$KVD3_PORT
eps_except() { # host endpoints of every node but $1
  local s out=
  for s in kvd1 kvd2 kvd3; do [ "$s" = "$1" ] || out+=${out:+,}127.0.0.1:${HOSTPORT[$s]}; done
  echo "$out"
}
kv() { "$KVCTL" --endpoints "$ALL_EPS" "$@"; }

# retry N CMD...: run CMD until it succeeds, at most N times 0.5 s apart.
retry() {
  local n=$1 i; shift
  for ((i = 0; i < n; i++)); do "$@" && return 0; sleep 0.5; done
  return 1
}

wait_healthy() { # services...; bounded 90 s
  local s st i
  for ((i = 0; i < 180; i++)); do
    local all=1
    for s in "$@"; do
      st=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$(cid "$s")" 2>/dev/null || true)
      [ "$st" = healthy ] || all=
    done
    [ -n "$all" ] && return 0
    sleep 0.5
  done
  fail "not all of $* healthy within 90 s"
}

# metric NAME SERVICE: "shard value" lines of a per-shard gauge.
metric() {
  curl -sf -m 2 "http://$(ip_of "$2"):2381/metrics" |
    sed -n "s/^$1{shard=\"\([0-9]*\)\"} \([0-9.e+]*\)$/\1 \2/p"
}

# caught_up SERVICE: its applied index of every shard reaches the commit
# index the shard's leader reports, and it knows every shard's leader.
caught_up() {
  local s=$1 st applied
  st=$(kv --timeout 3s cluster status -o json 2>/dev/null) || return 1
  applied=$(metric kvd_raft_applied_index "$s") || return 1
  [ -n "$applied" ] || return 1
  curl -sf -m 2 "http://$(ip_of "$s"):2381/readyz" >/dev/null || return 1
  jq -e --arg applied "$applied" '
    ($applied | split("\n") | map(select(length > 0) | split(" ") | {key: .[0], value: (.[1] | tonumber)}) | from_entries) as $a
    | [.shards[] | select(.leader != 0)] as $s
    | ($s | length) > 0 and all($s[]; ($a[(.shard | tostring)] // -1) >= .commit)' <<<"$st" >/dev/null
}
wait_caught_up() { # service; bounded 90 s
  local i t0; t0=$(now_ms)
  for ((i = 0; i < 180; i++)); do
    caught_up "$1" && { say "$1 caught up in $(($(now_ms) - t0)) ms"; return 0; }
    sleep 0.5
  done
  fail "$1 did not catch up within 90 s"
}

# --- 0. image and a clean slate ----------------------------------------
say "using ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || true)), project $PROJECT, host ports $KVD1_PORT $KVD2_PORT $KVD3_PORT"
make --no-print-directory -C "$ROOT" image >"$TMP/image.log" 2>&1 || { cat "$TMP/image.log"; fail "make image"; }
say "image kvd:dev built"

# --- 1. up, healthy, basic operations from the host ---------------------
compose up -d >"$TMP/up.log" 2>&1 || { cat "$TMP/up.log"; fail "compose up"; }
wait_healthy kvd1 kvd2 kvd3
say "all three healthy after $(($(date +%s) - T0)) s"
# The cluster runs mutual TLS with certificates the certs service wrote
# into its volume; kvctl on the host uses a copy (kvctl in the containers
# finds them through KVCTL_CACERT/_CERT/_KEY in the compose file).
docker cp "$(cid kvd1):/certs/." "$TMP/certs" >/dev/null || fail "copy the certificates out of kvd1"
export KVCTL_CACERT=$TMP/certs/ca.crt KVCTL_CERT=$TMP/certs/client-root.crt KVCTL_KEY=$TMP/certs/client-root.key
set +e; out=$(KVCTL_CACERT= KVCTL_CERT= KVCTL_KEY= "$KVCTL" --endpoints "$ALL_EPS" --timeout 3s get hello/a 2>&1); rc=$?; set -e
[ $rc -eq 3 ] && [[ $out == *TLS* ]] || fail "kvctl without certificates exited $rc ($out), want 3 naming TLS"
curl -s -o /dev/null -w '%{http_code}' -m 2 "http://127.0.0.1:$KVD1_METRICS_PORT/debug/pprof/" | grep -qx 404 ||
  fail "/debug/pprof/ is served on the published metrics port"
say "TLS: kvctl without certificates refused with exit 3; pprof not served"

ACKED=$TMP/acked # "key value" of every acknowledged write
put_acked() { kv --timeout 5s put "$1" "$2" >/dev/null && echo "$1 $2" >>"$ACKED"; }
retry 20 put_acked hello/a 1 || fail "first put from the host"
put_acked hello/b 2 || fail "put hello/b"
put_acked hello/c 3 || fail "put hello/c"
[ "$(kv get hello/b)" = 2 ] || fail "get hello/b"
scan=$(kv get --prefix hello/ | paste -sd' ')
[ "$scan" = "hello/a 1 hello/b 2 hello/c 3" ] || fail "prefix scan gave: $scan"
set +e; kv get hello/missing >/dev/null 2>&1; rc=$?; set -e
[ $rc -eq 1 ] || fail "get of a missing key exited $rc, want 1"
say "put/get/prefix scan from the host ok"

# One endpoint is enough: kvd1 forwards what it does not lead to the leader
# over the private network (the host cannot resolve kvd2 and kvd3).
one() { "$KVCTL" --endpoints "127.0.0.1:$KVD1_PORT" --timeout 5s "$@"; }
one_endpoint() {
  for i in $(seq -w 0 15); do
    one put "one/$i" "v$i" >/dev/null || fail "put one/$i through kvd1 alone"
    echo "one/$i v$i" >>"$ACKED"
  done
  for i in $(seq -w 0 15); do
    [ "$(one get "one/$i")" = "v$i" ] || fail "get one/$i through kvd1 alone"
  done
  fwd=$(curl -sf -m 2 "http://127.0.0.1:$KVD1_METRICS_PORT/metrics" | sed -n 's/^kvd_forwarded_requests_total{result="answered"} //p')
}
one_endpoint
if [ "${fwd:-0}" = 0 ]; then
  # kvd1 led every shard the keys went to (the first elections often go
  # to one node), so nothing needed forwarding. Restarted, it comes back
  # a follower of the leaders the other two elected meanwhile.
  say "kvd1 forwarded nothing: it led every shard the keys went to; restarting it so that the others lead"
  docker restart "$(cid kvd1)" >/dev/null
  wait_healthy kvd1
  wait_caught_up kvd1
  one_endpoint
fi
[ "${fwd:-0}" != 0 ] || fail "kvd1 forwarded nothing (or its metrics port $KVD1_METRICS_PORT is not published)"
for p in "$KVD1_METRICS_PORT" "$KVD2_METRICS_PORT" "$KVD3_METRICS_PORT"; do
  curl -sf -m 2 "http://127.0.0.1:$p/healthz" >/dev/null || fail "/healthz on published port $p"
done
say "one endpoint serves every key ($fwd forwarded by kvd1); /metrics and /healthz published on $KVD1_METRICS_PORT $KVD2_METRICS_PORT $KVD3_METRICS_PORT"

# --- 2. kill the node leading the most shards under a write load --------
# cluster status exits 3 while a shard has no leader; its JSON is still
# printed, and the jq below only counts shards that have one.
status=$(kv cluster status -o json) || true
victim_id=$(jq -r '[.shards[] | select(.leader != 0) | .leader] | group_by(.) | map({id: .[0], n: length}) | max_by(.n) | "\(.id) \(.n)"' <<<"$status")
victim=kvd${victim_id%% *}
say "$victim leads ${victim_id##* } of $(jq '.shards | length' <<<"$status") shards: killing it under load"

writer() {
  local i=0 k s t
  while [ ! -e "$TMP/stop" ]; do
    i=$((i + 1)); k=$(printf 'w/%06d' "$i")
    s=${EPOCHREALTIME/./}
    # --debug: each failed attempt is logged with its node and duration,
    # so the slowest put below can say where its time went.
    if "$KVCTL" --endpoints "$ALL_EPS" --timeout 5s --debug put "$k" "v$i" >/dev/null 2>"$TMP/put.err"; then
      t=${EPOCHREALTIME/./}
      echo "$k v$i" >>"$ACKED"; echo "$((t / 1000))" >>"$TMP/acktimes"
    else
      t=${EPOCHREALTIME/./}
      echo "$k" >>"$TMP/writefail"
    fi
    echo "$k $((s / 1000)) $(((t - s) / 1000))" >>"$TMP/latency"
    { echo "== $k"; cat "$TMP/put.err"; } >>"$TMP/writer.err"
  done
}
acks() { [ -f "$TMP/acktimes" ] && wc -l <"$TMP/acktimes" || echo 0; }
wait_acks() { # N: wait until at least N acks in all; bounded 60 s
  local i
  for ((i = 0; i < 120; i++)); do [ "$(acks)" -ge "$1" ] && return 0; sleep 0.5; done
  fail "writes stalled at $(acks) acks (want $1); last errors: $(grep '^kvctl:' "$TMP/writer.err" 2>/dev/null | tail -3)"
}
writer & WRITER_PID=$!
wait_acks 20
kill_ms=$(now_ms); before=$(acks)
docker kill "$(cid "$victim")" >/dev/null
wait_acks $((before + 30))
touch "$TMP/stop"; wait "$WRITER_PID" || true; WRITER_PID=
gap_ms=$(awk -v k="$kill_ms" 'NR > 1 && $1 > k && $1 - p > g { g = $1 - p } { p = $1 } END { print g + 0 }' "$TMP/acktimes")
first_after=$(awk -v k="$kill_ms" '$1 > k { print $1 - k; exit }' "$TMP/acktimes")
nfail=$( [ -f "$TMP/writefail" ] && wc -l <"$TMP/writefail" || echo 0)
slowest=$(sort -k3,3n "$TMP/latency" | tail -1 | awk -v k="$kill_ms" '{ printf "%s took %d ms, started %d ms after the kill", $1, $3, $2 - k }')
say "writes resumed: longest gap between acks after the kill ${gap_ms} ms (first ack ${first_after} ms after it); $(acks) acked, $nfail failed; slowest put: $slowest"
# Where the slowest put's time went: its failed attempts (kvctl --debug),
# the first and last three of them.
slow_key=$(sort -k3,3n "$TMP/latency" | tail -1 | cut -d' ' -f1)
awk -v k="== $slow_key" '$0 == k { on = 1; next } /^== / { on = 0 } on && /attempt failed/' "$TMP/writer.err" >"$TMP/slow.err"
if [ -s "$TMP/slow.err" ]; then
  say "  $slow_key: $(wc -l <"$TMP/slow.err") failed attempts; the first and last:"
  { head -3 "$TMP/slow.err"; [ "$(wc -l <"$TMP/slow.err")" -gt 6 ] && echo "..."; tail -n +4 "$TMP/slow.err" | tail -3; } |
    while read -r line; do say "    ${line#*level=DEBUG }"; done
fi

docker start "$(cid "$victim")" >/dev/null
wait_healthy "$victim"
wait_caught_up "$victim"

# --- 3. partition one node ----------------------------------------------
# Isolate the node that now leads the most shards: a leader cut off from
# its followers is where a stale linearizable read would come from.
status=$(kv cluster status -o json) || true
isolated=kvd$(jq -r '[.shards[] | select(.leader != 0) | .leader] | group_by(.) | max_by(length) | .[0]' <<<"$status")
led=$(jq -r --arg id "${isolated#kvd}" '[.shards[] | select(.leader == ($id | tonumber)) | .shard] | join(" ")' <<<"$status")
majority_eps=$(eps_except "$isolated")
ic=$(cid "$isolated")
NET=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "$ic")
# Keys whose value changes during the partition. Sixteen of them, so some
# almost surely live on shards the isolated node led.
for i in $(seq -w 0 15); do put_acked "part/$i" old || fail "put part/$i"; done
docker network disconnect "$NET" "$ic"
say "$isolated disconnected from $NET"
mkv() { "$KVCTL" --endpoints "$majority_eps" "$@"; }
for i in $(seq -w 0 15); do
  retry 10 mkv --timeout 5s put "part/$i" new >/dev/null || fail "majority: put part/$i"
  echo "part/$i new" >>"$ACKED"
done
for i in $(seq -w 0 15); do
  v=$(mkv --timeout 5s get "part/$i") || fail "majority: linearizable get part/$i"
  [ "$v" = new ] || fail "majority: part/$i = $v, want new"
done
say "majority serves writes and linearizable reads"
# The isolated node, asked from inside its container (the host cannot reach
# it any more): linearizable get and put must be refused with exit 3.
iso() { docker exec "$ic" /kvctl --endpoints 127.0.0.1:2379 --timeout 2s "$@"; }
for i in $(seq -w 0 15); do
  ( set +e; v=$(iso get "part/$i" 2>"$TMP/iso.$i.err"); echo "$? $v" >"$TMP/iso.$i" ) &
done
wait
covered=0
for i in $(seq -w 0 15); do
  read -r rc v <"$TMP/iso.$i"
  [ "$v" = old ] && fail "STALE linearizable read on isolated $isolated: part/$i = old (rc $rc)"
  [ "$rc" = 3 ] || fail "isolated $isolated: linearizable get part/$i exited $rc ($v), want 3: $(cat "$TMP/iso.$i.err")"
  sh=$(sed -n 's/.*[: ]shard \([0-9]*\)[: ].*/\1/p' "$TMP/iso.$i.err" | head -1)
  case " $led " in *" $sh "*) covered=$((covered + 1)) ;; esac
done
set +e; iso put part/00 isolated >/dev/null 2>"$TMP/iso.put.err"; rc=$?; set -e
[ $rc -eq 3 ] || fail "isolated $isolated: put exited $rc, want 3: $(cat "$TMP/iso.put.err")"
set +e; sv=$(docker exec "$ic" /kvctl --endpoints 127.0.0.1:2379 --timeout 8s get --consistency serializable part/00 2>/dev/null); src=$?; set -e
say "isolated $isolated refuses linearizable get (16 keys, $covered on shards it led: $led) and put with exit 3; serializable get: rc=$src value=${sv:-none}"

docker network connect --alias "$isolated" "$NET" "$ic"
say "$isolated reconnected"
wait_caught_up "$isolated"
for i in $(seq -w 0 15); do
  v=$(kv --timeout 5s get "part/$i") || fail "after reconnect: get part/$i"
  [ "$v" = new ] || fail "after reconnect: part/$i = $v, want new"
done
[ "$(docker exec "$ic" /kvctl --endpoints 127.0.0.1:2379 --timeout 8s get --consistency serializable part/00)" = new ] ||
  fail "isolated node did not converge: its serializable read of part/00 is not new"
say "$isolated converged"

# --- 4. down (keeping volumes) and up: nothing acknowledged is lost ------
# down keeps volumes, so every volume the project's containers mount must
# be one of its named ones: an anonymous volume would be left behind.
anon=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" |
  xargs -r docker inspect -f '{{.Name}}{{range .Mounts}}{{if eq .Type "volume"}} {{.Name}}{{end}}{{end}}' |
  awk -v p="$PROJECT" '{ for (i = 2; i <= NF; i++) if (index($i, p "_") != 1 && index($i, p "-") != 1) print $1 ":" $i }')
[ -z "$anon" ] || fail "anonymous volumes, which down would leave behind: $anon"
compose down --timeout 20 >"$TMP/down.log" 2>&1 || { cat "$TMP/down.log"; fail "compose down"; }
[ -z "$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")" ] || fail "containers left after down"
compose up -d >"$TMP/up2.log" 2>&1 || { cat "$TMP/up2.log"; fail "compose up (second)"; }
wait_healthy kvd1 kvd2 kvd3
check_all() {
  local want got
  # Last acknowledged value of each key, in key order.
  want=$(awk '{ v[$1] = $2 } END { for (k in v) print k, v[k] }' "$ACKED" | LC_ALL=C sort)
  got=$( { kv --timeout 10s get --prefix hello/; kv --timeout 10s get --prefix w/; kv --timeout 10s get --prefix part/; kv --timeout 10s get --prefix one/; } | paste -d' ' - - | LC_ALL=C sort) || return 1
  # Every acknowledged write must be there; a write that failed may or may
  # not have committed, so extra w/ keys are fine.
  missing=$(LC_ALL=C comm -23 <(echo "$want") <(echo "$got"))
  [ -z "$missing" ]
}
missing=
retry 20 check_all || fail "after down/up, $(echo "$missing" | grep -c .) acknowledged writes missing or changed: $(echo "$missing" | head -5 | paste -sd' ')"
say "after down/up all $(awk '{print $1}' "$ACKED" | sort -u | wc -l) acknowledged keys are there"

echo "compose-test: ok gap_ms=$gap_ms first_ack_after_kill_ms=$first_after killed=$victim isolated=$isolated isolated_led_keys=$covered acked=$(wc -l <"$ACKED") failed_writes=$nfail elapsed_s=$(($(date +%s) - T0))"

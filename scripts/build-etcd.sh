#!/usr/bin/env bash
# Builds etcd and etcd's own benchmark tool, at ETCD_VERSION (default
# v3.6.14, the version the throughput budget in docs/benchmarks.md was
# set against), into bin/etcd-VERSION/ (make etcd). make bench runs them
# next to kvd, so its table carries a same-run etcd comparison: this VM's
# speed drifts by a third between days, and a ratio measured in one run
# far less (by a tenth to a fifth between runs; take the median of
# three).
#
# Both come from the Go module proxy, built from source in a throwaway
# module (etcd's own go.mod has replace directives, so `go install
# module@version` refuses it). Nothing of etcd is committed here. Does
# nothing when both binaries are already built.
set -euo pipefail
cd "$(dirname "$0")/.."
V=${ETCD_VERSION:-v3.6.14}
OUT=$PWD/bin/etcd-$V
if [ -x "$OUT/etcd" ] && [ -x "$OUT/benchmark" ]; then
  exit 0
fi
GO=${GO:-go}
tmp=$(mktemp -d -t kvd-etcd-build.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
cat >main.go <<'GO'
// Command etcd is etcd's server, built from its module for make bench.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
echo "build-etcd: building etcd $V and its benchmark tool into $OUT (from the Go module proxy)" >&2
"$GO" mod init kvd-etcd-bench >/dev/null 2>&1
"$GO" get "go.etcd.io/etcd/server/v3@$V" "go.etcd.io/etcd/v3@$V" >/dev/null 2>&1 ||
  { echo "build-etcd: could not fetch etcd $V from the module proxy" >&2; exit 1; }
mkdir -p "$OUT"
"$GO" build -o "$OUT/etcd" .
"$GO" build -o "$OUT/benchmark" go.etcd.io/etcd/v3/tools/benchmark
echo "build-etcd: built $OUT/etcd and $OUT/benchmark" >&2

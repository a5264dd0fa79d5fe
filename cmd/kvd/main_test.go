package main

import (
	"bytes"
	"math"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"
	"time"

	"github.com/kvd/kvd/internal/proccluster"
)

// The flags docs/design.md (kvd flags) promises, each with its environment
// variable.
var documentedFlags = []string{
	"--id", "--data-dir", "--listen-client", "--advertise-client",
	"--listen-peer", "--advertise-peer", "--listen-metrics",
	"--initial-cluster", "--shards", "--replicas", "--join",
	"--max-inflight-bytes", "--max-response-bytes", "--max-batch-stream-bytes",
	"--max-client-conns", "--batch-send-timeout",
}

func TestHelpDocumentsEveryFlag(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run([]string{"--help"}, &out, &errOut, nil); code != 0 || errOut.Len() != 0 {
		t.Fatalf("--help: exit %d, stderr %q; want 0 and the help on stdout", code, errOut.String())
	}
	help := out.String()
	for _, f := range documentedFlags {
		if !strings.Contains(help, f+" ") {
			t.Errorf("kvd --help does not document %s", f)
		}
	}
	for _, s := range []string{"KVD_DATA_DIR", "ignores", "Example", "single-node"} {
		if !strings.Contains(help, s) {
			t.Errorf("kvd --help does not mention %q", s)
		}
	}
}

func freePort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// node returns args for a single-node kvd on free ports in dir.
func node(t *testing.T, dir string) []string {
	return []string{"--data-dir", dir, "--listen-client", freePort(t), "--listen-peer", freePort(t), "--listen-metrics", ""}
}

func TestBadFlagsExit2WithOneLine(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"malformed initial cluster", []string{"--initial-cluster", "1:127.0.0.1:2380"}, "ID=HOST:PORT"},
		{"bad id in initial cluster", []string{"--initial-cluster", "x=127.0.0.1:2380"}, "positive integer"},
		{"id not in initial cluster", []string{"--id", "4", "--initial-cluster", "1=127.0.0.1:2380,2=127.0.0.1:2390"}, "not in --initial-cluster"},
		{"own peer address differs from advertised", []string{"--advertise-peer", "127.0.0.1:2380", "--initial-cluster", "1=127.0.0.1:2390,2=127.0.0.1:2400"}, "gives node 1 the peer address 127.0.0.1:2390, but it advertises 127.0.0.1:2380"},
		{"port in use", []string{"--listen-client", busy.Addr().String()}, "pick a free port"},
		{"unknown flag", []string{"--no-such-flag"}, "unknown flag"},
		{"positional argument", []string{"extra"}, "unknown command"},
		{"bad log level", []string{"--log-level", "loud"}, "--log-level"},
		{"negative commit interval", []string{"--commit-interval", "-1s"}, "--commit-interval"},
		{"negative storage partitions", []string{"--storage-partitions", "-1"}, "--storage-partitions -1 out of range"},
		{"too many storage partitions", []string{"--storage-partitions", "65"}, "use 1..64"},
		{"join with bootstrap flags", []string{"--join", "127.0.0.1:2379", "--initial-cluster", "1=127.0.0.1:2380"}, "drop --initial-cluster"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			args := append(node(t, filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-"))), tc.args...)
			code := run(args, &out, &out, nil)
			if code != exitUsage {
				t.Fatalf("exit %d, want %d; output:\n%s", code, exitUsage, out.String())
			}
			last := lastLine(out.String())
			if !strings.HasPrefix(last, "kvd: ") || !strings.Contains(last, tc.want) {
				t.Fatalf("last line %q should start with \"kvd: \" and mention %q", last, tc.want)
			}
		})
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// startStop runs kvd with args until it is up, then stops it; it returns
// the exit code and output.
func startStop(t *testing.T, args []string) (int, string) {
	t.Helper()
	stop := make(chan struct{})
	var out proccluster.SyncBuffer
	done := make(chan int, 1)
	go func() { done <- run(args, &out, &out, stop) }()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(out.String(), "kvd node started") {
		select {
		case code := <-done:
			return code, out.String()
		default:
		}
		if time.Now().After(deadline) {
			close(stop)
			t.Fatalf("kvd did not start:\n%s", out.String())
		}
		time.Sleep(10 * time.Millisecond) // poll interval
	}
	close(stop)
	return <-done, out.String()
}

func TestRestartIgnoresBootstrapFlagsAndRefusesAnotherCluster(t *testing.T) {
	dir := t.TempDir()
	peer := freePort(t)
	first := append(node(t, dir), "--listen-peer", peer, "--initial-cluster", "1="+peer, "--shards", "2")
	if code, out := startStop(t, first); code != 0 {
		t.Fatalf("first start exit %d:\n%s", code, out)
	}
	// Same flags again: recovers and says it ignored them.
	if code, out := startStop(t, append(node(t, dir), "--initial-cluster", "1="+peer, "--shards", "2")); code != 0 || !strings.Contains(out, "bootstrap and join flags ignored") {
		t.Fatalf("restart exit %d, output:\n%s", code, out)
	}
	// No bootstrap flags: recovers.
	if code, out := startStop(t, node(t, dir)); code != 0 {
		t.Fatalf("restart without flags exit %d:\n%s", code, out)
	}
	// Flags of another cluster: refused with exit 2.
	var out bytes.Buffer
	code := run(append(node(t, dir), "--initial-cluster", "1="+peer+",2=127.0.0.1:1", "--shards", "2"), &out, &out, nil)
	if code != exitUsage || !strings.Contains(lastLine(out.String()), "another cluster") {
		t.Fatalf("another cluster's flags: exit %d, output:\n%s", code, out.String())
	}
	// Another node's id: refused with exit 2.
	out.Reset()
	code = run(append(node(t, dir), "--id", "2"), &out, &out, nil)
	if code != exitUsage || !strings.Contains(lastLine(out.String()), "belongs to node 1") {
		t.Fatalf("other node id: exit %d, output:\n%s", code, out.String())
	}
}

func TestEnvironmentSetsFlags(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("KVD_DATA_DIR", dir)
	t.Setenv("KVD_LISTEN_CLIENT", freePort(t))
	t.Setenv("KVD_LISTEN_PEER", freePort(t))
	t.Setenv("KVD_LISTEN_METRICS", "")
	t.Setenv("KVD_SHARDS", "2")
	code, out := startStop(t, nil)
	if code != 0 || !strings.Contains(out, "data_dir="+dir) {
		t.Fatalf("exit %d; output does not show the data dir from KVD_DATA_DIR:\n%s", code, out)
	}
	t.Setenv("KVD_SHARDS", "many")
	var buf bytes.Buffer
	if code := run(nil, &buf, &buf, nil); code != exitUsage || !strings.Contains(buf.String(), "KVD_SHARDS") {
		t.Fatalf("bad KVD_SHARDS: exit %d:\n%s", code, buf.String())
	}
}

// TestLimitFlagsFromEnvironment: the limit flags are read from KVD_*
// like every flag, and a bad value is a usage error naming the variable.
func TestLimitFlagsFromEnvironment(t *testing.T) {
	for _, name := range []string{"KVD_MAX_RESPONSE_BYTES", "KVD_MAX_CLIENT_CONNS", "KVD_MAX_BATCH_STREAM_BYTES", "KVD_BATCH_SEND_TIMEOUT"} {
		t.Run(name, func(t *testing.T) {
			t.Setenv(name, "lots")
			var buf bytes.Buffer
			if code := run(node(t, t.TempDir()), &buf, &buf, nil); code != exitUsage || !strings.Contains(buf.String(), name) {
				t.Fatalf("bad %s: exit %d:\n%s", name, code, buf.String())
			}
		})
	}
}

// TestDefaultMemoryLimit: without GOMEMLIMIT kvd sets its own soft
// memory limit; with it, the runtime's (from GOMEMLIMIT) stays.
func TestDefaultMemoryLimit(t *testing.T) {
	prev := debug.SetMemoryLimit(-1)
	defer debug.SetMemoryLimit(prev)
	if v, ok := os.LookupEnv("GOMEMLIMIT"); ok {
		defer os.Setenv("GOMEMLIMIT", v)
	} else {
		defer os.Unsetenv("GOMEMLIMIT")
	}

	os.Unsetenv("GOMEMLIMIT")
	debug.SetMemoryLimit(math.MaxInt64)
	setMemoryLimit()
	if got := debug.SetMemoryLimit(-1); got != defaultMemoryLimit {
		t.Fatalf("memory limit %d without GOMEMLIMIT, want %d", got, defaultMemoryLimit)
	}

	os.Setenv("GOMEMLIMIT", "1GiB")
	debug.SetMemoryLimit(1 << 30)
	setMemoryLimit()
	if got := debug.SetMemoryLimit(-1); got != 1<<30 {
		t.Fatalf("memory limit %d with GOMEMLIMIT=1GiB, want it kept", got)
	}
}

// TestVersion: kvd --version prints one line on stdout and starts nothing.
func TestVersion(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run([]string{"--version"}, &out, &errOut, nil); code != 0 || errOut.Len() != 0 {
		t.Fatalf("--version: exit %d, stderr %q", code, errOut.String())
	}
	if v := out.String(); !strings.HasPrefix(v, "kvd ") || strings.Count(v, "\n") != 1 || !strings.Contains(v, "go1.") {
		t.Fatalf("--version printed %q, want one line \"kvd VERSION ... goX\"", v)
	}
}

// A restarted or joining node validates its flags as a fresh one does: a
// restart once accepted --commit-interval -1s.
func TestRestartAndJoinValidateFlags(t *testing.T) {
	dir := t.TempDir()
	if code, out := startStop(t, append(node(t, dir), "--shards", "1")); code != 0 {
		t.Fatalf("first start exit %d:\n%s", code, out)
	}
	var out bytes.Buffer
	if code := run(append(node(t, dir), "--commit-interval", "-1s"), &out, &out, nil); code != exitUsage || !strings.Contains(lastLine(out.String()), "--commit-interval") {
		t.Fatalf("restart with --commit-interval -1s: exit %d, output:\n%s", code, out.String())
	}
	out.Reset()
	if code := run(append(node(t, t.TempDir()), "--id", "2", "--join", "127.0.0.1:1", "--commit-interval", "-1s"), &out, &out, nil); code != exitUsage || !strings.Contains(lastLine(out.String()), "--commit-interval") {
		t.Fatalf("join with --commit-interval -1s: exit %d, output:\n%s", code, out.String())
	}
}

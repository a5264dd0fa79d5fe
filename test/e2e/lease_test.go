package e2e

import (
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kvd/kvd/internal/proccluster"
)

// TestKvctlLease drives kvctl lease against a real 3-node cluster: grant
// prints the id alone, put --lease attaches keys, ttl --keys lists them,
// keepalive keeps the lease past its TTL and exits 0 on Ctrl-C and 1 once
// the lease is revoked, and a lease that is gone exits 1 everywhere.
func TestKvctlLease(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 2})
	run := func(want int, args ...string) (string, string) {
		t.Helper()
		out, errOut, code := c.Kvctl("", args...)
		if code != want {
			t.Fatalf("kvctl %q: exit %d, want %d (stdout %q, stderr %q)", args, code, want, out, errOut)
		}
		return out, errOut
	}
	keepalive := func(id string) (*exec.Cmd, *proccluster.SyncBuffer) {
		t.Helper()
		return bg(t, c, "lease", "keepalive", id)
	}
	exitCode := func(cmd *exec.Cmd) int {
		t.Helper()
		return exitOf(t, cmd)
	}

	out, _ := run(0, "lease", "grant", "2")
	id := strings.TrimSpace(out)
	if id == "" || strings.ContainsAny(id, " \t\n") {
		t.Fatalf("lease grant printed %q, want the id alone", out)
	}
	for _, k := range []string{"svc/a", "svc/b", "svc/c"} {
		run(0, "put", "--lease", id, k, "up")
	}
	if out, _ := run(0, "lease", "ttl", id, "--keys"); !strings.HasPrefix(out, "lease "+id+" granted 2s") ||
		!strings.Contains(out, "svc/a\n") || !strings.Contains(out, "svc/c\n") {
		t.Fatalf("lease ttl --keys: %q", out)
	}
	if out, _ := run(0, "lease", "list"); !strings.Contains(out, id+"\n") {
		t.Fatalf("lease list: %q", out)
	}

	// Kept alive, the lease outlives several TTLs; Ctrl-C exits 0.
	ka, buf := keepalive(id)
	buf.WaitFor(t, 20*time.Second, "four renewals", func(out string) bool { return strings.Count(out, "TTL") >= 4 })
	if out, _ := run(0, "get", "svc/a"); out != "up\n" {
		t.Fatalf("kept-alive key: %q", out)
	}
	if err := ka.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if code := exitCode(ka); code != 0 {
		t.Fatalf("keepalive after Ctrl-C: exit %d, want 0", code)
	}

	// A keepalive learns of the revocation and exits 1.
	ka, buf = keepalive(id)
	buf.WaitFor(t, 10*time.Second, "a renewal", func(out string) bool { return strings.Contains(out, "TTL") })
	if out, _ := run(0, "lease", "revoke", id); out != "3\n" {
		t.Fatalf("lease revoke printed %q, want 3 (keys deleted)", out)
	}
	if code := exitCode(ka); code != 1 {
		t.Fatalf("keepalive of a revoked lease: exit %d, want 1", code)
	}
	run(1, "get", "svc/b")
	run(1, "lease", "ttl", id)
	run(1, "lease", "revoke", id)
	run(1, "lease", "keepalive", id)
	if _, e := run(1, "put", "--lease", id, "svc/a", "late"); !strings.Contains(e, "lease") {
		t.Fatalf("put with a revoked lease: %q", e)
	}
	run(2, "lease", "grant", "0")
	run(2, "lease", "ttl", "abc")

	// A keepalive killed with SIGKILL renews no more: its lease expires
	// and takes its keys, in both shards, within the TTL, an election
	// timeout (at most 20 ticks of 50 ms at the cluster's defaults) and a
	// second.
	out, _ = run(0, "lease", "grant", "2")
	killed := strings.TrimSpace(out)
	for _, k := range []string{"{x}/a", "{y}/b", "{z}/c", "{w}/d"} {
		run(0, "put", "--lease", killed, k, "up")
	}
	ka, buf = keepalive(killed)
	buf.WaitFor(t, 10*time.Second, "a renewal", func(out string) bool { return strings.Contains(out, "TTL") })
	if err := ka.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = ka.Wait()
	start := time.Now()
	proccluster.WaitFor(t, 15*time.Second, "the killed keepalive's keys deleted", func() bool {
		out, _, code := c.Kvctl("", "get", "--prefix", "{")
		return code == 0 && strings.TrimSpace(out) == ""
	})
	if gone, bound := time.Since(start), 2*time.Second+20*50*time.Millisecond+time.Second; gone > bound {
		t.Errorf("keys of a lease whose keepalive was killed were gone %v after the kill; the bound is TTL + election timeout + 1 s = %v", gone, bound)
	} else {
		t.Logf("keys gone %v after the keepalive's SIGKILL", gone)
	}

	// Without renewals, a lease expires and takes its key.
	out, _ = run(0, "lease", "grant", "1")
	short := strings.TrimSpace(out)
	run(0, "put", "--lease", short, "svc/short", "up")
	proccluster.WaitFor(t, 10*time.Second, "the unrenewed lease's key deleted", func() bool {
		_, _, code := c.Kvctl("", "get", "svc/short")
		return code == 1
	})
}

// TestKvctlLeaseWithAuth: once auth is on, any user may use leases, and a
// put with a lease needs the key's own permission; no user is exit 4.
func TestKvctlLeaseWithAuth(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 2})
	for _, args := range [][]string{
		{"user", "add", "root", "--password", "r00t"},
		{"user", "grant-role", "root", "root"},
		{"user", "add", "app", "--password", "pw"},
		{"role", "add", "svc"},
		{"role", "grant-permission", "svc", "readwrite", "--prefix", "svc/"},
		{"user", "grant-role", "app", "svc"},
		{"auth", "enable"},
	} {
		if out, errOut, code := c.Kvctl("", args...); code != 0 || out != "OK\n" {
			t.Fatalf("kvctl %v: exit %d %q %s", args, code, out, errOut)
		}
	}
	proccluster.WaitFor(t, 10*time.Second, "a lease grant without a user refused", func() bool {
		_, _, code := c.Kvctl("", "lease", "grant", "5")
		return code == 4
	})
	out, errOut, code := c.Kvctl("", "--user", "app:pw", "lease", "grant", "30")
	if code != 0 {
		t.Fatalf("lease grant as app: exit %d %q", code, errOut)
	}
	id := strings.TrimSpace(out)
	if _, errOut, code := c.Kvctl("", "--user", "app:pw", "put", "--lease", id, "svc/x", "v"); code != 0 {
		t.Fatalf("put --lease as app: exit %d %q", code, errOut)
	}
	if _, _, code := c.Kvctl("", "--user", "app:pw", "put", "--lease", id, "other", "v"); code != 4 {
		t.Fatalf("put --lease of a key app may not write: exit %d, want 4", code)
	}
	ka, buf := bg(t, c, "--user", "app:pw", "lease", "keepalive", id)
	buf.WaitFor(t, 20*time.Second, "a renewal as app", func(out string) bool { return strings.Contains(out, "TTL 30s") })
	_ = ka.Process.Signal(syscall.SIGINT)
	if code := exitOf(t, ka); code != 0 {
		t.Fatalf("keepalive as app after Ctrl-C: exit %d", code)
	}
	if out, _, code := c.Kvctl("", "--user", "app:pw", "lease", "revoke", id); code != 0 || out != "1\n" {
		t.Fatalf("lease revoke as app: exit %d, %q", code, out)
	}
}

package embed_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/embed"
	"github.com/kvd/kvd/server"
)

// start starts a node on cfg and closes it when the test ends.
func start(t *testing.T, cfg embed.Config) *embed.Node {
	t.Helper()
	n, err := embed.Start(t.Context(), cfg)
	if err != nil {
		t.Fatalf("start: %v", err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return n
}

// waitReady waits for Ready with a deadline.
func waitReady(t *testing.T, n *embed.Node) {
	t.Helper()
	select {
	case <-n.Ready():
	case err := <-n.Err():
		t.Fatalf("node failed before ready: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("node not ready after 30s")
	}
}

func TestDataDirAloneServesInProcess(t *testing.T) {
	dir := t.TempDir()
	n := start(t, embed.Config{DataDir: dir, Shards: 2})
	waitReady(t, n)
	if addr := n.Server().ClientAddr(); !strings.HasSuffix(addr, ".invalid:0") {
		t.Fatalf("client address %q: want an in-memory address, not a port", addr)
	}
	if addr := n.Server().PeerAddr(); !strings.HasSuffix(addr, ".invalid:0") {
		t.Fatalf("peer address %q: want an in-memory address, not a port", addr)
	}
	if n.Server().MetricsAddr() != "" {
		t.Fatalf("metrics served on %q; want none", n.Server().MetricsAddr())
	}
	ctx := t.Context()
	c := n.Client()
	if _, err := c.Put(ctx, []byte("greeting"), []byte("hello")); err != nil {
		t.Fatal(err)
	}
	kv, err := c.Get(ctx, []byte("greeting"))
	if err != nil {
		t.Fatal(err)
	}
	if string(kv.GetValue()) != "hello" {
		t.Fatalf("got %q, want hello", kv.GetValue())
	}
	if _, err := os.Stat(filepath.Join(dir, "kvd.db")); err != nil {
		t.Fatalf("data dir holds no kvd.db: %v", err)
	}
}

func TestDataSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	ctx := t.Context()
	n, err := embed.Start(ctx, embed.Config{DataDir: dir, Shards: 2})
	if err != nil {
		t.Fatal(err)
	}
	waitReady(t, n)
	if _, err := n.Client().Put(ctx, []byte("k"), []byte("v1")); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	n2 := start(t, embed.Config{DataDir: dir})
	waitReady(t, n2)
	kv, err := n2.Client().Get(ctx, []byte("k"))
	if err != nil || string(kv.GetValue()) != "v1" {
		t.Fatalf("after restart: %v %q, want v1", err, kv.GetValue())
	}
}

// TestRestartRejectsWhatBootstrapRejects: a restarted node once took
// --commit-interval -1s, which a fresh node refused.
func TestRestartRejectsWhatBootstrapRejects(t *testing.T) {
	dir := t.TempDir()
	bad := embed.Config{DataDir: dir, CommitInterval: -time.Second}
	if _, err := embed.Start(t.Context(), bad); !errors.Is(err, server.ErrConfig) {
		t.Fatalf("fresh node with a negative commit interval: %v, want ErrConfig", err)
	}
	n, err := embed.Start(t.Context(), embed.Config{DataDir: dir, Shards: 1})
	if err != nil {
		t.Fatal(err)
	}
	waitReady(t, n)
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := embed.Start(t.Context(), bad); !errors.Is(err, server.ErrConfig) || !strings.Contains(err.Error(), "commit-interval") {
		t.Fatalf("restarted node with a negative commit interval: %v, want ErrConfig naming --commit-interval", err)
	}
	join := embed.Config{DataDir: t.TempDir(), Join: "127.0.0.1:1", CommitInterval: -time.Second}
	if _, err := embed.Start(t.Context(), join); !errors.Is(err, server.ErrConfig) {
		t.Fatalf("joining node with a negative commit interval: %v, want ErrConfig", err)
	}
}

func TestLocalCallsCounted(t *testing.T) {
	n := start(t, embed.Config{DataDir: t.TempDir(), Shards: 2})
	waitReady(t, n)
	before := n.LocalCalls()
	if _, err := n.Client().Put(t.Context(), []byte("a"), []byte("1")); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Client().Get(t.Context(), []byte("a")); err != nil {
		t.Fatal(err)
	}
	got := n.LocalCalls()
	if got < before+2 {
		t.Fatalf("LocalCalls went from %d to %d after a put and a get on a single node; want +2", before, got)
	}
	mfs, err := n.Server().Metrics().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "kvd_client_local_calls_total" {
			if v := mf.GetMetric()[0].GetCounter().GetValue(); v < float64(got) {
				t.Fatalf("kvd_client_local_calls_total = %v, want at least %d", v, got)
			}
			return
		}
	}
	t.Fatal("no kvd_client_local_calls_total metric")
}

var _ = client.ErrNotFound

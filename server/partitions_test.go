package server

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kvd/kvd/internal/testkit"
)

// A cluster whose nodes spread their shards over three storage
// partitions serves writes, restarts a node from its files (keeping the
// count its data dir was created with, whatever the flag says now), and
// keeps every write through the restart.
func TestStoragePartitionsServeAndRestart(t *testing.T) {
	c := newTestCluster(t, 3, 6, func(cfg *Config) { cfg.StoragePartitions = 3 })
	for _, s := range c.servers {
		if n := s.engine.Partitions(); n != 3 {
			t.Fatalf("node %d: %d partitions, want 3", s.cfg.NodeID, n)
		}
		if n := len(s.host.Nodes()); n != 7 {
			t.Fatalf("node %d: %d replicas, want 7", s.cfg.NodeID, n)
		}
	}
	cl := c.client()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	put := func(from, to int) {
		t.Helper()
		for i := from; i < to; i++ {
			if _, err := cl.Put(ctx, []byte(fmt.Sprintf("p/%03d", i)), []byte(fmt.Sprint(i))); err != nil {
				t.Fatalf("put %d: %v", i, err)
			}
		}
	}
	put(0, 60)
	c.stop(0)
	put(60, 120)
	c.cfgs[0].StoragePartitions = 1
	var logs testkit.LogBuffer
	c.cfgs[0].Logger = slog.New(slog.NewTextHandler(&logs, nil))
	c.start(0)
	if n := c.servers[0].engine.Partitions(); n != 3 {
		t.Fatalf("restarted with --storage-partitions 1: %d partitions, want the 3 it was created with", n)
	}
	if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "partitions=3 flag=1") {
		t.Fatalf("no warning that the flag does not apply to the existing data dir; log:\n%s", logs.String())
	}
	for _, f := range []string{"kvd.db", "kvd-1.db", "kvd-2.db"} {
		if _, err := os.Stat(filepath.Join(c.cfgs[0].DataDir, f)); err != nil {
			t.Fatal(err)
		}
	}
	c.waitReady()
	// Node 2 away: every shard's quorum now needs the restarted node.
	c.stop(1)
	put(120, 150)
	for i := range 150 {
		k := fmt.Sprintf("p/%03d", i)
		kv, err := cl.Get(ctx, []byte(k))
		if err != nil || kv == nil || string(kv.GetValue()) != fmt.Sprint(i) {
			t.Fatalf("get %s: %v, %v", k, kv, err)
		}
	}
}

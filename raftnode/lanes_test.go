package raftnode

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/storage"
)

// With two storage partitions, shards 0 and 1 are on two lanes, each
// saving to its own file: a proposal of shard 1 is answered while shard
// 0's partition writer is stuck in an apply. With one partition the same
// proposal would wait behind it (the single loop waits for its save, and
// the single writer for the apply).
func TestLaneIsNotHeldBackByAnotherPartition(t *testing.T) {
	e, err := storage.OpenStore(t.TempDir(), 2, storage.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = e.Close() }()
	entered, release := make(chan struct{}), make(chan struct{})
	h := NewHost(HostConfig{
		NodeID: 1,
		Store:  e,
		Apply: func(_ *storage.Txn, _ uint64, cmd []byte) any {
			if bytes.Equal(cmd, []byte("block")) {
				close(entered)
				<-release
			}
			return string(cmd)
		},
		TickInterval: 10 * time.Millisecond,
		ElectionTick: 10, HeartbeatTick: 1,
		SnapshotEntries: 10_000, SnapshotBytes: 64 << 20, MaxPendingProposals: 4096,
	})
	h.Start(nullSender{})
	defer h.Stop()
	free := sync.OnceFunc(func() { close(release) })
	defer free() // before Stop, which waits for the stuck save
	var nodes []*Node
	for _, shard := range []uint64{0, 1} {
		n, err := h.AddShard(shard, []uint64{1})
		if err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, n)
	}
	for _, n := range nodes {
		proccluster.WaitFor(t, 10*time.Second, "the single voter to lead", n.IsLeader)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	blocked := make(chan error, 1)
	go func() {
		_, err := nodes[0].Propose(ctx, []byte("block"))
		blocked <- err
	}()
	select {
	case <-entered:
	case <-ctx.Done():
		t.Fatal("shard 0's apply never ran")
	}
	res, err := nodes[1].Propose(ctx, []byte("free"))
	if err != nil || res != "free" {
		t.Fatalf("shard 1 while shard 0's writer is stuck: %v, %v", res, err)
	}
	free()
	if err := <-blocked; err != nil {
		t.Fatalf("shard 0 after its apply was released: %v", err)
	}
}

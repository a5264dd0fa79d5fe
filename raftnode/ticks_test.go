package raftnode

import (
	"context"
	"fmt"
	"testing"
	"time"

	"go.etcd.io/raft/v3"

	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/storage"
)

// A host given a tick source ticks only when it delivers: a single voter
// has not campaigned after ElectionTick-1 ticks however long they take, and
// leads once it has had 2*ElectionTick (raft's randomized election timeout
// is below that). The loop is the real one, over bbolt; with two storage
// partitions the two shards are on two loops, which the source ticks
// alike.
func TestHostTicksOnlyFromItsTickSource(t *testing.T) {
	for _, partitions := range []int{1, 2} {
		t.Run(fmt.Sprint("partitions=", partitions), func(t *testing.T) { testTickSource(t, partitions) })
	}
}

func testTickSource(t *testing.T, partitions int) {
	e, err := storage.OpenStore(t.TempDir(), partitions, storage.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = e.Close() }()
	ticks := make(chan time.Time) // unbuffered: a send returns once the host took the tick
	h := NewHost(HostConfig{
		NodeID:       1,
		Store:        e,
		Apply:        func(*storage.Txn, uint64, []byte) any { return nil },
		TickInterval: time.Hour, // would never tick on its own
		Ticks:        ticks,
		ElectionTick: 10, HeartbeatTick: 1,
		SnapshotEntries: 10_000, SnapshotBytes: 64 << 20, MaxPendingProposals: 4096,
	})
	h.Start(nullSender{})
	defer h.Stop()
	var nodes []*Node
	for _, shard := range []uint64{1, 2} {
		n, err := h.AddShard(shard, []uint64{1})
		if err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for range 9 {
		ticks <- time.Time{}
	}
	for _, n := range nodes {
		st, err := n.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		// A shard created with voters starts in term 1 (storage.CreateShard).
		if st.RaftState != raft.StateFollower || st.GetTerm() != 1 {
			t.Fatalf("shard %d after 9 ticks: %v in term %d, want a follower in term 1", n.Shard(), st.RaftState, st.GetTerm())
		}
	}
	for range 11 {
		ticks <- time.Time{}
	}
	// Winning its own vote takes the loop a few Ready rounds, no ticks.
	for _, n := range nodes {
		proccluster.WaitFor(t, 10*time.Second, fmt.Sprintf("the single voter of shard %d to lead", n.Shard()), n.IsLeader)
	}
}

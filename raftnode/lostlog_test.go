package raftnode_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kvd/kvd/raftnode"
	"github.com/kvd/kvd/storage"
)

// crashCopy copies node id's files now, as a crash would leave them: the
// engine's transaction stays open for an hour (commitInterval), so each
// bbolt file holds the state of its last commit and the WAL every round
// acknowledged since.
func (c *testCluster) crashCopy(id uint64) map[string][]byte {
	c.t.Helper()
	files := map[string][]byte{}
	entries, err := os.ReadDir(c.nodes[id].dir)
	if err != nil {
		c.t.Fatal(err)
	}
	for _, f := range entries {
		b, err := os.ReadFile(filepath.Join(c.nodes[id].dir, f.Name()))
		if err != nil {
			c.t.Fatal(err)
		}
		files[f.Name()] = b
	}
	return files
}

// A follower restarted on a WAL that lost the rounds it had acknowledged
// (damage where it cannot be told from a torn tail) has a log behind what
// its group committed. The leader's heartbeat then makes raft panic on
// it; the replica stops with ErrLogBehind instead, and the process and
// the rest of the cluster go on. Damage in the middle of the WAL is
// refused by storage.Open with ErrCorrupt.
func TestFollowerWithLostWALStopsItsReplica(t *testing.T) {
	c := newClusterFrom(&testCluster{t: t, commitInterval: time.Hour}, 3, 1)
	c.waitLeaders()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// The leader's heartbeats carry the commit index it knows the
	// follower acknowledged: the follower must have acknowledged the
	// writes to the leader it will hear from after its restart. So the
	// writes are done again until one leader, in one term, saw them all.
	var leader *raftnode.Node
	for attempt := 0; ; attempt++ {
		if attempt == 5 {
			t.Fatal("no leader stayed in place for 20 writes")
		}
		waitFor(t, 10*time.Second, "every replica to follow one leader, caught up", func() bool {
			leader = c.leader(1)
			if leader == nil {
				return false
			}
			for _, n := range c.nodes {
				if r := n.host.Node(1); r.Leader() != leader.Leader() || r.Commit() < leader.Commit() {
					return false
				}
			}
			return true
		})
		term := leader.Term()
		// Each put reaches the caught-up followers as a round of its own:
		// a WAL record each.
		for i := range 20 {
			if err := c.put(ctx, 1, fmt.Sprintf("k%d", i), "v"); err != nil {
				t.Fatal(err)
			}
		}
		waitFor(t, 10*time.Second, "the followers to learn the commit index", func() bool {
			for _, n := range c.nodes {
				if n.host.Node(1).Commit() < leader.Commit() {
					return false
				}
			}
			return true
		})
		if leader.IsLeader() && leader.Term() == term {
			break
		}
	}
	var follower uint64
	for id, n := range c.nodes {
		if n.host.Node(1) != leader {
			follower = id
		}
	}
	files := c.crashCopy(follower)
	// The partitions share kvd.wal, a region each of the same size: shard
	// 1's is that of its partition.
	st := c.nodes[follower].engine
	parts := st.Partitions()
	region := len(files["kvd.wal"]) / parts
	lo := st.Partition(1) * region
	c.stop(follower)

	// One byte flipped in the middle of the region's records: the open
	// refuses the files.
	damaged := t.TempDir()
	wal := append([]byte(nil), files["kvd.wal"]...)
	records := wal[lo : lo+region]
	end := len(records)
	for end > 0 && records[end-1] == 0 {
		end--
	}
	records[end/2] ^= 0x01
	for name, b := range files {
		if name == "kvd.wal" {
			b = wal
		}
		if err := os.WriteFile(filepath.Join(damaged, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if s, err := storage.OpenStore(damaged, parts, storage.Options{}); !errors.Is(err, storage.ErrCorrupt) {
		if s != nil {
			_ = s.Close()
		}
		t.Fatalf("open of a WAL with a byte flipped at %d of region %d bytes: %v, want ErrCorrupt", lo+end/2, region, err)
	}

	// Every acknowledged round of the region lost: the log ends at the
	// last commit.
	clear(files["kvd.wal"][lo : lo+region])
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(c.nodes[follower].dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	c.start(follower, nil)
	r := c.nodes[follower].host.Node(1)
	select {
	case <-r.Done():
	case <-ctx.Done():
		t.Fatal("the replica whose log is behind its group's commit index did not stop")
	}
	if err := r.Err(); !errors.Is(err, raftnode.ErrLogBehind) {
		t.Fatalf("Err = %v, want ErrLogBehind", err)
	}
	if err := c.put(ctx, 1, "after", "v"); err != nil {
		t.Fatalf("the other replicas stopped serving: %v", err)
	}
}

package raftnode_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kvd/kvd/raftnode"
	"github.com/kvd/kvd/storage"
)

// crashCopy copies node id's files now, as a crash would leave them: the
// engine's transaction stays open for an hour (commitInterval), so each
// bbolt file holds the state of its last commit and its WAL every round
// acknowledged since.
func (c *testCluster) crashCopy(id uint64) map[string][]byte {
	c.t.Helper()
	files := map[string][]byte{}
	for _, db := range c.nodes[id].engine.Paths() {
		for _, path := range []string{db, strings.TrimSuffix(db, ".db") + ".wal"} {
			b, err := os.ReadFile(path)
			if err != nil {
				c.t.Fatal(err)
			}
			files[filepath.Base(path)] = b
		}
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
	// The files of shard 1's partition.
	st := c.nodes[follower].engine
	dbName := filepath.Base(st.Paths()[st.Partition(1)])
	walName := strings.TrimSuffix(dbName, ".db") + ".wal"
	c.stop(follower)

	// One byte flipped in the middle of the WAL: Open refuses the files.
	damaged := filepath.Join(t.TempDir(), dbName)
	wal := append([]byte(nil), files[walName]...)
	end := len(wal)
	for end > 0 && wal[end-1] == 0 {
		end--
	}
	wal[end/2] ^= 0x01
	for name, b := range map[string][]byte{dbName: files[dbName], walName: wal} {
		if err := os.WriteFile(filepath.Join(filepath.Dir(damaged), name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if e, err := storage.Open(damaged, storage.Options{}); !errors.Is(err, storage.ErrCorrupt) {
		if e != nil {
			_ = e.Close()
		}
		t.Fatalf("Open of a WAL with a byte flipped at %d of %d: %v, want ErrCorrupt", end/2, end, err)
	}

	// Every acknowledged round lost: the log ends at the last commit.
	clear(files[walName])
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

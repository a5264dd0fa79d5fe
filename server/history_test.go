package server

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/fsm"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/storage"
)

// localEvents reads every event shard's local replica on s holds, and the
// oldest revision it keeps.
func localEvents(t *testing.T, s *Server, shard uint64) (evs []*kvpb.Event, oldest int64) {
	t.Helper()
	sh, err := s.engine.OpenShard(shard)
	if err != nil {
		t.Fatal(err)
	}
	err = sh.View(func(r *storage.Reader) error {
		oldest, _ = fsm.HistoryBounds(r)
		evs, _, _, err = fsm.ReadEvents(r, fsm.EventPos{Rev: oldest}, func([]byte) bool { return true }, 0, 0)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return evs, oldest
}

func sameEvents(a, b []*kvpb.Event) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !proto.Equal(a[i], b[i]) {
			return false
		}
	}
	return true
}

// TestHistoryTravelsInSnapshotsAndCompactionIsReplicated: replicas that
// joined by snapshot hold the same events as the one that applied the
// log, and a compaction leaves every replica with the same oldest
// revision.
func TestHistoryTravelsInSnapshotsAndCompactionIsReplicated(t *testing.T) {
	const shard = 1
	c := newTestCluster(t, 1, 1, func(cfg *Config) { cfg.Replicas = 3 })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cl := c.client()
	for i := range 40 {
		k := []byte(fmt.Sprintf("h/%d", i%7))
		if _, err := cl.Put(ctx, k, []byte(fmt.Sprint("v", i))); err != nil {
			t.Fatal(err)
		}
		if i%5 == 4 {
			if _, err := cl.Delete(ctx, k); err != nil {
				t.Fatal(err)
			}
		}
	}
	c.joinNode(2, 0)
	c.joinNode(3, 0)
	waitFor(t, 90*time.Second, "three voters on shard 1", func() bool {
		voters, learners := c.shardVoters(shard)
		return len(voters) == 3 && len(learners) == 0
	})
	want, _ := localEvents(t, c.servers[0], shard)
	if len(want) < 40 {
		t.Fatalf("node 1 holds %d events", len(want))
	}
	waitFor(t, 30*time.Second, "every replica's history", func() bool {
		for _, s := range c.servers[1:] {
			if got, _ := localEvents(t, s, shard); !sameEvents(got, want) {
				return false
			}
		}
		return true
	})
	if c.servers[2].host.SnapshotsReceived() == 0 {
		t.Fatal("node 3 received no snapshot")
	}

	below := want[len(want)/2].GetKv().GetModRevision()
	leader := c.leaderOf(shard)
	resp, err := clusterClient(t, leader).Compact(ctx, &kvpb.CompactRequest{Shard: shard, Revision: below})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.GetShards()[0].GetOldestRevision(); got != below {
		t.Fatalf("compacted to %d, want %d", got, below)
	}
	waitFor(t, 30*time.Second, "every replica compacted", func() bool {
		for _, s := range c.servers {
			if _, oldest := localEvents(t, s, shard); oldest != below {
				return false
			}
		}
		return true
	})
	// A read below the history names the oldest revision.
	key := want[0].GetKv().GetKey()
	_, err = kvClient(t, leader).Get(ctx, &kvpb.GetRequest{Key: key, Revision: below - 2})
	st := status.Convert(err)
	if st.Code() != codes.OutOfRange || len(st.Details()) != 1 || st.Details()[0].(*kvpb.CompactedShard).GetOldestRevision() != below {
		t.Fatalf("read below the history: %v, details %v", err, st.Details())
	}
}

// TestReadsAtRevision: Get and Range at a revision answer the state then;
// a revision not reached yet is OutOfRange.
func TestReadsAtRevision(t *testing.T) {
	c := newTestCluster(t, 1, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	kv := kvClient(t, c.servers[0])
	var revs []int64
	for i := range 3 {
		resp, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte("a"), Value: []byte(fmt.Sprint("v", i))})
		if err != nil {
			t.Fatal(err)
		}
		revs = append(revs, resp.GetHeader().GetRevision())
	}
	if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte("b"), Value: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Delete(ctx, &kvpb.DeleteRequest{Key: []byte("a")}); err != nil {
		t.Fatal(err)
	}
	for i, rev := range revs {
		resp, err := kv.Get(ctx, &kvpb.GetRequest{Key: []byte("a"), Revision: rev})
		if err != nil {
			t.Fatal(err)
		}
		if got := string(resp.GetKv().GetValue()); got != fmt.Sprint("v", i) || resp.GetKv().GetVersion() != int64(i+1) {
			t.Fatalf("a at %d: %v", rev, resp.GetKv())
		}
	}
	rr, err := kv.Range(ctx, &kvpb.RangeRequest{Shard: 1, Revision: revs[2]})
	if err != nil {
		t.Fatal(err)
	}
	if len(rr.GetKvs()) != 1 || string(rr.GetKvs()[0].GetKey()) != "a" {
		t.Fatalf("range at %d: %v", revs[2], rr.GetKvs())
	}
	now, err := kv.Range(ctx, &kvpb.RangeRequest{Shard: 1})
	if err != nil {
		t.Fatal(err)
	}
	if len(now.GetKvs()) != 1 || string(now.GetKvs()[0].GetKey()) != "b" {
		t.Fatalf("range now: %v", now.GetKvs())
	}
	_, err = kv.Get(ctx, &kvpb.GetRequest{Key: []byte("a"), Revision: now.GetHeader().GetRevision() + 1})
	if status.Code(err) != codes.OutOfRange {
		t.Fatalf("read at a future revision: %v", err)
	}
}

// TestHistoryRetentionTrims: the leader keeps the last HistoryRevisions
// revisions on every replica.
func TestHistoryRetentionTrims(t *testing.T) {
	const keep = 5
	c := newTestCluster(t, 3, 1, func(cfg *Config) { cfg.HistoryRevisions = keep })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cl := c.client()
	var rev int64
	for i := range 20 {
		resp, err := cl.Put(ctx, []byte(fmt.Sprint("r/", i)), []byte("v"))
		if err != nil {
			t.Fatal(err)
		}
		rev = max(rev, resp.GetHeader().GetRevision())
	}
	waitFor(t, 20*time.Second, "history trimmed to the last revisions on every replica", func() bool {
		for _, s := range c.servers {
			if _, oldest := localEvents(t, s, 1); oldest != rev-keep+1 {
				return false
			}
		}
		return true
	})
}

// TestHistoryTrimmedByBytes: overwriting one key with large values keeps
// every old value in the history; the leader trims it to HistoryBytes on
// every replica, however few revisions that leaves.
func TestHistoryTrimmedByBytes(t *testing.T) {
	const limit = 64 << 10
	c := newTestCluster(t, 3, 1, func(cfg *Config) { cfg.HistoryBytes = limit })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cl := c.client()
	value := bytes.Repeat([]byte("v"), 8<<10)
	for range 40 { // about 320 KiB of previous values
		if _, err := cl.Put(ctx, []byte("b"), value); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 20*time.Second, "history trimmed to its byte limit on every replica", func() bool {
		for _, s := range c.servers {
			sh, err := s.engine.OpenShard(1)
			if err != nil {
				t.Fatal(err)
			}
			var size int64
			_ = sh.View(func(r *storage.Reader) error { size = fsm.HistoryBytes(r); return nil })
			if size > limit || size == 0 {
				return false
			}
		}
		return true
	})
}

// TestHistoryRetentionByTime: with --history-retention the leader drops
// the changes older than it, by the proposer times recorded in them, on
// every replica, and keeps newer ones.
func TestHistoryRetentionByTime(t *testing.T) {
	const retention = 2 * time.Second
	c := newTestCluster(t, 3, 1, func(cfg *Config) {
		cfg.HistoryRevisions = -1
		cfg.HistoryRetention = retention
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cl := c.client()
	var rev int64
	for i := range 5 {
		resp, err := cl.Put(ctx, []byte(fmt.Sprint("t/", i)), []byte("v"))
		if err != nil {
			t.Fatal(err)
		}
		rev = max(rev, resp.GetHeader().GetRevision())
	}
	waitFor(t, 20*time.Second, "old changes dropped on every replica", func() bool {
		for _, s := range c.servers {
			if _, oldest := localEvents(t, s, 1); oldest != rev+1 {
				return false
			}
		}
		return true
	})
	resp, err := cl.Put(ctx, []byte("t/new"), []byte("v"))
	if err != nil {
		t.Fatal(err)
	}
	// Right after its put, the new change is younger than the retention.
	var evs []*kvpb.Event
	var oldest int64
	waitFor(t, 10*time.Second, "the put visible on the leader", func() bool {
		evs, oldest = localEvents(t, c.leaderOf(1), 1)
		return len(evs) > 0 || oldest > resp.GetHeader().GetRevision()
	})
	if oldest != resp.GetHeader().GetRevision() || len(evs) != 1 {
		t.Fatalf("history after a new put: oldest %d, %d events; want %d, 1", oldest, len(evs), resp.GetHeader().GetRevision())
	}
}

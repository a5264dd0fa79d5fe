package storage

import (
	"testing"
	"time"

	pb "go.etcd.io/raft/v3/raftpb"
)

// lingerShard opens an engine whose NoWait rounds linger for a minute, so
// only a joining request, Flush or Close ends them, and a shard holding
// entries 2 and 3 (committed, not applied).
func lingerShard(t *testing.T) (*Engine, string, *Shard) {
	t.Helper()
	e, path := openTest(t, Options{ApplyLinger: time.Minute})
	s, err := e.CreateShard(1, &pb.ConfState{Voters: []uint64{1}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Save(&Update{Entries: []*pb.Entry{putEntry(2, 1, "a", "1"), putEntry(3, 1, "b", "2")}, Sync: true}); err != nil {
		t.Fatal(err)
	}
	return e, path, s
}

func applyNoWait(t *testing.T, s *Shard) {
	t.Helper()
	res, err := s.Save(&Update{Committed: []*pb.Entry{putEntry(2, 1, "a", "1"), putEntry(3, 1, "b", "2")}, Apply: applyPut, NoWait: true})
	if err != nil {
		t.Fatal(err)
	}
	if string(res[0]) != "ok 2" || string(res[1]) != "ok 3" {
		t.Fatalf("results %q", res)
	}
	if i, _ := s.Applied(); i != 1 {
		t.Fatalf("Applied = %d before the round committed, want 1", i)
	}
	if d := dump(t, s); len(d) != 0 {
		t.Fatalf("readers see the uncommitted apply: %v", d)
	}
}

func waitApplied(t *testing.T, s *Shard, want uint64) {
	t.Helper()
	select {
	case <-s.AppliedC():
	case <-time.After(10 * time.Second):
		t.Fatal("AppliedC did not fire")
	}
	if i, _ := s.Applied(); i != want {
		t.Fatalf("Applied = %d, want %d", i, want)
	}
	if d := dump(t, s); d["kv/a"] != "1" || d["kv/b"] != "2" {
		t.Fatalf("state after commit: %v", d)
	}
}

// A NoWait save is answered before its round commits, and the next append
// shares that commit.
func TestNoWaitSaveSharesTheNextCommit(t *testing.T) {
	e, _, s := lingerShard(t)
	before := e.Stats().Commits
	applyNoWait(t, s)
	if _, err := s.Save(&Update{Entries: []*pb.Entry{putEntry(4, 1, "c", "3")}, Sync: true}); err != nil {
		t.Fatal(err)
	}
	if got := e.Stats().Commits - before; got != 1 {
		t.Fatalf("%d commits for an apply and an append, want 1", got)
	}
	waitApplied(t, s, 3)
}

// Flush ends a lingering round: a reader waiting for the apply need not
// wait for the linger.
func TestFlushCommitsALingeringRound(t *testing.T) {
	_, _, s := lingerShard(t)
	applyNoWait(t, s)
	s.Flush()
	waitApplied(t, s, 3)
}

// Close commits a lingering round; updates that need no wait are not lost
// by an orderly stop.
func TestCloseCommitsALingeringRound(t *testing.T) {
	e, path, s := lingerShard(t)
	applyNoWait(t, s)
	e2 := reopen(t, e, path, Options{})
	s2, err := e2.OpenShard(1)
	if err != nil {
		t.Fatal(err)
	}
	if i, _ := s2.Applied(); i != 3 {
		t.Fatalf("Applied after reopen = %d, want 3", i)
	}
}

// NoWait is ignored for an update that must be durable when Save returns.
func TestNoWaitIsIgnoredForAppends(t *testing.T) {
	_, _, s := lingerShard(t)
	if _, err := s.Save(&Update{Entries: []*pb.Entry{putEntry(4, 1, "c", "3")}, Committed: []*pb.Entry{putEntry(2, 1, "a", "1"), putEntry(3, 1, "b", "2")}, Apply: applyPut, NoWait: true}); err != nil {
		t.Fatal(err)
	}
	if i, _ := s.Applied(); i != 3 {
		t.Fatalf("Applied = %d when Save returned, want 3", i)
	}
}

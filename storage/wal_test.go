package storage

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// walShard opens an engine whose bbolt transaction stays open for a minute,
// so only a request that needs a commit, Flush or Close commits it, and a
// shard holding entries 2 and 3 (committed, not applied).
func walShard(t *testing.T) (*Engine, string, *Shard) {
	t.Helper()
	e, path := openTest(t, Options{CommitInterval: time.Minute})
	s, err := e.CreateShard(1, &pb.ConfState{Voters: []uint64{1}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Save(&Update{Entries: []*pb.Entry{putEntry(2, 1, "a", "1"), putEntry(3, 1, "b", "2")}, Sync: true}); err != nil {
		t.Fatal(err)
	}
	return e, path, s
}

func applyNoWait(t *testing.T, s *Shard) {
	t.Helper()
	log := &applyLog{}
	if err := s.Save(&Update{Committed: []*pb.Entry{putEntry(2, 1, "a", "1"), putEntry(3, 1, "b", "2")}, Apply: log.apply, NoWait: true}); err != nil {
		t.Fatal(err)
	}
	if got, want := log.take(), []string{"ok 2", "ok 3"}; !slices.Equal(got, want) {
		t.Fatalf("applied %q, want %q", got, want)
	}
	if i, _ := s.Applied(); i != 1 {
		t.Fatalf("Applied = %d before the transaction committed, want 1", i)
	}
	if d := dump(t, s); len(d) != 0 {
		t.Fatalf("readers see the uncommitted apply: %v", d)
	}
}

func waitApplied(t *testing.T, s *Shard, want uint64) {
	t.Helper()
	select {
	case <-s.e.AppliedC():
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

// An append is made durable by a WAL record, not a bbolt commit; the apply
// before it becomes visible only with the commit.
func TestAppendIsDurableWithoutCommit(t *testing.T) {
	e, _, s := walShard(t)
	before := e.Stats()
	applyNoWait(t, s)
	if err := s.Save(&Update{Entries: []*pb.Entry{putEntry(4, 1, "c", "3")}, Sync: true, NoWait: true}); err != nil {
		t.Fatal(err)
	}
	st := e.Stats()
	if c, n := st.Commits-before.Commits, st.Syncs-before.Syncs; c != 0 || n != 1 {
		t.Fatalf("%d commits and %d syncs for an apply and an append, want 0 and 1", c, n)
	}
	if li, _ := s.LastIndex(); li != 4 {
		t.Fatalf("LastIndex = %d, want 4", li)
	}
	if i, _ := s.Applied(); i != 1 {
		t.Fatalf("Applied = %d before the commit, want 1", i)
	}
	s.Flush()
	waitApplied(t, s, 3)
}

// Flush commits the open transaction: a reader waiting for the applied
// state need not wait for CommitInterval.
func TestFlushCommits(t *testing.T) {
	_, _, s := walShard(t)
	applyNoWait(t, s)
	s.Flush()
	waitApplied(t, s, 3)
}

// Close commits the open transaction.
func TestCloseCommits(t *testing.T) {
	e, path, s := walShard(t)
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

// A Save without NoWait that applies returns with its applied state
// committed.
func TestApplyWithoutNoWaitCommits(t *testing.T) {
	_, _, s := walShard(t)
	if err := s.Save(&Update{Entries: []*pb.Entry{putEntry(4, 1, "c", "3")}, Committed: []*pb.Entry{putEntry(2, 1, "a", "1"), putEntry(3, 1, "b", "2")}, Apply: applyPut}); err != nil {
		t.Fatal(err)
	}
	if i, _ := s.Applied(); i != 3 {
		t.Fatalf("Applied = %d when Save returned, want 3", i)
	}
}

// A copy of the files taken while the transaction is open is what a crash
// leaves: bbolt as of its last commit, and the WAL. Opening it replays the
// WAL: every acknowledged append and hard state is there, including a
// truncation; the applied index is the committed one, and the state
// machine matches it.
func TestWALReplayAfterCrash(t *testing.T) {
	e, path, s := walShard(t)
	if err := s.Save(&Update{Committed: []*pb.Entry{putEntry(2, 1, "a", "1")}, Apply: applyPut}); err != nil {
		t.Fatal(err) // applied 2, committed
	}
	applyNoWait3 := &Update{Committed: []*pb.Entry{putEntry(3, 1, "b", "2")}, Apply: applyPut, NoWait: true}
	if err := s.Save(applyNoWait3); err != nil {
		t.Fatal(err)
	}
	hs := &pb.HardState{Term: proto.Uint64(2), Vote: proto.Uint64(1), Commit: proto.Uint64(3)}
	for _, u := range []*Update{
		{Entries: []*pb.Entry{putEntry(4, 1, "c", "3"), putEntry(5, 1, "d", "4")}, Sync: true, NoWait: true},
		// A new leader overwrites 5.
		{Entries: []*pb.Entry{putEntry(5, 2, "e", "5"), putEntry(6, 2, "f", "6")}, HardState: hs, Sync: true, NoWait: true},
	} {
		if err := s.Save(u); err != nil {
			t.Fatal(err)
		}
	}
	if got := e.Stats().Commits; got == 0 {
		t.Fatal("no commit counted")
	}
	e2 := openCopy(t, path)
	s2, err := e2.OpenShard(1)
	if err != nil {
		t.Fatal(err)
	}
	if i, _ := s2.Applied(); i != 2 {
		t.Fatalf("Applied after the crash = %d, want the committed 2", i)
	}
	if d := dump(t, s2); d["kv/a"] != "1" || d["kv/b"] != "" {
		t.Fatalf("state after the crash: %v", d)
	}
	if li, _ := s2.LastIndex(); li != 6 {
		t.Fatalf("LastIndex after the crash = %d, want 6", li)
	}
	es, err := s2.Entries(2, 7, ^uint64(0))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"a=1", "b=2", "c=3", "e=5", "f=6"}
	for i, en := range es {
		if string(en.GetData()) != want[i] {
			t.Fatalf("entry %d = %q, want %q", en.GetIndex(), en.GetData(), want[i])
		}
	}
	got, _, err := s2.InitialState()
	if err != nil || !proto.Equal(got, hs) {
		t.Fatalf("hard state after the crash = %v, %v; want %v", got, err, hs)
	}
	// Reopening again replays nothing twice.
	e3 := reopen(t, e2, e2.db.Path(), Options{})
	s3, err := e3.OpenShard(1)
	if err != nil {
		t.Fatal(err)
	}
	if li, _ := s3.LastIndex(); li != 6 {
		t.Fatalf("LastIndex after a second open = %d, want 6", li)
	}
}

// When the WAL nears its size the writer commits bbolt and the WAL starts
// over under the next generation; a crash afterwards replays only the
// records of that generation, over older ones left in the file.
func TestWALRestartsWhenFull(t *testing.T) {
	e, path, s := walShard(t)
	before := e.Stats().Commits
	value := make([]byte, 1000)
	n := uint64(4)
	for ; e.Stats().Commits-before < 2; n++ {
		en := &pb.Entry{Index: proto.Uint64(n), Term: proto.Uint64(1), Data: append([]byte("k="), value...)}
		if err := s.Save(&Update{Entries: []*pb.Entry{en}, Sync: true, NoWait: true}); err != nil {
			t.Fatal(err)
		}
		if n > 100000 {
			t.Fatal("the WAL never filled up")
		}
	}
	// A few more rounds into the new generation, then "crash".
	last := n + 9
	for ; n <= last; n++ {
		en := &pb.Entry{Index: proto.Uint64(n), Term: proto.Uint64(1), Data: []byte("k=v")}
		if err := s.Save(&Update{Entries: []*pb.Entry{en}, Sync: true, NoWait: true}); err != nil {
			t.Fatal(err)
		}
	}
	e2 := openCopy(t, path)
	s2, err := e2.OpenShard(1)
	if err != nil {
		t.Fatal(err)
	}
	if li, _ := s2.LastIndex(); li != last {
		t.Fatalf("LastIndex after the crash = %d, want %d", li, last)
	}
	es, err := s2.Entries(last-9, last+1, ^uint64(0))
	if err != nil || len(es) != 10 || string(es[9].GetData()) != "k=v" {
		t.Fatalf("tail after the crash: %d entries, %v", len(es), err)
	}
}

// A torn last record (a crash in the middle of its write, so it was never
// acknowledged) is where replay stops; the records before it are replayed.
func TestWALReplayStopsAtATornRecord(t *testing.T) {
	e, path, s := walShard(t)
	for i := uint64(4); i <= 6; i++ {
		if err := s.Save(&Update{Entries: []*pb.Entry{putEntry(i, 1, "k", "v")}, Sync: true, NoWait: true}); err != nil {
			t.Fatal(err)
		}
	}
	off := e.wal.off
	e2 := openCopyWith(t, path, func(wal []byte) {
		wal[off-1] ^= 0xff // the last byte of the last record
	})
	s2, err := e2.OpenShard(1)
	if err != nil {
		t.Fatal(err)
	}
	if li, _ := s2.LastIndex(); li != 5 {
		t.Fatalf("LastIndex after a torn record = %d, want 5", li)
	}
}

// openCopy opens a copy of the engine files at path taken now, as a crash
// would leave them (the writer must be idle).
func openCopy(t *testing.T, path string) *Engine {
	t.Helper()
	return openCopyWith(t, path, func([]byte) {})
}

// openCopyWith is openCopy with the WAL's bytes passed through mangle.
func openCopyWith(t *testing.T, path string, mangle func(wal []byte)) *Engine {
	t.Helper()
	crashed := filepath.Join(t.TempDir(), "kvd.db")
	for _, name := range []string{filepath.Base(path), walName} {
		b, err := os.ReadFile(filepath.Join(filepath.Dir(path), name))
		if err != nil {
			t.Fatal(err)
		}
		if name == walName {
			mangle(b)
		}
		if err := os.WriteFile(filepath.Join(filepath.Dir(crashed), name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	e, err := Open(crashed, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close() })
	return e
}

// Entries the open transaction holds stay in the log cache beyond its
// limit, without forcing a commit, and readers get every entry; after a
// commit the next append trims the cache back to its limit.
func TestCacheKeepsUncommittedEntriesWithoutCommitting(t *testing.T) {
	e, _, s := walShard(t)
	e.cacheLimit = 500 // a few entries; set before any append beyond walShard's
	before := e.Stats()
	for i := uint64(4); i < 40; i++ {
		if err := s.Save(&Update{Entries: []*pb.Entry{putEntry(i, 1, "k", fmt.Sprintf("%060d", i))}, Sync: true}); err != nil {
			t.Fatal(err)
		}
	}
	if c := e.Stats().Commits - before.Commits; c != 0 {
		t.Fatalf("%d commits for appends past the cache limit, want 0", c)
	}
	cached := func() (int, int) {
		s.mu.Lock()
		defer s.mu.Unlock()
		st := s.st
		return len(st.cache), st.cacheBytes
	}
	if n, b := cached(); n < 36 || b <= 500 {
		t.Fatalf("cache holds %d entries (%d bytes), want every uncommitted one", n, b)
	}
	checkAll := func(last uint64) {
		t.Helper()
		ents, err := s.Entries(2, last+1, math.MaxUint64)
		if err != nil || len(ents) != int(last-1) {
			t.Fatalf("Entries(2, %d): %d entries, %v", last+1, len(ents), err)
		}
		for i, ent := range ents {
			if ent.GetIndex() != uint64(i)+2 {
				t.Fatalf("entry %d has index %d", i, ent.GetIndex())
			}
		}
	}
	checkAll(39)
	s.Flush()
	if err := s.Save(&Update{Entries: []*pb.Entry{putEntry(40, 1, "k", "last")}, Sync: true}); err != nil {
		t.Fatal(err)
	}
	if n, b := cached(); b > 500+200 || n > 10 {
		t.Fatalf("cache after a commit and an append: %d entries, %d bytes; want it trimmed to ~500 bytes", n, b)
	}
	checkAll(40)
}

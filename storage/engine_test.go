package storage

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log"
	"math"
	"slices"
	"strings"
	"sync"
	"testing"

	"go.etcd.io/raft/v3"
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

var voters = &pb.ConfState{Voters: []uint64{1, 2, 3}}

func TestBootstrapAndJoin(t *testing.T) {
	e, path := openTest(t, Options{NoSync: true})
	boot, err := e.CreateShard(7, voters)
	if err != nil {
		t.Fatal(err)
	}
	join, err := e.CreateShard(8, nil)
	if err != nil {
		t.Fatal(err)
	}
	check := func(e *Engine) {
		boot, err := e.OpenShard(7)
		if err != nil {
			t.Fatal(err)
		}
		join, err := e.OpenShard(8)
		if err != nil {
			t.Fatal(err)
		}
		hs, cs, err := boot.InitialState()
		if err != nil {
			t.Fatal(err)
		}
		if hs.GetTerm() != 1 || hs.GetCommit() != 1 || hs.GetVote() != 0 || !slices.Equal(cs.GetVoters(), voters.GetVoters()) {
			t.Fatalf("bootstrap InitialState = %v, %v", hs, cs)
		}
		if f, _ := boot.FirstIndex(); f != 2 {
			t.Fatalf("bootstrap FirstIndex = %d", f)
		}
		if l, _ := boot.LastIndex(); l != 1 {
			t.Fatalf("bootstrap LastIndex = %d", l)
		}
		if term, err := boot.Term(1); term != 1 || err != nil {
			t.Fatalf("bootstrap Term(1) = %d, %v", term, err)
		}
		if i, term := boot.Applied(); i != 1 || term != 1 {
			t.Fatalf("bootstrap Applied = %d/%d", i, term)
		}
		snap, _ := boot.Snapshot()
		if snap.GetMetadata().GetIndex() != 1 || snap.GetMetadata().GetTerm() != 1 || !slices.Equal(snap.GetMetadata().GetConfState().GetVoters(), voters.GetVoters()) {
			t.Fatalf("bootstrap Snapshot = %v", snap)
		}

		hs, cs, _ = join.InitialState()
		if !raft.IsEmptyHardState(hs) || len(cs.GetVoters()) != 0 {
			t.Fatalf("joining InitialState = %v, %v", hs, cs)
		}
		if f, _ := join.FirstIndex(); f != 1 {
			t.Fatalf("joining FirstIndex = %d", f)
		}
		if l, _ := join.LastIndex(); l != 0 {
			t.Fatalf("joining LastIndex = %d", l)
		}
		if _, err := join.Entries(1, 1, math.MaxUint64); !errors.Is(err, raft.ErrUnavailable) {
			t.Fatalf("joining Entries: %v", err)
		}
	}
	_, _ = boot, join
	check(e)
	check(reopen(t, e, path, Options{NoSync: true}))
}

// TestRaftBootstrap runs a single-voter raft group on a bootstrapped
// shard: it must elect itself and commit without any conf-change entries.
func TestRaftBootstrap(t *testing.T) {
	e, _ := openTest(t, Options{NoSync: true})
	s, err := e.CreateShard(1, &pb.ConfState{Voters: []uint64{1}})
	if err != nil {
		t.Fatal(err)
	}
	applied, _ := s.Applied()
	rn, err := raft.NewRawNode(&raft.Config{ID: 1, ElectionTick: 10, HeartbeatTick: 1, Storage: s,
		Applied: applied, MaxSizePerMsg: math.MaxUint64, MaxInflightMsgs: 256,
		Logger: &raft.DefaultLogger{Logger: log.New(io.Discard, "", 0)}})
	if err != nil {
		t.Fatal(err)
	}
	if err := rn.Campaign(); err != nil {
		t.Fatal(err)
	}
	proposed := false
	var got []string
	log := &applyLog{}
	for i := 0; i < 20 && len(got) == 0; i++ {
		if rn.Status().RaftState == raft.StateLeader && !proposed {
			if err := rn.Propose([]byte("a=1")); err != nil {
				t.Fatal(err)
			}
			proposed = true
		}
		if !rn.HasReady() {
			continue
		}
		rd := rn.Ready()
		u := &Update{Entries: rd.Entries, Committed: rd.CommittedEntries, Apply: log.apply, Sync: rd.MustSync}
		if !raft.IsEmptyHardState(rd.HardState) {
			u.HardState = rd.HardState
		}
		if err := s.Save(u); err != nil {
			t.Fatal(err)
		}
		got = append(got, log.take()...)
		rn.Advance(rd)
	}
	if len(got) != 1 {
		t.Fatalf("results %q, want one", got)
	}
	if v := dump(t, s)["kv/a"]; v != "1" {
		t.Fatalf("a = %q", v)
	}
}

// TestGroupCommitRound builds a round deterministically: while the writer
// is held inside one save, the other seven shards queue; they must all be
// merged into the next single commit.
func TestGroupCommitRound(t *testing.T) {
	e, _ := openTest(t, Options{})
	var shards []*Shard
	for i := range 8 {
		s, err := e.CreateShard(uint64(i+1), voters)
		if err != nil {
			t.Fatal(err)
		}
		shards = append(shards, s)
	}
	before := e.Stats()
	release := make(chan struct{})
	entered := make(chan struct{})
	block := func(tx *Txn, en *pb.Entry) {
		close(entered)
		<-release
		applyPut(tx, en)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	save := func(s *Shard, apply ApplyFunc) {
		defer wg.Done()
		en := putEntry(2, 1, "k", "v")
		err := s.Save(&Update{Entries: []*pb.Entry{en}, Committed: []*pb.Entry{en}, Apply: apply, Sync: true})
		errs <- err
	}
	wg.Add(1)
	go save(shards[0], block)
	<-entered
	for _, s := range shards[1:] {
		wg.Add(1)
		go save(s, applyPut)
	}
	waitFor(t, "seven queued saves", func() bool { return e.queued.Load() == 7 })
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	st := e.Stats()
	if c, u := st.Commits-before.Commits, st.Updates-before.Updates; c != 2 || u != 8 {
		t.Fatalf("commits %d updates %d, want 2 and 8", c, u)
	}
	if st.Entries-before.Entries != 8 || st.Applied-before.Applied != 8 {
		t.Fatalf("entries %d applied %d", st.Entries-before.Entries, st.Applied-before.Applied)
	}
	if st.Syncs-before.Syncs != 2 || st.CommitNanos.Count() != st.Commits || st.SyncNanos.Count() != st.Syncs {
		t.Fatalf("syncs %d, histogram counts %d and %d, commits %d", st.Syncs-before.Syncs, st.CommitNanos.Count(), st.SyncNanos.Count(), st.Commits)
	}
}

// TestGroupCommitConcurrent saves from 8 shards at once, fsync on, while
// raft-like readers read the same shards: commits must be well below
// updates, and every shard's log intact.
func TestGroupCommitConcurrent(t *testing.T) {
	e, _ := openTest(t, Options{})
	e.cacheLimit = 2000 // keep part of the logs in bbolt only
	const nShards, nSaves = 8, 40
	var wg sync.WaitGroup
	errs := make(chan error, 2*nShards)
	before := e.Stats()
	for i := range nShards {
		s, err := e.CreateShard(uint64(i+1), voters)
		if err != nil {
			t.Fatal(err)
		}
		stop := make(chan struct{})
		saved := make(chan struct{}, 1) // like a Ready: the reader reads after each save
		wg.Add(2)
		go func() {
			defer wg.Done()
			defer close(stop)
			log := &applyLog{}
			for j := uint64(2); j < 2+nSaves; j++ {
				en := putEntry(j, 1, fmt.Sprint("k", j), string(bytes.Repeat([]byte{'v'}, 256)))
				err := s.Save(&Update{
					HardState: &pb.HardState{Term: proto.Uint64(1), Commit: proto.Uint64(j)},
					Entries:   []*pb.Entry{en}, Committed: []*pb.Entry{en}, Apply: log.apply, Sync: true,
				})
				if got := log.take(); err == nil && !slices.Equal(got, []string{fmt.Sprint("ok ", j)}) {
					err = fmt.Errorf("applied %q for %d", got, j)
				}
				if err != nil {
					errs <- err
					return
				}
				select {
				case saved <- struct{}{}:
				default:
				}
			}
		}()
		go func() { // raft-like reads, concurrent with the writer
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				case <-saved:
				}
				last, _ := s.LastIndex()
				first, _ := s.FirstIndex()
				if last < first {
					continue
				}
				es, err := s.Entries(first, last+1, math.MaxUint64)
				if err == nil && uint64(len(es)) != last-first+1 {
					err = fmt.Errorf("got %d entries for [%d,%d]", len(es), first, last)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	st := e.Stats()
	commits, updates := st.Syncs-before.Syncs, st.Updates-before.Updates
	t.Logf("%d updates in %d rounds (%.1f per round)", updates, commits, float64(updates)/float64(commits))
	if updates != nShards*nSaves || commits*4 > updates*3 {
		t.Fatalf("%d updates in %d commits: group commit is not merging", updates, commits)
	}
}

func TestApplyAndReopen(t *testing.T) {
	e, path := openTest(t, Options{})
	s, err := e.CreateShard(1, voters)
	if err != nil {
		t.Fatal(err)
	}
	var es []*pb.Entry
	for i := uint64(2); i <= 6; i++ {
		es = append(es, putEntry(i, 1, fmt.Sprint("k", i), fmt.Sprint("v", i)))
	}
	// An empty entry (as raft appends on election) is applied but not
	// passed to Apply.
	es = append(es, &pb.Entry{Index: proto.Uint64(7), Term: proto.Uint64(2)})
	calls := 0
	log := &applyLog{}
	counting := func(tx *Txn, en *pb.Entry) { calls++; log.apply(tx, en) }
	if err := s.Save(&Update{Entries: es, Committed: es[:3], Apply: counting}); err != nil {
		t.Fatal(err)
	}
	if got, want := log.take(), []string{"ok 2", "ok 3", "ok 4"}; !slices.Equal(got, want) {
		t.Fatalf("applied %q, want %q", got, want)
	}
	if err := s.Save(&Update{Committed: es[3:], Apply: counting, ConfState: &pb.ConfState{Voters: []uint64{1, 2}}}); err != nil {
		t.Fatal(err)
	}
	if got, want := log.take(), []string{"ok 5", "ok 6"}; !slices.Equal(got, want) {
		t.Fatalf("applied %q, want %q (the empty entry 7 is not passed to Apply)", got, want)
	}
	if i, term := s.Applied(); i != 7 || term != 2 {
		t.Fatalf("Applied = %d/%d", i, term)
	}
	want := dump(t, s)
	if want["kv/k6"] != "v6" || want["meta/count"] != string(u64(5)) {
		t.Fatalf("state %v", want)
	}
	err = s.View(func(r *Reader) error {
		if i, _ := r.Applied(); i != 7 {
			return fmt.Errorf("reader applied %d", i)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	e = reopen(t, e, path, Options{})
	s, err = e.OpenShard(1)
	if err != nil {
		t.Fatal(err)
	}
	if i, term := s.Applied(); i != 7 || term != 2 {
		t.Fatalf("reopened Applied = %d/%d", i, term)
	}
	if got := dump(t, s); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("reopened state %v, want %v", got, want)
	}
	if _, cs, _ := s.InitialState(); !slices.Equal(cs.GetVoters(), []uint64{1, 2}) {
		t.Fatalf("reopened conf state %v", cs)
	}

	// Replaying the same committed entries (a restart re-delivering a
	// Ready) applies nothing twice.
	calls = 0
	if err := s.Save(&Update{Committed: es, Apply: counting}); err != nil {
		t.Fatal(err)
	}
	if got := log.take(); calls != 0 || len(got) != 0 {
		t.Fatalf("replay applied again: %d calls, applied %q", calls, got)
	}
	if got := dump(t, s); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("state after replay %v, want %v", got, want)
	}

	// A gap in the applied sequence is rejected, and writes nothing.
	gap := putEntry(9, 2, "gap", "x")
	err = s.Save(&Update{Entries: []*pb.Entry{putEntry(8, 2, "a", "b"), gap}, Committed: []*pb.Entry{gap}, Apply: applyPut})
	mustIs(t, err, ErrLogGap)
	if l, _ := s.LastIndex(); l != 7 {
		t.Fatalf("rejected update appended: last %d", l)
	}
}

// TestApplyAtomicVisibility checks, with concurrent readers, that the
// applied index is never visible apart from the data it reflects.
func TestApplyAtomicVisibility(t *testing.T) {
	e, _ := openTest(t, Options{NoSync: true})
	s, err := e.CreateShard(1, voters)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		defer close(errc)
		for {
			select {
			case <-done:
				return
			default:
			}
			err := s.View(func(r *Reader) error {
				applied, _ := r.Applied()
				var n uint64
				if b := r.GetMeta([]byte("count")); b != nil {
					n, _ = decodeU64(b)
				}
				if applied != n+1 { // index 1 is the bootstrap, not applied by us
					return fmt.Errorf("applied %d with %d puts", applied, n)
				}
				return nil
			})
			if err != nil {
				errc <- err
				return
			}
		}
	}()
	for i := uint64(2); i < 200; i += 3 {
		es := []*pb.Entry{putEntry(i, 1, "a", "1"), putEntry(i+1, 1, "b", "2"), putEntry(i+2, 1, "c", "3")}
		if err := s.Save(&Update{Entries: es, Committed: es, Apply: applyPut}); err != nil {
			t.Fatal(err)
		}
	}
	close(done)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// TestApplyPanic: a panicking ApplyFunc commits nothing of its round and
// stops the engine's writes.
func TestApplyPanic(t *testing.T) {
	e, path := openTest(t, Options{})
	s, err := e.CreateShard(1, voters)
	if err != nil {
		t.Fatal(err)
	}
	en := putEntry(2, 1, "a", "1")
	err = s.Save(&Update{Entries: []*pb.Entry{en}, Committed: []*pb.Entry{en},
		Apply: func(tx *Txn, en *pb.Entry) {
			applyPut(tx, en)
			panic("boom")
		}})
	mustIs(t, err, ErrFailed)
	err = s.Save(&Update{Entries: []*pb.Entry{en}})
	mustIs(t, err, ErrFailed)
	mustIs(t, e.PutMeta("x", []byte("y")), ErrFailed)

	e = reopen(t, e, path, Options{})
	s, err = e.OpenShard(1)
	if err != nil {
		t.Fatal(err)
	}
	if l, _ := s.LastIndex(); l != 1 {
		t.Fatalf("last %d after failed round", l)
	}
	if i, _ := s.Applied(); i != 1 {
		t.Fatalf("applied %d after failed round", i)
	}
	if got := dump(t, s); len(got) != 0 {
		t.Fatalf("state after failed round: %v", got)
	}
}

func TestCompact(t *testing.T) {
	e, path := openTest(t, Options{NoSync: true})
	s, err := e.CreateShard(1, voters)
	if err != nil {
		t.Fatal(err)
	}
	es := ents(2, 1, 1, 2, 2, 2)
	if err := s.Save(&Update{Entries: es, Committed: es[:3]}); err != nil {
		t.Fatal(err)
	}
	mustIs(t, s.Compact(5), ErrNotApplied)
	mustIs(t, s.Compact(1), raft.ErrCompacted)
	if err := s.Compact(4); err != nil {
		t.Fatal(err)
	}
	mustIs(t, s.Compact(4), raft.ErrCompacted)
	check := func(s *Shard) {
		snap, _ := s.Snapshot()
		if m := snap.GetMetadata(); m.GetIndex() != 4 || m.GetTerm() != 2 || !slices.Equal(m.GetConfState().GetVoters(), voters.GetVoters()) {
			t.Fatalf("snapshot after compact %v", m)
		}
		if f, _ := s.FirstIndex(); f != 5 {
			t.Fatalf("first %d", f)
		}
		if _, err := s.Entries(4, 5, math.MaxUint64); !errors.Is(err, raft.ErrCompacted) {
			t.Fatalf("Entries(4): %v", err)
		}
		if got, _ := s.Entries(5, 7, math.MaxUint64); fmtEnts(got) != fmtEnts(es[3:]) {
			t.Fatalf("entries %s", fmtEnts(got))
		}
	}
	check(s)
	e = reopen(t, e, path, Options{NoSync: true})
	s, _ = e.OpenShard(1)
	check(s)
	// A snapshot at or below the compacted index is out of date.
	tok, err := e.StageSnapshot(1, &pb.SnapshotMetadata{Index: proto.Uint64(4), Term: proto.Uint64(2)}, eofNext)
	if err != nil {
		t.Fatal(err)
	}
	err = s.Save(&Update{Snapshot: &pb.Snapshot{Data: tok, Metadata: &pb.SnapshotMetadata{Index: proto.Uint64(4), Term: proto.Uint64(2)}}})
	mustIs(t, err, raft.ErrSnapOutOfDate)
}

func TestErrors(t *testing.T) {
	e, _ := openTest(t, Options{NoSync: true})
	if _, err := e.OpenShard(5); !errors.Is(err, ErrShardNotFound) {
		t.Fatalf("OpenShard unknown: %v", err)
	}
	s, err := e.CreateShard(1, voters)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.CreateShard(1, voters); !errors.Is(err, ErrShardExists) {
		t.Fatalf("CreateShard twice: %v", err)
	}
	if s2, _ := e.OpenShard(1); s2 != s {
		t.Fatal("OpenShard returned another *Shard")
	}
	mustIs(t, e.PutMeta("", nil), ErrInvalid)
	if err := e.PutMeta("node-id", []byte{7}); err != nil {
		t.Fatal(err)
	}
	if v, _ := e.GetMeta("node-id"); !bytes.Equal(v, []byte{7}) {
		t.Fatalf("GetMeta = %v", v)
	}
	if v, err := e.GetMeta("absent"); v != nil || err != nil {
		t.Fatalf("GetMeta absent = %v, %v", v, err)
	}
	// Bad input through Txn fails the call, not the round.
	en := putEntry(2, 1, "a", "1")
	invalid := false
	err = s.Save(&Update{Entries: []*pb.Entry{en}, Committed: []*pb.Entry{en}, Apply: func(tx *Txn, _ *pb.Entry) {
		invalid = errors.Is(tx.Put(nil, []byte("v")), ErrInvalid)
	}})
	if err != nil || !invalid {
		t.Fatalf("Put(nil) inside apply: ErrInvalid %v, Save %v", invalid, err)
	}

	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	for name, err := range map[string]error{
		"Save":         s.Save(&Update{Entries: ents(1, 1)}),
		"Compact":      s.Compact(1),
		"CreateShard":  func() error { _, err := e.CreateShard(9, nil); return err }(),
		"OpenShard":    func() error { _, err := e.OpenShard(1); return err }(),
		"PutMeta":      e.PutMeta("a", nil),
		"GetMeta":      func() error { _, err := e.GetMeta("a"); return err }(),
		"View":         s.View(func(*Reader) error { return nil }),
		"OpenSnapshot": func() error { _, err := s.OpenSnapshot(); return err }(),
		"StageSnapshot": func() error {
			_, err := e.StageSnapshot(1, &pb.SnapshotMetadata{}, eofNext)
			return err
		}(),
	} {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", name, err)
		}
	}
}

// TestCloseWithPendingSaves closes the engine while saves wait for the
// writer: each gets either success or ErrClosed, none hangs.
func TestCloseWithPendingSaves(t *testing.T) {
	e, _ := openTest(t, Options{NoSync: true})
	var shards []*Shard
	for i := range 4 {
		s, err := e.CreateShard(uint64(i+1), voters)
		if err != nil {
			t.Fatal(err)
		}
		shards = append(shards, s)
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(shards))
	for _, s := range shards {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := uint64(2); ; i++ {
				if err := s.Save(&Update{Entries: ents(i, 1)}); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	waitFor(t, "some saves", func() bool { return e.Stats().Updates > 20 })
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		mustIs(t, err, ErrClosed)
	}
}

// The log cache is shared between published states: appends go in place
// past the end, overwrites copy first. A state a reader still holds must
// keep its entries through both.
func TestPublishedCacheSurvivesAppendAndTruncation(t *testing.T) {
	e, _ := openTest(t, Options{NoSync: true})
	s, err := e.CreateShard(1, voters)
	if err != nil {
		t.Fatal(err)
	}
	// Two appends, so that the cache's array has spare room (2..5 fill
	// four slots, 6 makes append grow it) and the next append stays in it.
	for _, es := range [][]*pb.Entry{ents(2, 1, 1, 1, 1), ents(6, 1)} {
		if err := s.Save(&Update{Entries: es}); err != nil {
			t.Fatal(err)
		}
	}
	s.mu.Lock()
	held := s.st // what a reader fetched before the next rounds
	s.mu.Unlock()
	if cap(held.cache) == len(held.cache) {
		t.Fatal("test setup: the cache has no spare capacity, so nothing is shared")
	}
	want := make([]uint64, len(held.cache))
	for i, en := range held.cache {
		want[i] = en.GetTerm()
	}
	// An append in place (7), then a leader change that rewrites 4..
	// with term 2: the held state must still say term 1 for 2..6.
	if err := s.Save(&Update{Entries: ents(7, 1)}); err != nil {
		t.Fatal(err)
	}
	if err := s.Save(&Update{Entries: ents(4, 2, 2, 2)}); err != nil {
		t.Fatal(err)
	}
	for i, en := range held.cache {
		if en.GetTerm() != want[i] || en.GetIndex() != uint64(2+i) {
			t.Fatalf("held cache[%d] is now %d/%d, want %d/%d", i, en.GetIndex(), en.GetTerm(), 2+i, want[i])
		}
	}
	if term, err := s.Term(4); err != nil || term != 2 {
		t.Fatalf("Term(4) after the rewrite = %d, %v; want 2", term, err)
	}
	if last, _ := s.LastIndex(); last != 6 {
		t.Fatalf("LastIndex after the rewrite = %d, want 6", last)
	}
}

// TestCommitBytes: the commit counts the pages it wrote, which hold a
// large value twice, in the shard's log and in its state.
func TestCommitBytes(t *testing.T) {
	e, _ := openTest(t, Options{})
	s, err := e.CreateShard(1, voters)
	if err != nil {
		t.Fatal(err)
	}
	before := e.Stats().CommitBytes
	const size = 1 << 20
	en := putEntry(2, 1, "k", strings.Repeat("v", size))
	if err := s.Save(&Update{Entries: []*pb.Entry{en}, Committed: []*pb.Entry{en}, Apply: applyPut, Sync: true}); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil { // commits
		t.Fatal(err)
	}
	if got := e.Stats().CommitBytes - before; got < 2*size || got > 3*size {
		t.Fatalf("commit wrote %d bytes of pages for a %d-byte value in the log and the state; want 2 to 3 times its size", got, size)
	}
}

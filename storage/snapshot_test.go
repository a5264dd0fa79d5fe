package storage

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"slices"
	"testing"

	bolt "go.etcd.io/bbolt"
	"go.etcd.io/raft/v3"
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/peerpb"
)

// fill applies n puts with values of size bytes to s, from index 2 on, in
// saves of per entries; returns the last index.
func fill(t testing.TB, s *Shard, n, size, per int) uint64 {
	t.Helper()
	idx, _ := s.LastIndex()
	for i := 0; i < n; i += per {
		var es []*pb.Entry
		for j := i; j < min(n, i+per); j++ {
			idx++
			v := make([]byte, size)
			for k := range v {
				v[k] = byte(j + k)
			}
			es = append(es, putEntry(idx, 1, fmt.Sprintf("key-%06d", j), string(v)))
		}
		if err := s.Save(&Update{Entries: es, Committed: es, Apply: applyPut}); err != nil {
			t.Fatal(err)
		}
	}
	return idx
}

// transfer streams a's state into engine eb's shard b, as the transport
// and raft would: OpenSnapshot, StageSnapshot, then Save with the token.
// It returns the chunk sizes seen and the installed metadata.
func transfer(t testing.TB, a *Shard, eb *Engine, b *Shard) ([]int, *pb.SnapshotMetadata) {
	t.Helper()
	r, err := a.OpenSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	meta := r.Metadata()
	var sizes []int
	next := func() ([]*peerpb.SnapshotPair, error) {
		ps, err := r.Next()
		if err == nil {
			n := 0
			for _, p := range ps {
				n += len(p.GetKey()) + len(p.GetValue())
			}
			sizes = append(sizes, n)
		}
		return ps, err
	}
	tok, err := eb.StageSnapshot(b.ID(), meta, next)
	if err != nil {
		t.Fatal(err)
	}
	snap := &pb.Snapshot{Data: tok, Metadata: meta}
	if err := b.Save(&Update{Snapshot: snap, HardState: &pb.HardState{Term: proto.Uint64(meta.GetTerm()), Commit: proto.Uint64(meta.GetIndex())}}); err != nil {
		t.Fatal(err)
	}
	return sizes, meta
}

func TestSnapshotRoundTrip(t *testing.T) {
	ea, _ := openTest(t, Options{NoSync: true})
	eb, pathB := openTest(t, Options{NoSync: true})
	a, err := ea.CreateShard(3, voters)
	if err != nil {
		t.Fatal(err)
	}
	last := fill(t, a, 1000, 100, 50)
	if err := a.Compact(last - 10); err != nil {
		t.Fatal(err)
	}
	b, err := eb.CreateShard(3, nil)
	if err != nil {
		t.Fatal(err)
	}
	// b had its own (stale) log: installing drops it.
	if err := b.Save(&Update{Entries: ents(1, 1, 1, 1)}); err != nil {
		t.Fatal(err)
	}
	_, meta := transfer(t, a, eb, b)
	if meta.GetIndex() != last || meta.GetTerm() != 1 || !slices.Equal(meta.GetConfState().GetVoters(), voters.GetVoters()) {
		t.Fatalf("snapshot metadata %v, want index %d", meta, last)
	}
	want := dump(t, a)
	check := func(b *Shard) {
		if got := dump(t, b); !maps.Equal(got, want) {
			t.Fatalf("installed state differs: %d pairs, want %d", len(got), len(want))
		}
		if f, _ := b.FirstIndex(); f != last+1 {
			t.Fatalf("first %d, want %d", f, last+1)
		}
		if l, _ := b.LastIndex(); l != last {
			t.Fatalf("last %d, want %d", l, last)
		}
		if term, err := b.Term(last); term != 1 || err != nil {
			t.Fatalf("Term(%d) = %d, %v", last, term, err)
		}
		if i, term := b.Applied(); i != last || term != 1 {
			t.Fatalf("applied %d/%d", i, term)
		}
		if cs := b.ConfState(); !slices.Equal(cs.GetVoters(), voters.GetVoters()) {
			t.Fatalf("conf state %v", cs)
		}
		snap, _ := b.Snapshot()
		if snap.GetMetadata().GetIndex() != last {
			t.Fatalf("Snapshot() index %d", snap.GetMetadata().GetIndex())
		}
		if _, err := b.Entries(last, last+1, math.MaxUint64); !errors.Is(err, raft.ErrCompacted) {
			t.Fatalf("Entries(%d): %v", last, err)
		}
	}
	check(b)
	// The log continues after the snapshot, and applying continues too.
	en := putEntry(last+1, 2, "after", "snap")
	if err := b.Save(&Update{Entries: []*pb.Entry{en}, Committed: []*pb.Entry{en}, Apply: applyPut}); err != nil {
		t.Fatal(err)
	}
	want["kv/after"] = "snap"
	want["meta/count"] = string(u64(1001))
	last++
	eb = reopen(t, eb, pathB, Options{NoSync: true})
	b, _ = eb.OpenShard(3)
	if got := dump(t, b); !maps.Equal(got, want) {
		t.Fatalf("state after reopen differs")
	}
	if l, _ := b.LastIndex(); l != last {
		t.Fatalf("last after reopen %d", l)
	}
	if n := stagedCount(t, eb); n != 0 {
		t.Fatalf("%d staged snapshots left", n)
	}
}

// TestSnapshotLarge streams 20 MiB of values: chunks stay about 1 MiB.
func TestSnapshotLarge(t *testing.T) {
	ea, _ := openTest(t, Options{NoSync: true})
	eb, _ := openTest(t, Options{NoSync: true})
	a, _ := ea.CreateShard(1, voters)
	fill(t, a, 320, 64<<10, 32) // 20 MiB
	b, _ := eb.CreateShard(1, nil)
	sizes, _ := transfer(t, a, eb, b)
	total := 0
	for i, n := range sizes {
		total += n
		if n > sendChunkBytes || (i < len(sizes)-2 && n < sendChunkBytes*3/4) {
			t.Errorf("chunk %d is %d bytes", i, n)
		}
	}
	if total < 20<<20 || len(sizes) < 20 || len(sizes) > 24 {
		t.Fatalf("%d bytes in %d chunks", total, len(sizes))
	}
	if !maps.Equal(dump(t, a), dump(t, b)) {
		t.Fatal("installed state differs")
	}
}

func TestSnapshotErrors(t *testing.T) {
	e, path := openTest(t, Options{NoSync: true})
	s, _ := e.CreateShard(1, nil)
	meta := &pb.SnapshotMetadata{Index: proto.Uint64(10), Term: proto.Uint64(2), ConfState: voters}
	pairs := func(ps ...*peerpb.SnapshotPair) func() ([]*peerpb.SnapshotPair, error) {
		done := false
		return func() ([]*peerpb.SnapshotPair, error) {
			if done {
				return nil, io.EOF
			}
			done = true
			return ps, nil
		}
	}
	kv := func(k string) *peerpb.SnapshotPair {
		return &peerpb.SnapshotPair{Bucket: []byte("kv"), Key: []byte(k), Value: seal([]byte(k), []byte("v"))}
	}

	// A stream that fails, or carries a bad pair, leaves nothing staged.
	boom := errors.New("stream broke")
	calls := 0
	_, err := e.StageSnapshot(1, meta, func() ([]*peerpb.SnapshotPair, error) {
		if calls++; calls == 1 {
			return []*peerpb.SnapshotPair{kv("a")}, nil
		}
		return nil, boom
	})
	mustIs(t, err, boom)
	_, err = e.StageSnapshot(1, meta, pairs(&peerpb.SnapshotPair{Bucket: []byte("log"), Key: []byte("x")}))
	mustIs(t, err, ErrBadSnapshot)
	_, err = e.StageSnapshot(1, meta, pairs(&peerpb.SnapshotPair{Bucket: []byte("kv")}))
	mustIs(t, err, ErrBadSnapshot)
	if n := stagedCount(t, e); n != 0 {
		t.Fatalf("%d staged after failures", n)
	}

	tok, err := e.StageSnapshot(1, meta, pairs(kv("a")))
	if err != nil {
		t.Fatal(err)
	}
	install := func(s *Shard, data []byte, m *pb.SnapshotMetadata) error {
		err := s.Save(&Update{Snapshot: &pb.Snapshot{Data: data, Metadata: m}})
		return err
	}
	mustIs(t, install(s, []byte("garbage"), meta), ErrBadSnapshot)
	other := proto.Clone(meta).(*pb.SnapshotMetadata)
	other.Term = proto.Uint64(3)
	mustIs(t, install(s, tok, other), ErrBadSnapshot)
	s2, _ := e.CreateShard(2, nil)
	mustIs(t, install(s2, tok, meta), ErrBadSnapshot) // another shard's staging

	// An older staging of the shard is dropped when a newer one installs.
	old, err := e.StageSnapshot(1, &pb.SnapshotMetadata{Index: proto.Uint64(5), Term: proto.Uint64(1)}, pairs(kv("old")))
	if err != nil {
		t.Fatal(err)
	}
	if err := install(s, tok, meta); err != nil {
		t.Fatal(err)
	}
	if got := dump(t, s); !maps.Equal(got, map[string]string{"kv/a": "v"}) {
		t.Fatalf("installed %v", got)
	}
	mustIs(t, install(s, tok, meta), raft.ErrSnapOutOfDate)
	mustIs(t, install(s, old, &pb.SnapshotMetadata{Index: proto.Uint64(5), Term: proto.Uint64(1)}), raft.ErrSnapOutOfDate)
	if n := stagedCount(t, e); n != 0 {
		t.Fatalf("%d staged after install", n)
	}

	// Open drops stagings left by a previous run.
	if _, err := e.StageSnapshot(1, &pb.SnapshotMetadata{Index: proto.Uint64(20), Term: proto.Uint64(3)}, pairs(kv("b"))); err != nil {
		t.Fatal(err)
	}
	if n := stagedCount(t, e); n != 1 {
		t.Fatalf("%d staged, want 1", n)
	}
	e = reopen(t, e, path, Options{NoSync: true})
	if n := stagedCount(t, e); n != 0 {
		t.Fatalf("%d staged after reopen", n)
	}
}

// TestSnapshotReaderIsolation: a reader's view does not move while the
// shard keeps applying.
func TestSnapshotReaderIsolation(t *testing.T) {
	e, _ := openTest(t, Options{NoSync: true})
	s, _ := e.CreateShard(1, voters)
	last := fill(t, s, 10, 10, 10)
	r, err := s.OpenSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	fill(t, s, 10, 10, 10)
	if r.Metadata().GetIndex() != last {
		t.Fatalf("view index %d, want %d", r.Metadata().GetIndex(), last)
	}
	n := 0
	for {
		ps, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		n += len(ps)
	}
	if n != 11 { // 10 keys + meta "count"
		t.Fatalf("%d pairs in view", n)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Next(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Next after Close: %v", err)
	}
}

func stagedCount(t testing.TB, e *Engine) int {
	t.Helper()
	n := 0
	err := e.view(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketStaging).ForEachBucket(func([]byte) error { n++; return nil })
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

package storage

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"go.etcd.io/raft/v3"
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// logStorage is what the parity tests drive: raft.Storage plus the write
// operations of raft.MemoryStorage. Both raft.MemoryStorage and
// shardAdapter implement it, and every case runs against both.
type logStorage interface {
	raft.Storage
	Append(ents []*pb.Entry) error
	Compact(i uint64) error
	ApplySnapshot(snap *pb.Snapshot) error
}

// shardAdapter maps MemoryStorage's write operations onto a Shard.
type shardAdapter struct {
	t    testing.TB
	e    *Engine
	path string
	*Shard
}

func (a *shardAdapter) Append(es []*pb.Entry) error {
	err := a.Save(&Update{Entries: es})
	return err
}

// Compact first applies up to i (Shard.Compact requires it; MemoryStorage
// leaves that duty to its caller).
func (a *shardAdapter) Compact(i uint64) error {
	applied, _ := a.Applied()
	if last, _ := a.LastIndex(); i > applied && i <= last {
		es, err := a.Entries(applied+1, i+1, math.MaxUint64)
		if err != nil {
			return err
		}
		if err := a.Save(&Update{Committed: es}); err != nil {
			return err
		}
	}
	return a.Shard.Compact(i)
}

func (a *shardAdapter) ApplySnapshot(snap *pb.Snapshot) error {
	if !raft.IsEmptySnap(snap) {
		tok, err := a.e.StageSnapshot(a.ID(), snap.GetMetadata(), eofNext)
		if err != nil {
			return err
		}
		snap = proto.Clone(snap).(*pb.Snapshot)
		snap.Data = tok
	}
	err := a.Save(&Update{Snapshot: snap})
	return err
}

// reopen closes and reopens the engine, so the shard is rebuilt from disk.
func (a *shardAdapter) reopen() {
	a.e = reopen(a.t, a.e, a.path, Options{NoSync: true})
	s, err := a.e.OpenShard(a.ID())
	if err != nil {
		a.t.Fatal(err)
	}
	a.Shard = s
}

// cacheModes run the shard side with the whole log cached, with nothing
// cached (every read from bbolt), and with a cache boundary inside the log.
var cacheModes = []struct {
	name  string
	limit int
}{
	{"cached", defaultLogCacheBytes},
	{"uncached", 0},
	{"partial", 120},
}

func newShardAdapter(t testing.TB, limit int) *shardAdapter {
	e, path := openTest(t, Options{NoSync: true})
	e.cacheLimit = limit
	s, err := e.CreateShard(1, nil)
	if err != nil {
		t.Fatal(err)
	}
	return &shardAdapter{t: t, e: e, path: path, Shard: s}
}

// pair runs fn against a MemoryStorage and a Shard (in every cache mode),
// each prepared with the log "snapshot at first-1 with term terms[0],
// then entries first.. with terms[1:]" as raft's storage_test builds it.
func pair(t *testing.T, first uint64, terms []uint64, fn func(t *testing.T, mem, sh logStorage, sa *shardAdapter)) {
	for _, m := range cacheModes {
		t.Run(m.name, func(t *testing.T) {
			mem := raft.NewMemoryStorage()
			sa := newShardAdapter(t, m.limit)
			for _, s := range []logStorage{mem, sa} {
				snap := &pb.Snapshot{Metadata: &pb.SnapshotMetadata{
					Index: proto.Uint64(first - 1), Term: proto.Uint64(terms[0]),
					ConfState: &pb.ConfState{Voters: []uint64{1}},
				}}
				if err := s.ApplySnapshot(snap); err != nil {
					t.Fatal(err)
				}
				if err := s.Append(ents(first, terms[1:]...)); err != nil {
					t.Fatal(err)
				}
			}
			fn(t, mem, sa, sa)
		})
	}
}

// observe renders everything raft can read from s.
func observe(s logStorage) string {
	var b strings.Builder
	first, _ := s.FirstIndex()
	last, _ := s.LastIndex()
	fmt.Fprintf(&b, "first=%d last=%d\n", first, last)
	for i := first - min(first, 2); i <= last+2; i++ {
		term, err := s.Term(i)
		fmt.Fprintf(&b, "term(%d)=%d %v\n", i, term, errName(err))
	}
	es, err := s.Entries(first, last+1, math.MaxUint64)
	fmt.Fprintf(&b, "entries %s %v\n", fmtEnts(es), errName(err))
	// Snapshot() is not compared: MemoryStorage.Compact leaves it alone
	// (CreateSnapshot sets it), Shard.Compact records it.
	return b.String()
}

func errName(err error) string {
	for _, e := range []error{raft.ErrCompacted, raft.ErrUnavailable, raft.ErrSnapOutOfDate} {
		if errors.Is(err, e) {
			return e.Error()
		}
	}
	if err != nil {
		return "other: " + err.Error()
	}
	return "ok"
}

func fmtEnts(es []*pb.Entry) string {
	var b strings.Builder
	for _, e := range es {
		fmt.Fprintf(&b, "%d/%d/%x ", e.GetIndex(), e.GetTerm(), e.GetData())
	}
	return b.String()
}

// same fails unless both storages look the same, and the shard still does
// after a reopen.
func same(t *testing.T, mem, sh logStorage, sa *shardAdapter) {
	t.Helper()
	want := observe(mem)
	if got := observe(sh); got != want {
		t.Fatalf("shard differs from MemoryStorage\nshard:\n%s\nmemory:\n%s", got, want)
	}
	sa.reopen()
	if got := observe(sa); got != want {
		t.Fatalf("reopened shard differs from MemoryStorage\nshard:\n%s\nmemory:\n%s", got, want)
	}
}

func sameErr(t *testing.T, got, want, expect error) {
	t.Helper()
	if errName(got) != errName(want) || (got == nil) != (want == nil) {
		t.Fatalf("shard error %v, MemoryStorage error %v", got, want)
	}
	if errName(want) != errName(expect) {
		t.Fatalf("MemoryStorage error %v, test expects %v", want, expect)
	}
}

func TestParityTerm(t *testing.T) {
	for _, tt := range []struct {
		i    uint64
		werr error
	}{
		{2, raft.ErrCompacted}, {3, nil}, {4, nil}, {5, nil}, {6, raft.ErrUnavailable},
	} {
		t.Run(fmt.Sprint(tt.i), func(t *testing.T) {
			pair(t, 4, []uint64{3, 4, 5}, func(t *testing.T, mem, sh logStorage, sa *shardAdapter) {
				wt, werr := mem.Term(tt.i)
				gt, gerr := sh.Term(tt.i)
				sameErr(t, gerr, werr, tt.werr)
				if gt != wt {
					t.Fatalf("Term(%d) = %d, MemoryStorage %d", tt.i, gt, wt)
				}
			})
		})
	}
}

func TestParityEntries(t *testing.T) {
	es := ents(3, 3, 4, 5, 6)
	size := func(es ...*pb.Entry) uint64 {
		var n int
		for _, e := range es {
			n += proto.Size(e)
		}
		return uint64(n)
	}
	for _, tt := range []struct {
		lo, hi, maxSize uint64
		werr            error
		wlen            int
	}{
		{2, 6, math.MaxUint64, raft.ErrCompacted, 0},
		{3, 4, math.MaxUint64, raft.ErrCompacted, 0},
		{4, 5, math.MaxUint64, nil, 1},
		{4, 6, math.MaxUint64, nil, 2},
		{4, 7, math.MaxUint64, nil, 3},
		{4, 7, 0, nil, 1}, // at least one entry, even with maxSize 0
		{4, 7, size(es[1], es[2]), nil, 2},
		{4, 7, size(es[1], es[2]) + size(es[3])/2, nil, 2},
		{4, 7, size(es[1], es[2], es[3]) - 1, nil, 2},
		{4, 7, size(es[1], es[2], es[3]), nil, 3},
		{5, 5, math.MaxUint64, nil, 0},
	} {
		t.Run(fmt.Sprintf("%d-%d-%d", tt.lo, tt.hi, tt.maxSize), func(t *testing.T) {
			pair(t, 4, []uint64{3, 4, 5, 6}, func(t *testing.T, mem, sh logStorage, sa *shardAdapter) {
				want, werr := mem.Entries(tt.lo, tt.hi, tt.maxSize)
				got, gerr := sh.Entries(tt.lo, tt.hi, tt.maxSize)
				sameErr(t, gerr, werr, tt.werr)
				if len(want) != tt.wlen {
					t.Fatalf("MemoryStorage returned %d entries, test expects %d", len(want), tt.wlen)
				}
				if fmtEnts(got) != fmtEnts(want) {
					t.Fatalf("Entries = %s, MemoryStorage %s", fmtEnts(got), fmtEnts(want))
				}
				// The caller owns the slice: appending must not disturb
				// the storage.
				if len(got) > 0 {
					_ = append(got, ent(99, 99))
					again, _ := sh.Entries(tt.lo, tt.hi, tt.maxSize)
					if fmtEnts(again) != fmtEnts(want) {
						t.Fatal("append to returned slice changed the storage")
					}
				}
			})
		})
	}
}

func TestParityEntriesEmptyLog(t *testing.T) {
	mem := raft.NewMemoryStorage()
	sa := newShardAdapter(t, defaultLogCacheBytes)
	_, werr := mem.Entries(1, 1, math.MaxUint64)
	_, gerr := sa.Entries(1, 1, math.MaxUint64)
	sameErr(t, gerr, werr, raft.ErrUnavailable)
	same(t, mem, sa, sa)
}

func TestParityLastIndex(t *testing.T) {
	pair(t, 4, []uint64{3, 4, 5}, func(t *testing.T, mem, sh logStorage, sa *shardAdapter) {
		same(t, mem, sh, sa)
		for _, s := range []logStorage{mem, sa} {
			if err := s.Append(ents(6, 5)); err != nil {
				t.Fatal(err)
			}
		}
		if last, _ := sa.LastIndex(); last != 6 {
			t.Fatalf("LastIndex = %d, want 6", last)
		}
		same(t, mem, sa, sa)
	})
}

func TestParityFirstIndex(t *testing.T) {
	pair(t, 4, []uint64{3, 4, 5}, func(t *testing.T, mem, sh logStorage, sa *shardAdapter) {
		if first, _ := sh.FirstIndex(); first != 4 {
			t.Fatalf("FirstIndex = %d, want 4", first)
		}
		for _, s := range []logStorage{mem, sh} {
			if err := s.Compact(4); err != nil {
				t.Fatal(err)
			}
		}
		if first, _ := sh.FirstIndex(); first != 5 {
			t.Fatalf("FirstIndex = %d, want 5", first)
		}
		same(t, mem, sh, sa)
	})
}

func TestParityCompact(t *testing.T) {
	for _, tt := range []struct {
		i    uint64
		werr error
	}{
		{2, raft.ErrCompacted}, {3, raft.ErrCompacted}, {4, nil}, {5, nil},
	} {
		t.Run(fmt.Sprint(tt.i), func(t *testing.T) {
			pair(t, 4, []uint64{3, 4, 5}, func(t *testing.T, mem, sh logStorage, sa *shardAdapter) {
				sameErr(t, sh.Compact(tt.i), mem.Compact(tt.i), tt.werr)
				same(t, mem, sh, sa)
			})
		})
	}
}

func TestParityAppend(t *testing.T) {
	for _, tt := range []struct {
		name    string
		entries []*pb.Entry
		want    string // index/term of the resulting log
	}{
		{"all compacted", ents(1, 1, 2), "4/4 5/5"},
		{"same", ents(3, 3, 4, 5), "4/4 5/5"},
		{"conflict", ents(3, 3, 6, 6), "4/6 5/6"},
		{"extend", ents(3, 3, 4, 5, 5), "4/4 5/5 6/5"},
		{"truncate incoming and existing", ents(2, 3, 3, 5), "4/5"},
		{"truncate existing", ents(4, 5), "4/5"},
		{"direct append", ents(6, 5), "4/4 5/5 6/5"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			pair(t, 4, []uint64{3, 4, 5}, func(t *testing.T, mem, sh logStorage, sa *shardAdapter) {
				sameErr(t, sh.Append(tt.entries), mem.Append(tt.entries), nil)
				es, _ := mem.Entries(4, func() uint64 { l, _ := mem.LastIndex(); return l + 1 }(), math.MaxUint64)
				var got []string
				for _, e := range es {
					got = append(got, fmt.Sprintf("%d/%d", e.GetIndex(), e.GetTerm()))
				}
				if strings.Join(got, " ") != tt.want {
					t.Fatalf("MemoryStorage log %v, test expects %s", got, tt.want)
				}
				same(t, mem, sh, sa)
			})
		})
	}
}

func TestParityApplySnapshot(t *testing.T) {
	cs := &pb.ConfState{Voters: []uint64{1, 2, 3}}
	snap := func(i, term uint64) *pb.Snapshot {
		return &pb.Snapshot{Data: []byte("data"), Metadata: &pb.SnapshotMetadata{Index: proto.Uint64(i), Term: proto.Uint64(term), ConfState: cs}}
	}
	for _, tt := range []struct {
		name  string
		snaps []*pb.Snapshot
		werr  error
	}{
		{"normal", []*pb.Snapshot{snap(4, 4)}, nil},
		{"out of date", []*pb.Snapshot{snap(4, 4), snap(3, 3)}, raft.ErrSnapOutOfDate},
		{"same index", []*pb.Snapshot{snap(4, 4), snap(4, 4)}, raft.ErrSnapOutOfDate},
		{"newer", []*pb.Snapshot{snap(4, 4), snap(9, 5)}, nil},
		{"bootstrap with conf state only", []*pb.Snapshot{{Data: []byte("data"), Metadata: &pb.SnapshotMetadata{ConfState: cs}}}, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			mem := raft.NewMemoryStorage()
			sa := newShardAdapter(t, defaultLogCacheBytes)
			var werr, gerr error
			for _, s := range tt.snaps {
				werr = mem.ApplySnapshot(s)
				gerr = sa.ApplySnapshot(s)
			}
			sameErr(t, gerr, werr, tt.werr)
			if !raft.IsEmptySnap(tt.snaps[0]) {
				same(t, mem, sa, sa)
				if got := sa.ConfState(); !proto.Equal(got, pb.EnsureConfState(cs)) {
					t.Fatalf("ConfState = %v, want %v", got, cs)
				}
			}
		})
	}
}

// TestParityRandom compares the two storages over random operation
// sequences, with reopens of the shard thrown in, in every cache mode.
func TestParityRandom(t *testing.T) {
	for _, m := range cacheModes {
		t.Run(m.name, func(t *testing.T) {
			for seed := uint64(1); seed <= 4; seed++ {
				rng := rand.New(rand.NewPCG(seed, 99))
				mem := raft.NewMemoryStorage()
				sa := newShardAdapter(t, m.limit)
				term := uint64(1)
				for op := 0; op < 150; op++ {
					first, _ := mem.FirstIndex()
					last, _ := mem.LastIndex()
					var desc string
					var werr, gerr error
					switch r := rng.IntN(100); {
					case r < 60:
						start := max(1, first+uint64(rng.IntN(int(last-first+4)))-2)
						start = min(start, last+1)
						if rng.IntN(4) == 0 {
							term++
						}
						es := make([]*pb.Entry, 1+rng.IntN(5))
						for i := range es {
							es[i] = &pb.Entry{Index: proto.Uint64(start + uint64(i)), Term: proto.Uint64(term), Data: make([]byte, rng.IntN(60))}
						}
						desc = fmt.Sprintf("append %s", fmtEnts(es))
						werr, gerr = mem.Append(es), sa.Append(es)
					case r < 80:
						i := first - 1 + uint64(rng.IntN(int(last-first+2)))
						desc = fmt.Sprintf("compact %d", i)
						werr, gerr = mem.Compact(i), sa.Compact(i)
					case r < 90:
						// Above the compacted offset: MemoryStorage checks
						// against its last applied snapshot, which its
						// Compact does not move; Shard.Compact does.
						i := first + uint64(rng.IntN(int(last-first+6)))
						term++
						s := &pb.Snapshot{Metadata: &pb.SnapshotMetadata{Index: proto.Uint64(i), Term: proto.Uint64(term)}}
						desc = fmt.Sprintf("snapshot %d/%d", i, term)
						werr, gerr = mem.ApplySnapshot(s), sa.ApplySnapshot(s)
					case r < 95:
						desc = "reopen"
						sa.reopen()
					case last < first:
						desc = "nothing to read"
					default:
						lo := first + uint64(rng.IntN(int(last-first+1)))
						hi := lo + uint64(rng.IntN(int(last-lo+2)))
						maxSize := uint64(rng.IntN(200))
						desc = fmt.Sprintf("entries %d %d %d", lo, hi, maxSize)
						w, e1 := mem.Entries(lo, hi, maxSize)
						g, e2 := sa.Entries(lo, hi, maxSize)
						if fmtEnts(w) != fmtEnts(g) || errName(e1) != errName(e2) {
							t.Fatalf("seed %d op %d %s: shard %s %v, memory %s %v", seed, op, desc, fmtEnts(g), e2, fmtEnts(w), e1)
						}
					}
					if errName(werr) != errName(gerr) || (werr == nil) != (gerr == nil) {
						t.Fatalf("seed %d op %d %s: shard error %v, memory error %v", seed, op, desc, gerr, werr)
					}
					if w, g := observe(mem), observe(sa); w != g {
						t.Fatalf("seed %d op %d %s:\nshard:\n%s\nmemory:\n%s", seed, op, desc, g, w)
					}
				}
			}
		})
	}
}

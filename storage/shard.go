package storage

import (
	"fmt"
	"sync"

	bolt "go.etcd.io/bbolt"
	"go.etcd.io/raft/v3"
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

var _ raft.Storage = (*Shard)(nil)

// Shard is one raft group's storage inside the engine: its log, hard
// state, snapshot metadata, applied index, conf state and state machine
// data. It implements raft.Storage for the group's RawNode.
//
// The raft.Storage methods are called on the group's raft goroutine; they
// answer from the in-memory view of what has been committed to disk (the
// log tail is cached, older entries are read from bbolt). Save and Compact
// go through the engine's writer and block until durable.
type Shard struct {
	e           *Engine
	id          uint64
	incarnation []byte // the bucket's incarnation this Shard belongs to

	// mu guards st. st is replaced, never modified, once the round that
	// built it is durable (by the syncer after its fdatasync, or by the
	// writer after a commit), so it always describes what is on disk. The
	// writer builds each round from Engine.newest, which may be ahead.
	//
	// mu is also held while reading log entries older than the cache from
	// bbolt, and the writer holds it across a commit that rewrites those
	// entries (compaction, snapshot install, a truncation below the cache):
	// so a reader never sees bbolt ahead of st, which would mix entries
	// of two different logs.
	mu sync.Mutex
	st *shardState

	// visible is the applied index and term of the last bbolt commit,
	// which readers see (st's may be ahead, in the open transaction).
	// Guarded by mu.
	visible struct{ index, term uint64 }
	// changed, if not nil, is closed when visible.index next moves
	// (AppliedChanged). Guarded by mu.
	changed chan struct{}
}

func newShard(e *Engine, id uint64, incarnation []byte, st *shardState) *Shard {
	s := &Shard{e: e, id: id, incarnation: incarnation, st: st}
	s.visible.index, s.visible.term = st.appliedIndex, st.appliedTerm
	return s
}

// showApplied makes the published applied index visible, after a commit,
// and reports whether it moved.
func (s *Shard) showApplied() bool {
	s.mu.Lock()
	moved := s.visible.index != s.st.appliedIndex
	s.visible.index, s.visible.term = s.st.appliedIndex, s.st.appliedTerm
	if moved && s.changed != nil {
		close(s.changed)
		s.changed = nil
	}
	s.mu.Unlock()
	return moved
}

// AppliedChanged returns a channel closed once the applied index readers
// see (Applied) moves past what it is now, for readers that follow the
// shard's state, such as watches: a View after it is closed sees the
// newer state. Any goroutine may call it; one channel serves every
// caller until it is closed.
func (s *Shard) AppliedChanged() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.changed == nil {
		s.changed = make(chan struct{})
	}
	return s.changed
}

// shardState is a shard's persistent state as published to readers (then
// immutable) or as being built by a write round (then owned by the writer).
type shardState struct {
	hard *pb.HardState        // nil until the first hard state is saved
	snap *pb.SnapshotMetadata // the log's dummy entry: index, term, conf state; never nil
	last uint64               // last index in the log; snap.Index if the log is empty

	// cache holds the newest log entries, ending at last. Entries are
	// immutable; states share the backing array: a round appends in place
	// past the end (no published slice reaches there) and copies before
	// it overwrites (a truncation), see round.appendLog.
	cache      []*pb.Entry
	cacheBytes int
	// The entries from unboltedFrom on are not in committed bbolt yet (only
	// in the open transaction and the WAL) when unboltedGen is the WAL's
	// current generation; the cache must keep them, since readers fetch
	// older entries from committed bbolt.
	unboltedGen, unboltedFrom uint64

	appliedIndex, appliedTerm uint64
	conf                      *pb.ConfState // as of appliedIndex; never nil
}

// cacheStart is the index of cache[0] (last+1 if the cache is empty).
func (st *shardState) cacheStart() uint64 { return st.last + 1 - uint64(len(st.cache)) }

// loadShard builds a Shard from its bucket.
func loadShard(e *Engine, id uint64, b *bolt.Bucket) (*Shard, error) {
	raftb := b.Bucket(bucketRaft)
	st := &shardState{snap: &pb.SnapshotMetadata{}, conf: &pb.ConfState{}}
	hs := &pb.HardState{}
	if ok, err := getProto(raftb, keyHardState, hs); err != nil {
		return nil, err
	} else if ok {
		st.hard = hs
	}
	if _, err := getProto(raftb, keySnapMeta, st.snap); err != nil {
		return nil, err
	}
	st.snap = pb.EnsureSnapshotMetadata(st.snap)
	if _, err := getProto(raftb, keyConfState, st.conf); err != nil {
		return nil, err
	}
	st.conf = pb.EnsureConfState(st.conf)
	var err error
	if st.appliedIndex, st.appliedTerm, err = decodeApplied(raftb.Get(keyApplied)); err != nil {
		return nil, err
	}
	st.last = st.snap.GetIndex()
	c := b.Bucket(bucketLog).Cursor()
	if k, _ := c.Last(); k != nil {
		if st.last, err = decodeU64(k); err != nil {
			return nil, err
		}
	}
	// Warm the cache with the tail, newest first, within the limit.
	var rev []*pb.Entry
	for k, v := c.Last(); k != nil && st.cacheBytes+len(v) <= e.cacheLimit; k, v = c.Prev() {
		ent := &pb.Entry{}
		if err := proto.Unmarshal(v, ent); err != nil {
			return nil, fmt.Errorf("storage: corrupt log entry %x: %w", k, err)
		}
		rev = append(rev, ent)
		st.cacheBytes += entrySize(ent)
	}
	for i := len(rev) - 1; i >= 0; i-- {
		st.cache = append(st.cache, rev[i])
	}
	if n := len(st.cache); n > 0 && st.cache[n-1].GetIndex() != st.last {
		return nil, fmt.Errorf("storage: shard %d: corrupt log tail", id)
	}
	return newShard(e, id, bytesClone(raftb.Get(keyIncarnation)), st), nil
}

func bytesClone(b []byte) []byte { return append([]byte(nil), b...) }

// ID returns the shard id.
func (s *Shard) ID() uint64 { return s.id }

// Applied returns the index and term of the last applied entry (or of the
// installed snapshot). Zero after deletion.
func (s *Shard) Applied() (index, term uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.visible.index, s.visible.term
}

// Flush asks the writer to commit its open transaction now (see
// Engine.Flush).
func (s *Shard) Flush() { s.e.Flush() }

// ConfState returns a copy of the conf state as of Applied.
func (s *Shard) ConfState() *pb.ConfState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return proto.Clone(s.st.conf).(*pb.ConfState)
}

// InitialState implements raft.Storage. The hard state is nil if none was
// ever saved. The conf state is the one as of the applied index, stored
// atomically with it: raft restarts from Applied with that membership and
// re-applies the committed conf changes after it.
func (s *Shard) InitialState() (*pb.HardState, *pb.ConfState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	var hs *pb.HardState
	if st.hard != nil {
		hs = proto.Clone(st.hard).(*pb.HardState)
	}
	return hs, proto.Clone(st.conf).(*pb.ConfState), nil
}

// FirstIndex implements raft.Storage.
func (s *Shard) FirstIndex() (uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	return st.snap.GetIndex() + 1, nil
}

// LastIndex implements raft.Storage.
func (s *Shard) LastIndex() (uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	return st.last, nil
}

// Snapshot implements raft.Storage: the metadata recorded by the last
// Compact or snapshot install, without data. The state itself is streamed
// with OpenSnapshot, whose view is at least as new.
func (s *Shard) Snapshot() (*pb.Snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	return &pb.Snapshot{Metadata: proto.Clone(st.snap).(*pb.SnapshotMetadata)}, nil
}

// Term implements raft.Storage: raft.ErrCompacted below the snapshot
// index, raft.ErrUnavailable beyond LastIndex.
func (s *Shard) Term(i uint64) (uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	switch offset := st.snap.GetIndex(); {
	case i < offset:
		return 0, raft.ErrCompacted
	case i == offset:
		return st.snap.GetTerm(), nil
	case i > st.last:
		return 0, raft.ErrUnavailable
	case i >= st.cacheStart():
		return st.cache[i-st.cacheStart()].GetTerm(), nil
	}
	var term uint64
	err := s.readLog(i, i+1, func(e *pb.Entry) bool {
		term = e.GetTerm()
		return false
	})
	return term, err
}

// Entries implements raft.Storage like raft.MemoryStorage: ErrCompacted if
// lo is at or below the snapshot index, ErrUnavailable if the log holds no
// entries or hi is beyond LastIndex+1 (where MemoryStorage panics); at
// least one entry, then as many as fit in maxSize (protobuf size). The
// returned slice is freshly allocated and the caller's; the entries are
// shared and must not be modified.
func (s *Shard) Entries(lo, hi, maxSize uint64) ([]*pb.Entry, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	offset := st.snap.GetIndex()
	if lo <= offset {
		return nil, raft.ErrCompacted
	}
	if hi > st.last+1 {
		return nil, fmt.Errorf("%w: entries [%d, %d) beyond last index %d", raft.ErrUnavailable, lo, hi, st.last)
	}
	if st.last == offset {
		return nil, raft.ErrUnavailable
	}
	if lo >= hi {
		return []*pb.Entry{}, nil
	}
	var (
		out  = make([]*pb.Entry, 0, min(hi-lo, 256))
		size uint64
	)
	// add appends e unless it would exceed maxSize; the first entry is
	// always taken.
	add := func(e *pb.Entry) bool {
		n := uint64(entrySize(e))
		if len(out) > 0 && size+n > maxSize {
			return false
		}
		size += n
		out = append(out, e)
		return true
	}
	cs := st.cacheStart()
	if lo < cs {
		full := true
		err := s.readLog(lo, min(hi, cs), func(e *pb.Entry) bool {
			full = add(e)
			return full
		})
		if err != nil {
			return nil, err
		}
		if !full {
			return out, nil
		}
	}
	for i := max(lo, cs); i < hi; i++ {
		if !add(st.cache[i-cs]) {
			break
		}
	}
	return out, nil
}

// readLog reads the entries [lo, hi) from bbolt, calling fn for each until
// it returns false. Called with s.mu held (see Shard.mu).
func (s *Shard) readLog(lo, hi uint64, fn func(*pb.Entry) bool) error {
	return s.e.view(func(tx *bolt.Tx) error {
		b := shardBucket(tx, s.id)
		if b == nil {
			return fmt.Errorf("%w: %d", ErrShardNotFound, s.id)
		}
		c := b.Bucket(bucketLog).Cursor()
		want := lo
		for k, v := c.Seek(u64(lo)); want < hi; k, v = c.Next() {
			if k == nil {
				return fmt.Errorf("storage: shard %d: log entry %d missing: %w", s.id, want, raft.ErrUnavailable)
			}
			idx, err := decodeU64(k)
			if err != nil {
				return err
			}
			if idx != want {
				return fmt.Errorf("storage: shard %d: log entry %d missing (found %d): %w", s.id, want, idx, raft.ErrUnavailable)
			}
			e := &pb.Entry{}
			if err := proto.Unmarshal(v, e); err != nil {
				return fmt.Errorf("storage: shard %d: corrupt log entry %d: %w", s.id, idx, err)
			}
			if !fn(e) {
				return nil
			}
			want++
		}
		return nil
	})
}

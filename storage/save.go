package storage

import (
	"fmt"

	bolt "go.etcd.io/bbolt"
	"go.etcd.io/raft/v3"
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// Update is what one raft Ready asks the shard to persist and apply. Save
// performs it in this order, in one transaction: install Snapshot, append
// Entries, store HardState, apply Committed, store ConfState.
type Update struct {
	// HardState replaces the stored hard state unless nil or empty.
	HardState *pb.HardState
	// Entries are appended; an entry at index i replaces the old entries
	// from i on (raft.MemoryStorage.Append semantics). Entries at or below
	// the snapshot index are ignored.
	Entries []*pb.Entry
	// Snapshot, when non-empty, is installed before Entries are appended.
	// Its Data is the token StageSnapshot returned: the staged state
	// replaces the shard's, the log is dropped (first index = index+1),
	// and the snapshot metadata, applied index/term and conf state become
	// the snapshot's.
	Snapshot *pb.Snapshot
	// Committed are applied in order after Entries are appended (they may
	// be among Entries). Entries at or below the applied index are
	// skipped, so replaying a Ready after a crash is harmless.
	Committed []*pb.Entry
	// ConfState, if non-nil, is the conf state after applying Committed; it
	// is stored with the applied index.
	ConfState *pb.ConfState
	// Apply is called for each committed EntryNormal with data, inside the
	// write transaction. nil skips them (the applied index still moves).
	Apply ApplyFunc
	// Sync is raft's MustSync. Entries and a hard state are made durable
	// (a WAL record, or a bbolt commit) before Save returns whatever Sync
	// says; Sync only keeps a NoWait update from skipping that wait.
	Sync bool
	// NoWait says the caller does not need the applied state durable when
	// Save returns: the entries it applies are durable in the log and a
	// crash makes raft apply them again. Without NoWait, a Save that
	// applies commits bbolt before it returns. An update that has nothing
	// else to persist (no entries, no snapshot, no membership change, no
	// sync: applying and recording the commit index) is answered as soon as
	// it is performed, without waiting for its round. Readers (Applied,
	// View, snapshots) see applied state only once bbolt commits, which
	// Engine.AppliedC signals.
	NoWait bool
}

// noWait reports whether Save may answer u before its round commits.
func (u *Update) noWait() bool {
	return u.NoWait && !u.Sync && len(u.Entries) == 0 && u.ConfState == nil &&
		(u.Snapshot == nil || raft.IsEmptySnap(u.Snapshot))
}

// ApplyFunc applies one committed entry to the shard's state through tx.
// It runs on the engine's writer goroutine, inside the write transaction
// that also records the applied index, so it must be deterministic (no
// clocks, randomness, map order or local settings) and must not block:
// every shard of the node waits for the round. A panic fails the round and
// the engine (ErrFailed); nothing of the round is committed. A Txn read
// that meets a value failing its checksum unwinds the ApplyFunc the same
// way (the round fails with ErrCorrupt), so that nothing it computes from
// the value reaches the state or its proposer. Storage
// returns nothing of what it does: a caller that wants an entry's result
// takes it in the function it passes (raftnode hands it to the proposer
// there), and must not keep tx memory beyond the call.
type ApplyFunc func(tx *Txn, e *pb.Entry)

// Save persists u durably and applies u.Committed, in one transaction
// shared with the other shards' concurrent saves (group commit). It blocks
// until the round is on disk, unless u.NoWait. The applied index and term become
// those of the last Committed entry in the same transaction as the state
// changes they reflect.
//
// Errors: raft.ErrSnapOutOfDate, ErrBadSnapshot, ErrLogGap reject u alone
// (nothing of it is written); ErrFailed, ErrClosed, ErrShardNotFound.
// Save must not be called concurrently for the same shard with updates
// whose order matters (the one goroutine that runs a raft group
// guarantees it).
func (s *Shard) Save(u *Update) error {
	return s.e.SaveAll([]ShardUpdate{{s, u}})[0]
}

// ShardUpdate is one shard's update in a SaveAll.
type ShardUpdate struct {
	Shard  *Shard
	Update *Update
}

// SaveAll performs Save for every update, in order, as one request to the
// writer: they share a round, and the caller one wake-up, however many
// shards it saves for. It returns once every update is durable (or, when
// every update is NoWait, performed), with each update's error at its
// position; an error rejecting one update leaves the others saved.
func (e *Engine) SaveAll(us []ShardUpdate) []error {
	errs := make([]error, len(us))
	noWait := true
	for _, su := range us {
		noWait = noWait && su.Update.noWait()
	}
	resp := e.do(&request{save: true, noWait: noWait, exec: func(rs *round) (response, error) {
		for i, su := range us {
			resp, fatal := rs.save(su.Shard, su.Update)
			if fatal != nil {
				return response{}, fatal
			}
			if resp.err == nil {
				rs.updates++
			}
			errs[i] = resp.err
		}
		return response{}, nil
	}})
	for i, su := range us {
		if resp.err != nil {
			errs[i] = resp.err
		}
		if errs[i] != nil {
			errs[i] = fmt.Errorf("storage: shard %d: save: %w", su.Shard.id, errs[i])
		}
	}
	return errs
}

// Compact drops the log entries up to and including index, through the
// writer, and records snapshot metadata {index, term(index), ConfState()}.
// index must not exceed the applied index (ErrNotApplied) and must be above
// the current snapshot index (raft.ErrCompacted). Callers compact at the
// applied index, so ConfState() is the conf state as of index.
func (s *Shard) Compact(index uint64) error {
	resp := s.e.do(&request{exec: func(rs *round) (response, error) {
		return rs.compact(s, index)
	}})
	if resp.err != nil {
		return fmt.Errorf("storage: shard %d: compact %d: %w", s.id, index, resp.err)
	}
	return nil
}

func (rs *round) save(s *Shard, u *Update) (response, error) {
	st, err := rs.state(s)
	if err != nil {
		return response{err: err}, nil
	}
	// Validate everything first: a rejected update must write nothing.
	snapIndex, last, applied := st.snap.GetIndex(), st.last, st.appliedIndex
	var staged *bolt.Bucket
	var stagedSeq uint64
	install := u.Snapshot != nil && !raft.IsEmptySnap(u.Snapshot)
	if install {
		meta := u.Snapshot.GetMetadata()
		if max(snapIndex, applied) >= meta.GetIndex() {
			return response{err: raft.ErrSnapOutOfDate}, nil
		}
		if staged, stagedSeq, err = rs.staged(s.id, u.Snapshot); err != nil {
			return response{err: err}, nil
		}
		snapIndex, last, applied = meta.GetIndex(), meta.GetIndex(), meta.GetIndex()
	}
	ents := u.Entries
	if len(ents) > 0 {
		first := snapIndex + 1
		if ents[0].GetIndex()+uint64(len(ents))-1 < first {
			ents = nil // all compacted
		} else if first > ents[0].GetIndex() {
			ents = ents[first-ents[0].GetIndex():]
		}
	}
	if len(ents) > 0 {
		if ents[0].GetIndex() > last+1 {
			return response{err: fmt.Errorf("%w: append at %d after last index %d", ErrLogGap, ents[0].GetIndex(), last)}, nil
		}
		for i, e := range ents {
			if e.GetIndex() != ents[0].GetIndex()+uint64(i) {
				return response{err: fmt.Errorf("%w: entry %d follows %d", ErrLogGap, e.GetIndex(), ents[0].GetIndex()+uint64(i)-1)}, nil
			}
		}
		last = ents[len(ents)-1].GetIndex()
	}
	next := applied + 1
	for _, e := range u.Committed {
		if e.GetIndex() <= applied {
			continue
		}
		if e.GetIndex() != next || e.GetIndex() > last {
			return response{err: fmt.Errorf("%w: apply %d after %d (last index %d)", ErrLogGap, e.GetIndex(), next-1, last)}, nil
		}
		next++
	}

	b := shardBucket(rs.tx, s.id)
	raftb := b.Bucket(bucketRaft)
	noWait := u.noWait()
	var op walOp
	if install {
		// Snapshots are not in the WAL: the round commits bbolt.
		rs.commit = true
		if err := rs.install(s, st, b, staged, stagedSeq, u.Snapshot.GetMetadata()); err != nil {
			return response{}, err
		}
	}
	if len(ents) > 0 {
		if op.entries, err = rs.appendLog(s, st, b.Bucket(bucketLog), ents); err != nil {
			return response{}, err
		}
	}
	if hs := u.HardState; hs != nil && !raft.IsEmptyHardState(hs) {
		st.hard = proto.Clone(hs).(*pb.HardState)
		v, err := proto.Marshal(st.hard)
		if err != nil {
			return response{}, err
		}
		if err := raftb.Put(keyHardState, v); err != nil {
			return response{}, err
		}
		op.hard = v
	}
	if !noWait && !op.empty() {
		op.shard = s.id
		rs.walOps = append(rs.walOps, op)
	}
	var txn *Txn
	moved := false
	for _, e := range u.Committed {
		if e.GetIndex() <= st.appliedIndex {
			continue
		}
		if u.Apply != nil && e.GetType() == pb.EntryNormal && len(e.GetData()) > 0 {
			if txn == nil {
				txn = &Txn{shard: s.id, kv: b.Bucket(bucketKV), meta: b.Bucket(bucketMeta), hist: b.Bucket(bucketHist), raft: raftb, slab: &rs.e.slab}
				txn.hist.FillPercent = histFillPercent
			}
			txn.index = e.GetIndex()
			u.Apply(txn, e)
		}
		st.appliedIndex, st.appliedTerm = e.GetIndex(), e.GetTerm()
		rs.applied++
		moved = true
	}
	if txn != nil {
		err := txn.finish()
		txn.end()
		if err != nil {
			return response{}, err
		}
	}
	if moved {
		if err := raftb.Put(keyApplied, encodeApplied(st.appliedIndex, st.appliedTerm)); err != nil {
			return response{}, err
		}
		// The WAL does not hold applied state: a caller that needs it
		// durable when Save returns gets a bbolt commit.
		if !u.NoWait {
			rs.commit = true
		}
	}
	if u.ConfState != nil {
		// Nor membership: readers see ConfState as of the visible applied
		// index, so it changes only with a commit.
		rs.commit = true
		st.conf = proto.Clone(pb.EnsureConfState(u.ConfState)).(*pb.ConfState)
		if err := putProto(raftb, keyConfState, st.conf); err != nil {
			return response{}, err
		}
	}
	rs.entries += uint64(len(ents))
	return response{}, nil
}

// appendLog writes ents (validated: contiguous, starting at or below
// st.last+1, above the snapshot index) and truncates the old suffix. It
// returns the marshalled entries, for the WAL.
func (rs *round) appendLog(s *Shard, st *shardState, logb *bolt.Bucket, ents []*pb.Entry) ([][]byte, error) {
	first, newLast := ents[0].GetIndex(), ents[len(ents)-1].GetIndex()
	// Log keys only grow: split full leaves, not half-full ones (bbolt's
	// default suits random inserts and would leave every log page half
	// empty, doubling the pages each commit writes).
	logb.FillPercent = 0.95
	marshalled := make([][]byte, len(ents))
	for i, e := range ents {
		v, err := marshalEntry(e)
		if err != nil {
			return nil, fmt.Errorf("storage: marshal entry %d: %w", e.GetIndex(), err)
		}
		if err := logb.Put(u64(e.GetIndex()), v); err != nil {
			return nil, err
		}
		marshalled[i] = v
	}
	for i := newLast + 1; i <= st.last; i++ {
		if err := logb.Delete(u64(i)); err != nil {
			return nil, err
		}
	}
	if cs := st.cacheStart(); first == st.last+1 {
		// A plain append writes only past the end of every published
		// slice of this backing array (states are published in order and
		// none is longer than st's), so it may use the spare capacity:
		// copying the whole cache each round cost
		// an eighth of a node's CPU under load.
		st.cache = append(st.cache, ents...)
	} else if first >= cs {
		// Overwriting entries: a full slice expression copies, because
		// the published cache keeps its entries after first, which
		// readers may still be returning.
		off := first - cs
		for _, e := range st.cache[off:] {
			st.cacheBytes -= entrySize(e)
		}
		st.cache = append(st.cache[:off:off], ents...)
	} else {
		// A truncation below the cache rewrites entries readers fetch from
		// bbolt: they must wait for this commit (see Shard.mu).
		rs.lockForCommit[s] = true
		st.cache = append([]*pb.Entry(nil), ents...)
		st.cacheBytes = 0
	}
	for _, v := range marshalled {
		st.cacheBytes += len(v) // entrySize(e), already computed
	}
	st.last = newLast
	if gen := rs.e.wal.gen; st.unboltedGen != gen {
		st.unboltedGen, st.unboltedFrom = gen, first
	} else {
		st.unboltedFrom = min(st.unboltedFrom, first)
	}
	st.evict(rs.e.cacheLimit, st.unboltedFrom)
	return marshalled, nil
}

// evict drops the oldest cached entries beyond limit bytes, but none from
// keepFrom on: readers find an evicted entry in committed bbolt, and the
// entries the open transaction holds are not there yet. The cache may so
// exceed its limit by what one commit interval appends; the next append
// after the commit trims it. (Evicting them and forcing a commit instead
// made every round with a large value pay for a bbolt commit.)
func (st *shardState) evict(limit int, keepFrom uint64) {
	n, first := 0, st.cacheStart()
	for n < len(st.cache) && st.cacheBytes > limit && first+uint64(n) < keepFrom {
		st.cacheBytes -= entrySize(st.cache[n])
		n++
	}
	st.cache = st.cache[n:]
}

func (rs *round) compact(s *Shard, index uint64) (response, error) {
	st, err := rs.state(s)
	if err != nil {
		return response{err: err}, nil
	}
	offset := st.snap.GetIndex()
	switch {
	case index <= offset:
		return response{err: raft.ErrCompacted}, nil
	case index > st.appliedIndex:
		return response{err: fmt.Errorf("%w: applied index %d", ErrNotApplied, st.appliedIndex)}, nil
	case index > st.last:
		return response{err: fmt.Errorf("%w: last index %d", raft.ErrUnavailable, st.last)}, nil
	}
	b := shardBucket(rs.tx, s.id)
	logb := b.Bucket(bucketLog)
	var term uint64
	if cs := st.cacheStart(); index >= cs {
		term = st.cache[index-cs].GetTerm()
	} else {
		v := logb.Get(u64(index))
		e := &pb.Entry{}
		if v == nil {
			return response{}, fmt.Errorf("storage: shard %d: log entry %d missing", s.id, index)
		}
		if err := proto.Unmarshal(v, e); err != nil {
			return response{}, fmt.Errorf("storage: shard %d: corrupt log entry %d: %w", s.id, index, err)
		}
		term = e.GetTerm()
	}
	for i := offset + 1; i <= index; i++ {
		if err := logb.Delete(u64(i)); err != nil {
			return response{}, err
		}
	}
	st.snap = &pb.SnapshotMetadata{
		Index:     proto.Uint64(index),
		Term:      proto.Uint64(term),
		ConfState: proto.Clone(st.conf).(*pb.ConfState),
	}
	if err := putProto(b.Bucket(bucketRaft), keySnapMeta, st.snap); err != nil {
		return response{}, err
	}
	if cs := st.cacheStart(); index >= cs {
		n := index - cs + 1
		for _, e := range st.cache[:n] {
			st.cacheBytes -= entrySize(e)
		}
		st.cache = st.cache[n:]
	}
	rs.lockForCommit[s] = true
	return response{}, nil
}

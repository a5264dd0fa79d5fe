package storage

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"

	bolt "go.etcd.io/bbolt"
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/peerpb"
)

const (
	// stageChunkBytes is how much of a received snapshot is written per
	// write round. Large enough to amortize the round, small enough that
	// a 200 MiB snapshot never sits in memory and that the shards sharing
	// the round are not held up long.
	stageChunkBytes = 4 << 20

	// sendChunkBytes is the target size of one SnapshotReader.Next chunk.
	sendChunkBytes = 1 << 20

	// pairOverhead approximates the framing of one pair in a chunk.
	pairOverhead = 16
)

// tokenPrefix starts every staging token, so that a snapshot whose Data is
// something else is rejected rather than misread.
var tokenPrefix = []byte("kvd-staged:")

// Bucket names used in snapshot pairs.
const (
	PairBucketKV   = "kv"
	PairBucketMeta = "meta"
	PairBucketHist = "hist"
)

// StageSnapshot receives a streamed snapshot of shard described by meta:
// it calls next until io.EOF and writes the pairs into a staging area, in
// rounds of about 4 MiB through the writer, so the snapshot never has to
// fit in memory. It returns a small token to put in pb.Snapshot.Data; the
// snapshot is installed by a later Save whose Update.Snapshot carries the
// token and the same index and term.
//
// StageSnapshot runs on the caller's goroutine (the transport's receive
// loop) and may take as long as the stream. next's pairs are retained until
// written, so next must return fresh slices. A failed stream leaves nothing
// staged. Staged snapshots that are never installed are dropped when a
// newer snapshot of the shard is installed, and at Open.
func (e *Engine) StageSnapshot(shard uint64, meta *pb.SnapshotMetadata, next func() ([]*peerpb.SnapshotPair, error)) (token []byte, err error) {
	metab, err := proto.Marshal(meta)
	if err != nil {
		return nil, fmt.Errorf("storage: stage snapshot of shard %d: %w", shard, err)
	}
	info := binary.BigEndian.AppendUint64(nil, shard)
	info = append(info, metab...)

	var (
		seq   uint64 // staging bucket, 0 until the first round creates it
		pairs []*peerpb.SnapshotPair
		size  int
	)
	flush := func(final bool) error {
		at, ps := seq, pairs
		resp := e.do(&request{exec: func(rs *round) (response, error) {
			return rs.stage(at, info, ps, final)
		}})
		if resp.err != nil {
			return resp.err
		}
		seq, pairs, size = resp.seq, nil, 0
		return nil
	}
	fail := func(err error) ([]byte, error) {
		if seq != 0 {
			at := seq
			e.do(&request{exec: func(rs *round) (response, error) {
				return response{}, rs.dropStagedSeq(at)
			}})
		}
		return nil, fmt.Errorf("storage: stage snapshot of shard %d at %d: %w", shard, meta.GetIndex(), err)
	}
	for {
		ps, err := next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fail(err)
		}
		for _, p := range ps {
			if err := validPair(p); err != nil {
				return fail(err)
			}
			pairs = append(pairs, p)
			size += len(p.GetKey()) + len(p.GetValue()) + pairOverhead
		}
		if size >= stageChunkBytes {
			if err := flush(false); err != nil {
				return fail(err)
			}
		}
	}
	if err := flush(true); err != nil {
		return fail(err)
	}
	return append(bytes.Clone(tokenPrefix), u64(seq)...), nil
}

// validPair checks a received pair: a known bucket, a key bbolt takes, and
// a value that matches its checksum, so that a replica never installs a
// value the sender's disk changed (it would then pass the checksums of
// every later read). A corrupt pair is ErrBadSnapshot and ErrCorrupt.
func validPair(p *peerpb.SnapshotPair) error {
	switch string(p.GetBucket()) {
	case PairBucketKV, PairBucketMeta, PairBucketHist:
	default:
		return fmt.Errorf("%w: pair in unknown bucket %q", ErrBadSnapshot, p.GetBucket())
	}
	if err := validKey(p.GetKey()); err != nil {
		return fmt.Errorf("%w: %w", ErrBadSnapshot, err)
	}
	if _, _, err := unseal(p.GetKey(), p.GetValue()); err != nil {
		return fmt.Errorf("%w: %w", ErrBadSnapshot, err)
	}
	return nil
}

// stage writes one chunk of a received snapshot into staging/<seq>,
// creating it when seq is 0; final marks the staging complete.
func (rs *round) stage(seq uint64, info []byte, pairs []*peerpb.SnapshotPair, final bool) (response, error) {
	stg := rs.tx.Bucket(bucketStaging)
	var b *bolt.Bucket
	if seq == 0 {
		var err error
		if seq, err = stg.NextSequence(); err != nil {
			return response{}, err
		}
		if b, err = stg.CreateBucket(u64(seq)); err != nil {
			return response{}, err
		}
		for _, name := range stateBuckets {
			if _, err := b.CreateBucket(name); err != nil {
				return response{}, err
			}
		}
		if err := b.Put(keyStageInfo, info); err != nil {
			return response{}, err
		}
	} else if b = stg.Bucket(u64(seq)); b == nil {
		// Dropped meanwhile: a newer snapshot of the shard was installed.
		return response{err: fmt.Errorf("%w: staging %d dropped", ErrBadSnapshot, seq)}, nil
	}
	// The state hash of the staged pairs (verified by validPair)
	// becomes the shard's on install.
	hash := getStateHash(b)
	for _, p := range pairs {
		dst := b.Bucket(p.GetBucket()) // a state bucket: validPair checked the name
		hash += storedSum(p.GetValue()) - storedSum(dst.Get(p.GetKey()))
		if err := dst.Put(p.GetKey(), p.GetValue()); err != nil {
			return response{}, err
		}
	}
	if err := putStateHash(b, hash); err != nil {
		return response{}, err
	}
	if final {
		if err := b.Put(keyStageDone, []byte{1}); err != nil {
			return response{}, err
		}
	}
	return response{seq: seq}, nil
}

// staged finds the completely staged snapshot that snap's token names and
// checks that it belongs to shard and matches snap's index and term.
func (rs *round) staged(shard uint64, snap *pb.Snapshot) (*bolt.Bucket, uint64, error) {
	tok := snap.GetData()
	if len(tok) != len(tokenPrefix)+8 || !bytes.HasPrefix(tok, tokenPrefix) {
		return nil, 0, fmt.Errorf("%w: data is not a staging token", ErrBadSnapshot)
	}
	seq := binary.BigEndian.Uint64(tok[len(tokenPrefix):])
	b := rs.tx.Bucket(bucketStaging).Bucket(u64(seq))
	if b == nil || b.Get(keyStageDone) == nil {
		return nil, 0, fmt.Errorf("%w: staging %d absent or incomplete", ErrBadSnapshot, seq)
	}
	id, meta, err := decodeStageInfo(b.Get(keyStageInfo))
	if err != nil {
		return nil, 0, err
	}
	want := snap.GetMetadata()
	if id != shard || meta.GetIndex() != want.GetIndex() || meta.GetTerm() != want.GetTerm() {
		return nil, 0, fmt.Errorf("%w: staging %d holds shard %d at %d/%d, not shard %d at %d/%d",
			ErrBadSnapshot, seq, id, meta.GetIndex(), meta.GetTerm(), shard, want.GetIndex(), want.GetTerm())
	}
	return b, seq, nil
}

func decodeStageInfo(v []byte) (uint64, *pb.SnapshotMetadata, error) {
	if len(v) < 8 {
		return 0, nil, fmt.Errorf("%w: corrupt staging info", ErrBadSnapshot)
	}
	meta := &pb.SnapshotMetadata{}
	if err := proto.Unmarshal(v[8:], meta); err != nil {
		return 0, nil, fmt.Errorf("%w: corrupt staging info: %w", ErrBadSnapshot, err)
	}
	return binary.BigEndian.Uint64(v), meta, nil
}

// install replaces the shard's state with the staged one and resets its
// log to start after meta.Index. Validated by the caller.
func (rs *round) install(s *Shard, st *shardState, b, staged *bolt.Bucket, seq uint64, meta *pb.SnapshotMetadata) error {
	hash := getStateHash(staged)
	// Moving the staged buckets is a pointer swap in bbolt: installing a
	// large snapshot costs no copy.
	for _, name := range stateBuckets {
		if err := b.DeleteBucket(name); err != nil {
			return err
		}
		if err := rs.tx.MoveBucket(name, staged, b); err != nil {
			return err
		}
	}
	if err := rs.tx.Bucket(bucketStaging).DeleteBucket(u64(seq)); err != nil {
		return err
	}
	if err := b.DeleteBucket(bucketLog); err != nil {
		return err
	}
	if _, err := b.CreateBucket(bucketLog); err != nil {
		return err
	}
	conf := proto.Clone(pb.EnsureConfState(meta.GetConfState())).(*pb.ConfState)
	st.snap = &pb.SnapshotMetadata{Index: proto.Uint64(meta.GetIndex()), Term: proto.Uint64(meta.GetTerm()), ConfState: conf}
	st.last = meta.GetIndex()
	st.cache, st.cacheBytes = nil, 0
	st.appliedIndex, st.appliedTerm = meta.GetIndex(), meta.GetTerm()
	st.conf = conf
	raftb := b.Bucket(bucketRaft)
	if err := putProto(raftb, keySnapMeta, st.snap); err != nil {
		return err
	}
	if err := putProto(raftb, keyConfState, st.conf); err != nil {
		return err
	}
	if err := raftb.Put(keyApplied, encodeApplied(st.appliedIndex, st.appliedTerm)); err != nil {
		return err
	}
	if err := putStateHash(raftb, hash); err != nil {
		return err
	}
	rs.lockForCommit[s] = true
	// Older complete stagings of this shard can never be installed now.
	return rs.dropStaged(s.id, meta.GetIndex(), true)
}

// dropStaged deletes the stagings of shard at or below index (all of them
// with index ^0); only completed ones if onlyDone, so that a stream still
// being received is not pulled from under its writer without need.
func (rs *round) dropStaged(shard, index uint64, onlyDone bool) error {
	stg := rs.tx.Bucket(bucketStaging)
	var drop [][]byte
	err := stg.ForEachBucket(func(k []byte) error {
		b := stg.Bucket(k)
		id, meta, err := decodeStageInfo(b.Get(keyStageInfo))
		if err != nil {
			drop = append(drop, bytes.Clone(k)) // unusable anyway
			return nil
		}
		if id == shard && meta.GetIndex() <= index && (!onlyDone || b.Get(keyStageDone) != nil) {
			drop = append(drop, bytes.Clone(k))
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, k := range drop {
		if err := stg.DeleteBucket(k); err != nil {
			return err
		}
	}
	return nil
}

func (rs *round) dropStagedSeq(seq uint64) error {
	stg := rs.tx.Bucket(bucketStaging)
	if stg.Bucket(u64(seq)) == nil {
		return nil
	}
	return stg.DeleteBucket(u64(seq))
}

// SnapshotReader streams a consistent view of one shard's state (its
// state buckets) for sending to a peer. It holds one bbolt read transaction
// until Close: writers are not blocked, but pages freed meanwhile cannot be
// reused, so the file grows while a snapshot is being sent. Not safe for
// concurrent use.
type SnapshotReader struct {
	id    uint64
	tx    *bolt.Tx
	shard *bolt.Bucket
	meta  *pb.SnapshotMetadata

	buckets [][]byte // buckets still to read, current first
	cur     *bolt.Cursor
	k, v    []byte // next pair of cur, nil when cur is exhausted

	closeOnce sync.Once
	closed    bool
}

// OpenSnapshot opens a consistent read view of the shard's state for
// sending. Close it when done; Engine.Close waits for it.
func (s *Shard) OpenSnapshot() (*SnapshotReader, error) {
	if s.e.closed.Load() {
		return nil, ErrClosed
	}
	tx, err := s.e.db.Begin(false)
	if err != nil {
		return nil, fmt.Errorf("storage: shard %d: open snapshot: %w", s.id, err)
	}
	b, err := s.bucket(tx)
	if err != nil {
		_ = tx.Rollback()
		return nil, err
	}
	raftb := b.Bucket(bucketRaft)
	index, term, err := decodeApplied(raftb.Get(keyApplied))
	if err != nil {
		_ = tx.Rollback()
		return nil, err
	}
	conf := &pb.ConfState{}
	if _, err := getProto(raftb, keyConfState, conf); err != nil {
		_ = tx.Rollback()
		return nil, err
	}
	r := &SnapshotReader{
		id:    s.id,
		tx:    tx,
		shard: b,
		meta: &pb.SnapshotMetadata{
			Index:     proto.Uint64(index),
			Term:      proto.Uint64(term),
			ConfState: pb.EnsureConfState(conf),
		},
		buckets: stateBuckets,
	}
	r.cur = b.Bucket(bucketKV).Cursor()
	r.k, r.v = r.cur.First()
	return r, nil
}

// Metadata describes the view: the applied index and term and the conf
// state as of that index. The receiver installs it with these.
func (r *SnapshotReader) Metadata() *pb.SnapshotMetadata {
	return proto.Clone(r.meta).(*pb.SnapshotMetadata)
}

// Next returns the next chunk of pairs, about 1 MiB (at least one pair),
// bucket by bucket (kv, meta, hist), in key order; io.EOF after the last. The
// pairs are copies owned by the caller, values in their stored form (with
// their checksums, which Next verifies: a corrupt pair is ErrCorrupt).
func (r *SnapshotReader) Next() ([]*peerpb.SnapshotPair, error) {
	if r.closed {
		return nil, ErrClosed
	}
	var (
		out  []*peerpb.SnapshotPair
		size int
	)
	for len(r.buckets) > 0 {
		// One copy of the bucket name per chunk, shared by its pairs.
		name := bytes.Clone(r.buckets[0])
		for ; r.k != nil; r.k, r.v = r.cur.Next() {
			// A corrupt pair must not spread: the receiver would store it
			// as its own (it verifies too, in case this side's memory or
			// the wire changed it).
			if _, _, err := unseal(r.k, r.v); err != nil {
				return nil, fmt.Errorf("storage: snapshot of shard %d: %w", r.id, err)
			}
			n := len(r.k) + len(r.v) + pairOverhead
			if len(out) > 0 && size+n > sendChunkBytes {
				return out, nil
			}
			size += n
			out = append(out, &peerpb.SnapshotPair{
				Bucket: name,
				Key:    bytes.Clone(r.k),
				Value:  append([]byte{}, r.v...),
			})
		}
		r.buckets = r.buckets[1:]
		if len(r.buckets) > 0 {
			r.cur = r.shard.Bucket(r.buckets[0]).Cursor()
			r.k, r.v = r.cur.First()
		}
	}
	if len(out) == 0 {
		return nil, io.EOF
	}
	return out, nil
}

// Close releases the read transaction. Idempotent.
func (r *SnapshotReader) Close() error {
	var err error
	r.closeOnce.Do(func() {
		r.closed = true
		err = r.tx.Rollback()
	})
	return err
}

package storage

import (
	"bytes"
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// Txn is one shard's state inside the engine's write transaction, handed
// to an ApplyFunc. It is valid only during that call and only on the
// writer goroutine. Reads see the writes made earlier in the same round,
// including those of earlier entries.
//
// Slices returned by Get, GetMeta and passed to Range callbacks point into
// bbolt's memory and are valid only until the ApplyFunc returns; copy what
// you keep. bbolt keeps the key and value slices given to Put until the
// commit, so do not modify them afterwards.
type Txn struct {
	shard                uint64
	index                uint64 // of the entry being applied
	kv, meta, hist, raft *bolt.Bucket

	// hash is the shard's state hash as changed by this Txn's puts and
	// deletes (loaded on first use); it is stored by finish.
	hash               uint64
	hashLoaded, hashed bool

	// seen remembers the stored checksums of the last pairs this Txn read
	// or wrote, so that a put replacing a value the state machine has just
	// read (it reads before it writes: the previous value, the revision,
	// the session) need not look it up again to move the state hash. A
	// key is copied, into its entry's own array when it fits: a Txn lives
	// for one round, so a slice grown per key would be an allocation per
	// read.
	seen     [6]seenSum
	seenNext int

	// cursors holds one cursor per bucket read, for lookup: bbolt's
	// Bucket.Get makes a cursor and grows its stack from nothing on every
	// call (four allocations in a tree three deep), where a kept cursor
	// reuses both. A put reads three to five keys.
	cursors [4]bucketCursor

	// histLast is a key at or above the greatest in hist/ (nil until a
	// history write looks it up): a history key above it is new, and its
	// put need not look up a value to replace. History keys only grow,
	// so that is every history write.
	histLast []byte

	// slab is the writer's, for the stored forms of the values put.
	slab *sealSlab
}

type bucketCursor struct {
	b *bolt.Bucket
	c *bolt.Cursor
}

// lookup returns key's stored value in b, nil if absent, as b.Get does.
func (t *Txn) lookup(b *bolt.Bucket, key []byte) []byte {
	// Seek starts from the root, so writes since the last lookup are
	// seen (bbolt's rule: reposition after a write).
	k, v := t.cursor(b).Seek(key)
	if !bytes.Equal(k, key) {
		return nil
	}
	return v
}

// cursor returns the kept cursor of b, or a new one when every slot
// holds another bucket's. Its position is the caller's: Seek first.
func (t *Txn) cursor(b *bolt.Bucket) *bolt.Cursor {
	for i := range t.cursors {
		e := &t.cursors[i]
		if e.b == nil {
			e.b, e.c = b, b.Cursor()
		}
		if e.b == b {
			return e.c
		}
	}
	return b.Cursor()
}

// seenSum is the stored checksum of key in bucket b (0: absent).
type seenSum struct {
	b   *bolt.Bucket
	key []byte // in buf when it fits
	sum uint64
	buf [32]byte
}

// remember records key's stored checksum in b.
func (t *Txn) remember(b *bolt.Bucket, key []byte, sum uint64) {
	for i := range t.seen {
		if e := &t.seen[i]; e.b == b && bytes.Equal(e.key, key) {
			e.sum = sum
			return
		}
	}
	e := &t.seen[t.seenNext]
	if e.key == nil {
		e.key = e.buf[:0]
	}
	e.b, e.key, e.sum = b, append(e.key[:0], key...), sum
	t.seenNext = (t.seenNext + 1) % len(t.seen)
}

// forget records that key is absent from b, if this Txn remembers it.
func (t *Txn) forget(b *bolt.Bucket, key []byte) {
	for i := range t.seen {
		if e := &t.seen[i]; e.b == b && bytes.Equal(e.key, key) {
			e.sum = 0
			return
		}
	}
}

// storedSumOf returns the checksum stored with key in b (0: absent),
// from what this Txn has seen when it can.
func (t *Txn) storedSumOf(b *bolt.Bucket, key []byte) uint64 {
	for i := range t.seen {
		if e := &t.seen[i]; e.b == b && bytes.Equal(e.key, key) {
			return e.sum
		}
	}
	return storedSum(t.lookup(b, key))
}

// end invalidates t, so that an ApplyFunc keeping it fails loudly instead
// of writing outside its transaction.
func (t *Txn) end() { t.kv, t.meta, t.hist, t.raft = nil, nil, nil, nil }

// finish stores the state hash if it changed.
func (t *Txn) finish() error {
	if t.hashed {
		return putStateHash(t.raft, t.hash)
	}
	return nil
}

// abortApply is the panic value with which a Txn read that met a corrupt
// value unwinds the ApplyFunc. Returning nil instead would let the
// ApplyFunc compute, and hand its proposer (raftnode answers from inside
// the transaction), a result built on a value that is not what this node
// stored; unwinding stops it there. The writer recovers it
// (round.exec) and fails the round with err, so the engine stops writing.
type abortApply struct{ err error }

func (t *Txn) corrupt(err error) {
	panic(abortApply{fmt.Errorf("shard %d: %w", t.shard, err)})
}

func (t *Txn) get(b *bolt.Bucket, key []byte) []byte {
	v, sum := unsealOrReport(key, t.lookup(b, key), t.corrupt)
	t.remember(b, key, sum)
	return v
}

// unsealOrReport returns key's stored value without its checksum, and
// the checksum; a corrupt value is handed to corrupt and reads as absent.
func unsealOrReport(key, stored []byte, corrupt func(error)) ([]byte, uint64) {
	v, sum, err := unseal(key, stored)
	if err != nil {
		corrupt(err)
		return nil, 0
	}
	return v, sum
}

// rangeUnsealed wraps a range callback fn so that it is given values
// without their checksum; a corrupt value is handed to corrupt instead
// and stops the range.
func rangeUnsealed(fn func(k, v []byte) bool, corrupt func(error)) func(k, v []byte) bool {
	return func(k, v []byte) bool {
		v, _, err := unseal(k, v)
		if err != nil {
			corrupt(err)
			return false
		}
		return fn(k, v)
	}
}

// addHash moves the state hash by the checksum of a pair written (add) or
// of the stored value it replaces or deletes (sub).
func (t *Txn) addHash(add, sub uint64) {
	if !t.hashLoaded {
		t.hash, t.hashLoaded = getStateHash(t.raft), true
	}
	t.hash += add - sub
	t.hashed = true
}

// Get returns the value of key in the shard's key-value data, nil if
// absent. A value that fails its checksum aborts the ApplyFunc and fails
// the round with ErrCorrupt (see abortApply).
func (t *Txn) Get(key []byte) []byte { return t.get(t.kv, key) }

// Put sets key to value in the shard's key-value data. It fails with
// ErrInvalid for an empty or oversized key; nothing is written then.
func (t *Txn) Put(key, value []byte) error { return t.put(t.kv, key, value) }

// Delete removes key from the shard's key-value data.
func (t *Txn) Delete(key []byte) error { return t.del(t.kv, key) }

// put stores value under key in b, sealed, and moves the state hash.
func (t *Txn) put(b *bolt.Bucket, key, value []byte) error {
	if err := validKey(key); err != nil {
		return err
	}
	old := t.storedSumOf(b, key)
	sealed := t.slab.seal(key, value)
	if err := b.Put(key, sealed); err != nil {
		return fmt.Errorf("storage: put: %w", err)
	}
	sum := storedSum(sealed)
	t.remember(b, key, sum)
	t.addHash(sum, old)
	return nil
}

func (t *Txn) del(b *bolt.Bucket, key []byte) error {
	if len(key) == 0 {
		return nil
	}
	old := t.lookup(b, key)
	if old == nil {
		return nil
	}
	if err := b.Delete(key); err != nil {
		return fmt.Errorf("storage: delete: %w", err)
	}
	t.remember(b, key, 0)
	t.addHash(0, storedSum(old))
	return nil
}

// Range calls fn for each key in [start, end) in key order (end nil: to
// the last key) until fn returns false. A corrupt value aborts like Get.
func (t *Txn) Range(start, end []byte, fn func(k, v []byte) bool) {
	rangeBucket(t.kv, start, end, rangeUnsealed(fn, t.corrupt))
}

// GetMeta returns the value of key in the shard's state-machine metadata
// (revision counter, client sessions); nil if absent. The metadata is part
// of snapshots.
func (t *Txn) GetMeta(key []byte) []byte { return t.get(t.meta, key) }

// PutMeta sets key to value in the shard's state-machine metadata.
func (t *Txn) PutMeta(key, value []byte) error { return t.put(t.meta, key, value) }

// DeleteMeta removes key from the shard's state-machine metadata.
func (t *Txn) DeleteMeta(key []byte) error { return t.del(t.meta, key) }

// DeleteMetaRange removes every metadata key in [start, end). It reads
// no value (so it verifies none: what it removes is never served). It
// deletes under the cursor, which saves the search a delete by key
// makes, and seeks again after each delete, as bbolt's cursor skips a
// key when it moves on from a deleted one.
func (t *Txn) DeleteMetaRange(start, end []byte) error {
	c := t.cursor(t.meta)
	for k, v := c.Seek(start); k != nil && bytes.Compare(k, end) < 0; k, v = c.Seek(start) {
		t.forget(t.meta, k)
		sum := storedSum(v)
		if err := c.Delete(); err != nil {
			return fmt.Errorf("storage: delete: %w", err)
		}
		t.addHash(0, sum)
	}
	return nil
}

// RangeMeta calls fn for each metadata key with prefix, in key order,
// until fn returns false. fn may delete the key it is given. It stops at a
// corrupt value, aborting like Get.
func (t *Txn) RangeMeta(prefix []byte, fn func(k, v []byte) bool) {
	rangePrefix(t.meta, prefix, rangeUnsealed(fn, t.corrupt))
}

// PutHistory stores an event of the shard's change history under key. The
// history is state like the metadata (in snapshots, in the state hash),
// but its keys only grow, so it has a bucket of its own.
func (t *Txn) PutHistory(key, value []byte) error {
	if t.histLast == nil {
		last, _ := t.hist.Cursor().Last()
		t.histLast = append([]byte{}, last...)
	}
	if bytes.Compare(key, t.histLast) <= 0 {
		return t.put(t.hist, key, value)
	}
	if err := validKey(key); err != nil {
		return err
	}
	sealed := t.slab.seal(key, value)
	if err := t.hist.Put(key, sealed); err != nil {
		return fmt.Errorf("storage: put: %w", err)
	}
	t.histLast = key
	t.addHash(storedSum(sealed), 0)
	return nil
}

// DeleteHistory removes key from the history.
func (t *Txn) DeleteHistory(key []byte) error { return t.del(t.hist, key) }

// RangeHistory calls fn for each history key from start (nil: the first)
// in key order until fn returns false. fn must not change the history. It
// stops at a corrupt value, aborting like Get.
func (t *Txn) RangeHistory(start []byte, fn func(k, v []byte) bool) {
	rangeBucket(t.hist, start, nil, rangeUnsealed(fn, t.corrupt))
}

// StateHash returns the shard's state hash as of this point of the round:
// the sum of the checksums of its state pairs (checksum.go). Replicas that
// applied the same entries have the same hash.
func (t *Txn) StateHash() uint64 {
	if !t.hashLoaded {
		t.hash, t.hashLoaded = getStateHash(t.raft), true
	}
	return t.hash
}

func rangeBucket(b *bolt.Bucket, start, end []byte, fn func(k, v []byte) bool) {
	c := b.Cursor()
	for k, v := c.Seek(start); k != nil && (end == nil || bytes.Compare(k, end) < 0); k, v = c.Next() {
		if !fn(k, v) {
			return
		}
	}
}

// rangePrefix iterates by seeking past each visited key rather than with
// Next, so that fn may delete the current key (bbolt's cursor skips an
// element after a delete under it).
func rangePrefix(b *bolt.Bucket, prefix []byte, fn func(k, v []byte) bool) {
	c := b.Cursor()
	for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); {
		next := append(bytes.Clone(k), 0) // smallest key after k
		if !fn(k, v) {
			return
		}
		k, v = c.Seek(next)
	}
}

// CheckHash records, and returns, the state hash with the index of the
// entry being applied, for Reader.HashCheck: replicas that applied the same
// log record the same hash at the same index, and a leader compares them.
// The record is kept beside the raft state, outside snapshots, so that
// each replica answers with its own hash; a later check replaces it.
func (t *Txn) CheckHash() (index, hash uint64, err error) {
	hash = t.StateHash()
	return t.index, hash, t.raft.Put(keyHashCheck, encodeApplied(t.index, hash))
}

// Reader is a read-only view of one shard's state, consistent with its
// applied index. Valid only during the View callback; returned slices
// likewise.
type Reader struct {
	shard                uint64
	kv, meta, hist, raft *bolt.Bucket
	// err is the first corruption a read met; View returns it.
	err error
}

func (r *Reader) get(b *bolt.Bucket, key []byte) []byte {
	v, _ := unsealOrReport(key, b.Get(key), r.corrupt)
	return v
}

func (r *Reader) corrupt(err error) {
	if r.err == nil {
		r.err = fmt.Errorf("shard %d: %w", r.shard, err)
	}
}

// Get returns the value of key, nil if absent. A value that fails its
// checksum reads as nil, and View returns ErrCorrupt.
func (r *Reader) Get(key []byte) []byte { return r.get(r.kv, key) }

// Range calls fn for each key in [start, end) (end nil: to the last key)
// until fn returns false. It stops at a corrupt value, and View returns
// ErrCorrupt.
func (r *Reader) Range(start, end []byte, fn func(k, v []byte) bool) {
	rangeBucket(r.kv, start, end, rangeUnsealed(fn, r.corrupt))
}

// GetMeta returns the value of a state-machine metadata key, nil if absent
// (or corrupt: then View returns ErrCorrupt).
func (r *Reader) GetMeta(key []byte) []byte { return r.get(r.meta, key) }

// ScanMeta calls fn for each metadata key in [start, end) in key order
// until fn returns false. It stops at a corrupt value, and View returns
// ErrCorrupt.
func (r *Reader) ScanMeta(start, end []byte, fn func(k, v []byte) bool) {
	rangeBucket(r.meta, start, end, rangeUnsealed(fn, r.corrupt))
}

// ScanHistory calls fn for each history key in [start, end) (end nil: to
// the last) in key order until fn returns false. It stops at a corrupt
// value, and View returns ErrCorrupt.
func (r *Reader) ScanHistory(start, end []byte, fn func(k, v []byte) bool) {
	rangeBucket(r.hist, start, end, rangeUnsealed(fn, r.corrupt))
}

// Applied returns the applied index and term this view reflects.
func (r *Reader) Applied() (index, term uint64) {
	index, term, _ = decodeApplied(r.raft.Get(keyApplied))
	return index, term
}

// HashCheck returns the last hash recorded by Txn.CheckHash and the index
// it was recorded at; ok is false if none was.
func (r *Reader) HashCheck() (index, hash uint64, ok bool) {
	v := r.raft.Get(keyHashCheck)
	if v == nil {
		return 0, 0, false
	}
	index, hash, err := decodeApplied(v)
	return index, hash, err == nil
}

// StateHash returns the shard's state hash as of Applied.
func (r *Reader) StateHash() uint64 { return getStateHash(r.raft) }

// View runs fn with a read-only view of the shard's committed state (for
// serializable reads). It does not block writers, but a long fn delays
// bbolt remaps; keep it short. Returns ErrShardNotFound if the shard is
// gone, ErrClosed after Close, or fn's error. If a read in fn met a value
// that fails its checksum, View returns ErrCorrupt (wrapped with the shard
// and key) whatever fn returned: what fn built from the view is not to be
// used.
func (s *Shard) View(fn func(r *Reader) error) error {
	return s.e.view(func(tx *bolt.Tx) error {
		b, err := s.bucket(tx)
		if err != nil {
			return err
		}
		r := &Reader{shard: s.id, kv: b.Bucket(bucketKV), meta: b.Bucket(bucketMeta), hist: b.Bucket(bucketHist), raft: b.Bucket(bucketRaft)}
		err = fn(r)
		if r.err != nil {
			return fmt.Errorf("storage: %w", r.err)
		}
		return err
	})
}

// bucket returns this Shard's bucket in tx, checking it was not deleted
// (and perhaps created again) since.
func (s *Shard) bucket(tx *bolt.Tx) (*bolt.Bucket, error) {
	b := shardBucket(tx, s.id)
	if b == nil || !bytes.Equal(b.Bucket(bucketRaft).Get(keyIncarnation), s.incarnation) {
		return nil, fmt.Errorf("%w: %d", ErrShardNotFound, s.id)
	}
	return b, nil
}

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
	kv, meta *bolt.Bucket
}

// end invalidates t, so that an ApplyFunc keeping it fails loudly instead
// of writing outside its transaction.
func (t *Txn) end() { t.kv, t.meta = nil, nil }

// Get returns the value of key in the shard's key-value data, nil if
// absent.
func (t *Txn) Get(key []byte) []byte { return t.kv.Get(key) }

// Put sets key to value in the shard's key-value data. It fails with
// ErrInvalid for an empty or oversized key; nothing is written then.
func (t *Txn) Put(key, value []byte) error { return put(t.kv, key, value) }

// Delete removes key from the shard's key-value data.
func (t *Txn) Delete(key []byte) error { return del(t.kv, key) }

// Range calls fn for each key in [start, end) in key order (end nil: to
// the last key) until fn returns false.
func (t *Txn) Range(start, end []byte, fn func(k, v []byte) bool) { rangeBucket(t.kv, start, end, fn) }

// GetMeta returns the value of key in the shard's state-machine metadata
// (revision counter, client sessions); nil if absent. The metadata is part
// of snapshots.
func (t *Txn) GetMeta(key []byte) []byte { return t.meta.Get(key) }

// PutMeta sets key to value in the shard's state-machine metadata.
func (t *Txn) PutMeta(key, value []byte) error { return put(t.meta, key, value) }

// DeleteMeta removes key from the shard's state-machine metadata.
func (t *Txn) DeleteMeta(key []byte) error { return del(t.meta, key) }

// RangeMeta calls fn for each metadata key with prefix, in key order,
// until fn returns false. fn may delete the key it is given.
func (t *Txn) RangeMeta(prefix []byte, fn func(k, v []byte) bool) {
	rangePrefix(t.meta, prefix, fn)
}

func put(b *bolt.Bucket, key, value []byte) error {
	if err := validKey(key); err != nil {
		return err
	}
	if err := b.Put(key, value); err != nil {
		return fmt.Errorf("storage: put: %w", err)
	}
	return nil
}

func del(b *bolt.Bucket, key []byte) error {
	if len(key) == 0 {
		return nil
	}
	if err := b.Delete(key); err != nil {
		return fmt.Errorf("storage: delete: %w", err)
	}
	return nil
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

// Reader is a read-only view of one shard's state, consistent with its
// applied index. Valid only during the View callback; returned slices
// likewise.
type Reader struct {
	kv, meta, raft *bolt.Bucket
}

// Get returns the value of key, nil if absent.
func (r *Reader) Get(key []byte) []byte { return r.kv.Get(key) }

// Range calls fn for each key in [start, end) (end nil: to the last key)
// until fn returns false.
func (r *Reader) Range(start, end []byte, fn func(k, v []byte) bool) {
	rangeBucket(r.kv, start, end, fn)
}

// GetMeta returns the value of a state-machine metadata key, nil if absent.
func (r *Reader) GetMeta(key []byte) []byte { return r.meta.Get(key) }

// Applied returns the applied index and term this view reflects.
func (r *Reader) Applied() (index, term uint64) {
	index, term, _ = decodeApplied(r.raft.Get(keyApplied))
	return index, term
}

// View runs fn with a read-only view of the shard's committed state (for
// serializable reads). It does not block writers, but a long fn delays
// bbolt remaps; keep it short. Returns ErrShardNotFound if the shard is
// gone, ErrClosed after Close, or fn's error.
func (s *Shard) View(fn func(r *Reader) error) error {
	return s.e.view(func(tx *bolt.Tx) error {
		b, err := s.bucket(tx)
		if err != nil {
			return err
		}
		return fn(&Reader{kv: b.Bucket(bucketKV), meta: b.Bucket(bucketMeta), raft: b.Bucket(bucketRaft)})
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

package storage

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/cespare/xxhash/v2"
	bolt "go.etcd.io/bbolt"
)

// Every value the state machine stores (kv/, meta/ and hist/ of a shard, and the
// same pairs in a snapshot) is kept as
//
//	checksum BE8 | value
//
// where checksum is pairSum(key, value). Reads verify it and return the
// value without it, so a value changed on disk (a flipped bit, a bad
// sector, a stray write) is reported as ErrCorrupt instead of served. The
// key is part of the sum, so a value moved under another key is caught too.
const sumLen = 8

// pairSum is the 64-bit checksum of one key-value pair. The key's length
// comes first, so that (key, value) pairs that concatenate to the same
// bytes still differ.
func pairSum(key, value []byte) uint64 {
	var d xxhash.Digest
	d.Reset()
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(key)))
	_, _ = d.Write(n[:])
	_, _ = d.Write(key)
	_, _ = d.Write(value)
	return d.Sum64()
}

// seal returns the stored form of value under key: a fresh slice, which
// bbolt may keep until the commit.
func seal(key, value []byte) []byte {
	return sealInto(make([]byte, sumLen+len(value)), key, value)
}

// sealInto writes the stored form of value under key into b, which is
// exactly its size, and returns b.
func sealInto(b, key, value []byte) []byte {
	binary.BigEndian.PutUint64(b, pairSum(key, value))
	copy(b[sumLen:], value)
	return b
}

// slabChunk is the size of the chunks a sealSlab carves stored values
// from; a value over an eighth of it gets an array of its own.
const slabChunk = 64 << 10

// sealSlab seals values into shared chunks: a round's puts then cost an
// allocation per chunk rather than one per value. bbolt keeps what a put
// gives it until the transaction ends; a carved slice is never handed out
// again, so a chunk is freed once nothing written into it is referenced.
// Owned by the writer goroutine.
type sealSlab struct{ buf []byte }

func (s *sealSlab) seal(key, value []byte) []byte {
	n := sumLen + len(value)
	if n > slabChunk/8 {
		return seal(key, value)
	}
	if cap(s.buf)-len(s.buf) < n {
		s.buf = make([]byte, 0, slabChunk)
	}
	i := len(s.buf)
	s.buf = s.buf[:i+n]
	return sealInto(s.buf[i:i+n:i+n], key, value)
}

// unseal verifies a stored value and returns it without its checksum (an
// alias of stored) and the checksum. A nil stored value is absent: nil, 0.
func unseal(key, stored []byte) ([]byte, uint64, error) {
	if stored == nil {
		return nil, 0, nil
	}
	if len(stored) < sumLen {
		return nil, 0, fmt.Errorf("%w: key %q: stored value of %d bytes has no checksum", ErrCorrupt, key, len(stored))
	}
	want := binary.BigEndian.Uint64(stored)
	v := stored[sumLen:]
	if got := pairSum(key, v); got != want {
		return nil, 0, fmt.Errorf("%w: key %q: checksum %016x, stored %016x", ErrCorrupt, key, got, want)
	}
	return v, want, nil
}

// storedSum returns the checksum recorded in a stored value without
// verifying it (0 for an absent or truncated value), for the running
// state hash: the value being replaced or deleted was verified when the
// state machine read it, and a scrub verifies them all.
func storedSum(stored []byte) uint64 {
	if len(stored) < sumLen {
		return 0
	}
	return binary.BigEndian.Uint64(stored)
}

// The state hash of a shard is the sum (mod 2^64) of the checksums of its
// state pairs: the user data and the state machine's own (revision,
// sessions, recorded results, cluster map, history), all of which replicas derive
// from the same log. Addition makes it independent of the order in which
// pairs were written and cheap to maintain: a put adds the new pair's
// checksum and subtracts the old one's, a delete subtracts. Replicas that
// applied the same log agree on it at every applied index; the scrubber
// recomputes it from the stored pairs. It lives in raft/ under
// keyStateHash, written in the same transaction as the data it describes.

func getStateHash(raftb *bolt.Bucket) uint64 {
	v := raftb.Get(keyStateHash)
	if len(v) != 8 {
		return 0
	}
	return binary.BigEndian.Uint64(v)
}

func putStateHash(raftb *bolt.Bucket, h uint64) error {
	return raftb.Put(keyStateHash, u64(h))
}

// sumBucket verifies every pair of a bucket and returns the sum of their
// checksums; the first corrupt pair is an error wrapping ErrCorrupt. pace,
// if not nil, is told the bytes of every pair and stops the scan
// (errScrubStopped) by returning false.
func sumBucket(b *bolt.Bucket, pace func(n int) bool) (uint64, error) {
	var sum uint64
	c := b.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		_, s, err := unseal(k, v)
		if err != nil {
			return 0, err
		}
		sum += s
		if pace != nil && !pace(len(k)+len(v)) {
			return 0, errScrubStopped
		}
	}
	return sum, nil
}

var errScrubStopped = errors.New("storage: scrub stopped")

// Scrub verifies the checksum of every state pair of the shard and
// that they add up to the stored state hash, in one read
// transaction (a consistent view; writers are not blocked, but pages freed
// meanwhile wait for it, so pace it rather than hold it for long). pace is
// told the size of each pair read and stops the scrub, returning nil, with
// false. A mismatch is ErrCorrupt.
func (s *Shard) Scrub(pace func(n int) bool) error {
	err := s.e.view(func(tx *bolt.Tx) error {
		b, err := s.bucket(tx)
		if err != nil {
			return err
		}
		var sum uint64
		for _, name := range stateBuckets {
			bsum, err := sumBucket(b.Bucket(name), pace)
			if err != nil {
				return err
			}
			sum += bsum
		}
		if want := getStateHash(b.Bucket(bucketRaft)); sum != want {
			return fmt.Errorf("%w: the pairs add up to state hash %016x, stored %016x", ErrCorrupt, sum, want)
		}
		return nil
	})
	switch {
	case errors.Is(err, errScrubStopped):
		return nil
	case err != nil:
		return fmt.Errorf("storage: shard %d: scrub: %w", s.id, err)
	}
	return nil
}

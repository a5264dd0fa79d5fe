package storage

import (
	"bytes"
	"encoding/binary"
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// Bucket tree of the one bbolt file (see doc.go):
//
//	node/                 node-level metadata (Engine.GetMeta/PutMeta)
//	node/layout           on-disk layout version (layoutVersion)
//	shards/<id BE8>/      one bucket per shard
//	    raft/             hardstate, snapmeta, applied, confstate, incarnation,
//	                      state-hash, hash-check
//	    log/<index BE8>   marshaled raftpb.Entry, contiguous indexes
//	    kv/               the state machine's key-value data (Txn.Get/Put)
//	    meta/             the state machine's metadata (Txn.GetMeta/PutMeta)
//	    hist/             the state machine's change history (Txn.PutHistory),
//	                      append-only keys, so kept in a bucket of its own:
//	                      in meta/ it deepened every metadata lookup
//	wal/gen               generation the WAL continues with (see wal.go)
//	staging/<seq BE8>/    snapshots being received (StageSnapshot)
//	    info, done        shard id + metadata; marker set by the last chunk
//	    state-hash        the state hash of the pairs staged so far
//	    kv/, meta/, hist/ become the shard's on install
var (
	bucketNode    = []byte("node")
	bucketShards  = []byte("shards")
	bucketStaging = []byte("staging")
	bucketWAL     = []byte("wal")
	keyWALGen     = []byte("gen")

	bucketRaft = []byte("raft")
	bucketLog  = []byte("log")
	bucketKV   = []byte("kv")
	bucketMeta = []byte("meta")
	bucketHist = []byte("hist")

	keyHardState   = []byte("hardstate")
	keySnapMeta    = []byte("snapmeta")
	keyApplied     = []byte("applied") // index BE8 | term BE8
	keyConfState   = []byte("confstate")
	keyIncarnation = []byte("incarnation")
	keyStateHash   = []byte("state-hash") // running sum of the state buckets' checksums BE8 (checksum.go)
	keyHashCheck   = []byte("hash-check") // index BE8 | state hash BE8 (Txn.CheckHash)

	keyLayout = []byte("layout") // in node/: layout version BE8

	keyStageInfo = []byte("info") // shard BE8 | marshaled SnapshotMetadata
	keyStageDone = []byte("done")
)

// stateBuckets are a shard's state-machine buckets: what a snapshot
// carries and installs, what the scrubber verifies and the state hash sums.
var stateBuckets = [][]byte{bucketKV, bucketMeta, bucketHist}

// layoutVersion is the on-disk layout this code reads and writes. Files
// without a layout record are version 1: values stored without checksums.
// Version 2 stores every kv/ and meta/ value behind its checksum
// (checksum.go) and keeps the state hash. Version 3 keeps the history in
// hist/; Open moves a version 2 file's history there (upgradeHistory).
// Open refuses any other version rather than misread it; a node with an
// older data dir is rebuilt from its peers (remove the data dir, join
// again).
const layoutVersion = 3

// layoutPartitioned is layout 3 in a file of a data dir of several
// partitions (store.go), each with a WAL file of its own. It differs from
// layout 3 only in name, so that a kvd without partitions refuses the
// file as newer rather than open kvd.db alone and find most of its shards
// missing. OpenStore moves such a data dir to layoutSharedWAL.
const layoutPartitioned = 4

// layoutSharedWAL is layout 3 in a file of a data dir of several
// partitions that share one WAL file, a region each. A kvd that gave each
// partition its own WAL must refuse it: it would replay nothing of the
// shared file and lose what was acknowledged since the last commits.
const layoutSharedWAL = 5

// checkLayout records layoutVersion in a new file and refuses a file of
// another version, in one line that names the file (path), both versions
// and what to do. Called first in Open's preparing transaction.
func checkLayout(tx *bolt.Tx, path string) error {
	node := tx.Bucket(bucketNode)
	if node == nil {
		// A new file: nothing in it predates the checksums.
		b, err := tx.CreateBucket(bucketNode)
		if err != nil {
			return err
		}
		return b.Put(keyLayout, u64(layoutVersion))
	}
	have := uint64(1)
	if v := node.Get(keyLayout); v != nil {
		var err error
		if have, err = decodeU64(v); err != nil {
			return fmt.Errorf("%w: %s: layout record: %w", ErrLayout, path, err)
		}
	}
	switch {
	case have == 2:
		if err := upgradeHistory(tx); err != nil {
			return fmt.Errorf("%w: %s: moving layout 2's history to hist/: %w", ErrLayout, path, err)
		}
		return node.Put(keyLayout, u64(layoutVersion))
	case have == layoutPartitioned || have == layoutSharedWAL:
		return nil
	case have > layoutSharedWAL:
		// Written by a newer release: reading it could misread anything
		// that release changed, and there is no downgrade.
		return fmt.Errorf("%w: %s has layout %d, newer than layout %d that this kvd reads (3 for a data dir of one file, 5 for one of several partitions; it upgrades layouts 2 and 4 in place): a newer kvd wrote it; run that release or a later one on this data dir, as kvd does not downgrade a data file",
			ErrLayout, path, have, layoutSharedWAL)
	case have != layoutVersion:
		return fmt.Errorf("%w: %s has layout %d, older than layout %d that this kvd reads (it upgrades layout 2 in place, nothing older): move the data dir away and add this node back as a new member (empty data dir, a new --id, --join)",
			ErrLayout, path, have, layoutVersion)
	}
	return nil
}

// layout2History is the prefix under which layout 2 kept the state
// machine's history events in meta/; layout 3 keeps them in hist/ under
// the rest of the key.
var layout2History = []byte("h/")

// upgradeHistory moves every shard's history events from meta/ to hist/.
// An event's checksum covers its key, so each is sealed again under its
// new key and the state hash moves by the difference; an event that fails
// its checksum is moved as it is, and fails it under the new key too, so
// the move never launders a corrupt value into a valid one.
func upgradeHistory(tx *bolt.Tx) error {
	shards := tx.Bucket(bucketShards)
	if shards == nil {
		return nil
	}
	return shards.ForEachBucket(func(id []byte) error {
		b := shards.Bucket(id)
		meta := b.Bucket(bucketMeta)
		hist, err := b.CreateBucketIfNotExists(bucketHist)
		if err != nil || meta == nil {
			return err
		}
		hist.FillPercent = histFillPercent
		raftb := b.Bucket(bucketRaft)
		hash := getStateHash(raftb)
		var moved [][]byte
		c := meta.Cursor()
		for k, stored := c.Seek(layout2History); k != nil && bytes.HasPrefix(k, layout2History); k, stored = c.Next() {
			nk := bytes.Clone(k[len(layout2History):])
			nv := bytes.Clone(stored)
			if v, _, err := unseal(k, stored); err == nil {
				nv = seal(nk, v)
			}
			if err := hist.Put(nk, nv); err != nil {
				return err
			}
			hash += storedSum(nv) - storedSum(stored)
			moved = append(moved, bytes.Clone(k))
		}
		for _, k := range moved {
			if err := meta.Delete(k); err != nil {
				return err
			}
		}
		if len(moved) == 0 {
			return nil
		}
		return putStateHash(raftb, hash)
	})
}

// histFillPercent packs hist/'s pages full: its keys only ever grow, so a
// page split leaves nothing to fill the left half later (bbolt's default
// of half full would double its pages).
const histFillPercent = 1.0

// u64 encodes v big-endian so that bbolt's byte order is numeric order.
func u64(v uint64) []byte {
	return binary.BigEndian.AppendUint64(make([]byte, 0, 8), v)
}

func decodeU64(b []byte) (uint64, error) {
	if len(b) != 8 {
		return 0, fmt.Errorf("storage: corrupt 8-byte value of length %d", len(b))
	}
	return binary.BigEndian.Uint64(b), nil
}

func encodeApplied(index, term uint64) []byte {
	b := make([]byte, 0, 16)
	b = binary.BigEndian.AppendUint64(b, index)
	return binary.BigEndian.AppendUint64(b, term)
}

func decodeApplied(b []byte) (index, term uint64, err error) {
	if b == nil {
		return 0, 0, nil
	}
	if len(b) != 16 {
		return 0, 0, fmt.Errorf("storage: corrupt applied record of length %d", len(b))
	}
	return binary.BigEndian.Uint64(b), binary.BigEndian.Uint64(b[8:]), nil
}

// shardBucket returns the bucket of shard id, nil if absent.
func shardBucket(tx *bolt.Tx, id uint64) *bolt.Bucket {
	return tx.Bucket(bucketShards).Bucket(u64(id))
}

// validKey reports whether bbolt accepts key, so that bad input from a peer
// or a client fails one request instead of the whole write round.
func validKey(key []byte) error {
	switch {
	case len(key) == 0:
		return fmt.Errorf("%w: empty key", ErrInvalid)
	case len(key) > bolt.MaxKeySize:
		return fmt.Errorf("%w: key of %d bytes exceeds %d", ErrInvalid, len(key), bolt.MaxKeySize)
	}
	return nil
}

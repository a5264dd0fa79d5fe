package storage

import (
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
//	wal/gen               generation the WAL continues with (see wal.go)
//	staging/<seq BE8>/    snapshots being received (StageSnapshot)
//	    info, done        shard id + metadata; marker set by the last chunk
//	    state-hash        the state hash of the pairs staged so far
//	    kv/, meta/        become the shard's kv/ and meta/ on install
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

	keyHardState   = []byte("hardstate")
	keySnapMeta    = []byte("snapmeta")
	keyApplied     = []byte("applied") // index BE8 | term BE8
	keyConfState   = []byte("confstate")
	keyIncarnation = []byte("incarnation")
	keyStateHash   = []byte("state-hash") // running sum of kv and meta checksums BE8 (checksum.go)
	keyHashCheck   = []byte("hash-check") // index BE8 | state hash BE8 (Txn.CheckHash)

	keyLayout = []byte("layout") // in node/: layout version BE8

	keyStageInfo = []byte("info") // shard BE8 | marshaled SnapshotMetadata
	keyStageDone = []byte("done")
)

// layoutVersion is the on-disk layout this code reads and writes. Files
// without a layout record are version 1: values stored without checksums.
// Version 2 stores every kv/ and meta/ value behind its checksum
// (checksum.go) and keeps the state hash. Open refuses any other version
// rather than misread it; a node with an older data dir is rebuilt from its
// peers (remove the data dir, join again).
const layoutVersion = 2

// checkLayout records layoutVersion in a new file and refuses a file of
// another version. Called first in Open's preparing transaction.
func checkLayout(tx *bolt.Tx) error {
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
			return fmt.Errorf("%w: layout record: %w", ErrLayout, err)
		}
	}
	if have != layoutVersion {
		return fmt.Errorf("%w: the data file has on-disk layout %d, this kvd reads only layout %d; rebuild the node from its peers (remove its data dir and join again)", ErrLayout, have, layoutVersion)
	}
	return nil
}

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

package fsm

import "github.com/kvd/kvd/storage"

// State is one shard's state as a command reads and changes it: the kv
// data, the metadata beside it, and the state hash a HashCheck records.
// *storage.Txn is the production State; fsm/memstate keeps one in memory
// for tests of the state machine alone.
//
// Apply calls it on one goroutine, for the duration of one command.
// Slices it returns belong to the State and are valid until the command
// ends; slices given to Put and PutMeta must not change afterwards. Every
// method is deterministic: two States given the same calls return the same
// answers.
type State interface {
	// Get and GetMeta return a kv or metadata value, nil if absent.
	Get(key []byte) []byte
	GetMeta(key []byte) []byte
	// Put and PutMeta set a value; an error (an invalid key) leaves the
	// State unchanged.
	Put(key, value []byte) error
	PutMeta(key, value []byte) error
	// Delete and DeleteMeta remove a key; an absent key is no change.
	Delete(key []byte) error
	DeleteMeta(key []byte) error
	// DeleteMetaRange removes every metadata key in [start, end).
	DeleteMetaRange(start, end []byte) error
	// RangeMeta calls fn for each metadata key with prefix in key order
	// until fn returns false; fn may delete the key it is given.
	RangeMeta(prefix []byte, fn func(k, v []byte) bool)
	// PutHistory and DeleteHistory change the history (history.go): state
	// like the metadata, apart from it because its keys only grow.
	PutHistory(key, value []byte) error
	DeleteHistory(key []byte) error
	// RangeHistory calls fn for each history key from start (nil: the
	// first) in key order until fn returns false; fn changes nothing.
	RangeHistory(start []byte, fn func(k, v []byte) bool)
	// CheckHash records the state hash with the index of the command
	// being applied, and returns both (see storage.Txn.CheckHash).
	CheckHash() (index, hash uint64, err error)
}

// View is a read-only view of one shard's state, for read requests.
// *storage.Reader is the production View. Slices it returns are valid only
// while the view is.
type View interface {
	Get(key []byte) []byte
	GetMeta(key []byte) []byte
	// Range calls fn for each kv key in [start, end) (end nil: to the
	// last key) in key order until fn returns false.
	Range(start, end []byte, fn func(k, v []byte) bool)
	// ScanMeta and ScanHistory are Range over the metadata and the
	// history (history.go).
	ScanMeta(start, end []byte, fn func(k, v []byte) bool)
	ScanHistory(start, end []byte, fn func(k, v []byte) bool)
}

// The storage engine is the State and View the server runs on.
var (
	_ State = (*storage.Txn)(nil)
	_ View  = (*storage.Reader)(nil)
)

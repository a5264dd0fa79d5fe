package storage

import "errors"

// Sentinel errors of the storage package. Match them with errors.Is: most
// are returned wrapped with the shard id or index that caused them.
//
// Where the raft library expects its own sentinels (raft.ErrCompacted,
// raft.ErrUnavailable, raft.ErrSnapOutOfDate) the Shard returns those, so
// raft's own checks keep working.
var (
	// ErrClosed is returned by every operation after Engine.Close, and to
	// writes that were still queued when Close stopped the writer.
	ErrClosed = errors.New("storage: closed")

	// ErrShardExists is returned by CreateShard for an id already on disk.
	ErrShardExists = errors.New("storage: shard exists")

	// ErrShardNotFound is returned for a shard that is not on disk.
	ErrShardNotFound = errors.New("storage: shard not found")

	// ErrFailed is returned for every write after a write transaction failed
	// (disk error, full disk, a panicking ApplyFunc). The engine refuses
	// further writes because the in-memory view and the disk may no longer
	// agree; the node must stop and restart from what is on disk.
	ErrFailed = errors.New("storage: engine failed, restart required")

	// ErrNotApplied is returned by Compact for an index beyond the applied
	// index: the log may not be dropped before the state contains it.
	ErrNotApplied = errors.New("storage: compact index beyond applied index")

	// ErrLogGap is returned by Save when the appended entries or the
	// committed entries would leave a hole in the log or the applied
	// sequence. Raft never asks for that; it indicates a caller bug.
	ErrLogGap = errors.New("storage: entries leave a gap")

	// ErrBadSnapshot is returned when Update.Snapshot does not name a
	// completely staged snapshot for this shard with the same index and
	// term, or when a streamed snapshot holds an invalid pair.
	ErrBadSnapshot = errors.New("storage: snapshot not staged or invalid")

	// ErrCorrupt is returned when a stored value does not match its
	// checksum, or a shard's stored pairs do not add up to its state hash:
	// the disk holds something this node did not write. The value is never
	// returned. Reads fail with it; a write round that meets it fails the
	// engine (ErrFailed). The replica must be rebuilt from its peers.
	// Open returns it too when the write-ahead log is damaged: a record
	// that had been made durable does not check out, and replaying up to
	// it would silently lose the acknowledged writes after it.
	ErrCorrupt = errors.New("storage: corrupt data")

	// ErrLayout is returned by Open for a data file of another on-disk
	// layout version than this code's.
	ErrLayout = errors.New("storage: unsupported on-disk layout")

	// ErrInvalid is returned for an invalid argument (empty key, key too
	// large for bbolt).
	ErrInvalid = errors.New("storage: invalid argument")
)

package raftnode

import (
	"go.etcd.io/raft/v3"
	pb "go.etcd.io/raft/v3/raftpb"

	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/storage"
)

// shardStorage is one replica's storage as its node uses it, every method
// called on the host's loop goroutine. *storage.Shard implements it; the
// tests' memory engine does too, so that the loop runs without bbolt.
type shardStorage interface {
	// raft.Storage is what the RawNode reads: durable log and state only.
	raft.Storage
	// Applied is the index and term of the last entry applied and visible
	// to readers, which may lag what saves applied until the storage
	// commits (then engine.AppliedC fires).
	Applied() (index, term uint64)
	// Compact drops the log up to index, which must be applied;
	// raft.ErrCompacted means it is gone already.
	Compact(index uint64) error
	// Flush asks that what saves applied become visible now rather than
	// at the storage's commit interval. It does not wait.
	Flush()
}

// engine is a node's storage as its Host uses it: replicas' storage,
// opened or created, and the saves of a loop pass, made in one request
// so that they share one write and one sync. The Host calls OpenShard,
// CreateShard and StageSnapshot from any goroutine, SaveAll and AppliedC
// of a partition only from that partition's loop goroutine (its lane).
// *storage.Store, through boltEngine, is the production one.
type engine interface {
	// OpenShard returns shard id's storage, an error wrapping
	// storage.ErrShardNotFound when there is none.
	OpenShard(id uint64) (shardStorage, error)
	// CreateShard creates shard id with configuration cs, bootstrapped
	// as storage.Engine.CreateShard describes.
	CreateShard(id uint64, cs *pb.ConfState) (shardStorage, error)
	// SaveAll performs each update (storage.Update says in what order,
	// calling its Apply for the committed normal entries), and returns
	// once each is durable, or merely performed when every update is
	// NoWait and storage.Update allows it, with each update's error at
	// its position. Every shard is one this engine returned.
	// The shards are all of partition p, and p's lane is the only
	// caller for p.
	SaveAll(p int, us []shardUpdate) []error
	// Partitions is how many storage partitions save independently; the
	// host runs a loop for each. Partition says which holds shard id.
	Partitions() int
	Partition(shard uint64) int
	// AppliedC fires when applied state of partition p became visible to
	// readers.
	AppliedC(p int) <-chan struct{}
	// StageSnapshot keeps a streamed snapshot and returns the token that
	// names it in the MsgSnap raft is handed (storage.Update.Snapshot).
	StageSnapshot(shard uint64, meta *pb.SnapshotMetadata, next func() ([]*peerpb.SnapshotPair, error)) ([]byte, error)
}

// shardUpdate is one replica's update in an engine.SaveAll.
type shardUpdate struct {
	shard  shardStorage
	update *storage.Update
}

var (
	_ shardStorage = (*storage.Shard)(nil)
	_ engine       = (*boltEngine)(nil)
)

// boltEngine is a *storage.Store as an engine. Go has no covariant
// results, so the store's OpenShard, CreateShard and SaveAll, whose
// types name *storage.Shard, cannot satisfy the interface themselves.
type boltEngine struct {
	s *storage.Store
	// updates is SaveAll's argument to the store, one reused per
	// partition: a partition's lane is its only caller.
	updates [][]storage.ShardUpdate
}

func (b *boltEngine) OpenShard(id uint64) (shardStorage, error) {
	s, err := b.s.OpenShard(id)
	if err != nil {
		return nil, err
	}
	return s, nil
}

func (b *boltEngine) CreateShard(id uint64, cs *pb.ConfState) (shardStorage, error) {
	s, err := b.s.CreateShard(id, cs)
	if err != nil {
		return nil, err
	}
	return s, nil
}

func (b *boltEngine) SaveAll(p int, us []shardUpdate) []error {
	updates := b.updates[p]
	for _, u := range us {
		updates = append(updates, storage.ShardUpdate{Shard: u.shard.(*storage.Shard), Update: u.update})
	}
	errs := b.s.SaveAll(updates)
	clear(updates) // let the updates go
	b.updates[p] = updates[:0]
	return errs
}

func (b *boltEngine) Partitions() int                { return b.s.Partitions() }
func (b *boltEngine) Partition(shard uint64) int     { return b.s.Partition(shard) }
func (b *boltEngine) AppliedC(p int) <-chan struct{} { return b.s.AppliedC(p) }

func (b *boltEngine) StageSnapshot(shard uint64, meta *pb.SnapshotMetadata, next func() ([]*peerpb.SnapshotPair, error)) ([]byte, error) {
	return b.s.StageSnapshot(shard, meta, next)
}

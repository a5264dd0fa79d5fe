package storage

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	bolt "go.etcd.io/bbolt"
	pb "go.etcd.io/raft/v3/raftpb"

	"github.com/kvd/kvd/proto/peerpb"
)

// Store is a node's storage: one or more Engines, the partitions, each a
// bbolt file with its WAL and its own writer, and each holding a fixed
// share of the shards (shard id modulo the partition count). A shard's
// log, hard state and state machine live in one partition, so nothing of
// a shard spans files and each partition recovers alone.
//
// Why more than one: an Engine's writer performs every write of its file,
// applies and bbolt commits included, so a shard whose commits are large
// (1 MiB transactions) delays every other shard of the same file. Shards
// in other partitions do not wait for it, provided their saves do not
// share a request with its (raftnode runs a loop per partition). The
// price: a round that one file makes with one WAL write and one sync, N
// files make with one each. The design follows dragonboat, which spreads
// its groups over several log databases and step workers.
//
// A data dir keeps the partition count it was created with: it is
// recorded in the first file, kvd.db, which also holds the node-level
// metadata (GetMeta, PutMeta). The others are kvd-1.db, kvd-2.db, ...
// A data dir created before partitions existed is one partition.
type Store struct {
	parts   []*Engine
	failedc chan struct{}
	failErr error // set before failedc closes
	stopc   chan struct{}
	wg      sync.WaitGroup
	once    sync.Once // publishes the first failure
	stop    sync.Once
}

// Node-metadata keys of the partition records, in the node/ bucket of
// each file beside the server's own keys. kvd.db records the count; every
// other file its index and the count, so that a file of another data dir,
// or one renamed, is refused rather than read as this one's.
const (
	keyPartitions = "storage/partitions"
	keyPartition  = "storage/partition"
)

// MaxPartitions bounds OpenStore's partitions.
const MaxPartitions = 64

// OpenStore opens the data dir's partitions, creating a new data dir with
// partitions files (at least 1). An existing data dir keeps its count,
// whatever partitions says; a file it records that is missing, or one
// that names another place, fails the open.
func OpenStore(dir string, partitions int, opts Options) (*Store, error) {
	if partitions < 1 || partitions > MaxPartitions {
		return nil, fmt.Errorf("storage: %d partitions: want 1 to %d", partitions, MaxPartitions)
	}
	s := &Store{
		failedc: make(chan struct{}),
		stopc:   make(chan struct{}),
	}
	// The partitions share the WAL space one file would have, down to a
	// quarter of it each. kvd.db's WAL is sized before the count of an
	// existing data dir is known; it keeps the size it was created with.
	walSize := func(n uint64) Options {
		o := opts
		if o.WALSize <= 0 {
			o.WALSize = max(walPrealloc/int64(n), walPrealloc/4)
		}
		return o
	}
	first, err := Open(filepath.Join(dir, "kvd.db"), walSize(uint64(partitions)))
	if err != nil {
		return nil, err
	}
	s.parts = []*Engine{first}
	n, fresh, err := first.partitionCount()
	if err == nil && fresh {
		n = uint64(partitions)
	}
	for i := uint64(1); err == nil && i < n; i++ {
		var p *Engine
		p, err = s.openPartition(dir, i, n, fresh, walSize(n))
		if p != nil {
			s.parts = append(s.parts, p)
		}
	}
	if err == nil && fresh && n > 1 {
		// Last: until the count is recorded the data dir is new, and an
		// open after a crash here creates the partitions again.
		err = first.putNode(map[string][]byte{keyPartitions: u64(n), string(keyLayout): u64(layoutPartitioned)})
	}
	if err != nil {
		for _, p := range s.parts {
			_ = p.Close()
		}
		return nil, err
	}
	for _, p := range s.parts {
		s.wg.Add(1)
		go s.watch(p)
	}
	return s, nil
}

// openPartition opens partition i of n; in a new data dir it creates the
// file and records i/n in it (again, over what a crashed creation left).
func (s *Store) openPartition(dir string, i, n uint64, fresh bool, opts Options) (*Engine, error) {
	path := filepath.Join(dir, "kvd-"+strconv.FormatUint(i, 10)+".db")
	if !fresh {
		if _, err := os.Stat(path); err != nil {
			return nil, fmt.Errorf("storage: %s: partition %d of %d recorded in kvd.db: %w", path, i, n, err)
		}
	}
	e, err := Open(path, opts)
	if err != nil {
		return nil, err
	}
	want := strconv.FormatUint(i, 10) + "/" + strconv.FormatUint(n, 10)
	have, err := e.GetMeta(keyPartition)
	switch {
	case err != nil:
	case fresh:
		// New, or left empty by a crashed creation: never a file that
		// holds shards kvd.db does not account for.
		if _, empty, ferr := e.partitionCount(); ferr != nil || !empty {
			err = fmt.Errorf("%w: %s holds data, but kvd.db records no partitions", ErrLayout, path)
			break
		}
		err = e.putNode(map[string][]byte{keyPartition: []byte(want), string(keyLayout): u64(layoutPartitioned)})
	case string(have) != want:
		err = fmt.Errorf("%w: %s says it is partition %q, want %s: a file of another data dir?", ErrLayout, path, have, want)
	}
	if err != nil {
		_ = e.Close()
		return nil, err
	}
	return e, nil
}

// putNode stores node-level records in one durable write.
func (e *Engine) putNode(records map[string][]byte) error {
	resp := e.do(&request{exec: func(rs *round) (response, error) {
		node := rs.tx.Bucket(bucketNode)
		for k, v := range records {
			if err := node.Put([]byte(k), v); err != nil {
				return response{}, err
			}
		}
		return response{}, nil
	}})
	return resp.err
}

// partitionCount returns the partition count kvd.db records, 1 for a
// file that records none; fresh reports a file holding nothing yet (no
// shard, no node metadata): a new data dir.
func (e *Engine) partitionCount() (n uint64, fresh bool, err error) {
	n = 1
	err = e.view(func(tx *bolt.Tx) error {
		node := tx.Bucket(bucketNode)
		if v := node.Get([]byte(keyPartitions)); v != nil {
			var err error
			n, err = decodeU64(v)
			if err == nil && (n < 1 || n > MaxPartitions) {
				err = fmt.Errorf("out of range")
			}
			if err != nil {
				return fmt.Errorf("%w: partition count %x: %w", ErrLayout, v, err)
			}
			return nil
		}
		fresh = true
		if k, _ := tx.Bucket(bucketShards).Cursor().First(); k != nil {
			fresh = false
		}
		return node.ForEach(func(k, _ []byte) error {
			if string(k) != string(keyLayout) && string(k) != keyPartition {
				fresh = false
			}
			return nil
		})
	})
	return n, fresh, err
}

// watch publishes p's failure as the store's.
func (s *Store) watch(p *Engine) {
	defer s.wg.Done()
	select {
	case <-p.Failed():
		s.once.Do(func() {
			s.failErr = p.Err()
			close(s.failedc)
		})
	case <-s.stopc:
	}
}

// Partitions returns the number of partitions.
func (s *Store) Partitions() int { return len(s.parts) }

// Paths returns the partitions' bbolt files, kvd.db first.
func (s *Store) Paths() []string {
	paths := make([]string, len(s.parts))
	for i, p := range s.parts {
		paths[i] = p.db.Path()
	}
	return paths
}

// Partition returns the index of the partition that holds shard id.
func (s *Store) Partition(id uint64) int { return int(id % uint64(len(s.parts))) }

// part returns the partition that holds shard id.
func (s *Store) part(id uint64) *Engine { return s.parts[s.Partition(id)] }

// Failed is closed when any partition has failed (Engine.Failed); Err
// says why.
func (s *Store) Failed() <-chan struct{} { return s.failedc }

// Err returns the first partition failure, wrapping ErrFailed, or nil.
func (s *Store) Err() error {
	select {
	case <-s.failedc:
		return s.failErr
	default:
		return nil
	}
}

// Close closes every partition (Engine.Close) and returns the first error.
func (s *Store) Close() error {
	var errs []error
	s.stop.Do(func() { close(s.stopc) })
	for _, p := range s.parts {
		errs = append(errs, p.Close())
	}
	s.wg.Wait()
	return errors.Join(errs...)
}

// Flush asks every partition to commit now (Engine.Flush).
func (s *Store) Flush() {
	for _, p := range s.parts {
		p.Flush()
	}
}

// AppliedC is partition p's Engine.AppliedC.
func (s *Store) AppliedC(p int) <-chan struct{} { return s.parts[p].AppliedC() }

// CreateShard creates shard id in its partition (Engine.CreateShard).
func (s *Store) CreateShard(id uint64, cs *pb.ConfState) (*Shard, error) {
	return s.part(id).CreateShard(id, cs)
}

// OpenShard opens shard id from its partition (Engine.OpenShard).
func (s *Store) OpenShard(id uint64) (*Shard, error) { return s.part(id).OpenShard(id) }

// StageSnapshot stages a snapshot of shard in the shard's partition
// (Engine.StageSnapshot), where its install moves the staged buckets.
func (s *Store) StageSnapshot(shard uint64, meta *pb.SnapshotMetadata, next func() ([]*peerpb.SnapshotPair, error)) ([]byte, error) {
	return s.part(shard).StageSnapshot(shard, meta, next)
}

// GetMeta reads node-level metadata (Engine.GetMeta), kept in kvd.db.
func (s *Store) GetMeta(key string) ([]byte, error) { return s.parts[0].GetMeta(key) }

// PutMeta stores node-level metadata (Engine.PutMeta) in kvd.db.
func (s *Store) PutMeta(key string, v []byte) error { return s.parts[0].PutMeta(key, v) }

// SaveAll is Engine.SaveAll over partitions: each partition's updates go
// to its writer as one request, the partitions in parallel, and it
// returns when all have answered. Every Shard is one this store returned.
func (s *Store) SaveAll(us []ShardUpdate) []error {
	if e := s.onePart(us); e != nil {
		return e.SaveAll(us)
	}
	byPart := make(map[*Engine][]int, len(s.parts))
	for i, su := range us {
		byPart[su.Shard.e] = append(byPart[su.Shard.e], i)
	}
	errs := make([]error, len(us))
	var wg sync.WaitGroup
	for e, idx := range byPart {
		save := func() {
			sub := make([]ShardUpdate, len(idx))
			for j, i := range idx {
				sub[j] = us[i]
			}
			for j, err := range e.SaveAll(sub) {
				errs[idx[j]] = err
			}
		}
		wg.Go(save)
	}
	wg.Wait()
	return errs
}

// onePart returns the partition of every shard in us, nil when they are
// in several (or us is empty).
func (s *Store) onePart(us []ShardUpdate) *Engine {
	if len(us) == 0 {
		return nil
	}
	e := us[0].Shard.e
	for _, su := range us[1:] {
		if su.Shard.e != e {
			return nil
		}
	}
	return e
}

// Stats returns the partitions' counters added up.
func (s *Store) Stats() Stats {
	st := s.parts[0].Stats()
	for _, p := range s.parts[1:] {
		st.add(p.Stats())
	}
	return st
}

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
// bbolt file with its own writer, and each holding a fixed share of the
// shards (shard id modulo the partition count). A shard's log, hard state
// and state machine live in one partition, so nothing of a shard spans
// bbolt files.
//
// Why more than one: an Engine's writer performs every write of its file,
// applies and bbolt commits included, so a shard whose commits are large
// (1 MiB transactions) delays every other shard of the same file. Shards
// in other partitions do not wait for it, provided their saves do not
// share a request with its (raftnode runs a loop per partition). The
// design follows dragonboat, which spreads its groups over several log
// databases and step workers.
//
// The partitions share one WAL file, kvd.wal, a region of it each
// (openSharedWAL), and its fdatasyncs (fileSync): a sync makes durable
// what every partition wrote before it, so N partitions cost the disk
// fewer syncs than N files did, though more per write than one partition
// (fileSync has the figures). A round still costs one WAL write and one
// writer pass per partition that takes part.
//
// A data dir keeps the partition count it was created with: it is
// recorded in the first file, kvd.db, with the size of a WAL region; kvd.db
// also holds the node-level metadata (GetMeta, PutMeta). The others are
// kvd-1.db, kvd-2.db, ... A data dir created before partitions existed is
// one partition, with the whole of kvd.wal as its WAL.
type Store struct {
	parts   []*Engine
	wal     *wal // the partitions' shared WAL file, whole; nil for one partition
	failedc chan struct{}
	failErr error // set before failedc closes
	stopc   chan struct{}
	wg      sync.WaitGroup
	once    sync.Once // publishes the first failure
	stop    sync.Once
}

// Node-metadata keys of the partition records, in the node/ bucket of
// each file beside the server's own keys. kvd.db records the count and
// the size of each partition's region of the WAL file; every other file
// its index and the count, so that a file of another data dir, or one
// renamed, is refused rather than read as this one's.
const (
	keyPartitions = "storage/partitions"
	keyWALRegion  = "storage/wal-region"
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
	first := partitionPath(dir, 0)
	info, err := peekPartitions(first)
	if err != nil {
		return nil, err
	}
	n := info.n
	if info.fresh {
		n = uint64(partitions)
	}
	if n == 1 {
		e, err := Open(first, opts)
		if err != nil {
			return nil, err
		}
		s.parts = []*Engine{e}
		s.start()
		return s, nil
	}
	if info.region == 0 && !info.fresh {
		// Written by a kvd that gave each partition a WAL file of its own.
		if err := mergeWALs(dir, n, opts); err != nil {
			return nil, err
		}
	}
	// The partitions share the WAL space one file would have, down to a
	// quarter of it each.
	region := int64(info.region)
	if region == 0 {
		if region = opts.WALSize; region <= 0 {
			region = max(walPrealloc/int64(n), walPrealloc/4)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("storage: create data dir: %w", err)
	}
	file, wals, err := openSharedWAL(walPath(first), int(n), region, !opts.NoSync)
	if err != nil {
		return nil, err
	}
	s.wal = file
	// Files that do not record the shared WAL yet (new, or merged above)
	// record it, kvd.db last: until it has, the data dir is new (or still
	// to merge), and an open after a crash does it again.
	record := info.region == 0
	for i := uint64(0); err == nil && i < n; i++ {
		var p *Engine
		p, err = s.openPartition(dir, i, n, info.fresh, record, opts, wals[i])
		if p != nil {
			s.parts = append(s.parts, p)
		}
	}
	if err == nil && record {
		err = s.parts[0].putNode(map[string][]byte{keyPartitions: u64(n), keyWALRegion: u64(uint64(region)), string(keyLayout): u64(layoutSharedWAL)})
	}
	if err != nil {
		_ = s.Close()
		return nil, err
	}
	s.start()
	return s, nil
}

// start watches the partitions for failure.
func (s *Store) start() {
	for _, p := range s.parts {
		s.wg.Add(1)
		go s.watch(p)
	}
}

// partitionPath is partition i's bbolt file in dir.
func partitionPath(dir string, i uint64) string {
	if i == 0 {
		return filepath.Join(dir, "kvd.db")
	}
	return filepath.Join(dir, "kvd-"+strconv.FormatUint(i, 10)+".db")
}

// openPartition opens partition i of n over its region w of the shared
// WAL. In a new data dir it creates the file and records i/n in it
// (again, over what a crashed creation left); with record, the file
// records the shared WAL's layout.
func (s *Store) openPartition(dir string, i, n uint64, fresh, record bool, opts Options, w *wal) (*Engine, error) {
	path := partitionPath(dir, i)
	if !fresh {
		if _, err := os.Stat(path); err != nil {
			return nil, fmt.Errorf("storage: %s: partition %d of %d recorded in kvd.db: %w", path, i, n, err)
		}
	}
	e, err := open(path, opts, w)
	if err != nil {
		return nil, err
	}
	if i == 0 {
		return e, nil // kvd.db: OpenStore records what it must
	}
	want := strconv.FormatUint(i, 10) + "/" + strconv.FormatUint(n, 10)
	have, err := e.GetMeta(keyPartition)
	switch {
	case err != nil:
	case fresh:
		// New, or left empty by a crashed creation: never a file that
		// holds shards kvd.db does not account for.
		if info, ferr := e.partitionInfo(); ferr != nil || !info.fresh {
			err = fmt.Errorf("%w: %s holds data, but kvd.db records no partitions", ErrLayout, path)
			break
		}
	case string(have) != want:
		err = fmt.Errorf("%w: %s says it is partition %q, want %s: a file of another data dir?", ErrLayout, path, have, want)
	}
	if err == nil && record {
		err = e.putNode(map[string][]byte{keyPartition: []byte(want), string(keyLayout): u64(layoutSharedWAL)})
	}
	if err != nil {
		_ = e.Close()
		return nil, err
	}
	return e, nil
}

// mergeWALs readies a data dir of n partitions written with a WAL file
// each (layout 4) for the shared WAL: each partition is opened over its
// own WAL, which replays and commits it, and closed, and the WAL files,
// now redundant, are removed.
func mergeWALs(dir string, n uint64, opts Options) error {
	// A WAL keeps the size it has; one that is missing needs no space.
	opts.WALSize = walHeaderSize
	for i := range n {
		e, err := Open(partitionPath(dir, i), opts)
		if err != nil {
			return err
		}
		if err := e.Close(); err != nil {
			return err
		}
	}
	for i := range n {
		if err := os.Remove(walPath(partitionPath(dir, i))); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("storage: remove a partition's own wal: %w", err)
		}
	}
	return syncDir(dir)
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

// partitionInfo is what kvd.db records of the data dir's partitions.
type partitionInfo struct {
	n      uint64 // the partition count, 1 when none is recorded
	region uint64 // the size of a partition's WAL region, 0 when none is recorded
	// fresh: the file holds nothing yet (no shard, no node metadata): a
	// new data dir.
	fresh bool
}

// peekPartitions reads what the bbolt file at path records of the
// partitions, before any partition is opened: whether they share a WAL
// decides how each opens. A missing file is a new data dir.
func peekPartitions(path string) (partitionInfo, error) {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return partitionInfo{n: 1, fresh: true}, nil
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: openTimeout})
	if err != nil {
		return partitionInfo{}, fmt.Errorf("storage: open %s: %w", path, err)
	}
	defer db.Close()
	var info partitionInfo
	err = db.View(func(tx *bolt.Tx) (err error) {
		info, err = readPartitionInfo(tx)
		return err
	})
	return info, err
}

// partitionInfo returns what the file records of the partitions.
func (e *Engine) partitionInfo() (info partitionInfo, err error) {
	err = e.view(func(tx *bolt.Tx) (err error) {
		info, err = readPartitionInfo(tx)
		return err
	})
	return info, err
}

// readPartitionInfo reads the partition records of the file tx is of.
func readPartitionInfo(tx *bolt.Tx) (partitionInfo, error) {
	info := partitionInfo{n: 1}
	node := tx.Bucket(bucketNode)
	if node == nil {
		// A file whose creation stopped before its first commit.
		info.fresh = tx.Bucket(bucketShards) == nil
		return info, nil
	}
	if v := node.Get([]byte(keyPartitions)); v != nil {
		var err error
		info.n, err = decodeU64(v)
		if err == nil && (info.n < 1 || info.n > MaxPartitions) {
			err = fmt.Errorf("out of range")
		}
		if err != nil {
			return info, fmt.Errorf("%w: partition count %x: %w", ErrLayout, v, err)
		}
		if v := node.Get([]byte(keyWALRegion)); v != nil {
			if info.region, err = decodeU64(v); err != nil || info.region < walHeaderSize || info.region > 1<<40 {
				return info, fmt.Errorf("%w: WAL region size %x", ErrLayout, v)
			}
		}
		return info, nil
	}
	info.fresh = true
	if shards := tx.Bucket(bucketShards); shards != nil {
		if k, _ := shards.Cursor().First(); k != nil {
			info.fresh = false
		}
	}
	err := node.ForEach(func(k, _ []byte) error {
		if string(k) != string(keyLayout) && string(k) != keyPartition {
			info.fresh = false
		}
		return nil
	})
	return info, err
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
	if s.wal != nil {
		if err := s.wal.close(); err != nil {
			errs = append(errs, fmt.Errorf("storage: close wal: %w", err))
		}
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
	if s.wal != nil && s.wal.sync {
		// The partitions' WAL syncs shared fdatasyncs of the one file:
		// count those.
		st.Syncs = st.Syncs - st.walSyncs + s.wal.syncs.count()
	}
	return st
}

package storage

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// Options configures an Engine. The zero value is the production setting.
type Options struct {
	// Logger receives the engine's few log lines (open, failure). nil
	// discards them.
	Logger *slog.Logger

	// NoSync skips fsync on commit. Only for benchmarks and tests that ask
	// for it: an acknowledged write may then be lost by a crash, and a
	// power failure may corrupt the file.
	NoSync bool

	// InitialMmapSize is the initial size of bbolt's memory map, default
	// 256 MiB. bbolt must remap when the file outgrows the map, and a remap
	// waits for every open read transaction; a snapshot being streamed to a
	// slow peer holds one for a long time, and would stall every write of
	// the node meanwhile. A generous map makes remaps rare.
	InitialMmapSize int

	// CommitInterval bounds how long the bbolt transaction stays open
	// across rounds (each made durable by the WAL) before it commits.
	// Readers see applied state only once it commits, so it also bounds
	// how far a serializable read may lag the writes this node applied.
	// Default 200 ms (etcd commits its backend every 100 ms): a commit
	// costs about the same with four times the writes in it, so fewer
	// commits leave the writer more time for rounds (991a3f6 has the
	// measurements).
	// Negative commits after every round.
	CommitInterval time.Duration

	// WALSize is the size the WAL is preallocated to, default 64 MiB; a
	// WAL already larger keeps its size. The writer commits bbolt when
	// the WAL is 15/16 full, so a smaller WAL commits more often under
	// heavy writes. In a Store of several partitions it is the size of
	// each partition's region of the shared WAL file, default 64 MiB
	// divided among them, at least 16 MiB each; a data dir keeps the
	// region size it was created with.
	WALSize int64
}

const (
	defaultMmapSize = 256 << 20

	defaultCommitInterval = 200 * time.Millisecond

	// defaultLogCacheBytes bounds, per shard, the committed log tail kept
	// in memory (entries the open transaction holds stay too). Raft reads
	// the tail (to send appends to followers, to apply) and rarely
	// anything older, which comes from bbolt. 256 KiB is ~750 entries of
	// a 256-byte put, seconds of a shard's writes under load. Larger
	// caches were most of a node's live heap, which kvd's GOGC of 300
	// (cmd/kvd) lets grow to four times its size (a681cab).
	defaultLogCacheBytes = 256 << 10

	// openTimeout bounds the wait for bbolt's file lock, so a second process
	// on the same data dir fails instead of hanging.
	openTimeout = 10 * time.Second
)

// Engine is one node's storage: one bbolt file holding every shard, and the
// one writer goroutine that performs every write (see doc.go). All methods
// are safe for concurrent use.
type Engine struct {
	db   *bolt.DB
	log  *slog.Logger
	opts Options

	// cacheLimit is the per-shard log cache size in bytes. Set before the
	// first write (tests lower it to exercise the bbolt read path); read by
	// the writer.
	cacheLimit int

	// reqc carries write requests to the writer. Unbuffered on purpose: a
	// send succeeds only when the writer takes the request, so nothing is
	// left queued behind a stopped writer.
	reqc       chan *request
	stopc      chan struct{} // closed by Close: the writer stops taking requests
	flushc     chan struct{} // Flush: commit the open transaction now (buffered 1)
	writerDone chan struct{} // closed when the writer goroutine has returned
	// appliedc gets a value (never blocking, buffered 1) when a commit
	// moves any shard's visible applied index (AppliedC).
	appliedc chan struct{}

	// The syncer (syncer.go): syncc carries rounds from the writer, which
	// closes it as it returns; syncPending counts rounds handed over and
	// not yet done; syncErr is why an fdatasync failed.
	syncc       chan *syncBatch
	syncPending atomic.Int64
	syncErr     atomic.Pointer[error]
	syncerDone  chan struct{}
	// latest is the newest state of each shard a round has built since the
	// last commit, published or not. Owned by the writer.
	latest map[*Shard]*shardState

	// queued counts requests waiting for the writer to take them (tests use
	// it to build a round deterministically).
	queued atomic.Int64

	closeOnce sync.Once
	closeErr  error
	closed    atomic.Bool

	// failed is set by the writer after a round could not be committed;
	// every later write is refused with it. Owned by the writer goroutine.
	failed error
	// failure publishes the engine's failure to other goroutines: err is
	// set and c closed once, by whichever of the writer and the syncer
	// sees it first.
	failure struct {
		once sync.Once
		c    chan struct{}
		err  atomic.Pointer[error]
	}
	// wal, open and slab are owned by the writer goroutine.
	wal  *wal
	open openTx
	slab sealSlab

	// mu guards shards, the Shard objects handed out, so that OpenShard
	// returns the same *Shard every time (its in-memory log must be the
	// only one). Never held together with a Shard's mu.
	mu struct {
		sync.Mutex
		shards map[uint64]*Shard
	}

	// stats guards the counters the writer updates after every round.
	stats struct {
		sync.Mutex
		s Stats
	}
}

// Open opens or creates the engine's bbolt file at path (creating missing
// directories) and starts the writer. Snapshots left staged by a previous
// run are dropped: a sender restarts them from scratch anyway.
func Open(path string, opts Options) (*Engine, error) { return open(path, opts, nil) }

// open is Open with the WAL w, a region of the store's shared WAL file
// (openSharedWAL), or with the file's own WAL when w is nil. It closes
// its own WAL if it fails, never w.
func open(path string, opts Options, w *wal) (*Engine, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.InitialMmapSize <= 0 {
		opts.InitialMmapSize = defaultMmapSize
	}
	if opts.CommitInterval == 0 {
		opts.CommitInterval = defaultCommitInterval
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("storage: create data dir: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{
		Timeout:         openTimeout,
		NoSync:          opts.NoSync,
		InitialMmapSize: opts.InitialMmapSize,
		// The hashmap freelist stays fast as the file grows, and not
		// writing the freelist on every commit saves pages per fsync; bbolt
		// rebuilds it by scanning at open (as etcd does).
		FreelistType:   bolt.FreelistMapType,
		NoFreelistSync: true,
	})
	if err != nil {
		return nil, fmt.Errorf("storage: open %s: %w", path, err)
	}
	dropped := 0
	err = db.Update(func(tx *bolt.Tx) error {
		if err := checkLayout(tx, path); err != nil {
			return err
		}
		for _, name := range [][]byte{bucketNode, bucketShards, bucketWAL} {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		if st := tx.Bucket(bucketStaging); st != nil {
			dropped = st.Stats().BucketN - 1
			if err := tx.DeleteBucket(bucketStaging); err != nil {
				return err
			}
		}
		_, err := tx.CreateBucket(bucketStaging)
		return err
	})
	if err != nil {
		_ = db.Close()
		if errors.Is(err, ErrLayout) {
			return nil, err // names the file already, in the line a user sees
		}
		return nil, fmt.Errorf("storage: prepare %s: %w", path, err)
	}
	e := &Engine{
		db:         db,
		log:        opts.Logger,
		opts:       opts,
		cacheLimit: defaultLogCacheBytes,
		reqc:       make(chan *request),
		stopc:      make(chan struct{}),
		flushc:     make(chan struct{}, 1),
		writerDone: make(chan struct{}),
		appliedc:   make(chan struct{}, 1),
		syncc:      make(chan *syncBatch, 256),
		syncerDone: make(chan struct{}),
		latest:     make(map[*Shard]*shardState),
	}
	e.mu.shards = make(map[uint64]*Shard)
	e.failure.c = make(chan struct{})
	e.stats.s = newStats()
	if e.wal = w; w == nil {
		if e.wal, err = openWAL(walPath(path), opts.WALSize, !opts.NoSync); err != nil {
			_ = db.Close()
			return nil, err
		}
	}
	replayed, err := e.recover()
	if err != nil {
		_ = e.wal.close()
		_ = db.Close()
		return nil, fmt.Errorf("storage: recover %s: %w", path, err)
	}
	e.log.Info("storage opened", "path", path, "nosync", opts.NoSync, "dropped_staged", dropped, "wal_records_replayed", replayed)
	go e.syncer()
	go e.writer()
	return e, nil
}

// recover replays into bbolt the WAL records written since its last
// commit (see wal.go), and commits them.
func (e *Engine) recover() (records int, err error) {
	tx, err := e.db.Begin(true)
	if err != nil {
		return 0, err
	}
	// A file that never stored a generation (new, or written before the
	// WAL existed) has no records to replay. It starts at a random
	// generation, which matches none in the WAL (nothing is written under
	// the first: recover commits the next), neither the zeros of a
	// preallocated file nor those a WAL left over from another bbolt file
	// holds, and leaves room for walFormat2.
	e.wal.gen = rand.Uint64()>>2 | 1
	if v := tx.Bucket(bucketWAL).Get(keyWALGen); v != nil {
		if e.wal.gen, err = decodeU64(v); err != nil {
			_ = tx.Rollback()
			return 0, err
		}
	}
	rs := &round{e: e, tx: tx, states: map[*Shard]*shardState{}, lockForCommit: map[*Shard]bool{}}
	shards := map[uint64]*Shard{}
	res, err := e.wal.replay(e.wal.gen, func(op walOp) error {
		s := shards[op.shard]
		if s == nil {
			b := shardBucket(tx, op.shard)
			if b == nil {
				return fmt.Errorf("wal holds shard %d, which is not on disk", op.shard)
			}
			if s, err = loadShard(e, op.shard, b); err != nil {
				return err
			}
			shards[op.shard] = s
		}
		u := &Update{}
		if op.hard != nil {
			u.HardState = &pb.HardState{}
			if err := proto.Unmarshal(op.hard, u.HardState); err != nil {
				return fmt.Errorf("wal: shard %d: hard state: %w", op.shard, err)
			}
		}
		for _, b := range op.entries {
			ent := &pb.Entry{}
			if err := proto.Unmarshal(b, ent); err != nil {
				return fmt.Errorf("wal: shard %d: entry: %w", op.shard, err)
			}
			u.Entries = append(u.Entries, ent)
		}
		resp, err := rs.save(s, u)
		if err == nil {
			err = resp.err
		}
		if err != nil {
			return fmt.Errorf("wal: replay into shard %d: %w", op.shard, err)
		}
		return nil
	})
	if err != nil {
		_ = tx.Rollback()
		return res.records, err
	}
	if res.torn >= 0 {
		e.log.Warn("storage: WAL ends with a torn record, written when the node stopped and never acknowledged; replay stops there and the next write overwrites it",
			"path", e.wal.path, "offset", res.torn, "records_replayed", res.records, "later_unacknowledged_records", res.unacked)
	}
	// Commit even with nothing replayed: the WAL then restarts under a
	// generation no record on the file has.
	e.open.tx, e.open.start = tx, time.Now()
	return res.records, e.commit(rs)
}

// Failed is closed when the engine has failed (a write, commit or WAL sync
// did not reach the disk): from then on it refuses every write with
// ErrFailed, and the node must restart from what is on disk. Err says why.
func (e *Engine) Failed() <-chan struct{} { return e.failure.c }

// Err returns why the engine failed, wrapping ErrFailed, or nil.
func (e *Engine) Err() error {
	if p := e.failure.err.Load(); p != nil {
		return *p
	}
	return nil
}

// markFailed publishes err (wrapping ErrFailed) as the engine's failure,
// unless one was published before.
func (e *Engine) markFailed(err error) {
	e.failure.once.Do(func() {
		e.failure.err.Store(&err)
		close(e.failure.c)
	})
}

// Close stops the writer (requests still waiting for it get ErrClosed; a
// round in progress completes) and closes the file. It is idempotent.
// Close waits for open SnapshotReaders and View calls to finish, because
// bbolt cannot unmap the file under a reader: close them first.
func (e *Engine) Close() error {
	e.closeOnce.Do(func() {
		e.closed.Store(true)
		close(e.stopc)
		<-e.writerDone
		if err := e.wal.close(); err != nil {
			e.closeErr = fmt.Errorf("storage: close wal: %w", err)
		}
		if err := e.db.Close(); err != nil {
			e.closeErr = fmt.Errorf("storage: close: %w", err)
		}
	})
	return e.closeErr
}

// Flush asks the writer to commit the open transaction now, because a
// reader waits for the applied state it holds. It never blocks.
func (e *Engine) Flush() {
	select {
	case e.flushc <- struct{}{}:
	default:
	}
}

// AppliedC receives a value after a commit has moved the applied index
// readers see (Shard.Applied) of any shard, when nothing is waiting for an
// earlier one: raft groups whose NoWait saves returned before their round
// committed learn here that readers can see them.
func (e *Engine) AppliedC() <-chan struct{} { return e.appliedc }

// view runs fn in a bbolt read transaction, mapping a closed database to
// ErrClosed.
func (e *Engine) view(fn func(tx *bolt.Tx) error) error {
	if e.closed.Load() {
		return ErrClosed
	}
	err := e.db.View(fn)
	if errors.Is(err, berrors.ErrDatabaseNotOpen) {
		return ErrClosed
	}
	return err
}

// CreateShard creates shard id, durably, and returns it.
//
// With voters in cs the shard is bootstrapped: every initial replica gets
// the same state, a snapshot at index 1, term 1 holding cs, hard state
// {Term: 1, Commit: 1} and applied index 1, so FirstIndex is 2 and
// LastIndex 1, and no conf-change entries are needed. With an empty cs (a
// replica joining an existing group) the storage is empty (FirstIndex 1,
// LastIndex 0) and the leader will send a snapshot.
//
// It returns ErrShardExists if the shard is already on disk.
func (e *Engine) CreateShard(id uint64, cs *pb.ConfState) (*Shard, error) {
	cs = proto.Clone(pb.EnsureConfState(cs)).(*pb.ConfState)
	resp := e.do(&request{exec: func(rs *round) (response, error) {
		return rs.createShard(id, cs)
	}})
	if resp.err != nil {
		return nil, fmt.Errorf("storage: create shard %d: %w", id, resp.err)
	}
	return resp.shard, nil
}

// OpenShard returns shard id, which must be on disk (else
// ErrShardNotFound). Repeated calls return the same *Shard.
func (e *Engine) OpenShard(id uint64) (*Shard, error) {
	if e.closed.Load() {
		return nil, ErrClosed
	}
	// e.mu is held across the load so that concurrent calls load one
	// *Shard.
	e.mu.Lock()
	defer e.mu.Unlock()
	if s, ok := e.mu.shards[id]; ok {
		return s, nil
	}
	var s *Shard
	err := e.view(func(tx *bolt.Tx) error {
		b := shardBucket(tx, id)
		if b == nil {
			return ErrShardNotFound
		}
		var err error
		s, err = loadShard(e, id, b)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("storage: open shard %d: %w", id, err)
	}
	e.mu.shards[id] = s
	return s, nil
}

// GetMeta returns a copy of the node-level metadata value under key (node
// id, cluster id...), nil if absent.
func (e *Engine) GetMeta(key string) ([]byte, error) {
	var v []byte
	err := e.view(func(tx *bolt.Tx) error {
		v = bytes.Clone(tx.Bucket(bucketNode).Get([]byte(key)))
		return nil
	})
	return v, err
}

// PutMeta stores node-level metadata through the writer; it is durable
// when PutMeta returns.
func (e *Engine) PutMeta(key string, v []byte) error {
	k := []byte(key)
	if err := validKey(k); err != nil {
		return err
	}
	v = bytes.Clone(v)
	resp := e.do(&request{exec: func(rs *round) (response, error) {
		return response{}, rs.tx.Bucket(bucketNode).Put(k, v)
	}})
	return resp.err
}

// Stats returns a copy of the cumulative counters.
func (e *Engine) Stats() Stats {
	e.stats.Lock()
	defer e.stats.Unlock()
	return e.stats.s.clone()
}

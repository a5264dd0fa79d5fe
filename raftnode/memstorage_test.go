package raftnode

import (
	"errors"
	"fmt"
	"strings"
	"sync"

	"go.etcd.io/raft/v3"
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/storage"
)

// memEngine is an engine in memory for the interaction tests: what a save
// performs is durable the moment it is performed, and survives a crash of
// the Host over it (the test builds a new Host over the same memEngine).
// Every save is reported to the recorder, in order, as it happens.
//
// In held mode a SaveAll does not proceed on its own: it tells the test
// (held) and waits until the test releases it, so that the test sees what
// the loop did before the save returned, and decides when the disk
// answers, or that the node crashes first.
//
// Update.Apply takes a *storage.Txn, which only bbolt can make: the memory
// engine calls it with nil. The ApplyFunc the tests give the Host ignores
// its tx and applies to the shard the engine names in applying, which is
// set for the duration of each update's applies.
type memEngine struct {
	node uint64
	rec  *recorder

	mu       sync.Mutex
	shards   map[uint64]*memShard
	applying *memShard // the shard whose committed entries are being applied
	appliedc chan struct{}

	hold    bool          // saves wait for release
	held    chan struct{} // a save waits: the test may now release it
	release chan bool     // true: crash instead of saving
}

func newMemEngine(node uint64, rec *recorder) *memEngine {
	return &memEngine{
		node:     node,
		rec:      rec,
		shards:   make(map[uint64]*memShard),
		appliedc: make(chan struct{}, 1),
		held:     make(chan struct{}),
		release:  make(chan bool),
	}
}

var errCrashed = errors.New("memory engine: the node crashed before this save was durable")

func (e *memEngine) OpenShard(id uint64) (shardStorage, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	s, ok := e.shards[id]
	if !ok {
		return nil, fmt.Errorf("memory engine: open shard %d: %w", id, storage.ErrShardNotFound)
	}
	return s, nil
}

// CreateShard bootstraps a shard as storage.Engine.CreateShard does: with
// voters, at a snapshot of index 1 in term 1 that commits nothing but the
// configuration.
func (e *memEngine) CreateShard(id uint64, cs *pb.ConfState) (shardStorage, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, ok := e.shards[id]; ok {
		return nil, fmt.Errorf("memory engine: create shard %d: %w", id, storage.ErrShardExists)
	}
	s := &memShard{id: id, ms: raft.NewMemoryStorage(), cs: proto.CloneOf(cs), kv: map[string]string{}}
	if len(cs.GetVoters()) > 0 {
		snap := &pb.Snapshot{Metadata: &pb.SnapshotMetadata{Index: proto.Uint64(1), Term: proto.Uint64(1), ConfState: proto.CloneOf(cs)}}
		if err := s.ms.ApplySnapshot(snap); err != nil {
			return nil, err
		}
		if err := s.ms.SetHardState(&pb.HardState{Term: proto.Uint64(1), Vote: proto.Uint64(0), Commit: proto.Uint64(1)}); err != nil {
			return nil, err
		}
		s.applied, s.appliedTerm = 1, 1
	}
	e.shards[id] = s
	return s, nil
}

// SaveAll performs each update in storage.Update's order: entries, hard
// state, applies, conf state. It reports the save, and each apply as the
// ApplyFunc sees it.
func (e *memEngine) SaveAll(_ int, us []shardUpdate) []error {
	errs := make([]error, len(us))
	if e.hold {
		for _, su := range us {
			e.rec.event(e.node, "save waits: %s", describeUpdate(su.update))
		}
		e.held <- struct{}{}
		if crash := <-e.release; crash {
			for i := range errs {
				errs[i] = errCrashed
			}
			return errs
		}
	}
	applied := false
	for i, su := range us {
		s := su.shard.(*memShard)
		errs[i] = e.save(s, su.update)
		applied = applied || len(su.update.Committed) > 0
	}
	if applied {
		select {
		case e.appliedc <- struct{}{}:
		default:
		}
	}
	return errs
}

func (e *memEngine) save(s *memShard, u *storage.Update) error {
	if u.Snapshot != nil && !raft.IsEmptySnap(u.Snapshot) {
		return errors.New("memory engine: snapshots are not modelled")
	}
	e.rec.event(e.node, "persist %s", describeUpdate(u))
	if len(u.Entries) > 0 {
		if err := s.ms.Append(cloneEntries(u.Entries)); err != nil {
			return err
		}
	}
	if u.HardState != nil && !raft.IsEmptyHardState(u.HardState) {
		if err := s.ms.SetHardState(proto.CloneOf(u.HardState)); err != nil {
			return err
		}
	}
	e.mu.Lock()
	e.applying = s
	e.mu.Unlock()
	for _, ent := range u.Committed {
		if ent.GetIndex() <= s.applied {
			continue
		}
		if ent.GetType() == pb.EntryNormal && len(ent.GetData()) > 0 && u.Apply != nil {
			u.Apply(nil, ent)
		}
		s.mu.Lock()
		s.applied, s.appliedTerm = ent.GetIndex(), ent.GetTerm()
		s.mu.Unlock()
		// A waiter answered from inside the apply is reported right
		// after it.
		e.rec.scan()
	}
	e.mu.Lock()
	e.applying = nil
	e.mu.Unlock()
	if u.ConfState != nil {
		s.mu.Lock()
		s.cs = proto.CloneOf(u.ConfState)
		s.mu.Unlock()
	}
	return nil
}

// apply is the tests' ApplyFunc: "k=v" puts v at k, anything else is
// only recorded. The result names the command and its index, so a test
// sees that the answer is the one apply computed.
func (e *memEngine) apply(index uint64, cmd []byte) any {
	e.mu.Lock()
	s := e.applying
	e.mu.Unlock()
	res := fmt.Sprintf("%s@%d", cmd, index)
	if k, v, ok := strings.Cut(string(cmd), "="); ok {
		s.mu.Lock()
		s.kv[k] = v
		s.mu.Unlock()
	}
	e.rec.event(e.node, "apply %d %s", index, cmd)
	return res
}

// The memory engine is one partition.
func (e *memEngine) Partitions() int              { return 1 }
func (e *memEngine) Partition(uint64) int         { return 0 }
func (e *memEngine) AppliedC(int) <-chan struct{} { return e.appliedc }

func (e *memEngine) StageSnapshot(shard uint64, _ *pb.SnapshotMetadata, _ func() ([]*peerpb.SnapshotPair, error)) ([]byte, error) {
	return nil, fmt.Errorf("memory engine: shard %d: snapshots are not modelled", shard)
}

// memShard is one shard's durable state: the raft log, hard state and
// snapshot metadata in a raft.MemoryStorage, and the applied index,
// configuration and key-value state beside it.
type memShard struct {
	id uint64
	ms *raft.MemoryStorage

	mu                   sync.Mutex
	cs                   *pb.ConfState
	applied, appliedTerm uint64
	kv                   map[string]string
}

// InitialState returns the configuration stored with the applied index,
// as storage.Shard does, not the snapshot's.
func (s *memShard) InitialState() (*pb.HardState, *pb.ConfState, error) {
	hs, _, err := s.ms.InitialState()
	if err != nil {
		return nil, nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return proto.CloneOf(hs), proto.CloneOf(s.cs), nil
}

func (s *memShard) Entries(lo, hi, maxSize uint64) ([]*pb.Entry, error) {
	return s.ms.Entries(lo, hi, maxSize)
}
func (s *memShard) Term(i uint64) (uint64, error)   { return s.ms.Term(i) }
func (s *memShard) LastIndex() (uint64, error)      { return s.ms.LastIndex() }
func (s *memShard) FirstIndex() (uint64, error)     { return s.ms.FirstIndex() }
func (s *memShard) Snapshot() (*pb.Snapshot, error) { return s.ms.Snapshot() }

func (s *memShard) Applied() (index, term uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.applied, s.appliedTerm
}

// Compact records snapshot metadata at index and drops the log before it,
// as storage.Shard.Compact does.
func (s *memShard) Compact(index uint64) error {
	s.mu.Lock()
	applied, cs := s.applied, proto.CloneOf(s.cs)
	s.mu.Unlock()
	if index > applied {
		return fmt.Errorf("memory engine: compact %d beyond applied %d", index, applied)
	}
	if _, err := s.ms.CreateSnapshot(index, cs, nil); err != nil {
		return err
	}
	return s.ms.Compact(index)
}

// Flush has nothing to do: applied state is visible once saved.
func (s *memShard) Flush() {}

// durable describes what survives a crash.
func (s *memShard) durable() string {
	hs, _, _ := s.ms.InitialState()
	first, _ := s.ms.FirstIndex()
	last, _ := s.ms.LastIndex()
	s.mu.Lock()
	defer s.mu.Unlock()
	return fmt.Sprintf("hs %s, log %d..%d, applied %d, voters %v", raft.DescribeHardState(hs), first, last, s.applied, s.cs.GetVoters())
}

func cloneEntries(ents []*pb.Entry) []*pb.Entry {
	out := make([]*pb.Entry, len(ents))
	for i, e := range ents {
		out[i] = proto.CloneOf(e)
	}
	return out
}

// describeUpdate is one line naming what u persists and applies.
func describeUpdate(u *storage.Update) string {
	var parts []string
	if u.HardState != nil && !raft.IsEmptyHardState(u.HardState) {
		parts = append(parts, "hs "+raft.DescribeHardState(u.HardState))
	}
	if len(u.Entries) > 0 {
		ents := make([]string, len(u.Entries))
		for i, e := range u.Entries {
			ents[i] = fmt.Sprintf("%d/%d", e.GetTerm(), e.GetIndex())
		}
		parts = append(parts, "entries "+strings.Join(ents, " "))
	}
	if k := len(u.Committed); k > 0 {
		parts = append(parts, fmt.Sprintf("apply %d..%d", u.Committed[0].GetIndex(), u.Committed[k-1].GetIndex()))
	}
	if u.ConfState != nil {
		parts = append(parts, fmt.Sprintf("voters %v", u.ConfState.GetVoters()))
	}
	if u.Sync {
		parts = append(parts, "sync")
	}
	return strings.Join(parts, ", ")
}

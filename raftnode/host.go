package raftnode

import (
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	pb "go.etcd.io/raft/v3/raftpb"

	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/storage"
)

// HostConfig configures a Host.
type HostConfig struct {
	NodeID uint64
	// Store holds every replica's log, state and state machine.
	Store  *storage.Store
	Apply  ApplyFunc
	Logger *slog.Logger

	// TickInterval is the length of one Raft tick. Default 50 ms, so with
	// ElectionTick 10 a dead leader is replaced within 0.5–1 s.
	TickInterval time.Duration
	// Ticks, when set, is the host's tick source instead of a time.Ticker
	// of TickInterval: each value received is one Raft tick. Tests drive
	// it by hand, so time moves only when they say. TickInterval still
	// paces leadership checks (readindex.go).
	Ticks               <-chan time.Time
	ElectionTick        int
	HeartbeatTick       int
	SnapshotEntries     uint64
	SnapshotBytes       uint64
	MaxPendingProposals int
}

// Host runs every Raft group replica of one node over one storage engine,
// all from one goroutine (loop.go): it creates and opens shards, ticks
// them, and routes incoming messages and snapshots to them. It implements
// the transport's Handler.
type Host struct {
	cfg    HostConfig
	eng    engine // cfg.Store, or the tests' memory engine
	log    *slog.Logger
	sender Sender

	mu struct {
		sync.RWMutex
		nodes   map[uint64]*Node // by shard id
		stopped bool             // the loop has let every replica go
	}
	// lanes are the loops, one per storage partition; a replica belongs
	// to the lane of its shard's partition.
	lanes []*lane
	stopc chan struct{}
	wg    sync.WaitGroup
	once  sync.Once

	snapshotsReceived atomic.Uint64
	checks            *leaderChecks
}

// ErrUnknownShard is returned for a shard this node does not host.
var ErrUnknownShard = errors.New("raftnode: shard not hosted on this node")

// NewHost returns a Host; call Start with the transport before AddShard.
func NewHost(cfg HostConfig) *Host {
	return newHost(cfg, &boltEngine{s: cfg.Store, updates: make([][]storage.ShardUpdate, cfg.Store.Partitions())})
}

// newHost is NewHost over any engine; cfg.Store is not used.
func newHost(cfg HostConfig, eng engine) *Host {
	if cfg.TickInterval == 0 {
		cfg.TickInterval = 50 * time.Millisecond
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	h := &Host{cfg: cfg, eng: eng, log: cfg.Logger, stopc: make(chan struct{})}
	h.mu.nodes = make(map[uint64]*Node)
	for i := range eng.Partitions() {
		h.lanes = append(h.lanes, &lane{index: i, wakec: make(chan struct{}, 1)})
	}
	return h
}

// Start sets the message sender (the transport, built with this Host as
// its handler) and starts ticking. Call it before the transport can
// receive: before SetPeer, and before its gRPC server serves.
func (h *Host) Start(sender Sender) {
	h.setSender(sender)
	if h.cfg.Ticks != nil {
		h.fanOutTicks()
	}
	for _, l := range h.lanes {
		h.wg.Add(1)
		go h.run(l)
	}
}

// fanOutTicks hands each tick of cfg.Ticks to every lane, so that a test's
// tick source moves all of them; one lane takes the source as it is.
func (h *Host) fanOutTicks() {
	if len(h.lanes) == 1 {
		h.lanes[0].ticks = h.cfg.Ticks
		return
	}
	outs := make([]chan time.Time, len(h.lanes))
	for i, l := range h.lanes {
		outs[i] = make(chan time.Time)
		l.ticks = outs[i]
	}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		for {
			select {
			case <-h.stopc:
				return
			case t := <-h.cfg.Ticks:
				for _, out := range outs {
					select {
					case out <- t:
					case <-h.stopc:
						return
					}
				}
			}
		}
	}()
}

// setSender is Start without the loop goroutine: tests that step the
// host themselves (iterate) call it instead.
func (h *Host) setSender(sender Sender) {
	h.sender = sender
	// A round whose answers are lost is asked again after two ticks: long
	// past a loopback or LAN round trip, short next to a read's deadline.
	h.checks = newLeaderChecks(h.cfg.NodeID, 2*h.cfg.TickInterval, sender.SendLeaderCheck)
}

// AddShard starts the replica of shard id, opening its storage when it
// exists and creating it with voters otherwise (voters empty: a new replica
// that waits for a snapshot from the leader).
func (h *Host) AddShard(id uint64, voters []uint64) (*Node, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if n, ok := h.mu.nodes[id]; ok {
		return n, nil
	}
	if h.sender == nil {
		return nil, errors.New("raftnode: AddShard before Start")
	}
	if h.mu.stopped {
		return nil, fmt.Errorf("raftnode: add shard %d: host: %w", id, ErrStopped)
	}
	st, err := h.eng.OpenShard(id)
	if errors.Is(err, storage.ErrShardNotFound) {
		st, err = h.eng.CreateShard(id, &pb.ConfState{Voters: slices.Clone(voters)})
	}
	if err != nil {
		return nil, fmt.Errorf("raftnode: open shard %d: %w", id, err)
	}
	n, err := newNode(Config{
		NodeID:              h.cfg.NodeID,
		Shard:               id,
		Storage:             st,
		Sender:              h.sender,
		Apply:               h.cfg.Apply,
		Logger:              h.cfg.Logger,
		ElectionTick:        h.cfg.ElectionTick,
		HeartbeatTick:       h.cfg.HeartbeatTick,
		SnapshotEntries:     h.cfg.SnapshotEntries,
		SnapshotBytes:       h.cfg.SnapshotBytes,
		MaxPendingProposals: h.cfg.MaxPendingProposals,
		checks:              h.checks,
	}, h, h.lanes[h.eng.Partition(id)])
	if err != nil {
		return nil, err
	}
	h.mu.nodes[id] = n
	n.wake()
	return n, nil
}

// Node returns the replica of shard id, or nil.
func (h *Host) Node(id uint64) *Node {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.mu.nodes[id]
}

// Nodes returns every replica, ordered by shard id.
func (h *Host) Nodes() []*Node {
	h.mu.RLock()
	defer h.mu.RUnlock()
	out := make([]*Node, 0, len(h.mu.nodes))
	for _, n := range h.mu.nodes {
		out = append(out, n)
	}
	slices.SortFunc(out, func(a, b *Node) int { return cmp.Compare(a.Shard(), b.Shard()) })
	return out
}

// Stop stops the loop, which lets every replica go, and waits. Idempotent.
func (h *Host) Stop() {
	h.once.Do(func() { close(h.stopc) })
	h.wg.Wait()
}

// HandleMessage delivers a peer's message to its shard (transport Handler).
func (h *Host) HandleMessage(shard uint64, m *pb.Message) {
	if n := h.Node(shard); n != nil {
		n.Step(m)
	}
}

// HandleSnapshot stages a streamed snapshot in storage and hands Raft the
// MsgSnap with a token naming the staged data (transport Handler).
func (h *Host) HandleSnapshot(shard uint64, m *pb.Message, next func() ([]*peerpb.SnapshotPair, error)) error {
	n := h.Node(shard)
	if n == nil {
		return fmt.Errorf("%w: %d", ErrUnknownShard, shard)
	}
	snap := m.GetSnapshot()
	token, err := h.eng.StageSnapshot(shard, snap.GetMetadata(), next)
	if err != nil {
		return fmt.Errorf("raftnode: stage snapshot of shard %d: %w", shard, err)
	}
	snap.Data = token
	h.snapshotsReceived.Add(1)
	h.log.Info("received snapshot", "shard", shard, "from", m.GetFrom(),
		"index", snap.GetMetadata().GetIndex(), "term", snap.GetMetadata().GetTerm())
	n.Step(m)
	return nil
}

// SnapshotsReceived counts snapshots staged for this node's replicas.
func (h *Host) SnapshotsReceived() uint64 { return h.snapshotsReceived.Load() }

// HandleLeaderCheck answers a peer's leadership check with this node's
// term of each shard asked, or takes the answer to one of ours (transport
// Handler). It reads only published state, so it wakes no replica.
func (h *Host) HandleLeaderCheck(from uint64, c *peerpb.LeaderCheck) {
	if c.GetReply() {
		h.checks.answer(from, c)
		return
	}
	terms := make([]uint64, len(c.GetShards()))
	h.mu.RLock()
	for i, shard := range c.GetShards() {
		if n := h.mu.nodes[shard]; n != nil {
			terms[i] = n.term.Load()
		}
	}
	h.mu.RUnlock()
	h.sender.SendLeaderCheck(from, &peerpb.LeaderCheck{Id: c.GetId(), Reply: true, Terms: terms})
}

// LeaderCheckRounds counts the leadership-check rounds this node started:
// one confirms the reads of every shard it leads that were waiting.
func (h *Host) LeaderCheckRounds() uint64 { return h.checks.started.Load() }

// ReportUnreachable implements the transport Handler.
func (h *Host) ReportUnreachable(shard, peer uint64) {
	if n := h.Node(shard); n != nil {
		n.ReportUnreachable(peer)
	}
}

// ReportSnapshot implements the transport Handler.
func (h *Host) ReportSnapshot(shard, peer uint64, failed bool) {
	if n := h.Node(shard); n != nil {
		n.ReportSnapshot(peer, failed)
	}
}

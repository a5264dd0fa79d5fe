package raftnode

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/raft/v3"
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/storage"
)

// Sender hands Raft messages to the transport. Send must not block.
type Sender interface {
	Send(shard uint64, msgs []*pb.Message)
	// SendLeaderCheck sends a leadership check (readindex.go) to a peer.
	// It must not block; a lost check is asked again.
	SendLeaderCheck(to uint64, c *peerpb.LeaderCheck)
}

// ApplyFunc applies one committed command to the shard state. It runs on the
// storage writer goroutine inside the write transaction, so it must be
// deterministic: no clocks, no randomness, no map order, no local settings.
// The returned value is handed to the proposer, if it is still waiting, as
// it is: never encoded, and never read by raftnode.
type ApplyFunc func(tx *storage.Txn, index uint64, cmd []byte) any

// Config configures one Raft group replica.
type Config struct {
	NodeID  uint64
	Shard   uint64
	Storage shardStorage
	Sender  Sender
	Apply   ApplyFunc
	Logger  *slog.Logger

	// ElectionTick and HeartbeatTick are in ticks (see Host.TickInterval).
	// Every setting below is required (server.DefaultConfig has kvd's).
	ElectionTick  int
	HeartbeatTick int
	// SnapshotEntries is how many applied entries beyond the last compaction
	// trigger the next one.
	SnapshotEntries uint64
	// SnapshotBytes triggers a compaction as well once the entries applied
	// since the last one carry this many bytes of commands. Default
	// 64 MiB. By count alone, a shard taking transactions of 1 MiB kept
	// up to 10,000 of them, gigabytes of log in the node's file.
	SnapshotBytes uint64
	// MaxPendingProposals bounds proposals waiting for apply; beyond it
	// Propose fails fast with ErrBusy.
	MaxPendingProposals int

	// checks, set by a Host, confirms leadership for ReadIndex across the
	// host's shards (readindex.go); nil uses raft's round per read batch.
	checks *leaderChecks
}

// check refuses a configuration with a setting left out. raftnode has no
// defaults of its own: its caller (server.Config) owns them, so a replica
// never runs with timing other than the node was configured with.
func (c *Config) check() error {
	switch {
	case c.HeartbeatTick < 1 || c.ElectionTick <= c.HeartbeatTick:
		return fmt.Errorf("raftnode: shard %d: election tick %d must exceed heartbeat tick %d, which must be at least 1", c.Shard, c.ElectionTick, c.HeartbeatTick)
	case c.SnapshotEntries == 0 || c.SnapshotBytes == 0:
		return fmt.Errorf("raftnode: shard %d: snapshot entries and bytes must be set", c.Shard)
	case c.MaxPendingProposals < 1:
		return fmt.Errorf("raftnode: shard %d: max pending proposals must be at least 1", c.Shard)
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// Node is one Raft group replica. Its Host's loop goroutine (loop.go) owns
// the RawNode and st; every other goroutine reaches it through channels,
// and every send also selects on the node's stop channel and the caller's
// context, then wakes the loop.
type Node struct {
	cfg  Config
	log  *slog.Logger
	host *Host
	lane *lane // the host loop that owns the node
	st   *loopState
	// woken is set while the node is on its lane's list of nodes to visit.
	woken atomic.Bool

	propc  chan *proposal
	readc  chan *readWaiter
	recvc  chan *pb.Message
	funcc  chan func(*raft.RawNode)
	stopc  chan struct{}
	donec  chan struct{}
	stopMu sync.Once

	// Published by the loop goroutine for lock-free readers (routing,
	// metrics, status). They may lag the RawNode by one loop iteration.
	leader  atomic.Uint64
	term    atomic.Uint64
	commit  atomic.Uint64
	applied atomic.Uint64
	pending atomic.Int64
	// readyTerm is the term in which this replica, as leader, has seen an
	// entry of its own term commit; 0 when it does not lead.
	readyTerm atomic.Uint64
	// conf is the configuration applied last: the voters a leadership
	// check asks.
	conf atomic.Pointer[pb.ConfState]

	errMu sync.Mutex
	err   error // why the node stopped, if not by Stop

	stats Stats
}

// Stats counts a node's batching; read with the accessor methods.
type Stats struct {
	Proposals    atomic.Uint64 // proposals accepted by Raft
	ProposeBatch atomic.Uint64 // Ready rounds that carried new local entries
	Reads        atomic.Uint64 // linearizable reads served
	ReadRounds   atomic.Uint64 // raft's own ReadIndex rounds issued (see readindex.go)
	Compactions  atomic.Uint64
	// LeaderChanges counts changes of the leader this replica knows of
	// (including to "none").
	LeaderChanges atomic.Uint64
}

// Errors returned by Node methods.
var (
	ErrStopped = errors.New("raftnode: stopped")
	// ErrNotLeader is wrapped by *NotLeaderError.
	ErrNotLeader = errors.New("raftnode: not leader")
	// ErrLeadershipLost means the outcome is unknown: the entry may still
	// commit under the next leader. Callers retry with the same session and
	// sequence number, which the state machine deduplicates.
	ErrLeadershipLost = errors.New("raftnode: leadership lost; outcome unknown")
	ErrBusy           = errors.New("raftnode: too many pending proposals")
	// ErrLogBehind means the shard's log on this node ends before entries
	// this node had acknowledged (its hard state commits them, or the
	// group's leader does): its storage lost writes. Raft cannot run such a
	// replica; it must be removed and added back as a new member.
	ErrLogBehind = errors.New("raftnode: log lost entries this node had acknowledged")
	// ErrBadState means the raft state on disk contradicts itself (commit
	// or applied index outside the log, a snapshot that is not where the
	// log starts).
	ErrBadState = errors.New("raftnode: inconsistent raft state on disk")
	// ErrRaftPanic means the raft library panicked while this replica was
	// processed, on a broken invariant; the replica stopped, the node's
	// other replicas did not.
	ErrRaftPanic = errors.New("raftnode: raft group failed")
)

// rejoinAdvice is what to do with a replica whose storage lost entries.
const rejoinAdvice = "the node cannot serve this shard from this data: stop it, remove its data directory, and start it again with a new --id and --join to add it back to the cluster as a new member (its replicas catch up from the others)"

// NotLeaderError says which node leads the shard, when known (Leader 0).
type NotLeaderError struct {
	Shard, Leader uint64
}

func (e *NotLeaderError) Error() string {
	if e.Leader == 0 {
		return fmt.Sprintf("raftnode: shard %d has no known leader", e.Shard)
	}
	return fmt.Sprintf("raftnode: not leader of shard %d; leader is node %d", e.Shard, e.Leader)
}

func (e *NotLeaderError) Unwrap() error { return ErrNotLeader }

type result struct {
	value any // what ApplyFunc returned; nil for conf changes
	err   error
}

type proposal struct {
	id   uint64
	data []byte         // command, nil for conf changes
	cc   pb.ConfChangeI // set for conf changes
	done chan result    // buffered 1: the loop goroutine never blocks on it
}

type readWaiter struct {
	// index, once set, is the commit index the read waits to see
	// applied. A read whose leadership check confirmed it arrives with
	// it set (a leader's commit index is never 0); the others wait for
	// raft's ReadIndex round to set it.
	index uint64
	done  chan error // buffered 1
}

// newNode opens a RawNode over cfg.Storage, for h's loop to run. The
// storage must already hold the group's initial state
// (storage.Engine.CreateShard).
func newNode(cfg Config, h *Host, l *lane) (*Node, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	applied, _ := cfg.Storage.Applied()
	hs, cs, err := cfg.Storage.InitialState()
	if err != nil {
		return nil, fmt.Errorf("raftnode: shard %d: initial state: %w", cfg.Shard, err)
	}
	if err := checkRecoverable(cfg.Shard, cfg.Storage, hs, applied); err != nil {
		return nil, err
	}
	rn, err := raft.NewRawNode(&raft.Config{
		ID:                        cfg.NodeID,
		ElectionTick:              cfg.ElectionTick,
		HeartbeatTick:             cfg.HeartbeatTick,
		Storage:                   cfg.Storage,
		Applied:                   applied,
		MaxSizePerMsg:             1 << 20,
		MaxCommittedSizePerReady:  4 << 20,
		MaxUncommittedEntriesSize: 16 << 20,
		MaxInflightMsgs:           256,
		// Bytes, not only messages, bound what a leader has in flight to
		// each follower: with 1 MiB appends, 256 messages alone would let
		// one slow follower pin 256 MiB per shard.
		MaxInflightBytes: 8 << 20,
		CheckQuorum:      true,
		PreVote:          true,
		ReadOnlyOption:   raft.ReadOnlySafe,
		// Followers refuse proposals instead of forwarding them, so a
		// proposal is either tracked by this node's leader or rejected at
		// once with a hint; the server routes clients to the leader.
		DisableProposalForwarding: true,
		StepDownOnRemoval:         true,
		Logger:                    newRaftLogger(cfg.Logger.With("shard", cfg.Shard)),
	})
	if err != nil {
		return nil, fmt.Errorf("raftnode: shard %d: %w", cfg.Shard, err)
	}
	n := &Node{
		cfg:   cfg,
		log:   cfg.Logger.With("shard", cfg.Shard, "node", cfg.NodeID),
		host:  h,
		lane:  l,
		propc: make(chan *proposal, 1024),
		readc: make(chan *readWaiter, 1024),
		recvc: make(chan *pb.Message, 4096),
		funcc: make(chan func(*raft.RawNode), 64),
		stopc: make(chan struct{}),
		donec: make(chan struct{}),
	}
	n.applied.Store(applied)
	// A replica answers leadership checks with its term from the start,
	// not only after its first Ready.
	n.term.Store(hs.GetTerm())
	n.commit.Store(hs.GetCommit())
	n.conf.Store(cs)
	n.st = newLoopState(n, rn)
	return n, nil
}

// checkRecoverable checks that the stored log can satisfy the hard state
// and the applied index, as raft.NewRawNode requires: it panics
// otherwise. A log behind its hard state's commit index lost entries this
// node had acknowledged (a damaged or lost write-ahead log).
func checkRecoverable(shard uint64, s shardStorage, hs *pb.HardState, applied uint64) error {
	first, err := s.FirstIndex()
	if err != nil {
		return fmt.Errorf("raftnode: shard %d: first index: %w", shard, err)
	}
	last, err := s.LastIndex()
	if err != nil {
		return fmt.Errorf("raftnode: shard %d: last index: %w", shard, err)
	}
	snap, err := s.Snapshot()
	if err != nil {
		return fmt.Errorf("raftnode: shard %d: snapshot: %w", shard, err)
	}
	commit := hs.GetCommit()
	switch {
	case commit > last || applied > last:
		return fmt.Errorf("%w: shard %d: its hard state commits index %d and %d is applied, but its log ends at index %d; %s",
			ErrLogBehind, shard, commit, applied, last, rejoinAdvice)
	case snap.GetMetadata().GetIndex() != first-1:
		return fmt.Errorf("%w: shard %d: snapshot at index %d, but the log starts at %d; %s",
			ErrBadState, shard, snap.GetMetadata().GetIndex(), first, rejoinAdvice)
	case !raft.IsEmptyHardState(hs) && commit < first-1:
		return fmt.Errorf("%w: shard %d: hard state commits index %d, below its snapshot at %d; %s",
			ErrBadState, shard, commit, first-1, rejoinAdvice)
	case applied > 0 && (applied < first-1 || applied > commit):
		return fmt.Errorf("%w: shard %d: applied index %d outside [%d, %d] (snapshot, commit); %s",
			ErrBadState, shard, applied, first-1, commit, rejoinAdvice)
	}
	return nil
}

// Shard returns the group's shard id.
func (n *Node) Shard() uint64 { return n.cfg.Shard }

// Leader returns the node id of the current leader as last seen, or 0.
func (n *Node) Leader() uint64 { return n.leader.Load() }

// IsLeader reports whether this replica leads its group, as last seen.
func (n *Node) IsLeader() bool { return n.leader.Load() == n.cfg.NodeID }

// Term, Commit and Applied are the last published values.
func (n *Node) Term() uint64    { return n.term.Load() }
func (n *Node) Commit() uint64  { return n.commit.Load() }
func (n *Node) Applied() uint64 { return n.applied.Load() }

// PendingProposals is the number of proposals waiting for apply.
func (n *Node) PendingProposals() int64 { return n.pending.Load() }

// Stats returns the node's counters.
func (n *Node) Stats() *Stats { return &n.stats }

// Done is closed when the node has stopped, by Stop or by a fatal error.
func (n *Node) Done() <-chan struct{} { return n.donec }

// Err returns why the node stopped on its own (a storage failure), or nil.
func (n *Node) Err() error {
	n.errMu.Lock()
	defer n.errMu.Unlock()
	return n.err
}

// Stop stops the node and waits until its host's loop has let it go.
// Idempotent.
func (n *Node) Stop() {
	n.stopMu.Do(func() { close(n.stopc) })
	n.wake()
	<-n.donec
}

// Step delivers a message from a peer. It never blocks; when the inbox is
// full the message is dropped, which Raft tolerates like network loss.
func (n *Node) Step(m *pb.Message) {
	select {
	case n.recvc <- m:
		n.wake()
	default:
	}
}

// ReportUnreachable tells Raft that sending to peer failed.
func (n *Node) ReportUnreachable(peer uint64) {
	n.do(func(rn *raft.RawNode) { rn.ReportUnreachable(peer) }, false)
}

// ReportSnapshot tells Raft how sending a snapshot to peer ended. It must not
// be lost (the peer's progress stays paused until it is reported), so when
// the queue is full a goroutine waits for room; the caller never waits:
// the transport reports a snapshot it could not queue from inside Send,
// on the loop goroutine, which is the one that empties the queue.
func (n *Node) ReportSnapshot(peer uint64, failed bool) {
	st := raft.SnapshotFinish
	if failed {
		st = raft.SnapshotFailure
	}
	n.do(func(rn *raft.RawNode) { rn.ReportSnapshot(peer, st) }, true)
}

// do queues f to run on the loop goroutine without blocking. When the
// queue is full, f is dropped, or, if it must not be lost, queued by a
// goroutine that waits for room until the node stops.
func (n *Node) do(f func(*raft.RawNode), mustRun bool) {
	select {
	case n.funcc <- f:
		n.wake()
		return
	default:
	}
	if !mustRun {
		return
	}
	go func() {
		select {
		case n.funcc <- f:
			n.wake()
		case <-n.stopc:
		case <-n.donec:
		}
	}()
}

// Status returns the full Raft status, read on the loop goroutine.
func (n *Node) Status(ctx context.Context) (raft.Status, error) {
	ch := make(chan raft.Status, 1)
	if err := n.send(ctx, n.funcc, func(rn *raft.RawNode) { ch <- rn.Status() }); err != nil {
		return raft.Status{}, err
	}
	select {
	case st := <-ch:
		return st, nil
	case <-ctx.Done():
		return raft.Status{}, ctx.Err()
	case <-n.donec:
		return raft.Status{}, ErrStopped
	}
}

// Compact snapshots the shard at its applied index and drops the log
// before it, now rather than when SnapshotEntries is reached. A leader does
// this before adding a replica: a new replica starts with no configuration,
// so it must catch up from a snapshot, which carries the voters, and never
// by replaying the log from index 1, which would leave the voters it was
// bootstrapped with out of its configuration.
func (n *Node) Compact(ctx context.Context) error {
	errc := make(chan error, 1)
	if err := n.send(ctx, n.funcc, func(*raft.RawNode) {
		applied, _ := n.cfg.Storage.Applied()
		err := n.cfg.Storage.Compact(applied)
		if errors.Is(err, raft.ErrCompacted) {
			err = nil // already compacted at this index
		}
		errc <- err
	}); err != nil {
		return err
	}
	select {
	case err := <-errc:
		if err != nil {
			return fmt.Errorf("raftnode: compact shard %d: %w", n.cfg.Shard, err)
		}
		n.stats.Compactions.Add(1)
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-n.donec:
		return ErrStopped
	}
}

// Campaign makes this replica start an election (tests and leadership
// balancing).
func (n *Node) Campaign(ctx context.Context) error {
	return n.send(ctx, n.funcc, func(rn *raft.RawNode) { _ = rn.Campaign() })
}

// TransferLeadership asks the current leader (this node) to hand leadership
// to transferee, and waits until this replica sees transferee as the
// shard's leader or ctx ends; a transfer that raft drops (transferee
// behind, another election) therefore ends with ctx's error.
func (n *Node) TransferLeadership(ctx context.Context, transferee uint64) error {
	if err := n.send(ctx, n.funcc, func(rn *raft.RawNode) { rn.TransferLeader(transferee) }); err != nil {
		return err
	}
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		if l := n.leader.Load(); l == transferee {
			return nil
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return fmt.Errorf("raftnode: transfer leadership of shard %d to %d: %w", n.cfg.Shard, transferee, ctx.Err())
		case <-n.donec:
			return ErrStopped
		}
	}
}

// Propose replicates cmd and returns the state machine's result once it has
// applied on this node. On a follower it fails fast with *NotLeaderError.
func (n *Node) Propose(ctx context.Context, cmd []byte) (any, error) {
	p := &proposal{data: cmd, done: make(chan result, 1)}
	return n.wait(ctx, p)
}

// ProposeConfChange replicates a membership change and waits until it has
// applied on this node.
func (n *Node) ProposeConfChange(ctx context.Context, cc pb.ConfChangeI) error {
	p := &proposal{cc: cc, done: make(chan result, 1)}
	_, err := n.wait(ctx, p)
	return err
}

func (n *Node) wait(ctx context.Context, p *proposal) (any, error) {
	if err := send(ctx, n, n.propc, p); err != nil {
		return nil, err
	}
	select {
	case r := <-p.done:
		return r.value, r.err
	case <-ctx.Done():
		// The proposal stays tracked; its result is dropped into the
		// buffered channel when it applies.
		return nil, ctx.Err()
	case <-n.donec:
		select {
		case r := <-p.done:
			return r.value, r.err
		default:
			return nil, ErrStopped
		}
	}
}

// ReadIndex waits until this replica (the leader) has confirmed its
// leadership with a quorum and applied everything committed before the
// call: a read of local state afterwards is linearizable. Concurrent calls
// share rounds: on a Host, one round for all its shards (readindex.go).
func (n *Node) ReadIndex(ctx context.Context) error {
	var index uint64 // confirmed commit index, 0 for raft's round
	if n.cfg.checks != nil {
		if term, commit, voters, ok := n.readIndexTarget(); ok {
			switch err := n.cfg.checks.confirm(ctx, n, term, voters); {
			case err == nil:
				if n.applied.Load() >= commit {
					n.stats.Reads.Add(1)
					return nil
				}
				index = commit
			case !errors.Is(err, errUnconfirmed):
				return err
			}
		}
	}
	w := &readWaiter{index: index, done: make(chan error, 1)}
	if err := send(ctx, n, n.readc, w); err != nil {
		return err
	}
	select {
	case err := <-w.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	case <-n.donec:
		return ErrStopped
	}
}

func (n *Node) send(ctx context.Context, ch chan func(*raft.RawNode), f func(*raft.RawNode)) error {
	return send(ctx, n, ch, f)
}

func send[T any](ctx context.Context, n *Node, ch chan T, v T) error {
	select {
	case ch <- v:
		n.wake()
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-n.stopc:
		return ErrStopped
	case <-n.donec:
		return ErrStopped
	}
}

// idPrefixLen is the size of the proposal id that prefixes every normal
// entry's data. The id lets the leader match an applied entry to the
// waiting proposal; apply strips it, so it never affects state.
const idPrefixLen = 8

func decodeEntry(data []byte) (id uint64, cmd []byte, ok bool) {
	if len(data) < idPrefixLen {
		return 0, nil, false
	}
	return binary.BigEndian.Uint64(data), data[idPrefixLen:], true
}

// applyEntry runs the ApplyFunc on e's command, without its proposal id.
func (n *Node) applyEntry(tx *storage.Txn, e *pb.Entry) any {
	_, cmd, ok := decodeEntry(e.GetData())
	if !ok {
		return nil
	}
	return n.cfg.Apply(tx, e.GetIndex(), cmd)
}

// loopState is a node's part of its host's loop, owned by the loop
// goroutine.
type loopState struct {
	rn        *raft.RawNode
	nextID    uint64
	proposals map[uint64]*proposal
	// proposals drained this iteration, and their entries, not yet given
	// to raft (see flushProposals).
	batch        []*proposal
	batchEntries []*pb.Entry
	// reads waiting for the next ReadIndex round, and rounds in flight keyed
	// by their request context.
	readsQueued []*readWaiter
	readRounds  map[uint64][]*readWaiter
	nextRound   uint64
	// reads whose round returned an index not yet applied.
	readsWaiting []*readWaiter
	lastCompact  uint64
	// logBytes is the command bytes of the entries applied since the last
	// compaction (counted from this start: a restart begins again at 0).
	logBytes uint64
	isLeader bool
	// applied is the last index handed to storage to apply; readers see
	// it (n.applied) once its round commits.
	applied uint64

	// visiting: the node is on the loop's list this iteration; done: the
	// loop has let it go (stopped, or failed to persist).
	visiting, done bool
}

func newLoopState(n *Node, rn *raft.RawNode) *loopState {
	st := &loopState{
		rn:         rn,
		proposals:  make(map[uint64]*proposal),
		readRounds: make(map[uint64][]*readWaiter),
		// A time-based start keeps ids unique across restarts, so an entry
		// proposed before a crash never matches a proposal made after it.
		nextID: uint64(time.Now().UnixNano()),
	}
	st.lastCompact, _ = n.cfg.Storage.FirstIndex()
	if st.lastCompact > 0 {
		st.lastCompact--
	}
	st.applied = n.applied.Load()
	return st
}

// wake puts the node on its host's list of nodes to visit, after a send
// to one of its channels.
func (n *Node) wake() {
	if n.woken.CompareAndSwap(false, true) {
		n.host.wake(n)
	}
}

// takeInput steps everything queued for the node into raft, so that one
// Ready (one storage round, one message batch) carries as much as
// possible. Once Stop was called, it lets the node go instead.
func (n *Node) takeInput() {
	st := n.st
	select {
	case <-n.stopc:
		n.halt(nil)
		return
	default:
	}
	n.drain()
	n.flushProposals()
	// One ReadIndex round at a time: reads that arrive while a round is
	// in flight share the next one, so a burst of reads costs a couple
	// of quorum round trips, not one each.
	if len(st.readsQueued) > 0 && len(st.readRounds) == 0 {
		n.startReadRound()
	}
}

// halt lets the node go: everything waiting on it fails with ErrStopped,
// and err, when the node could not persist, is what Err reports.
func (n *Node) halt(err error) {
	if err != nil {
		n.log.Error("raft node stopping: cannot persist", "err", err)
	}
	n.stop(err)
}

// stop is halt without its log line.
func (n *Node) stop(err error) {
	if err != nil {
		n.errMu.Lock()
		n.err = err
		n.errMu.Unlock()
	}
	n.failAll(ErrStopped)
	// A replica let go leads nothing, whatever it last published.
	n.leader.Store(0)
	n.readyTerm.Store(0)
	n.st.done = true
	close(n.donec)
}

// afterApply publishes the applied index readers can see, releases the
// reads it satisfies and compacts the log when due.
func (n *Node) afterApply() error {
	st := n.st
	visible, _ := n.cfg.Storage.Applied()
	n.applied.Store(visible)
	n.releaseReads()
	for _, w := range st.readsWaiting {
		if w.index <= st.applied {
			// A read waits for entries applied in the storage's open
			// transaction: commit it now rather than at its interval.
			n.cfg.Storage.Flush()
			break
		}
	}
	return n.maybeCompact()
}

func (n *Node) drain() {
	st := n.st
	for i := 0; i < 4096; i++ {
		select {
		case m := <-n.recvc:
			n.step(st.rn, m)
		case p := <-n.propc:
			n.propose(p)
		case w := <-n.readc:
			n.queueRead(w)
		case f := <-n.funcc:
			// Proposals drained before f reach raft before it, as they
			// did one by one: a leadership transfer must not drop them.
			n.flushProposals()
			f(st.rn)
		default:
			return
		}
	}
}

func (n *Node) queueRead(w *readWaiter) {
	st := n.st
	if w.index > 0 {
		st.readsWaiting = append(st.readsWaiting, w)
	} else {
		st.readsQueued = append(st.readsQueued, w)
	}
}

func (n *Node) step(rn *raft.RawNode, m *pb.Message) {
	if err := rn.Step(m); err != nil && !errors.Is(err, raft.ErrStepPeerNotFound) {
		n.log.Debug("step", "type", m.GetType(), "from", m.GetFrom(), "err", err)
	}
}

func (n *Node) propose(p *proposal) {
	st := n.st
	if !st.isLeader {
		p.done <- result{err: &NotLeaderError{Shard: n.cfg.Shard, Leader: n.leader.Load()}}
		return
	}
	if len(st.proposals)+len(st.batch) >= n.cfg.MaxPendingProposals {
		p.done <- result{err: ErrBusy}
		return
	}
	st.nextID++
	p.id = st.nextID
	if p.cc == nil {
		data := make([]byte, idPrefixLen+len(p.data))
		binary.BigEndian.PutUint64(data, p.id)
		copy(data[idPrefixLen:], p.data)
		st.batch = append(st.batch, p)
		st.batchEntries = append(st.batchEntries, &pb.Entry{Data: data})
		return
	}
	n.flushProposals() // keep proposal order
	cc := proto.CloneOf(p.cc.AsV2())
	cc.Context = make([]byte, idPrefixLen)
	binary.BigEndian.PutUint64(cc.Context, p.id)
	n.proposed([]*proposal{p}, st.rn.ProposeConfChange(cc))
}

// flushProposals gives raft every normal proposal drained this loop
// iteration as ONE MsgProp. Raft sends a leader's new entries to each
// follower once per MsgProp it steps, so proposing them one by one cost
// a MsgApp per proposal per follower (and a MsgAppResp back, and often
// an empty MsgApp to advance the commit index), however many shared the
// Ready (498017d).
func (n *Node) flushProposals() {
	st := n.st
	if len(st.batch) == 0 {
		return
	}
	err := st.rn.Step(&pb.Message{
		Type:    pb.MsgProp.Enum(),
		From:    proto.Uint64(n.cfg.NodeID),
		Entries: st.batchEntries,
	})
	n.proposed(st.batch, err)
	clear(st.batch)
	st.batch, st.batchEntries = st.batch[:0], nil // raft keeps the entries
}

// proposed records ps as waiting for their entries, or answers them with
// err when raft refused them.
func (n *Node) proposed(ps []*proposal, err error) {
	st := n.st
	if err != nil {
		if errors.Is(err, raft.ErrProposalDropped) {
			// Dropped by a leader in transfer, or over the uncommitted
			// size limit: both mean "not now".
			err = ErrBusy
		}
		err = fmt.Errorf("raftnode: propose on shard %d: %w", n.cfg.Shard, err)
		for _, p := range ps {
			p.done <- result{err: err}
		}
		return
	}
	for _, p := range ps {
		st.proposals[p.id] = p
	}
	n.pending.Store(int64(len(st.proposals)))
	n.stats.Proposals.Add(uint64(len(ps)))
}

func (n *Node) startReadRound() {
	st := n.st
	if !st.isLeader {
		err := &NotLeaderError{Shard: n.cfg.Shard, Leader: n.leader.Load()}
		for _, w := range st.readsQueued {
			w.done <- err
		}
		st.readsQueued = nil
		return
	}
	st.nextRound++
	rctx := make([]byte, 8)
	binary.BigEndian.PutUint64(rctx, st.nextRound)
	st.readRounds[st.nextRound] = st.readsQueued
	st.readsQueued = nil
	st.rn.ReadIndex(rctx)
	n.stats.ReadRounds.Add(1)
}

// dropCoveredCommits drops from msgs each append without entries that a
// later append with entries to the same peer makes redundant, by carrying
// a commit index at least as high. A leader whose commit index moves sends
// every follower such an empty append, only to tell it the new commit
// index; when the same Ready also sends that follower new entries
// (acknowledgements and proposals arrived in the same loop iteration, as
// under load they do), the second append tells it as well. Dropping the
// first saves the message and the follower's answer to it. Raft tolerates
// lost messages, so dropping one is always safe; this drops only those
// whose content arrives anyway, in the same batch. msgs is the caller's
// (raft gives up a Ready's messages), so it is compacted in place.
func dropCoveredCommits(msgs []*pb.Message) []*pb.Message {
	// For each peer, the highest commit index an append with entries
	// later in msgs carries; a node has a handful of peers.
	type carried struct{ to, commit uint64 }
	var buf [4]carried
	later := buf[:0]
	var drop []bool
	for i := len(msgs) - 1; i >= 0; i-- {
		m := msgs[i]
		if m.GetType() != pb.MsgApp {
			continue
		}
		j := slices.IndexFunc(later, func(c carried) bool { return c.to == m.GetTo() })
		switch {
		case len(m.GetEntries()) > 0 && j < 0:
			later = append(later, carried{m.GetTo(), m.GetCommit()})
		case len(m.GetEntries()) > 0:
			later[j].commit = max(later[j].commit, m.GetCommit())
		case j >= 0 && later[j].commit >= m.GetCommit():
			if drop == nil {
				drop = make([]bool, len(msgs))
			}
			drop[i] = true
		}
	}
	if drop == nil {
		return msgs
	}
	kept := msgs[:0]
	for i, m := range msgs {
		if !drop[i] {
			kept = append(kept, m)
		}
	}
	clear(msgs[len(kept):])
	return kept
}

// pendingReady is a node's Ready from takeReady to finishReady: its
// storage update (nil when it has nothing to persist) is saved in between,
// with the other nodes' of the same loop iteration.
type pendingReady struct {
	n         *Node
	rd        raft.Ready
	u         *storage.Update
	waiting   []*proposal
	answered  []bool
	sentEarly bool
}

// takeReady takes the node's Ready and prepares its storage update.
func (n *Node) takeReady() (*pendingReady, error) {
	st := n.st
	rn := st.rn
	rd := rn.Ready()

	if rd.SoftState != nil {
		if old := n.leader.Swap(rd.SoftState.Lead); old != rd.SoftState.Lead {
			n.stats.LeaderChanges.Add(1)
		}
		wasLeader := st.isLeader
		st.isLeader = rd.SoftState.RaftState == raft.StateLeader
		if wasLeader && !st.isLeader {
			n.readyTerm.Store(0)
			n.failAll(ErrLeadershipLost)
		}
	}
	if hs := rd.HardState; hs != nil && !raft.IsEmptyHardState(hs) {
		n.term.Store(hs.GetTerm())
		n.commit.Store(hs.GetCommit())
	}

	// Membership changes take effect in Raft now; the resulting ConfState
	// is stored atomically with the applied index below.
	var cs *pb.ConfState
	for _, e := range rd.CommittedEntries {
		switch e.GetType() {
		case pb.EntryConfChange:
			var cc pb.ConfChange
			if err := proto.Unmarshal(e.GetData(), &cc); err != nil {
				return nil, fmt.Errorf("shard %d: decode conf change at %d: %w", n.cfg.Shard, e.GetIndex(), err)
			}
			cs = rn.ApplyConfChange(&cc)
		case pb.EntryConfChangeV2:
			var cc pb.ConfChangeV2
			if err := proto.Unmarshal(e.GetData(), &cc); err != nil {
				return nil, fmt.Errorf("shard %d: decode conf change at %d: %w", n.cfg.Shard, e.GetIndex(), err)
			}
			cs = rn.ApplyConfChange(&cc)
		}
	}
	// The configuration the leadership checks ask: a snapshot's, then that
	// of the conf changes committed after it.
	if snap := rd.Snapshot; snap != nil && !raft.IsEmptySnap(snap) {
		n.conf.Store(snap.GetMetadata().GetConfState())
	}
	if cs != nil {
		n.conf.Store(cs)
	}

	// The proposals waiting for these entries are answered from inside
	// the write transaction, as soon as their result is computed, not
	// after the transaction's fsync: the entries are already durable on a
	// quorum, and a crash before this commit replays them to the same
	// result. Reads are unaffected: ReadIndex waits on n.applied, which
	// moves only after the commit.
	waiting, answered := n.waitingFor(rd.CommittedEntries)
	apply := func(tx *storage.Txn, e *pb.Entry) { n.applyEntry(tx, e) }
	if waiting != nil {
		first := rd.CommittedEntries[0].GetIndex()
		apply = func(tx *storage.Txn, e *pb.Entry) {
			res := n.applyEntry(tx, e)
			if i := e.GetIndex() - first; waiting[i] != nil {
				waiting[i].done <- result{value: res}
				answered[i] = true
			}
		}
	}
	u := &storage.Update{
		Entries:   rd.Entries,
		Committed: rd.CommittedEntries,
		ConfState: cs,
		Apply:     apply,
		Sync:      rd.MustSync,
		// Applying committed entries need not wait for its commit: they
		// are durable in the log (a crash replays them to the same
		// result), so the loop goes on to the next Ready, whose append
		// may share the commit. Storage decides which updates qualify.
		NoWait: true,
	}
	if rd.HardState != nil && !raft.IsEmptyHardState(rd.HardState) {
		u.HardState = rd.HardState
	}
	if rd.Snapshot != nil && !raft.IsEmptySnap(rd.Snapshot) {
		u.Snapshot = rd.Snapshot
	}
	// A leader may send before its own write is durable (Raft thesis
	// §10.2.1): its appends then reach the followers while it syncs, so
	// its fsync and theirs overlap instead of adding up. A leader counts
	// its own entry toward a quorum only after Advance, so nothing commits
	// on the strength of an entry it has not persisted. Everyone else
	// must persist first: a follower's MsgAppResp or vote promises it.
	rd.Messages = dropCoveredCommits(rd.Messages)
	pr := &pendingReady{n: n, rd: rd, waiting: waiting, answered: answered}
	pr.sentEarly = st.isLeader && len(rd.Messages) > 0
	if pr.sentEarly {
		n.cfg.Sender.Send(n.cfg.Shard, rd.Messages)
	}
	if len(u.Entries) > 0 || len(u.Committed) > 0 || u.HardState != nil || u.Snapshot != nil {
		pr.u = u
	}
	return pr, nil
}

// finishReady completes pr once its update was saved (saveErr, when it
// was not): it sends what had to wait for the save, answers proposals and
// reads, and advances raft.
func (n *Node) finishReady(pr *pendingReady, saveErr error) error {
	st, rn, rd, u, waiting, answered := n.st, n.st.rn, pr.rd, pr.u, pr.waiting, pr.answered
	if saveErr != nil {
		// Proposals answered from inside the failed round stay answered
		// (their entries are committed); forget them so the stop path
		// does not answer them twice.
		for i, p := range waiting {
			if p != nil && answered[i] {
				delete(st.proposals, p.id)
			}
		}
		return fmt.Errorf("shard %d: save: %w", n.cfg.Shard, saveErr)
	}
	if len(rd.Entries) > 0 && st.isLeader {
		n.stats.ProposeBatch.Add(1)
	}

	// Only now, with entries and hard state durable, may messages that
	// depend on them leave.
	if len(rd.Messages) > 0 && !pr.sentEarly {
		n.cfg.Sender.Send(n.cfg.Shard, rd.Messages)
	}

	if u != nil && u.Snapshot != nil {
		st.applied = u.Snapshot.GetMetadata().GetIndex()
	}
	if k := len(rd.CommittedEntries); k > 0 {
		for _, e := range rd.CommittedEntries {
			st.logBytes += uint64(len(e.GetData()))
		}
		last := rd.CommittedEntries[k-1]
		st.applied = last.GetIndex()
		// The commit index published above covers this entry; once one of
		// the leader's own term commits, ReadIndex may use it (rule 1).
		if st.isLeader && last.GetTerm() == n.term.Load() {
			n.readyTerm.Store(last.GetTerm())
		}
	}
	for i, p := range waiting {
		if p == nil {
			continue
		}
		// Entries apply skipped (conf changes, empty entries) are
		// answered here, after the commit.
		if !answered[i] {
			p.done <- result{}
		}
		delete(st.proposals, p.id)
	}
	n.pending.Store(int64(len(st.proposals)))

	for _, rs := range rd.ReadStates {
		if len(rs.RequestCtx) != 8 {
			continue
		}
		round := binary.BigEndian.Uint64(rs.RequestCtx)
		ws, ok := st.readRounds[round]
		if !ok {
			continue
		}
		delete(st.readRounds, round)
		for _, w := range ws {
			w.index = rs.Index
		}
		st.readsWaiting = append(st.readsWaiting, ws...)
	}

	rn.Advance(rd)
	return nil
}

// waitingFor returns, aligned with ents, the proposals waiting for them
// (nil when none is), and a slice to mark those answered. Called on the
// loop goroutine.
func (n *Node) waitingFor(ents []*pb.Entry) (waiting []*proposal, answered []bool) {
	st := n.st
	for i, e := range ents {
		var id uint64
		switch e.GetType() {
		case pb.EntryNormal:
			id, _, _ = decodeEntry(e.GetData())
		case pb.EntryConfChange, pb.EntryConfChangeV2:
			id = confChangeID(e)
		}
		p, ok := st.proposals[id]
		if !ok || id == 0 {
			continue
		}
		if waiting == nil {
			waiting, answered = make([]*proposal, len(ents)), make([]bool, len(ents))
		}
		waiting[i] = p
	}
	return waiting, answered
}

func confChangeID(e *pb.Entry) uint64 {
	var cc pb.ConfChangeV2
	if e.GetType() == pb.EntryConfChange {
		var v1 pb.ConfChange
		if proto.Unmarshal(e.GetData(), &v1) != nil {
			return 0
		}
		cc.Context = v1.GetContext()
	} else if proto.Unmarshal(e.GetData(), &cc) != nil {
		return 0
	}
	if len(cc.GetContext()) != idPrefixLen {
		return 0
	}
	return binary.BigEndian.Uint64(cc.GetContext())
}

func (n *Node) releaseReads() {
	st := n.st
	applied := n.applied.Load()
	kept := st.readsWaiting[:0]
	for _, w := range st.readsWaiting {
		if w.index <= applied {
			w.done <- nil
			n.stats.Reads.Add(1)
		} else {
			kept = append(kept, w)
		}
	}
	clear(st.readsWaiting[len(kept):])
	st.readsWaiting = kept
}

func (n *Node) maybeCompact() error {
	st := n.st
	applied := n.applied.Load()
	if applied <= st.lastCompact || (applied-st.lastCompact < n.cfg.SnapshotEntries && st.logBytes < n.cfg.SnapshotBytes) {
		return nil
	}
	if err := n.cfg.Storage.Compact(applied); err != nil {
		if errors.Is(err, raft.ErrCompacted) {
			// A snapshot installed meanwhile already moved the log start.
			st.lastCompact, st.logBytes = applied, 0
			return nil
		}
		return fmt.Errorf("shard %d: compact to %d: %w", n.cfg.Shard, applied, err)
	}
	st.lastCompact, st.logBytes = applied, 0
	n.stats.Compactions.Add(1)
	n.log.Debug("compacted log", "index", applied)
	return nil
}

// failAll answers every waiting proposal and read with err.
func (n *Node) failAll(err error) {
	st := n.st
	for _, p := range st.batch {
		p.done <- result{err: err}
	}
	clear(st.batch)
	st.batch, st.batchEntries = st.batch[:0], nil
	for id, p := range st.proposals {
		// Never blocking: a proposal answered from inside the apply of a
		// Ready whose finishing panicked (guard) is still listed, and its
		// answer stands.
		select {
		case p.done <- result{err: err}:
		default:
		}
		delete(st.proposals, id)
	}
	n.pending.Store(0)
	for round, ws := range st.readRounds {
		for _, w := range ws {
			w.done <- err
		}
		delete(st.readRounds, round)
	}
	for _, w := range st.readsWaiting {
		w.done <- err
	}
	st.readsWaiting = nil
	for _, w := range st.readsQueued {
		w.done <- err
	}
	st.readsQueued = nil
}

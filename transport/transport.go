package transport

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"

	"github.com/kvd/kvd/proto/peerpb"
)

// Sentinel errors. Match them with errors.Is; they arrive wrapped with the
// peer, shard or step that failed.
var (
	// ErrStopped: the transport has been stopped.
	ErrStopped = errors.New("transport: stopped")
	// ErrUnknownPeer: no address is known for the peer (SetPeer was never
	// called for it, or it was removed).
	ErrUnknownPeer = errors.New("transport: unknown peer")
	// ErrPeerMismatch: the node at a peer's address is not that peer, or a
	// stream arrived from a node that should not have dialed us. A wrong
	// address must fail loudly rather than deliver one node's messages to
	// another.
	ErrPeerMismatch = errors.New("transport: peer id mismatch")
	// ErrProtocol: the remote side broke the stream protocol (a snapshot
	// without a header, a header that is not a MsgSnap, ...).
	ErrProtocol = errors.New("transport: protocol violation")
	// ErrSnapshotTruncated: a snapshot stream ended before its last chunk.
	ErrSnapshotTruncated = errors.New("transport: snapshot stream ended before last chunk")
	// ErrSnapshotUnconsumed: Handler.HandleSnapshot returned nil before
	// reading the snapshot to io.EOF. Acknowledging it would tell the sender
	// that a partial state was installed.
	ErrSnapshotUnconsumed = errors.New("transport: snapshot handler returned before the end of the snapshot")
	// ErrNoSnapshotSource: a MsgSnap was sent but Config.Snapshots is nil.
	ErrNoSnapshotSource = errors.New("transport: no snapshot source configured")

	// errLinkClosed: a send raced with the end of its stream; the caller
	// treats it like any failed send.
	errLinkClosed = errors.New("transport: stream closed")
)

// Tuning constants. They are not in Config because nothing outside this
// package has a reason to change them; tests do not depend on their values.
const (
	defaultQueueSize        = 4096
	defaultMaxQueueBytes    = 32 << 20
	defaultMaxBatchMessages = 512
	defaultMaxBatchBytes    = 4 << 20

	// maxMessageBytes bounds one gRPC message either way. A batch stops
	// growing at MaxBatchBytes, but a single raft message (a MsgApp with
	// large entries) travels alone whatever its size, and snapshot chunks
	// are sized by the SnapshotReader; gRPC's 4 MiB default would turn
	// either into a broken stream that reconnects forever.
	maxMessageBytes = 64 << 20

	// maxHeaderBytes bounds a peer call's metadata (gRPC's default is
	// 16 MiB): the identity kvd sends is a few numbers.
	maxHeaderBytes = 16 << 10

	// peerWindow is the flow-control window of a peer connection and of
	// each stream on it, fixed on both sides: gRPC's adaptive window keeps
	// a PING in flight on every connection that receives data, a frame and
	// its answer per round trip on links that are never idle (see
	// kvpb.ClientStreamWindow for what that cost). 4 MiB holds a few snapshot
	// chunks; the adaptive window could grow to 16 MiB.
	peerWindow = 4 << 20

	// snapshotWorkers bounds concurrent outgoing snapshots: each holds a
	// storage read transaction and a connection's worth of bandwidth.
	snapshotWorkers = 2
	// snapshotQueueSize bounds snapshots waiting for a worker; beyond it a
	// MsgSnap fails at once (raft retries after ReportSnapshot).
	snapshotQueueSize = 64

	// Reconnect backoff of the dialing side, jittered.
	backoffMin = 50 * time.Millisecond
	backoffMax = 2 * time.Second

	// handshakeTimeout bounds the wait for the other side's first
	// message, either way: a node that accepts TCP but never answers must
	// not hold the dialer forever, nor one that dials and sends nothing
	// hold a stream of the acceptor's.
	handshakeTimeout = 5 * time.Second

	// idlePing: each side sends an empty batch when it has sent nothing for
	// this long, and linkIdleTimeout breaks a stream on which nothing at
	// all arrived for that long. gRPC clamps client keepalive pings to 10 s,
	// so gRPC alone would leave a dead link unnoticed on the dialer's side
	// for 12 s; this notices it in seconds on both sides, whatever the
	// network in between does (a proxy or a userspace network stack that
	// keeps acknowledging TCP).
	idlePing        = time.Second
	linkIdleTimeout = 4 * idlePing

	// Keepalive: the accepting side pings every keepaliveTime and drops the
	// connection after keepaliveTimeout without an answer, so a dead link
	// is noticed in about 3 s. clientKeepaliveTime is the gRPC floor.
	keepaliveTime       = time.Second
	keepaliveTimeout    = 2 * time.Second
	clientKeepaliveTime = 10 * time.Second
)

// Handler receives what arrives from peers and learns about delivery
// failures. All methods may be called concurrently from several goroutines
// (one receive goroutine per peer, snapshot goroutines, and the goroutine
// that calls Send), until Stop returns. None may block for long, and none
// may call back into Transport methods that wait (Stop).
type Handler interface {
	// HandleMessage is called on a peer's receive goroutine for each
	// message, in the order the peer sent them; it must not block for long
	// (the raft side queues or drops). The handler owns m.
	HandleMessage(shard uint64, m *raftpb.Message)
	// HandleSnapshot is called once per incoming snapshot stream, on a gRPC
	// handler goroutine, with the MsgSnap header (Snapshot.Data empty) and
	// a pull function over the remaining pairs, which returns io.EOF at the
	// end. It may block while it installs the snapshot. It must read to
	// io.EOF before returning nil. Returning an error fails the stream, and
	// the sender reports the snapshot failed.
	HandleSnapshot(shard uint64, m *raftpb.Message, next func() ([]*peerpb.SnapshotPair, error)) error
	// HandleLeaderCheck is called on a peer's receive goroutine for each
	// leader check (question or answer) the peer sent, after the raft
	// messages of the same batch. It must not block. The handler owns c.
	HandleLeaderCheck(from uint64, c *peerpb.LeaderCheck)
	// ReportUnreachable says a message of shard to peer was dropped. It may
	// be called on the goroutine that calls Send (unknown peer, full
	// queue), so it must not wait for that goroutine.
	ReportUnreachable(shard, peer uint64)
	// ReportSnapshot reports the outcome of an outgoing MsgSnap, once per
	// MsgSnap passed to Send. It may be called on the goroutine that calls
	// Send (snapshot queue full).
	ReportSnapshot(shard, peer uint64, failed bool)
}

// SnapshotReader streams one shard's state. The transport calls its methods
// from one goroutine and always calls Close.
type SnapshotReader interface {
	// Metadata is the metadata of the state this reader streams. It replaces
	// the metadata of the MsgSnap being sent: the reader streams the state
	// at its own applied index, which is at least as new as what raft asked
	// for, and raft accepts a newer snapshot.
	Metadata() *raftpb.SnapshotMetadata
	// Next returns the next chunk of pairs, and nil, io.EOF at the end. The
	// transport does not keep the slice after sending it.
	Next() ([]*peerpb.SnapshotPair, error)
	Close() error
}

// SnapshotSource opens a reader over a shard's current state. It is called
// on a snapshot goroutine, never on the path that sends heartbeats.
type SnapshotSource interface {
	OpenSnapshot(shard uint64) (SnapshotReader, error)
}

// Config configures a Transport. NodeID and Handler are required.
type Config struct {
	NodeID  uint64
	Handler Handler
	// Snapshots serves outgoing MsgSnap; nil fails every MsgSnap.
	Snapshots SnapshotSource
	// Logger; nil discards.
	Logger *slog.Logger
	// QueueSize is the per-peer outbound queue, in messages (default 4096).
	// When it is full, Send drops the message and reports the peer
	// unreachable: backpressure, never unbounded memory.
	QueueSize int
	// MaxQueueBytes bounds the entry bytes waiting in one peer's queue
	// (default 32 MiB): a count alone would let 4096 appends of 1 MiB
	// entries queue 4 GiB. A message carrying entries that would pass it
	// is dropped and reported like one that finds the queue full;
	// messages without entries (heartbeats, votes, answers) are bounded
	// by QueueSize alone.
	MaxQueueBytes int
	// MaxBatchMessages caps the messages in one batch (default 512).
	MaxBatchMessages int
	// MaxBatchBytes stops a batch from growing past this many bytes of
	// marshalled messages (default 4 MiB); a single larger message is sent
	// alone.
	MaxBatchBytes int
	// ClusterID is the cluster this node belongs to: streams from, or
	// answers by, nodes of another cluster are refused.
	ClusterID uint64
	// Incarnation identifies this node's data dir (a random number drawn
	// when it was created). Peers refuse a node id that comes back with
	// another one: its raft state is gone. 0 disables the check.
	Incarnation uint64
	// Incarnations records peers' incarnations; nil disables the check.
	Incarnations Incarnations
	// Evicted is called, once, when a peer refuses this node because its
	// data dir is not the one the cluster knew for its id; the node must
	// stop serving (it can only rejoin as a new member). It must not
	// block or call back into the transport.
	Evicted func(error)
	// RequirePeerCert refuses a stream unless its caller presented a
	// verified node certificate naming the node id it claims (tls.go). The
	// gRPC server must then serve TLS that requires client certificates,
	// and DialOptions carry this node's certificate.
	RequirePeerCert bool
	// DialOptions are appended to the defaults (insecure credentials,
	// keepalive, reconnect backoff, message size limits), so a later option
	// such as grpc.WithTransportCredentials overrides a default.
	DialOptions []grpc.DialOption

	// protocols, when set, replaces Spoken: tests play a build of another
	// release with it (export_test.go). The empty range plays a build from
	// before versions, which neither announces a version nor checks one.
	protocols *Protocols
}

// Transport carries Raft messages between this node and its peers. See the
// package documentation for the rules it follows.
type Transport struct {
	id       uint64
	cfg      Config
	log      *slog.Logger
	dialOpts []grpc.DialOption
	// protocols is the range of peer protocol versions this node
	// announces and accepts (version.go); empty: it does neither.
	protocols Protocols

	// ctx is cancelled by Stop; every goroutine selects on ctx.Done(), and
	// every stream and dial of ours derives from it.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once // Stop's signal runs once

	// nonce is drawn at start: two processes with one node id differ in it.
	nonce uint64
	// incMu makes looking up and recording a peer's incarnation atomic.
	incMu     sync.Mutex
	evictOnce sync.Once
	refusals  refusalLog

	// snapq feeds the snapshot workers.
	snapq chan snapJob

	mu struct {
		sync.RWMutex
		// stopped is set by Stop; after it no goroutine starts and no link
		// is installed, which is what lets Stop's Wait be final.
		stopped bool
		// peers holds the peers SetPeer added: their addresses and queues.
		peers map[uint64]*peer
		// links holds the live stream to each peer, whichever side dialed.
		// It may hold a link for a peer not in peers: a lower-id node can
		// dial us before we learn its address, and the link is used as
		// soon as SetPeer adds it.
		links map[uint64]*link
		// downSince holds, for each peer whose stream broke and has not
		// come back, when it broke: the peer is reported unreachable
		// once, and reachable again once, not at every redial.
		downSince map[uint64]time.Time
	}

	stats struct {
		batchesSent, messagesSent, bytesSent             atomic.Uint64
		batchesReceived, messagesReceived, bytesReceived atomic.Uint64
		droppedUnknownPeer, badMessages                  atomic.Uint64
		snapshotsSent, snapshotsFailed, snapshotsRecv    atomic.Uint64
	}
}

// New returns a started Transport. It dials nobody until SetPeer.
func New(cfg Config) *Transport {
	if cfg.QueueSize <= 0 {
		cfg.QueueSize = defaultQueueSize
	}
	if cfg.MaxQueueBytes <= 0 {
		cfg.MaxQueueBytes = defaultMaxQueueBytes
	}
	if cfg.MaxBatchMessages <= 0 {
		cfg.MaxBatchMessages = defaultMaxBatchMessages
	}
	if cfg.MaxBatchBytes <= 0 {
		cfg.MaxBatchBytes = defaultMaxBatchBytes
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t := &Transport{
		id:        cfg.NodeID,
		cfg:       cfg,
		log:       log.With("node", cfg.NodeID),
		snapq:     make(chan snapJob, snapshotQueueSize),
		nonce:     rand.Uint64() | 1, // never 0, which means "none sent"
		protocols: Spoken(),
	}
	if cfg.protocols != nil {
		t.protocols = *cfg.protocols
	}
	t.ctx, t.cancel = context.WithCancel(context.Background())
	t.mu.peers = make(map[uint64]*peer)
	t.mu.links = make(map[uint64]*link)
	t.mu.downSince = make(map[uint64]time.Time)
	t.dialOpts = append([]grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time:                clientKeepaliveTime,
			Timeout:             keepaliveTimeout,
			PermitWithoutStream: true,
		}),
		// gRPC's own reconnect backoff starts at 1 s and grows to 2 min;
		// ours must decide how fast a peer comes back, so match it.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{
				BaseDelay:  backoffMin,
				Multiplier: 2,
				Jitter:     0.2,
				MaxDelay:   backoffMax,
			},
			MinConnectTimeout: handshakeTimeout,
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessageBytes), grpc.MaxCallSendMsgSize(maxMessageBytes)),
		grpc.WithStaticStreamWindowSize(peerWindow), grpc.WithStaticConnWindowSize(peerWindow),
	}, cfg.DialOptions...)
	for range snapshotWorkers {
		t.goroutine(t.snapshotWorker)
	}
	return t
}

// ServerOptions returns the options the gRPC server that serves this
// transport needs: keepalive pings every second with a 2 s timeout, so a
// dead link is noticed in seconds, an enforcement policy that lets peers
// ping as often, and a message size limit that fits large batches and
// snapshot chunks. It is a function, not a method, so the server can be
// built before the Transport.
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time:    keepaliveTime,
			Timeout: keepaliveTimeout,
		}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             keepaliveTime,
			PermitWithoutStream: true,
		}),
		grpc.MaxRecvMsgSize(maxMessageBytes),
		grpc.MaxHeaderListSize(maxHeaderBytes),
		grpc.StaticStreamWindowSize(peerWindow), grpc.StaticConnWindowSize(peerWindow),
	}
}

// Register registers the Raft peer service on s. It may be called for
// several servers over the transport's life (a restarted listener).
func (t *Transport) Register(s *grpc.Server) {
	peerpb.RegisterRaftServer(s, &service{t: t})
}

// SetPeer adds a peer or changes its address; calling it again with the same
// address does nothing. A changed address breaks the current stream if this
// node dialed it, so the next one goes to the new address.
func (t *Transport) SetPeer(id uint64, addr string) {
	if id == t.id {
		return // messages to self never leave the node
	}
	t.mu.Lock()
	if t.mu.stopped {
		t.mu.Unlock()
		return
	}
	if p := t.mu.peers[id]; p != nil {
		t.mu.Unlock()
		p.setAddr(addr)
		return
	}
	p := newPeer(t.ctx, id, addr, t.cfg.QueueSize)
	t.mu.peers[id] = p
	// Start goroutines under t.mu so that Stop, which takes it, sees a
	// peer whose goroutines are accounted for in t.wg.
	t.goroutineLocked(func() { t.sendLoop(p) })
	if t.dials(id) {
		t.goroutineLocked(func() { t.dialLoop(p) })
	}
	t.mu.Unlock()
}

// Send enqueues msgs, all of one shard, for their destination peers. It
// never blocks: a message that cannot be queued is dropped and reported
// with Handler.ReportUnreachable. MsgSnap goes to a snapshot goroutine
// instead of the stream. The transport takes ownership of msgs: the caller
// must not modify them afterwards (they are marshalled later, on the
// peer's sender goroutine).
func (t *Transport) Send(shard uint64, msgs []*raftpb.Message) {
	for _, m := range msgs {
		to := m.GetTo()
		if m.GetType() == raftpb.MsgSnap {
			t.queueSnapshot(shard, m)
			continue
		}
		switch err := t.enqueue(to, outMsg{shard: shard, m: m}); {
		case errors.Is(err, ErrStopped):
			return
		case err != nil:
			t.cfg.Handler.ReportUnreachable(shard, to)
		}
	}
}

// SendLeaderCheck enqueues a leader check for peer to, to travel in the
// next batch with the raft messages. It never blocks; a check that cannot
// be queued is dropped without a report: its sender times the round out
// and asks again. The transport takes ownership of c.
func (t *Transport) SendLeaderCheck(to uint64, c *peerpb.LeaderCheck) {
	_ = t.enqueue(to, outMsg{check: c})
}

// errQueueFull: a peer's queue had no room for a message.
var errQueueFull = errors.New("transport: peer queue full")

// enqueue puts m on peer to's queue without blocking, counting what it
// drops: ErrStopped, ErrUnknownPeer or errQueueFull when it does.
func (t *Transport) enqueue(to uint64, m outMsg) error {
	t.mu.RLock()
	stopped, p := t.mu.stopped, t.mu.peers[to]
	t.mu.RUnlock()
	switch {
	case stopped:
		return ErrStopped
	case p == nil:
		t.stats.droppedUnknownPeer.Add(1)
		return ErrUnknownPeer
	}
	// Appends keep their order in the bulk queue: an empty append (a
	// commit index) that overtook the entries before it would be rejected
	// and make the leader resend. Anything else may overtake them, as raft
	// allows any reordering (etcd's rafthttp sends appends on a stream of
	// their own for the same reason).
	q := p.urgent
	if m.m != nil && m.m.GetType() == raftpb.MsgApp {
		q = p.queue
		for _, e := range m.m.GetEntries() {
			m.bytes += int64(len(e.GetData()))
		}
	}
	if m.bytes > 0 && p.queuedBytes.Add(m.bytes) > int64(t.cfg.MaxQueueBytes) {
		p.queuedBytes.Add(-m.bytes)
		p.dropped.Add(1)
		return errQueueFull
	}
	select {
	case q <- m:
		return nil
	default:
		p.queuedBytes.Add(-m.bytes)
		p.dropped.Add(1)
		return errQueueFull
	}
}

// Stats is a snapshot of the transport's counters. Batches count only
// batches that carry messages, so Messages/Batches is the mean batch size.
type Stats struct {
	BatchesSent, MessagesSent, BytesSent             uint64
	BatchesReceived, MessagesReceived, BytesReceived uint64
	// DroppedUnknownPeer counts messages to peers SetPeer never added.
	DroppedUnknownPeer uint64
	// BadMessages counts received messages dropped unread: they did not
	// unmarshal, or were not from the stream's peer to this node (fromPeer).
	BadMessages                                       uint64
	SnapshotsSent, SnapshotsFailed, SnapshotsReceived uint64
	Peers                                             map[uint64]PeerStats
}

// PeerStats are the counters of one peer.
type PeerStats struct {
	// SendFailures counts messages lost because sending their batch on the
	// stream failed.
	SendFailures uint64
	// Dropped counts messages dropped before sending: queue full, or no
	// stream to the peer.
	Dropped uint64
	// Connected says a stream to the peer is up.
	Connected bool
}

// MessagesPerBatch is the mean number of messages in a sent batch.
func (s Stats) MessagesPerBatch() float64 {
	if s.BatchesSent == 0 {
		return 0
	}
	return float64(s.MessagesSent) / float64(s.BatchesSent)
}

// Stats returns the current counters.
func (t *Transport) Stats() Stats {
	s := Stats{
		BatchesSent:        t.stats.batchesSent.Load(),
		MessagesSent:       t.stats.messagesSent.Load(),
		BytesSent:          t.stats.bytesSent.Load(),
		BatchesReceived:    t.stats.batchesReceived.Load(),
		MessagesReceived:   t.stats.messagesReceived.Load(),
		BytesReceived:      t.stats.bytesReceived.Load(),
		DroppedUnknownPeer: t.stats.droppedUnknownPeer.Load(),
		BadMessages:        t.stats.badMessages.Load(),
		SnapshotsSent:      t.stats.snapshotsSent.Load(),
		SnapshotsFailed:    t.stats.snapshotsFailed.Load(),
		SnapshotsReceived:  t.stats.snapshotsRecv.Load(),
		Peers:              make(map[uint64]PeerStats),
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	for id, p := range t.mu.peers {
		s.Peers[id] = PeerStats{
			SendFailures: p.sendFailures.Load(),
			Dropped:      p.dropped.Load(),
			Connected:    t.mu.links[id] != nil,
		}
	}
	return s
}

// Stop closes every stream and waits for every goroutine the transport
// started. It is idempotent and safe to call concurrently. It does not stop
// the gRPC servers passed to Register; their Raft handlers answer
// Unavailable afterwards.
func (t *Transport) Stop() {
	t.once.Do(func() {
		t.mu.Lock()
		t.mu.stopped = true
		links := make([]*link, 0, len(t.mu.links))
		for _, l := range t.mu.links {
			links = append(links, l)
		}
		t.mu.Unlock()
		// Cancelling ctx ends the peers' loops, our client streams and
		// outgoing snapshots; shutting the links down ends the inbound
		// stream handlers, whose gRPC contexts are not ours to cancel.
		t.cancel()
		for _, l := range links {
			l.shutdown()
		}
	})
	t.wg.Wait()
}

// goroutine runs f on a new goroutine that Stop waits for, unless the
// transport is stopping; it reports whether f was started.
func (t *Transport) goroutine(f func()) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.goroutineLocked(f)
}

// goroutineLocked is goroutine for callers holding t.mu. Checking stopped
// and calling wg.Add under the same lock Stop takes to set stopped is what
// makes Add never race with Stop's Wait.
func (t *Transport) goroutineLocked(f func()) bool {
	if t.mu.stopped {
		return false
	}
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		f()
	}()
	return true
}

// dials reports whether this node opens the stream to peer id: the lower
// id dials, so exactly one of the two ever does.
func (t *Transport) dials(id uint64) bool { return t.id < id }

// peer returns the peer with id, or nil.
func (t *Transport) peer(id uint64) *peer {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.mu.peers[id]
}

// link returns the live stream to peer id, or nil.
func (t *Transport) link(id uint64) *link {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.mu.links[id]
}

// installLink makes l the stream to its peer, shutting down the one it
// replaces: a newer stream means the peer reconnected, and the old one is
// dead or about to be. It fails once the transport is stopping, so Stop
// never misses a link. For a stream the peer dialed (inbound) it also
// refuses to replace a live stream that came from another process
// (another nonce) with the same node id: admit checked that before
// answering; this check closes the window between the two.
func (t *Transport) installLink(l *link, inbound bool) error {
	t.mu.Lock()
	if t.mu.stopped {
		t.mu.Unlock()
		return ErrStopped
	}
	old := t.mu.links[l.peer]
	if inbound && old != nil && old.live() && old.remoteNonce != l.remoteNonce {
		t.mu.Unlock()
		return fmt.Errorf("%w: node %d connected from two processes at once", ErrDuplicateNode, l.peer)
	}
	t.mu.links[l.peer] = l
	since, wasDown := t.mu.downSince[l.peer]
	delete(t.mu.downSince, l.peer)
	t.mu.Unlock()
	if old != nil {
		old.shutdown()
	}
	if wasDown {
		t.log.Info("transport: peer reachable again", "peer", l.peer, "down_for", time.Since(since).Round(time.Millisecond))
	}
	return nil
}

// removeLink forgets l if it is still the peer's current stream. The
// peer is then unreachable until a new stream is installed: that is
// logged here, once, however often the dialer retries meanwhile, and
// not when this node is stopping or the peer was removed.
func (t *Transport) removeLink(l *link) {
	t.mu.Lock()
	if t.mu.links[l.peer] != l {
		t.mu.Unlock()
		return
	}
	delete(t.mu.links, l.peer)
	_, known := t.mu.peers[l.peer]
	report := known && !t.mu.stopped && t.ctx.Err() == nil
	_, already := t.mu.downSince[l.peer]
	now := time.Now()
	if report && !already {
		t.mu.downSince[l.peer] = now
	}
	t.mu.Unlock()
	if report && !already {
		t.log.Warn("transport: peer unreachable", "peer", l.peer, "since", now.UTC().Format(time.RFC3339Nano))
	}
}

package client

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/kvd/kvd/proto/kvpb"
)

// breakerThreshold is how many consecutive failures (heartbeats, or
// requests the node could not be reached for) open a node's circuit
// breaker. A request attempt that times out opens it at once (trip).
const breakerThreshold = 3

// breakerState is a node's circuit-breaker state.
//
//	closed ──3 failures──▶ open ──next heartbeat──▶ half-open ──probe ok──▶ closed
//	                         ▲                          │
//	                         └────────probe fails───────┘
//
// Only closed nodes receive requests; the half-open probe is the heartbeat's
// health check, so a node that just came back is tried by one cheap RPC
// before real traffic returns to it.
type breakerState int

const (
	breakerClosed breakerState = iota
	breakerOpen
	breakerHalfOpen
)

func (s breakerState) String() string {
	switch s {
	case breakerClosed:
		return "closed"
	case breakerOpen:
		return "open"
	case breakerHalfOpen:
		return "half-open"
	}
	return "unknown"
}

// node is one kvd member as the client sees it: one gRPC connection, a
// circuit breaker fed by heartbeats and request outcomes, and a bulkhead
// bounding the requests in flight to it.
type node struct {
	id     uint64
	addr   string
	conn   *grpc.ClientConn
	kv     kvpb.KVClient
	clu    kvpb.ClusterClient
	health healthpb.HealthClient
	log    *slog.Logger

	// sem is the bulkhead: one token per request in flight. Acquired
	// without blocking; a full node is "busy" and the caller goes elsewhere.
	sem chan struct{}
	// kept counts slots held for requests whose callers gave up and
	// released them (see release).
	kept atomic.Int64

	// watch is the node's Watch stream (watchmux.go), opened on first use
	// and dropped when it breaks or its last watch ends.
	watch struct {
		sync.Mutex
		mux *watchMux
	}

	// batch is the node's Batch stream (see batch.go), opened on first use
	// and again after it breaks; batchLock (cap 1) guards it.
	batchLock chan struct{}
	batch     *batchStream
	// itemIDs numbers the node's Batch items; unique on every stream.
	itemIDs atomic.Uint64

	// ctx is cancelled to stop the heartbeat goroutine (and its probe in
	// flight); done is closed when that goroutine returned.
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	// mu guards the breaker.
	mu struct {
		sync.Mutex
		state    breakerState
		failures int       // consecutive failures
		lastErr  error     // last failure, for Status
		lastOK   time.Time // last success
	}
}

// dialNode makes the connection to one member. A plain host:port goes
// through gRPC's passthrough resolver: the name is resolved by each
// connection attempt, which gives up when the attempt is cancelled.
// gRPC's default dns resolver runs its lookups (TXT included) in a
// goroutine that ClientConn.Close waits for, and Go's resolver does not
// cut a lookup short on cancellation: an unresolvable member name (a
// container's service name seen from the host) held every Close, and so
// every kvctl invocation, for the DNS timeout (3 s here).
func dialNode(id uint64, addr string, maxInFlight int, opts []grpc.DialOption, log *slog.Logger) (*node, error) {
	conn, err := grpc.NewClient(dialTarget(addr), append([]grpc.DialOption{
		grpc.WithStaticStreamWindowSize(kvpb.ClientStreamWindow), grpc.WithStaticConnWindowSize(kvpb.ClientConnWindow)}, opts...)...)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &node{
		ctx:       ctx,
		cancel:    cancel,
		id:        id,
		addr:      addr,
		conn:      conn,
		kv:        kvpb.NewKVClient(conn),
		clu:       kvpb.NewClusterClient(conn),
		health:    healthpb.NewHealthClient(conn),
		log:       log.With("node", id, "addr", addr),
		sem:       make(chan struct{}, maxInFlight),
		batchLock: make(chan struct{}, 1),
		done:      make(chan struct{}),
	}, nil
}

// acquire takes a bulkhead slot without waiting; false means the node is busy.
func (n *node) acquire() bool {
	select {
	case n.sem <- struct{}{}:
		return true
	default:
		return false
	}
}

// release frees a bulkhead slot, unless a request that outlived its
// caller keeps one (keepToken): then this release is skipped, and
// releaseKept frees the slot when that request's answer comes. Slots are
// interchangeable, so which release is skipped does not matter.
func (n *node) release() {
	for {
		k := n.kept.Load()
		if k == 0 {
			<-n.sem
			return
		}
		if n.kept.CompareAndSwap(k, k-1) {
			return
		}
	}
}

// keepToken keeps the caller's slot taken past its release.
func (n *node) keepToken() { n.kept.Add(1) }

// releaseKept frees a slot kept by keepToken.
func (n *node) releaseKept() { <-n.sem }

// available reports whether requests may go to n (breaker closed).
func (n *node) available() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.mu.state == breakerClosed
}

func (n *node) state() (breakerState, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.mu.state, n.mu.lastErr
}

func (n *node) success() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.mu.state != breakerClosed {
		n.log.Info("client: node answers again, breaker closed", "was", n.mu.state.String())
	}
	n.mu.state = breakerClosed
	n.mu.failures = 0
	n.mu.lastErr = nil
	n.mu.lastOK = time.Now()
}

func (n *node) failure(err error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.mu.failures++
	n.mu.lastErr = err
	switch n.mu.state {
	case breakerClosed:
		if n.mu.failures >= breakerThreshold {
			n.mu.state = breakerOpen
			n.log.Warn("client: node marked down, breaker open", "failures", n.mu.failures, "err", err)
		}
	case breakerHalfOpen:
		n.mu.state = breakerOpen
	}
}

// trip opens the breaker at once: a request that got no answer within
// the attempt timeout is stronger evidence than a missed heartbeat, and a
// leader hint from a follower that has not yet noticed the death would
// otherwise send the next attempt straight back into the same wait. The
// heartbeat closes it again as soon as the node answers.
func (n *node) trip(err error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.mu.failures++
	n.mu.lastErr = err
	if n.mu.state != breakerOpen {
		n.mu.state = breakerOpen
		n.log.Warn("client: node marked down, breaker open", "reason", "attempt timed out", "err", err)
	}
}

// heartbeat pings n with the gRPC health service every interval until stop
// is closed. It is the only path from open back to closed.
func (n *node) heartbeat(interval, timeout time.Duration) {
	defer close(n.done)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-t.C:
		}
		n.mu.Lock()
		if n.mu.state == breakerOpen {
			n.mu.state = breakerHalfOpen
		}
		n.mu.Unlock()
		err := n.probe(timeout)
		if err != nil {
			n.failure(err)
		} else {
			n.success()
		}
	}
}

func (n *node) probe(timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(n.ctx, timeout)
	defer cancel()
	resp, err := n.health.Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return err
	}
	if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		return errNotServing
	}
	return nil
}

// close stops the heartbeat (if started) and closes the connection.
func (n *node) close(started bool) error {
	n.cancel()
	if started {
		<-n.done
	}
	return n.conn.Close()
}

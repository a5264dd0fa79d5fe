package client

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/hashring"
	"github.com/kvd/kvd/proto/kvpb"
)

// Defaults for the zero values of Config.
const (
	DefaultDialTimeout        = 2 * time.Second
	DefaultHeartbeatInterval  = 250 * time.Millisecond
	DefaultMaxInFlightPerNode = 128
	DefaultAttemptTimeout     = 2 * time.Second
	DefaultConnectTimeout     = 500 * time.Millisecond
)

var errNotServing = errors.New("health check: not serving")

// Config configures a Client. Only Endpoints is required.
type Config struct {
	// Endpoints are client addresses (host:port) of any kvd nodes. New
	// asks them all for the cluster map at once and uses the first answer;
	// afterwards the client talks to the members the map lists.
	Endpoints []string
	// DialTimeout bounds each endpoint's bootstrap answer (default 2 s).
	DialTimeout time.Duration
	// HeartbeatInterval is how often every member is health-checked
	// (default 250 ms). A member that misses 3 in a row, or leaves a
	// request attempt unanswered for AttemptTimeout, is skipped until a
	// later check succeeds.
	HeartbeatInterval time.Duration
	// MaxInFlightPerNode bounds the requests in flight to one node
	// (default 128). A full node counts as busy: the request goes to
	// another replica when the operation allows it, or backs off.
	MaxInFlightPerNode int
	// AttemptTimeout bounds one RPC attempt (default 2 s), so a hung node
	// cannot consume the caller's whole deadline; the caller's context
	// still bounds the request as a whole.
	AttemptTimeout time.Duration
	// ConnectTimeout bounds how long a request attempt waits for a
	// member's connection to come up (default 500 ms). A member still
	// unconnected then is skipped as a hung one is: its breaker opens
	// until a heartbeat reaches it, and the request goes on to the next
	// replica. The connection attempt itself goes on. Without it, a
	// member whose connection never comes up (a name whose DNS lookup
	// hangs, an address that drops packets) cost every request that
	// chose it the whole AttemptTimeout.
	ConnectTimeout time.Duration
	// TLS, when set, is used for every connection: the nodes serve their
	// client port with TLS (kvd --client-cert), and its Certificates
	// answer a node that requires a client certificate (--client-ca).
	// Its RootCAs must trust the nodes' certificates, which must name the
	// host each member is dialed by. Nil dials without TLS.
	TLS *tls.Config
	// Username and Password authenticate every request once the cluster
	// has auth enabled (auth.go): the client gets a token for them and
	// renews it before it expires. Empty: requests carry no user, and
	// only a client certificate in TLS can identify one.
	Username, Password string
	// DialOptions are added to every member connection's own (window
	// sizes, TLS, token). An embedded node (package embed) dials itself
	// in memory with one (grpc.WithContextDialer) and counts the calls
	// that reach it with another.
	DialOptions []grpc.DialOption
	// Logger receives breaker transitions and map changes, and at debug
	// level every attempt that failed (node, time taken, error); never a
	// line for a request that succeeded at once. Nil discards.
	Logger *slog.Logger
}

// Client is a kvd client. It is safe for concurrent use; create one per
// process and share it. Close it when done.
type Client struct {
	cfg      Config
	log      *slog.Logger
	dialOpts []grpc.DialOption // credentials of every connection (auth.go)
	session  uint64
	seqs     *seqTracker

	closeOnce sync.Once
	// base is cancelled by Close; every attempt's context hangs off it so
	// Close interrupts RPCs and backoff waits.
	base     context.Context
	cancel   context.CancelFunc
	closeErr error

	// refreshMu serialises cluster-map fetches so a burst of StaleEpoch
	// answers triggers one fetch, not one per request.
	refreshMu sync.Mutex

	// mu guards the routing state below. Held only for map lookups, never
	// across an RPC.
	mu struct {
		sync.RWMutex
		cmap    *kvpb.ClusterMap
		ring    *hashring.Ring
		nodes   map[uint64]*node    // by member id; one conn each
		shards  map[uint64][]uint64 // shard id → replica ids, in map order
		leaders map[uint64]uint64   // shard id → cached leader id
		closed  bool                // set by Close; applyMap then dials nothing
		// overrides maps member id → an endpoint from Config.Endpoints
		// that reaches it when the address the member advertises is not
		// one the caller gave (a container name, say, seen from the host).
		overrides map[uint64]string
	}
	// probes tracks bootstrap probes still running after New returned;
	// repair tracks repairMap. Close waits for both.
	probes, repair sync.WaitGroup
}

// New connects to the cluster: it asks every endpoint at once for the
// cluster map, takes the first (newest) answer, dials every member and
// starts the heartbeats. It fails with ErrUnavailable when no endpoint
// answers within ctx and DialTimeout.
func New(ctx context.Context, cfg Config) (*Client, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, fmt.Errorf("%w: no endpoints", ErrInvalidArgument)
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.HeartbeatInterval <= 0 {
		cfg.HeartbeatInterval = DefaultHeartbeatInterval
	}
	if cfg.MaxInFlightPerNode <= 0 {
		cfg.MaxInFlightPerNode = DefaultMaxInFlightPerNode
	}
	if cfg.AttemptTimeout <= 0 {
		cfg.AttemptTimeout = DefaultAttemptTimeout
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = DefaultConnectTimeout
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Client{cfg: cfg, log: log}
	c.base, c.cancel = context.WithCancel(context.Background())
	c.mu.nodes = map[uint64]*node{}
	c.mu.overrides = map[uint64]string{}
	c.session = newSession()
	c.seqs = newSeqTracker()
	c.dialOpts = c.dialOptions()

	if err := c.bootstrap(ctx); err != nil {
		c.Close()
		return nil, err
	}
	c.repair.Add(1)
	go c.repairMap()
	return c, nil
}

// memberAddr is where the client dials member mem. Called with c.mu held.
func (c *Client) memberAddr(mem *kvpb.Member) string {
	if ep, ok := c.mu.overrides[mem.GetId()]; ok {
		return ep
	}
	return mem.GetClientAddr()
}

func newSession() uint64 {
	var b [8]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			panic("client: crypto/rand failed: " + err.Error()) // broken invariant: rand.Read never fails on supported platforms
		}
		if s := binary.LittleEndian.Uint64(b[:]); s != 0 {
			return s
		}
	}
}

// Session is the client's write session id (random, nonzero). Together
// with a per-write sequence number it makes retried writes exactly-once.
func (c *Client) Session() uint64 { return c.session }

// applyMap installs m when it is newer than the cached map: it rebuilds
// the ring, dials new members, closes removed ones and keeps cached
// leaders that are still replicas of their shard.
func (c *Client) applyMap(m *kvpb.ClusterMap) error {
	// A map without data shards yet (a cluster still bootstrapping)
	// leaves the ring nil: shardOf then says so, and routeKey refreshes.
	ring, err := hashring.FromMap(m)
	if err != nil && !errors.Is(err, hashring.ErrNoShards) {
		return fmt.Errorf("client: cluster map epoch %d: %w", m.GetEpoch(), err)
	}

	c.mu.Lock()
	if c.mu.closed {
		c.mu.Unlock()
		return ErrClosed
	}
	if old := c.mu.cmap; old != nil && m.GetEpoch() <= old.GetEpoch() {
		c.mu.Unlock()
		return nil
	}
	var stale []*node
	keep := map[uint64]bool{}
	for _, mem := range m.GetMembers() {
		addr := c.memberAddr(mem)
		if addr == "" {
			// Not published yet (a cluster just bootstrapping): the
			// member is unreachable until a later map lists it, which
			// repairMap fetches.
			continue
		}
		keep[mem.GetId()] = true
		if n, ok := c.mu.nodes[mem.GetId()]; ok && n.addr == addr {
			continue
		} else if ok {
			stale = append(stale, n)
		}
		n, err := dialNode(mem.GetId(), addr, c.cfg.MaxInFlightPerNode, c.dialOpts, c.log)
		if err != nil {
			// grpc.NewClient only fails on a malformed target; skip the
			// member and let requests to it fail over.
			c.log.Warn("client: cannot dial member", "node", mem.GetId(), "addr", addr, "err", err)
			delete(c.mu.nodes, mem.GetId())
			continue
		}
		c.mu.nodes[mem.GetId()] = n
		go n.heartbeat(c.cfg.HeartbeatInterval, c.probeTimeout())
	}
	for id, n := range c.mu.nodes {
		if !keep[id] {
			stale = append(stale, n)
			delete(c.mu.nodes, id)
		}
	}
	shards := map[uint64][]uint64{}
	leaders := map[uint64]uint64{}
	for _, s := range m.GetShards() {
		reps := append([]uint64(nil), s.GetReplicas()...)
		shards[s.GetId()] = reps
		if l, ok := c.mu.leaders[s.GetId()]; ok && slices.Contains(reps, l) {
			leaders[s.GetId()] = l
		} else if len(reps) > 0 {
			leaders[s.GetId()] = reps[0]
		}
	}
	c.mu.cmap = proto.Clone(m).(*kvpb.ClusterMap)
	c.mu.ring = ring
	c.mu.shards = shards
	c.mu.leaders = leaders
	c.mu.Unlock()

	c.log.Info("client: cluster map", "epoch", m.GetEpoch(), "members", len(m.GetMembers()), "shards", len(hashring.DataShards(m)))
	for _, n := range stale {
		n.close(true)
	}
	return nil
}

// probeTimeout bounds one heartbeat: two intervals, at most DialTimeout.
func (c *Client) probeTimeout() time.Duration {
	return min(2*c.cfg.HeartbeatInterval, c.cfg.DialTimeout)
}

// refreshMap fetches the cluster map from any available member and applies
// it. With minEpoch > 0 it returns at once when the cached map is already
// at least that new (another goroutine refreshed it meanwhile).
func (c *Client) refreshMap(ctx context.Context, minEpoch uint64) error {
	c.refreshMu.Lock()
	defer c.refreshMu.Unlock()
	if minEpoch > 0 && c.epoch() >= minEpoch {
		return nil
	}
	var errs []error
	for _, n := range c.nodesInOrder() {
		actx, cancel := c.attemptCtx(ctx)
		m, err := n.clu.Map(actx, &kvpb.MapRequest{})
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("node %d (%s): %w", n.id, n.addr, err))
			if ctx.Err() != nil {
				break
			}
			continue
		}
		return c.applyMap(m)
	}
	if len(errs) == 0 {
		return fmt.Errorf("%w: no members in the cluster map", ErrUnavailable)
	}
	return fmt.Errorf("%w: refresh cluster map: %w", ErrUnavailable, errors.Join(errs...))
}

// nodesInOrder lists the members, available ones first.
func (c *Client) nodesInOrder() []*node {
	c.mu.RLock()
	defer c.mu.RUnlock()
	var up, down []*node
	for _, mem := range c.mu.cmap.GetMembers() {
		n := c.mu.nodes[mem.GetId()]
		if n == nil {
			continue
		}
		if n.available() {
			up = append(up, n)
		} else {
			down = append(down, n)
		}
	}
	return append(up, down...)
}

// dataShards lists the data shards of the cached map, in map order.
func (c *Client) dataShards() []uint64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return hashring.DataShards(c.mu.cmap)
}

func (c *Client) epoch() uint64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.mu.cmap.GetEpoch()
}

// attemptCtx bounds one RPC attempt by AttemptTimeout. Close ends an
// attempt in flight without it: closing the node cancels its Batch stream
// and closes its connection, which fails every call on them, and the
// retry loop then answers ErrClosed. Registering every attempt with the
// client's base context as well (context.AfterFunc) cost CPU on every
// request and bought nothing that Close does not already do (77e7a45
// and 2af7ba9 have the measurement).
func (c *Client) attemptCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, c.cfg.AttemptTimeout)
}

// Map fetches the current cluster map from the cluster (refreshing the
// client's cache) and returns a copy the caller owns.
func (c *Client) Map(ctx context.Context) (*kvpb.ClusterMap, error) {
	if c.isClosed() {
		return nil, ErrClosed
	}
	if err := c.refreshMap(ctx, 0); err != nil {
		return nil, err
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	return proto.Clone(c.mu.cmap).(*kvpb.ClusterMap), nil
}

// Close stops the heartbeats and closes every connection. Requests in
// flight fail with ErrClosed. Close is idempotent; later calls return the
// first call's result.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.cancel()
		c.probes.Wait() // cancelled above, so they end at once
		c.repair.Wait()
		c.mu.Lock()
		c.mu.closed = true
		nodes := c.mu.nodes
		c.mu.nodes = map[uint64]*node{}
		c.mu.Unlock()
		var errs []error
		for _, n := range nodes {
			if err := n.close(true); err != nil {
				errs = append(errs, err)
			}
		}
		c.closeErr = errors.Join(errs...)
	})
	return c.closeErr
}

func (c *Client) isClosed() bool {
	return c.base.Err() != nil
}

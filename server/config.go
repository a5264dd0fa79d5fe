package server

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kvd/kvd/storage"
)

// Config is everything a kvd node is started with. cmd/kvd fills it from
// flags and KVD_* environment variables; embedders fill it directly.
type Config struct {
	NodeID  uint64
	DataDir string

	// Listen addresses; Advertise addresses are what other nodes and
	// clients dial (default: the listen address).
	ListenClient, AdvertiseClient string
	ListenPeer, AdvertisePeer     string
	// ListenMetrics serves /metrics, /healthz, /readyz and /debug/pprof/;
	// empty disables it.
	ListenMetrics string

	// EnablePprof serves /debug/pprof/ on the metrics listener; off by
	// default, as a profile names code paths and costs CPU on demand.
	EnablePprof bool

	// Peer TLS: with PeerCertFile, the peer port serves TLS, requires a
	// client certificate signed by PeerCAFile naming the node id each call
	// claims (a kvd://node/<id> URI SAN, internal/pki), and this node
	// dials its peers with the same certificate. Without it the peer port
	// is open to anyone who can reach it.
	PeerCertFile, PeerKeyFile, PeerCAFile string
	// Client TLS: with ClientCertFile the client port serves TLS; with
	// ClientCAFile too, clients must present a certificate it signed.
	ClientCertFile, ClientKeyFile, ClientCAFile string

	// AuthTokenTTL is how long a token from Auth.Authenticate is good
	// for (default DefaultAuthTokenTTL).
	AuthTokenTTL time.Duration

	// InitialCluster maps node id to peer address for bootstrap. Ignored
	// when the data dir already holds a node.
	InitialCluster map[uint64]string
	// Shards is the number of data shards at bootstrap (the meta shard 0
	// comes on top); Replicas the copies of each, capped by the node count.
	Shards   int
	Replicas int
	// BootstrapExplicit says InitialCluster/Shards/Replicas were given by
	// the user, not defaulted: on a restart they must then describe the
	// cluster already in the data dir.
	BootstrapExplicit bool

	// Join lists client addresses (comma-separated) of running members. A
	// node on a fresh data dir then joins their cluster as a new member
	// instead of bootstrapping one; the meta shard's leader gives it
	// replicas of the shards that have fewer than the cluster's replica
	// count. Ignored when the data dir already holds a node.
	Join string

	Limits Limits

	// Raft timing: one tick every TickInterval; a follower that hears
	// nothing for ElectionTicks..2*ElectionTicks ticks campaigns.
	TickInterval   time.Duration
	ElectionTicks  int
	HeartbeatTicks int
	// A shard compacts its log once SnapshotEntries entries, or
	// SnapshotBytes bytes of commands, were applied since the last time.
	SnapshotEntries uint64
	SnapshotBytes   uint64

	// CommitInterval is how long applied writes may wait in the open bbolt
	// transaction, made durable by the WAL meanwhile, before it commits
	// (storage.Options.CommitInterval). It bounds how stale a serializable
	// read on the leader can be. Default 200 ms.
	CommitInterval time.Duration

	// StoragePartitions is how many bbolt files, each with its own
	// writer, WAL region and Raft loop, a new data dir spreads its shards
	// over (storage.Store): a shard's large writes then delay only the
	// shards of its own file, at the price of a WAL write, a commit and a
	// loop pass per file where one file pays one (docs/architecture.md,
	// Storage, has the figures). An existing data dir keeps the count it
	// was created with. Default 1.
	StoragePartitions int

	// RequestTimeout bounds a request that arrives without a deadline.
	RequestTimeout time.Duration

	// BatchSendTimeout cuts off a Batch stream whose answers could not be
	// sent for this long (its client is not reading them): the stream ends
	// with ResourceExhausted and what it held is freed. Default 10 s.
	BatchSendTimeout time.Duration

	// NoForwarding makes a follower answer a request for a shard it does
	// not lead with NotLeader (and the leader's hint) rather than forward
	// it to the leader (forward.go): for tests of a client's own routing,
	// whose faults forwarding would route around.
	NoForwarding bool

	// ClientConnIdle is how long a client connection may go without a
	// request before the node closes it (it holds one of MaxClientConns).
	// Default 5 minutes.
	ClientConnIdle time.Duration

	// SessionTTL is how long a client session may stay idle before its
	// exactly-once records are dropped (by a replicated command, so every
	// replica drops them at the same log index). A client idle longer than
	// this that retries an old write may apply it twice.
	SessionTTL time.Duration

	// HistoryRevisions is how many revisions of changes each shard keeps
	// for reads at a revision and watches (default 100,000; negative:
	// no count limit). HistoryRetention, if positive, also drops changes
	// older than it, by the proposers' clocks recorded with them. The
	// leader trims by a replicated command, so all replicas agree on the
	// oldest revision.
	HistoryRevisions int64
	HistoryRetention time.Duration
	// HistoryBytes bounds the bytes of each shard's history (its events,
	// with the previous values of overwritten and deleted keys): beyond
	// it the leader trims the oldest revisions. Default 64 MiB; negative:
	// no byte limit. Without it, overwriting one 1 MiB key kept every old
	// value for HistoryRevisions revisions: 100 GB.
	HistoryBytes int64
	// WatchProgressInterval is how often an idle watch is told the
	// shard's revision (default 1 s).
	WatchProgressInterval time.Duration

	// CorruptionCheckInterval is how often the leader of each shard has
	// the replicas compare their state hashes (corruption.go).
	CorruptionCheckInterval time.Duration
	// ScrubInterval is how often each node verifies its stored shards
	// against their checksums and state hashes. For both intervals zero
	// means the default (1 minute, 1 hour) and a negative value turns the
	// check off (kvd's flags take 0 for off).
	ScrubInterval time.Duration

	Logger *slog.Logger

	// ClientListener and PeerListener, when set, are used instead of
	// listening on ListenClient/ListenPeer (in-process tests bind port 0).
	ClientListener, PeerListener net.Listener
}

// Limits bound request sizes and queues (docs/design.md, Limits).
type Limits struct {
	MaxKeyBytes     int // default 4 KiB
	MaxValueBytes   int // default 1 MiB
	MaxRequestBytes int // default 2 MiB
	MaxTxnOps       int // default 128
	// MaxPendingProposals per shard; beyond it writes get ResourceExhausted.
	MaxPendingProposals int // default 4096
	// MaxInFlightBytes bounds the request bytes the node holds at once,
	// across all requests, and the Batch answers it holds until they are
	// sent; beyond it requests get ResourceExhausted at admission instead
	// of queueing, so memory stays bounded under overload. A quarter of it
	// is kept for small requests (see admission), so a flood of large
	// writes cannot starve small reads.
	MaxInFlightBytes int // default 32 MiB
	// MaxResponseBytes bounds the kvs of one Range page: a page stops at
	// it (with More set) as it stops at the key limit, so a scan of large
	// values pages by bytes. A page always holds at least one kv. It
	// bounds the events of a Watch response the same way (watch.go).
	MaxResponseBytes int // default 4 MiB, the client's default receive limit
	// MaxBatchStreamBytes bounds what one Batch stream holds: requests
	// being served plus answers not yet sent. At it the node stops reading
	// the stream, so flow control pushes back on its client.
	MaxBatchStreamBytes int // default 4 MiB
	// MaxClientConns bounds the client connections the node keeps open;
	// beyond it new connections are closed as soon as they are accepted.
	MaxClientConns int // default 1024
	// MaxWatchStreams bounds the Watch streams the node serves at once;
	// MaxWatchesPerStream the watches one stream carries. A watch stream
	// holds at most MaxBatchStreamBytes of unsent events (watch.go).
	MaxWatchStreams     int // default 1024
	MaxWatchesPerStream int // default 1000
}

// Defaults for a single node started with no flags.
const (
	DefaultClientAddr  = "127.0.0.1:2379"
	DefaultPeerAddr    = "127.0.0.1:2380"
	DefaultMetricsAddr = "127.0.0.1:2381"
	DefaultDataDir     = "kvd-data"
	DefaultShards      = 16
	DefaultReplicas    = 3

	DefaultMaxInFlightBytes    = 32 << 20
	DefaultMaxResponseBytes    = 4 << 20
	DefaultMaxBatchStreamBytes = defaultBatchHeldBytes
	DefaultMaxClientConns      = 1024
	DefaultBatchSendTimeout    = defaultBatchSendTimeout
)

// ErrConfig marks a configuration error: cmd/kvd exits 2 on it.
var ErrConfig = errors.New("invalid configuration")

// DefaultConfig is a node's configuration with every field at the default
// of its kvd flag, except the listen addresses, which it leaves empty:
// cmd/kvd's flags default to it, and New fills the zero fields of a
// Config from it, so the binary and embedders (package embed) start from
// the same values.
func DefaultConfig() Config {
	return Config{
		NodeID:   1,
		DataDir:  DefaultDataDir,
		Shards:   DefaultShards,
		Replicas: DefaultReplicas,
		Limits: Limits{
			MaxKeyBytes:         4 << 10,
			MaxValueBytes:       1 << 20,
			MaxRequestBytes:     2 << 20,
			MaxTxnOps:           128,
			MaxPendingProposals: 4096,
			MaxInFlightBytes:    DefaultMaxInFlightBytes,
			MaxResponseBytes:    DefaultMaxResponseBytes,
			MaxBatchStreamBytes: DefaultMaxBatchStreamBytes,
			MaxClientConns:      DefaultMaxClientConns,
			MaxWatchStreams:     1024,
			MaxWatchesPerStream: 1000,
		},
		TickInterval:            50 * time.Millisecond,
		ElectionTicks:           10,
		HeartbeatTicks:          2,
		SnapshotEntries:         10_000,
		SnapshotBytes:           64 << 20,
		CommitInterval:          200 * time.Millisecond,
		StoragePartitions:       1,
		RequestTimeout:          5 * time.Second,
		BatchSendTimeout:        DefaultBatchSendTimeout,
		ClientConnIdle:          5 * time.Minute,
		SessionTTL:              time.Hour,
		HistoryRevisions:        100_000,
		HistoryBytes:            64 << 20,
		WatchProgressInterval:   time.Second,
		CorruptionCheckInterval: time.Minute,
		ScrubInterval:           time.Hour,
		AuthTokenTTL:            DefaultAuthTokenTTL,
	}
}

// orDefault sets *p to d when *p is the zero value.
func orDefault[T comparable](p *T, d T) {
	var zero T
	if *p == zero {
		*p = d
	}
}

func (c *Config) setDefaults() {
	d := DefaultConfig()
	orDefault(&c.DataDir, d.DataDir)
	orDefault(&c.ListenClient, DefaultClientAddr)
	orDefault(&c.ListenPeer, DefaultPeerAddr)
	if c.ClientListener != nil {
		c.ListenClient = c.ClientListener.Addr().String()
	}
	if c.PeerListener != nil {
		c.ListenPeer = c.PeerListener.Addr().String()
	}
	orDefault(&c.AdvertiseClient, c.ListenClient)
	orDefault(&c.AdvertisePeer, c.ListenPeer)
	orDefault(&c.NodeID, d.NodeID)
	if len(c.InitialCluster) == 0 {
		c.InitialCluster = map[uint64]string{c.NodeID: c.AdvertisePeer}
	}
	orDefault(&c.Shards, d.Shards)
	orDefault(&c.Replicas, d.Replicas)
	l, dl := &c.Limits, d.Limits
	orDefault(&l.MaxKeyBytes, dl.MaxKeyBytes)
	orDefault(&l.MaxValueBytes, dl.MaxValueBytes)
	orDefault(&l.MaxRequestBytes, dl.MaxRequestBytes)
	orDefault(&l.MaxTxnOps, dl.MaxTxnOps)
	orDefault(&l.MaxPendingProposals, dl.MaxPendingProposals)
	orDefault(&l.MaxInFlightBytes, dl.MaxInFlightBytes)
	orDefault(&l.MaxResponseBytes, dl.MaxResponseBytes)
	orDefault(&l.MaxBatchStreamBytes, dl.MaxBatchStreamBytes)
	orDefault(&l.MaxClientConns, dl.MaxClientConns)
	orDefault(&l.MaxWatchStreams, dl.MaxWatchStreams)
	orDefault(&l.MaxWatchesPerStream, dl.MaxWatchesPerStream)
	orDefault(&c.TickInterval, d.TickInterval)
	orDefault(&c.ElectionTicks, d.ElectionTicks)
	orDefault(&c.HeartbeatTicks, d.HeartbeatTicks)
	orDefault(&c.SnapshotEntries, d.SnapshotEntries)
	orDefault(&c.SnapshotBytes, d.SnapshotBytes)
	orDefault(&c.CommitInterval, d.CommitInterval)
	orDefault(&c.StoragePartitions, d.StoragePartitions)
	orDefault(&c.RequestTimeout, d.RequestTimeout)
	orDefault(&c.BatchSendTimeout, d.BatchSendTimeout)
	orDefault(&c.ClientConnIdle, d.ClientConnIdle)
	orDefault(&c.SessionTTL, d.SessionTTL)
	orDefault(&c.HistoryRevisions, d.HistoryRevisions)
	orDefault(&c.HistoryBytes, d.HistoryBytes)
	orDefault(&c.WatchProgressInterval, d.WatchProgressInterval)
	orDefault(&c.CorruptionCheckInterval, d.CorruptionCheckInterval)
	orDefault(&c.ScrubInterval, d.ScrubInterval)
	orDefault(&c.AuthTokenTTL, d.AuthTokenTTL)
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// validate checks a configuration with its defaults filled in. New runs
// it on every start: a fresh node, a restart on an existing data dir and
// a join alike, so a value one of them refuses is refused by all.
func (c *Config) validate() error {
	if c.Join != "" && c.BootstrapExplicit {
		return fmt.Errorf("%w: --join adds a node to an existing cluster, whose shards and replicas are already set: drop --initial-cluster, --shards and --replicas", ErrConfig)
	}
	if c.Shards < 1 || c.Shards > 4096 {
		return fmt.Errorf("%w: --shards %d out of range; use 1..4096", ErrConfig, c.Shards)
	}
	if c.Replicas < 1 {
		return fmt.Errorf("%w: --replicas %d must be at least 1", ErrConfig, c.Replicas)
	}
	if c.CommitInterval < 0 {
		return fmt.Errorf("%w: --commit-interval %v must be positive", ErrConfig, c.CommitInterval)
	}
	if c.StoragePartitions < 1 || c.StoragePartitions > storage.MaxPartitions {
		return fmt.Errorf("%w: --storage-partitions %d out of range; use 1..%d", ErrConfig, c.StoragePartitions, storage.MaxPartitions)
	}
	if c.ElectionTicks <= c.HeartbeatTicks {
		return fmt.Errorf("%w: election ticks (%d) must exceed heartbeat ticks (%d)", ErrConfig, c.ElectionTicks, c.HeartbeatTicks)
	}
	if c.HeartbeatTicks < 1 {
		return fmt.Errorf("%w: --heartbeat-ticks %d must be at least 1", ErrConfig, c.HeartbeatTicks)
	}
	for _, d := range []struct {
		flag string
		v    time.Duration
	}{
		{"--tick-interval", c.TickInterval},
		{"--request-timeout", c.RequestTimeout},
		{"--batch-send-timeout", c.BatchSendTimeout},
		{"--session-ttl", c.SessionTTL},
		{"--watch-progress-interval", c.WatchProgressInterval},
		{"--auth-token-ttl", c.AuthTokenTTL},
		{"client connection idle time", c.ClientConnIdle},
	} {
		if d.v <= 0 {
			return fmt.Errorf("%w: %s %v must be positive", ErrConfig, d.flag, d.v)
		}
	}
	if c.HistoryRetention < 0 {
		return fmt.Errorf("%w: --history-retention %v must not be negative (0 turns it off)", ErrConfig, c.HistoryRetention)
	}
	l := c.Limits
	for _, v := range []struct {
		flag string
		v    int
	}{
		{"--max-key-bytes", l.MaxKeyBytes},
		{"--max-value-bytes", l.MaxValueBytes},
		{"--max-request-bytes", l.MaxRequestBytes},
		{"--max-txn-ops", l.MaxTxnOps},
		{"--max-pending-proposals", l.MaxPendingProposals},
		{"--max-inflight-bytes", l.MaxInFlightBytes},
		{"--max-response-bytes", l.MaxResponseBytes},
		{"--max-batch-stream-bytes", l.MaxBatchStreamBytes},
		{"--max-client-conns", l.MaxClientConns},
		{"--max-watch-streams", l.MaxWatchStreams},
		{"--max-watches-per-stream", l.MaxWatchesPerStream},
	} {
		if v.v < 1 {
			return fmt.Errorf("%w: %s %d must be at least 1", ErrConfig, v.flag, v.v)
		}
	}
	return nil
}

// validateBootstrap checks what only a bootstrapping node uses: that it is
// in its initial cluster, at the address it advertises.
func (c *Config) validateBootstrap() error {
	own, ok := c.InitialCluster[c.NodeID]
	if !ok {
		return fmt.Errorf("%w: node id %d is not in --initial-cluster (%s); add %d=HOST:PEERPORT or fix --id",
			ErrConfig, c.NodeID, FormatInitialCluster(c.InitialCluster), c.NodeID)
	}
	// Peers dial what --initial-cluster says; this node publishes
	// --advertise-peer. Two addresses for one node leave peers dialing
	// one that is not it (or nothing), and its shards without a leader.
	if own != c.AdvertisePeer {
		return fmt.Errorf("%w: --initial-cluster gives node %d the peer address %s, but it advertises %s (--advertise-peer, default --listen-peer); make them the same",
			ErrConfig, c.NodeID, own, c.AdvertisePeer)
	}
	return nil
}

// ParseInitialCluster parses "1=host:port,2=host:port".
func ParseInitialCluster(s string) (map[uint64]string, error) {
	out := map[uint64]string{}
	if strings.TrimSpace(s) == "" {
		return out, nil
	}
	for _, part := range strings.Split(s, ",") {
		idStr, addr, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return nil, fmt.Errorf("%w: --initial-cluster entry %q is not ID=HOST:PORT (example: 1=10.0.0.1:2380,2=10.0.0.2:2380)", ErrConfig, part)
		}
		id, err := strconv.ParseUint(idStr, 10, 64)
		if err != nil || id == 0 {
			return nil, fmt.Errorf("%w: --initial-cluster entry %q: node id must be a positive integer", ErrConfig, part)
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return nil, fmt.Errorf("%w: --initial-cluster entry %q: address must be HOST:PORT", ErrConfig, part)
		}
		if _, dup := out[id]; dup {
			return nil, fmt.Errorf("%w: --initial-cluster names node %d twice", ErrConfig, id)
		}
		out[id] = addr
	}
	return out, nil
}

// FormatInitialCluster is the inverse of ParseInitialCluster, ordered by id.
func FormatInitialCluster(m map[uint64]string) string {
	ids := make([]uint64, 0, len(m))
	for id := range m {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	parts := make([]string, len(ids))
	for i, id := range ids {
		parts[i] = fmt.Sprintf("%d=%s", id, m[id])
	}
	return strings.Join(parts, ",")
}

package embed

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/hashring"
	"github.com/kvd/kvd/internal/authtoken"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/server"
)

// Config is a node's configuration: the same struct the kvd command fills
// from its flags. Zero fields take DefaultConfig's values, except the
// listen addresses: an empty ListenClient (with no ClientListener) serves
// the in-process client only, an empty ListenPeer (with no PeerListener)
// takes no Raft traffic from other nodes, and an empty ListenMetrics
// serves no HTTP. CorruptionCheckInterval and ScrubInterval turn off at a
// negative value (kvd's flags take 0 for that); HistoryRevisions and
// HistoryBytes are unlimited at a negative one.
type Config = server.Config

// DefaultConfig is every field at the default of its kvd flag, listen
// addresses empty (no ports).
func DefaultConfig() Config { return server.DefaultConfig() }

// Node is a running kvd node.
type Node struct {
	srv *server.Server
	log *slog.Logger

	// mem serves the in-process client; clientAddr is the address the
	// cluster map gives this node, which the in-process client dials in
	// memory instead of over TCP.
	mem        *memListener
	memPeer    *memListener // nil when the peer port is TCP
	clientAddr string

	localCalls atomic.Uint64
	creds      credentials.TransportCredentials // the client's, with client TLS (tls.go)
	auth       *authtoken.Source                // the client's user, WithClientAuth (auth.go)

	cliOnce sync.Once
	cli     *client.Client
	cliErr  error

	readyOnce sync.Once
	ready     chan struct{}

	stop      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

// Start validates cfg, opens (or creates) the data dir and starts the
// node. It returns once the node runs; Ready says when it serves. A bad
// configuration fails with an error wrapping server.ErrConfig. Start
// does not wait for other nodes, except that a node joining a cluster
// (Join) waits for a member to admit it, up to the server's join
// timeout; ctx is only checked before anything starts. opts set what
// the node's Client needs beyond Config (WithClientAuth).
func Start(ctx context.Context, cfg Config, opts ...Option) (_ *Node, err error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	n := &Node{ready: make(chan struct{}), stop: make(chan struct{})}
	for _, o := range opts {
		o(n)
	}
	if cfg.NodeID == 0 {
		cfg.NodeID = 1
	}
	// One in-memory listener per node, named by its id so nodes in one
	// process (and their logs) can tell them apart.
	n.mem = newMemListener(fmt.Sprintf("kvd-%d.embed.invalid:0", cfg.NodeID))
	defer func() {
		if err != nil {
			_ = n.mem.Close()
			if n.memPeer != nil {
				_ = n.memPeer.Close()
			}
		}
	}()
	switch {
	case cfg.ClientListener != nil:
		cfg.ClientListener = newBothListener(cfg.ClientListener, n.mem)
	case cfg.ListenClient != "":
		tcp, err := net.Listen("tcp", cfg.ListenClient)
		if err != nil {
			return nil, fmt.Errorf("%w: --listen-client %s: %v (is another kvd running? pick a free port)", server.ErrConfig, cfg.ListenClient, err)
		}
		cfg.ClientListener = newBothListener(tcp, n.mem)
	default:
		cfg.ClientListener = n.mem
	}
	if cfg.PeerListener == nil && cfg.ListenPeer == "" {
		// A node no other node can reach: it needs no peers, and gets
		// an address no one could dial.
		n.memPeer = newMemListener(fmt.Sprintf("kvd-%d-peer.embed.invalid:0", cfg.NodeID))
		cfg.PeerListener = n.memPeer
	}
	n.clientAddr = cfg.AdvertiseClient
	if n.clientAddr == "" {
		n.clientAddr = cfg.ClientListener.Addr().String()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	n.log = cfg.Logger.With("node", cfg.NodeID)
	if n.creds, err = clientCreds(&cfg); err != nil {
		_ = cfg.ClientListener.Close()
		return nil, err
	}
	srv, err := server.New(cfg)
	if err != nil {
		_ = cfg.ClientListener.Close()
		return nil, err
	}
	n.srv = srv
	srv.Metrics().MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "kvd_client_local_calls_total",
		Help: "Requests of the embedded client that this node served in memory, without a socket.",
	}, func() float64 { return float64(n.localCalls.Load()) }))
	return n, nil
}

// Server is the node's server, for what this package does not wrap
// (addresses, the Raft host, metrics).
func (n *Node) Server() *server.Server { return n.srv }

// Err delivers, once, the error that made the node stop serving after it
// started: its storage engine failed (its data dir went away, say), one
// of its Raft replicas stopped on an error, or its peers refused it. The
// node then refuses every request; Close it. Nothing arrives on a node
// that keeps running.
func (n *Node) Err() <-chan error { return n.srv.Fatal() }

// Ready is closed once the node serves linearizable reads and writes on
// every data shard: it has not failed, its replicas have leaders and have
// caught up, the cluster map lists it, and its client has read and
// written (through Raft, by a transaction that changes nothing) each
// shard. The check starts at the first call and goes on until it passes
// or the node is closed. A node that fails is never ready: wait on Err
// as well.
func (n *Node) Ready() <-chan struct{} {
	n.readyOnce.Do(func() {
		n.wg.Add(1)
		go n.awaitReady()
	})
	return n.ready
}

// readyPoll is how often awaitReady checks again.
const readyPoll = 20 * time.Millisecond

func (n *Node) awaitReady() {
	defer n.wg.Done()
	t := time.NewTicker(readyPoll)
	defer t.Stop()
	var last error
	for {
		err := n.checkReady()
		if err == nil {
			n.log.Info("kvd node ready")
			close(n.ready)
			return
		}
		if last == nil || err.Error() != last.Error() {
			n.log.Debug("not ready yet", "reason", err)
		}
		last = err
		select {
		case <-n.stop:
			return
		case <-t.C:
		}
	}
}

// readyKey is the key the readiness check reads and compares on each
// shard; {N} is a hash tag, tried in turn until every shard has one. The
// key is never written.
const readyKey = "kvd/embed/ready{%d}"

func (n *Node) checkReady() error {
	if err := n.srv.NotReady(); err != nil {
		return err
	}
	c := n.Client()
	if c == nil {
		return n.cliErr
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	go func() {
		select {
		case <-n.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	m, err := c.Map(ctx)
	if err != nil {
		return err
	}
	ring, err := hashring.FromMap(m)
	if err != nil {
		return err
	}
	keys := map[uint64][]byte{}
	shards := ring.Shards()
	for i := 0; len(keys) < len(shards) && i < 1<<16; i++ {
		k := fmt.Appendf(nil, readyKey, i)
		if s := ring.Shard(k); keys[s] == nil {
			keys[s] = k
		}
	}
	for shard, k := range keys {
		if _, err := c.Get(ctx, k); err != nil && !errors.Is(err, client.ErrNotFound) {
			return fmt.Errorf("shard %d: linearizable read: %w", shard, err)
		}
		// A compare and no operations: a write through Raft that
		// changes no key.
		if _, err := c.Txn(ctx, &kvpb.TxnRequest{Compare: []*kvpb.Compare{{
			Key: k, Target: kvpb.Compare_VERSION, Result: kvpb.Compare_EQUAL, Version: 0,
		}}}); err != nil {
			return fmt.Errorf("shard %d: write: %w", shard, err)
		}
	}
	return nil
}

// Client is a client of the node's cluster, made on the first call and
// closed by Close. Requests for a shard this node leads reach it in
// memory, without a socket (LocalCalls counts them); others go to their
// leader over TCP. It is nil only when the node was closed or failed
// before the first call.
func (n *Node) Client() *client.Client {
	n.cliOnce.Do(func() {
		n.cli, n.cliErr = n.newClient()
		if n.cliErr != nil {
			n.log.Error("embedded client", "err", n.cliErr)
		}
	})
	return n.cli
}

func (n *Node) newClient() (*client.Client, error) {
	select {
	case <-n.stop:
		return nil, client.ErrClosed
	default:
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	local := "passthrough:///" + n.clientAddr
	var opts []grpc.DialOption
	if n.creds != nil {
		// After the client's own credentials, so these win.
		opts = append(opts, grpc.WithTransportCredentials(n.creds))
	}
	if n.auth != nil {
		opts = append(opts, grpc.WithPerRPCCredentials(n.auth))
	}
	return client.New(ctx, client.Config{
		Endpoints: []string{n.clientAddr},
		Logger:    n.log,
		DialOptions: append(opts,
			grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
				if addr == n.clientAddr {
					return n.mem.dial(ctx)
				}
				var d net.Dialer
				return d.DialContext(ctx, "tcp", addr)
			}),
			grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
				if cc.Target() == local && isKVMethod(method) {
					n.localCalls.Add(1)
				}
				return invoker(ctx, method, req, reply, cc, opts...)
			}),
			grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
				s, err := streamer(ctx, desc, cc, method, opts...)
				if err != nil || cc.Target() != local || !isKVMethod(method) {
					return s, err
				}
				return &countingStream{ClientStream: s, n: &n.localCalls}, nil
			}),
		),
	})
}

// isKVMethod says whether a gRPC method serves keys (KV or Watch), not
// health checks or cluster maps.
func isKVMethod(method string) bool {
	return strings.HasPrefix(method, "/"+kvpb.KV_ServiceDesc.ServiceName+"/") ||
		strings.HasPrefix(method, "/"+kvpb.Watch_ServiceDesc.ServiceName+"/")
}

// countingStream counts each request sent on a stream (a Batch item, a
// watch) as one call.
type countingStream struct {
	grpc.ClientStream
	n *atomic.Uint64
}

func (s *countingStream) SendMsg(m any) error {
	s.n.Add(1)
	return s.ClientStream.SendMsg(m)
}

// LocalCalls is how many requests the node's Client served in memory, by
// this node (the leader of the key's shard), without a socket. /metrics
// has it as kvd_client_local_calls_total.
func (n *Node) LocalCalls() uint64 { return n.localCalls.Load() }

// Close stops the node: its client, then its server, which stops every
// Raft replica and closes the data dir. Later calls return the first
// call's result.
func (n *Node) Close() error {
	n.closeOnce.Do(func() {
		close(n.stop)
		n.wg.Wait()
		var errs []error
		n.cliOnce.Do(func() {}) // no client after Close
		if n.cli != nil {
			if err := n.cli.Close(); err != nil {
				errs = append(errs, fmt.Errorf("close client: %w", err))
			}
		}
		if err := n.srv.Stop(); err != nil {
			errs = append(errs, fmt.Errorf("stop node: %w", err))
		}
		_ = n.mem.Close()
		if n.memPeer != nil {
			_ = n.memPeer.Close()
		}
		n.closeErr = errors.Join(errs...)
	})
	return n.closeErr
}

// Package server wires a kvd node together: storage engine, Raft host,
// peer transport, the public gRPC services, routing by the cluster map, and
// the metrics/health HTTP endpoint.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/fsm"
	"github.com/kvd/kvd/hashring"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/raftnode"
	"github.com/kvd/kvd/storage"
	"github.com/kvd/kvd/transport"
)

// maxStreamsPerConn bounds concurrent requests per client connection.
const maxStreamsPerConn = 256

// maxHeaderBytes bounds a call's metadata (gRPC's default is 16 MiB): an
// auth token and the client's ids need a few hundred bytes, and gRPC holds
// a call's headers, which no flow control covers, for as long as it runs.
const maxHeaderBytes = 64 << 10

// Node-level records kept in the storage engine's metadata.
const (
	metaNodeID     = "node-id"
	metaClusterID  = "cluster-id"
	metaClusterMap = "cluster-map" // the newest map this node has seen
)

// Server is one running kvd node.
type Server struct {
	kvpb.UnimplementedKVServer
	kvpb.UnimplementedClusterServer
	kvpb.UnimplementedWatchServer
	peerpb.UnimplementedInternalServer

	cfg   Config
	log   *slog.Logger
	tls   tlsSetup  // tls.go
	authc authCache // auth.go

	engine    *storage.Store
	host      *raftnode.Host
	tr        *transport.Transport
	peerSrv   *grpc.Server
	clientSrv *grpc.Server
	health    *health.Server
	httpSrv   *http.Server
	metrics   *metrics
	adm       *admission   // the in-flight byte budget (admission.go)
	corrupt   corruption   // corruption.go
	conns     *connLimiter // the client listener: capped, and holding unsent answers (conns.go)

	// published is set once the replicated cluster map lists this node's
	// addresses; until then clients cannot find it and /readyz says so.
	published atomic.Bool

	clientLis, peerLis, metricsLis net.Listener

	// mu guards the routing state derived from the cluster map.
	mu struct {
		sync.RWMutex
		cmap *kvpb.ClusterMap
		ring *hashring.Ring
	}

	// peerConns caches connections to other nodes' peer addresses for
	// Internal RPCs.
	peerConns struct {
		sync.Mutex
		byAddr map[string]*grpc.ClientConn
	}

	// fatal is set once the node cannot be trusted to serve (fatal.go).
	fatal struct {
		err atomic.Pointer[error] // set once, by the first setFatal
		c   chan error            // buffered 1: receives err once
	}

	stopc chan struct{}
	// ctx is cancelled by Stop, so background work started by the server
	// (map publishing) never delays shutdown.
	ctx    context.Context
	cancel context.CancelFunc
	// watch holds the node's watches (watch.go).
	watch watchRegistry
	// lessor holds the leases while this node leads the meta shard (lease.go).
	lessor   *lessor
	wg       sync.WaitGroup
	stopOnce sync.Once
	stopErr  error
}

// New opens the data dir, binds the listeners and starts the node. A port
// in use or a data dir of another node/cluster fails here with an error
// wrapping ErrConfig.
func New(cfg Config) (_ *Server, err error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: cfg.Logger.With("node", cfg.NodeID), stopc: make(chan struct{})}
	s.fatal.c = make(chan error, 1)
	s.authc.checking = make(chan struct{}, passwordChecks)
	// Made first: the node may turn fatal (a peer refusing it) before its
	// client server exists.
	s.health = health.NewServer()
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.peerConns.byAddr = map[string]*grpc.ClientConn{}
	s.corrupt.init()
	defer func() {
		if err != nil {
			s.Stop()
		}
	}()

	if s.tls, err = loadTLS(&cfg); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("%w: data dir %s: %v", ErrConfig, cfg.DataDir, err)
	}
	s.engine, err = storage.OpenStore(cfg.DataDir, cfg.StoragePartitions, storage.Options{Logger: cfg.Logger, CommitInterval: cfg.CommitInterval})
	if err != nil {
		return nil, fmt.Errorf("open data dir %s: %w", cfg.DataDir, err)
	}
	if n := s.engine.Partitions(); n != cfg.StoragePartitions {
		s.log.Warn("the data dir keeps the storage partitions it was created with; --storage-partitions applies only to a new data dir",
			"data_dir", cfg.DataDir, "partitions", n, "flag", cfg.StoragePartitions)
	}
	cmap, fresh, err := s.loadOrBootstrap()
	if err != nil {
		return nil, err
	}
	if err := s.setMap(cmap); err != nil {
		return nil, err
	}

	if s.clientLis, err = listen(cfg.ClientListener, cfg.ListenClient, "--listen-client"); err != nil {
		return nil, err
	}
	if s.peerLis, err = listen(cfg.PeerListener, cfg.ListenPeer, "--listen-peer"); err != nil {
		return nil, err
	}
	if cfg.ListenMetrics != "" {
		if s.metricsLis, err = listen(nil, cfg.ListenMetrics, "--listen-metrics"); err != nil {
			return nil, err
		}
	}

	s.host = raftnode.NewHost(raftnode.HostConfig{
		NodeID:              s.cfg.NodeID,
		Store:               s.engine,
		Apply:               fsm.Apply,
		Logger:              s.cfg.Logger,
		TickInterval:        cfg.TickInterval,
		ElectionTick:        cfg.ElectionTicks,
		HeartbeatTick:       cfg.HeartbeatTicks,
		SnapshotEntries:     cfg.SnapshotEntries,
		SnapshotBytes:       cfg.SnapshotBytes,
		MaxPendingProposals: cfg.Limits.MaxPendingProposals,
	})
	incarnation, err := loadIncarnation(s.engine)
	if err != nil {
		return nil, err
	}
	s.tr = transport.New(transport.Config{
		NodeID:       cfg.NodeID,
		Handler:      s.host,
		Snapshots:    checkedSnapshots{s},
		Logger:       cfg.Logger,
		ClusterID:    cmap.GetClusterId(),
		Incarnation:  incarnation,
		Incarnations: newPeerIncarnations(s.engine),
		Evicted:      s.setFatal,
		// With peer TLS every stream must come with the certificate of
		// the node it claims to be.
		RequirePeerCert: s.tls.peerDial != nil,
		DialOptions:     []grpc.DialOption{s.tls.peerCreds()},
	})
	peerOpts := append(transport.ServerOptions(), grpc.ChainUnaryInterceptor(s.checkPeerCall))
	if s.tls.peerServer != nil {
		peerOpts = append(peerOpts, grpc.Creds(credentials.NewTLS(s.tls.peerServer)))
	} else {
		logPlaintextPeer(s.log, s.PeerAddr())
	}
	s.peerSrv = grpc.NewServer(peerOpts...)
	s.tr.Register(s.peerSrv)
	peerpb.RegisterInternalServer(s.peerSrv, s)
	// Nodes without a replica of the meta shard read the map from a peer.
	kvpb.RegisterClusterServer(s.peerSrv, s)
	// Followers forward client requests to their shard's leader here.
	kvpb.RegisterKVServer(s.peerSrv, forwardedKV{s: s})
	kvpb.RegisterLeaseServer(s.peerSrv, newForwardedLease(s))
	// The host handles what the transport receives, so it starts before
	// any peer can reach the transport.
	s.host.Start(s.tr)
	s.updatePeers(cmap)
	for shard, voters := range localShards(cmap, cfg.NodeID) {
		// Only a bootstrapping node creates replicas with their voters;
		// any other replica starts empty and waits for the leader's
		// snapshot (see startNewReplicas).
		if !fresh || cfg.Join != "" {
			voters = nil
		}
		if _, err := s.host.AddShard(shard, voters); err != nil {
			return nil, fmt.Errorf("start shard %d: %w", shard, err)
		}
	}
	if fresh {
		// The node id goes last: its presence means bootstrap (or the
		// join) completed, replicas included. A crash before it makes the
		// next start bootstrap again, which reopens what exists.
		if err := s.engine.PutMeta(metaNodeID, u64(cfg.NodeID)); err != nil {
			return nil, err
		}
	}

	s.adm = newAdmission(cfg.Limits.MaxInFlightBytes)
	s.conns = newConnLimiter(s.clientLis, cfg.Limits.MaxClientConns, s.adm, cfg.BatchSendTimeout, s.log)
	s.metrics = newMetrics(s)
	s.lessor = newLessor(s)
	s.startCorruptionChecks()
	clientOpts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(cfg.Limits.MaxRequestBytes + 64<<10),
		// gRPC reads and decodes a request before any handler or
		// interceptor sees it, so admission alone cannot bound memory:
		// streams beyond this wait on the client, not in our heap.
		grpc.MaxConcurrentStreams(maxStreamsPerConn),
		grpc.MaxHeaderListSize(maxHeaderBytes),
		grpc.StaticStreamWindowSize(kvpb.ClientStreamWindow), grpc.StaticConnWindowSize(kvpb.ClientConnWindow),
		// Outermost first: every request is counted, admitted against
		// the in-flight budget (a read's answer too, until its connection
		// has written it: connLimiter), a panic anywhere below is
		// recovered, and a failed node refuses before serving.
		grpc.ChainUnaryInterceptor(s.metrics.interceptor, s.adm.unary, s.recoverUnary, s.refuseUnaryIfFailed, s.authUnary),
		grpc.StatsHandler(answerTracker{s.conns}),
		grpc.ChainStreamInterceptor(s.recoverStream, s.refuseStreamIfFailed, s.authStream),
		// Connections are capped (connLimiter), so idle ones must not keep
		// slots forever: closed after MaxConnectionIdle without a request
		// (kvd's client health-checks its connections every 250 ms, so
		// its connections are never idle, and it redials after a close),
		// and pinged to find dead peers. Clients may ping every 10 s.
		grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionIdle: cfg.ClientConnIdle,
			Time:              time.Minute,
			Timeout:           20 * time.Second,
		}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	}
	if s.tls.client != nil {
		clientOpts = append(clientOpts, grpc.Creds(credentials.NewTLS(s.tls.client)))
	}
	s.clientSrv = grpc.NewServer(clientOpts...)
	s.metrics.reg.MustRegister(s.conns.collectors()...)
	kvpb.RegisterKVServer(s.clientSrv, s)
	kvpb.RegisterClusterServer(s.clientSrv, s)
	kvpb.RegisterWatchServer(s.clientSrv, s)
	kvpb.RegisterAuthServer(s.clientSrv, authService{s: s})
	kvpb.RegisterLeaseServer(s.clientSrv, leaseService{s: s})
	healthpb.RegisterHealthServer(s.clientSrv, s.health)

	s.goServe("peer", func() error { return s.peerSrv.Serve(s.peerLis) })
	s.goServe("client", func() error { return s.clientSrv.Serve(s.conns) })
	if s.metricsLis != nil {
		s.httpSrv = &http.Server{Handler: s.httpHandler(), ReadHeaderTimeout: 5 * time.Second}
		s.goServe("metrics", func() error { return s.httpSrv.Serve(s.metricsLis) })
	}
	s.wg.Add(3)
	go s.maintainMap()
	go s.every(min(s.cfg.SessionTTL/10, time.Minute), s.expireSessions)
	s.wg.Add(1)
	go s.every(time.Second, s.trimHistory)
	go s.placeReplicas()
	s.wg.Add(2)
	go s.lessor.run()
	go s.lessor.revoker()
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	s.wg.Add(2)
	go s.watchFatal()
	go func() { defer s.wg.Done(); s.conns.cutOffStalled(s.stopc) }()
	s.log.Info("kvd node started", "client", s.ClientAddr(), "peer", s.PeerAddr(),
		"shards", len(localShards(cmap, cfg.NodeID)), "data_dir", cfg.DataDir, "peer_protocol", transport.Spoken().String())
	return s, nil
}

// every runs f each interval until Stop.
func (s *Server) every(interval time.Duration, f func()) {
	defer s.wg.Done()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-s.stopc:
			return
		case <-t.C:
			f()
		}
	}
}

func listen(l net.Listener, addr, flag string) (net.Listener, error) {
	if l != nil {
		return l, nil
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%w: %s %s: %v (is another kvd running? pick a free port)", ErrConfig, flag, addr, err)
	}
	return l, nil
}

func (s *Server) goServe(name string, serve func() error) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := serve(); err != nil && !errors.Is(err, grpc.ErrServerStopped) && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("server stopped", "listener", name, "err", err)
		}
	}()
}

// loadOrBootstrap returns the cluster map to start with: the stored one on
// a restart (bootstrap and join flags are ignored), or on a fresh data dir
// (fresh is then true) the initial map from the flags, or the map of the
// cluster joined with --join.
func (s *Server) loadOrBootstrap() (_ *kvpb.ClusterMap, fresh bool, _ error) {
	cfg := &s.cfg
	storedID, err := s.engine.GetMeta(metaNodeID)
	if err != nil {
		return nil, false, err
	}
	initial := InitialMap(cfg.InitialCluster, cfg.Shards, cfg.Replicas)
	if storedID != nil {
		id := fromU64(storedID)
		if id != cfg.NodeID {
			return nil, false, fmt.Errorf("%w: data dir %s belongs to node %d, not %d; use --id %d or another --data-dir",
				ErrConfig, cfg.DataDir, id, cfg.NodeID, id)
		}
		b, err := s.engine.GetMeta(metaClusterMap)
		if err != nil {
			return nil, false, err
		}
		cmap, err := fsm.ClusterMapFrom(b)
		if err != nil || cmap == nil {
			return nil, false, fmt.Errorf("data dir %s: no readable cluster map (%v); the data dir is damaged", cfg.DataDir, err)
		}
		if cfg.BootstrapExplicit && cfg.Join == "" && cmap.GetClusterId() != initial.GetClusterId() {
			return nil, false, fmt.Errorf("%w: data dir %s holds another cluster (id %x) than --initial-cluster/--shards/--replicas describe (id %x); use another --data-dir or start without bootstrap flags",
				ErrConfig, cfg.DataDir, cmap.GetClusterId(), initial.GetClusterId())
		}
		s.log.Info("recovering from data dir; bootstrap and join flags ignored", "data_dir", cfg.DataDir, "epoch", cmap.GetEpoch())
		return cmap, false, nil
	}
	if cfg.Join != "" {
		cmap, err := s.join()
		if err != nil {
			return nil, false, err
		}
		if err := s.persistMap(cmap); err != nil {
			return nil, false, err
		}
		s.log.Info("joined cluster", "via", cfg.Join, "epoch", cmap.GetEpoch(), "members", len(cmap.GetMembers()))
		return cmap, true, nil
	}
	if err := cfg.validateBootstrap(); err != nil {
		return nil, false, err
	}
	// Record our own client address in the initial map we start with; the
	// replicated map learns it when this node publishes it.
	if m := member(initial, cfg.NodeID); m != nil {
		m.ClientAddr = cfg.AdvertiseClient
	}
	if err := s.persistMap(initial); err != nil {
		return nil, false, err
	}
	s.log.Info("bootstrapped new node", "cluster", FormatInitialCluster(cfg.InitialCluster),
		"shards", cfg.Shards, "replicas", min(cfg.Replicas, len(cfg.InitialCluster)))
	return initial, true, nil
}

// persistMap records the map a fresh node starts with and its cluster id.
func (s *Server) persistMap(m *kvpb.ClusterMap) error {
	b, err := proto.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode cluster map: %w", err)
	}
	if err := s.engine.PutMeta(metaClusterMap, b); err != nil {
		return err
	}
	return s.engine.PutMeta(metaClusterID, u64(m.GetClusterId()))
}

// setMap installs a cluster map for routing.
func (s *Server) setMap(m *kvpb.ClusterMap) error {
	ring, err := hashring.FromMap(m)
	if err != nil {
		return fmt.Errorf("cluster map epoch %d: %w", m.GetEpoch(), err)
	}
	s.mu.Lock()
	s.mu.cmap, s.mu.ring = m, ring
	s.mu.Unlock()
	return nil
}

func (s *Server) clusterMap() *kvpb.ClusterMap {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.mu.cmap
}

func (s *Server) epoch() uint64 { return s.clusterMap().GetEpoch() }

func (s *Server) updatePeers(m *kvpb.ClusterMap) {
	for _, mb := range m.GetMembers() {
		if mb.GetId() != s.cfg.NodeID && mb.GetPeerAddr() != "" {
			s.tr.SetPeer(mb.GetId(), mb.GetPeerAddr())
		}
	}
}

// maintainMap keeps the node's view of the cluster map current and makes
// sure the replicated map exists and lists this node's addresses.
func (s *Server) maintainMap() {
	defer s.wg.Done()
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-s.stopc:
			return
		case <-t.C:
		}
		replicated := s.readReplicatedMap()
		if replicated == nil && s.host.Node(MetaShard) == nil {
			replicated = s.fetchMap()
		}
		if replicated != nil && replicated.GetEpoch() > s.epoch() {
			if err := s.setMap(replicated); err != nil {
				s.log.Error("cannot use cluster map", "err", err)
				continue
			}
			s.updatePeers(replicated)
			if b, err := proto.Marshal(replicated); err != nil {
				s.log.Error("encode cluster map", "err", err)
			} else if err := s.engine.PutMeta(metaClusterMap, b); err != nil {
				s.log.Error("persist cluster map", "err", err)
			}
			s.log.Info("cluster map updated", "epoch", replicated.GetEpoch())
			s.startNewReplicas(replicated)
		}
		if !s.published.Load() {
			s.published.Store(s.publishSelf(replicated))
		}
	}
}

// Bounds of session expiry's work: one ExpireSessions drops about
// expireBatch sessions, and one shard gets at most maxExpireRounds of
// them per run of expireSessions; what is left waits for the next run.
const (
	expireBatch     = 1000
	maxExpireRounds = 100
)

// expireSessions has every shard this node leads drop the sessions idle
// for longer than SessionTTL. The decision uses the leader's clock at
// proposal time, carried in the command; apply never reads a clock.
func (s *Server) expireSessions() {
	now := time.Now()
	for _, n := range s.host.Nodes() {
		if err := s.expireShardSessions(n, now); err != nil {
			s.log.Debug("expire sessions", "shard", n.Shard(), "err", err)
		}
	}
}

// expireShardSessions expires the sessions of n idle at now, oldest
// first, about expireBatch per command (fsm.ExpiryCutoff), so that no
// apply drops millions of them at once: a client may use a new session
// per write.
func (s *Server) expireShardSessions(n *raftnode.Node, now time.Time) error {
	sh, err := s.engine.OpenShard(n.Shard())
	if err != nil {
		return err
	}
	idle := s.cfg.SessionTTL.Milliseconds()
	cutoff := now.UnixMilli() - idle
	for range maxExpireRounds {
		if !n.IsLeader() {
			return nil
		}
		var c int64
		var more bool
		err := sh.View(func(r *storage.Reader) error {
			c, more = fsm.ExpiryCutoff(r, cutoff, expireBatch)
			return nil
		})
		if err != nil {
			return err
		}
		cmd, err := proto.Marshal(&peerpb.Command{Op: &peerpb.Command_ExpireSessions{ExpireSessions: &peerpb.ExpireSessions{
			NowUnixMs: c + idle,
			IdleMs:    idle,
		}}})
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(s.ctx, s.cfg.RequestTimeout)
		_, err = n.Propose(ctx, cmd)
		if err == nil && more {
			// The next cutoff is read from what this one left: the
			// commit index now covers it.
			err = waitVisible(ctx, sh, n.Commit())
		}
		cancel()
		if err != nil || !more {
			return err
		}
	}
	return nil
}

// readReplicatedMap reads the meta shard's map from the local replica, if
// this node has one.
func (s *Server) readReplicatedMap() *kvpb.ClusterMap {
	sh, err := s.engine.OpenShard(MetaShard)
	if err != nil {
		return nil
	}
	var m *kvpb.ClusterMap
	_ = sh.View(func(r *storage.Reader) error {
		m, _ = fsm.ClusterMap(r)
		return nil
	})
	return m
}

// publishSelf proposes the initial map (if the meta shard has none yet and
// this node leads it) and this node's addresses. It reports whether the
// replicated map already lists them.
func (s *Server) publishSelf(replicated *kvpb.ClusterMap) bool {
	self := &kvpb.Member{Id: s.cfg.NodeID, ClientAddr: s.cfg.AdvertiseClient, PeerAddr: s.cfg.AdvertisePeer}
	if replicated != nil {
		if m := member(replicated, s.cfg.NodeID); m != nil && proto.Equal(m, self) {
			return true
		}
	}
	ctx, cancel := context.WithTimeout(s.ctx, time.Second)
	defer cancel()
	if replicated == nil {
		n := s.host.Node(MetaShard)
		if n == nil || !n.IsLeader() {
			return false
		}
		initial := proto.CloneOf(s.clusterMap())
		if initial.GetEpoch() != 1 {
			return false
		}
		cmd, err := proto.Marshal(&peerpb.Command{Op: &peerpb.Command_SetClusterMap{SetClusterMap: &peerpb.SetClusterMap{Map: initial}}})
		if err != nil {
			s.log.Error("encode initial cluster map", "err", err)
			return false
		}
		if _, err := n.Propose(ctx, cmd); err != nil {
			s.log.Debug("propose initial cluster map", "err", err)
		}
		return false
	}
	cmd, err := proto.Marshal(&peerpb.Command{Op: &peerpb.Command_UpdateMember{UpdateMember: &peerpb.UpdateMember{Member: self}}})
	if err != nil {
		// Addresses that are not UTF-8 cannot be published; the log says so
		// on every attempt.
		s.log.Error("encode member addresses", "err", err)
		return false
	}
	if err := s.proposeMeta(ctx, cmd); err != nil {
		s.log.Debug("publish member addresses", "err", err)
	}
	return false
}

// proposeMeta replicates cmd on the meta shard, locally when this node
// leads it, otherwise through the leader's Internal.Propose; a node with no
// replica of the meta shard asks each of its replicas in turn. A command
// the state machine refused comes back as a rejectedError.
func (s *Server) proposeMeta(ctx context.Context, cmd []byte) error {
	var try []uint64
	if n := s.host.Node(MetaShard); n != nil {
		if n.IsLeader() {
			res, err := n.Propose(ctx, cmd)
			if err != nil {
				return err
			}
			if _, err := fsm.Outcome(res); err != nil {
				return metaRejected(err)
			}
			return nil
		}
		if l := n.Leader(); l != 0 {
			try = []uint64{l}
		}
	} else {
		for _, id := range replicasOf(s.clusterMap(), MetaShard) {
			if id != s.cfg.NodeID {
				try = append(try, id)
			}
		}
	}
	// Unavailable, as any shard without a leader: the caller retries.
	var err error = &raftnode.NotLeaderError{Shard: MetaShard}
	for _, id := range try {
		var resp *peerpb.ProposeResponse
		resp, err = internal(s, id, func(c peerpb.InternalClient) (*peerpb.ProposeResponse, error) {
			return c.Propose(ctx, &peerpb.ProposeRequest{Shard: MetaShard, Command: cmd})
		})
		if err == nil {
			if _, err := fsm.DecodeResult(resp.GetResult()); err != nil {
				return metaRejected(err)
			}
			return nil
		}
	}
	return err
}

// rejectedError is a meta command the state machine refused (a bad or
// conflicting change): retrying it cannot help.
type rejectedError struct{ error }

func (e rejectedError) Unwrap() error { return e.error }

// metaRejected is the error of a command the meta shard's state machine
// refused. ErrNotMeta there means the shard has not applied its first
// cluster map (the cluster bootstrapped a moment ago): that is
// unavailable for now, as a shard without a leader, not a refusal, so
// every caller's client retries it.
func metaRejected(err error) error {
	if errors.Is(err, fsm.ErrNotMeta) {
		return fmt.Errorf("%w: %v", errMapNotApplied, err)
	}
	return rejectedError{err}
}

var errMapNotApplied = errors.New("the cluster map is not committed yet; retry")

// internal calls another node's Internal service at its peer address.
func internal[T any](s *Server, id uint64, call func(peerpb.InternalClient) (T, error)) (T, error) {
	var zero T
	m := member(s.clusterMap(), id)
	if m == nil || m.GetPeerAddr() == "" {
		return zero, fmt.Errorf("no peer address for node %d", id)
	}
	conn, err := s.peerConn(m.GetPeerAddr())
	if err != nil {
		return zero, err
	}
	return call(peerpb.NewInternalClient(conn))
}

func (s *Server) peerConn(addr string) (*grpc.ClientConn, error) {
	s.peerConns.Lock()
	defer s.peerConns.Unlock()
	if c, ok := s.peerConns.byAddr[addr]; ok {
		return c, nil
	}
	c, err := grpc.NewClient(addr, s.tls.peerCreds(), grpc.WithChainUnaryInterceptor(s.tagPeerCall))
	if err != nil {
		return nil, err
	}
	s.peerConns.byAddr[addr] = c
	return c, nil
}

// Propose implements peerpb.Internal: replicate a command on a shard this
// node leads, on behalf of another node.
func (s *Server) Propose(ctx context.Context, req *peerpb.ProposeRequest) (*peerpb.ProposeResponse, error) {
	n := s.host.Node(req.GetShard())
	if n == nil {
		return nil, s.toStatus(ErrNoReplica, req.GetShard())
	}
	res, err := n.Propose(ctx, req.GetCommand())
	if err != nil {
		return nil, s.toStatus(err, req.GetShard())
	}
	r, ok := res.(*peerpb.Result)
	if !ok {
		return nil, fmt.Errorf("propose: result is a %T", res)
	}
	out, err := proto.Marshal(r)
	if err != nil {
		return nil, fmt.Errorf("propose: encode result: %w", err)
	}
	return &peerpb.ProposeResponse{Result: out}, nil
}

// ClientAddr and PeerAddr are the bound listen addresses.
func (s *Server) ClientAddr() string { return s.clientLis.Addr().String() }
func (s *Server) PeerAddr() string   { return s.peerLis.Addr().String() }

// MetricsAddr is the bound metrics address, or "" when disabled.
func (s *Server) MetricsAddr() string {
	if s.metricsLis == nil {
		return ""
	}
	return s.metricsLis.Addr().String()
}

// Host exposes the Raft host (tests, embedders' status pages).
func (s *Server) Host() *raftnode.Host { return s.host }

// Stop shuts the node down in reverse order of start and waits. Idempotent.
func (s *Server) Stop() error {
	s.stopOnce.Do(func() {
		close(s.stopc)
		s.cancel()
		if s.health != nil {
			s.health.Shutdown()
		}
		if s.httpSrv != nil {
			_ = s.httpSrv.Close()
		}
		if s.clientSrv != nil {
			s.clientSrv.Stop()
		}
		if s.host != nil {
			s.host.Stop()
		}
		if s.tr != nil {
			s.tr.Stop()
		}
		if s.peerSrv != nil {
			s.peerSrv.Stop()
		}
		for _, l := range []net.Listener{s.clientLis, s.peerLis, s.metricsLis} {
			if l != nil {
				_ = l.Close()
			}
		}
		s.watch.stop()
		s.wg.Wait()
		s.peerConns.Lock()
		for _, c := range s.peerConns.byAddr {
			_ = c.Close()
		}
		s.peerConns.Unlock()
		if s.engine != nil {
			s.stopErr = s.engine.Close()
		}
	})
	return s.stopErr
}

type snapshotSource struct{ e *storage.Store }

func (s snapshotSource) OpenSnapshot(shard uint64) (transport.SnapshotReader, error) {
	sh, err := s.e.OpenShard(shard)
	if err != nil {
		return nil, err
	}
	return sh.OpenSnapshot()
}

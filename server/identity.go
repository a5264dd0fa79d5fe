package server

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"strconv"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	grpcpeer "google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/storage"
	"github.com/kvd/kvd/transport"
)

// Node metadata of peer identity (see transport's handshake).
const (
	// metaIncarnation is a random number drawn when the data dir is first
	// used. A node id that comes back with another one lost its raft
	// state, and its peers refuse it.
	metaIncarnation = "incarnation"
	// metaPeerIncarnation prefixes, per peer id, the incarnation this node
	// first saw that peer with.
	metaPeerIncarnation = "peer-incarnation/"
)

// loadIncarnation returns the data dir's incarnation, drawing and
// persisting one if it has none yet: a fresh data dir, or one written
// before incarnations existed, whose peers have no record to contradict.
// A bootstrap that crashes before completing keeps the one it drew.
func loadIncarnation(e *storage.Store) (uint64, error) {
	b, err := e.GetMeta(metaIncarnation)
	if err != nil {
		return 0, err
	}
	if b != nil {
		return fromU64(b), nil
	}
	var r [8]byte
	var inc uint64
	for inc == 0 {
		if _, err := rand.Read(r[:]); err != nil {
			return 0, fmt.Errorf("draw the data dir's incarnation: %w", err)
		}
		inc = binary.BigEndian.Uint64(r[:])
	}
	if err := e.PutMeta(metaIncarnation, u64(inc)); err != nil {
		return 0, err
	}
	return inc, nil
}

// peerIncarnations implements transport.Incarnations over the engine's
// node metadata, with a cache: the transport asks on every stream.
type peerIncarnations struct {
	e  *storage.Store
	mu sync.Mutex
	m  map[uint64]uint64
}

func newPeerIncarnations(e *storage.Store) *peerIncarnations {
	return &peerIncarnations{e: e, m: map[uint64]uint64{}}
}

func (p *peerIncarnations) PeerIncarnation(id uint64) (uint64, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if inc, ok := p.m[id]; ok {
		return inc, nil
	}
	b, err := p.e.GetMeta(metaPeerIncarnation + strconv.FormatUint(id, 10))
	if err != nil {
		return 0, err
	}
	if b == nil {
		return 0, nil
	}
	p.m[id] = fromU64(b)
	return p.m[id], nil
}

func (p *peerIncarnations) RecordPeerIncarnation(id, inc uint64) error {
	if err := p.e.PutMeta(metaPeerIncarnation+strconv.FormatUint(id, 10), u64(inc)); err != nil {
		return err
	}
	p.mu.Lock()
	p.m[id] = inc
	p.mu.Unlock()
	return nil
}

// Internal and Cluster calls between nodes carry the caller's cluster and
// node id, as raft streams do, so that a wrong peer address cannot feed a
// node another cluster's map or commands.
const (
	mdPeerCluster = transport.MetadataCluster
	mdPeerFrom    = transport.MetadataFrom
)

// tagPeerCall adds this node's identity to a call to another node.
func (s *Server) tagPeerCall(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	// One append, and versions that strconv has cached: a forwarded
	// request pays nothing more for announcing them.
	ctx = metadata.AppendToOutgoingContext(ctx, mdPeerCluster, strconv.FormatUint(s.clusterMap().GetClusterId(), 16),
		mdPeerFrom, strconv.FormatUint(s.cfg.NodeID, 16),
		transport.MetadataProtocol, strconv.Itoa(transport.PeerProtocol),
		transport.MetadataProtocolMin, strconv.Itoa(transport.MinPeerProtocol))
	return invoker(ctx, method, req, reply, cc, opts...)
}

// checkPeerCall refuses a call on the peer listener from a node of another
// cluster, or of a release whose peer protocol versions this node does not
// speak (transport/version.go; a call that announces none is version 1, as
// from a build older than versions). With peer TLS, it also refuses a call
// whose certificate does not name the node id the call claims, or that
// claims none: only members call the peer port then. Without peer TLS a
// call without identity (a client tool) passes.
//
// It covers every unary call on the peer port, once per call. The only
// streaming calls there are Raft.Stream and Raft.Snapshot, which the
// transport checks in its handshake; a new streaming peer call must check
// the versions too (transport.CheckProtocols).
func (s *Server) checkPeerCall(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	if s.tls.peerServer != nil {
		if err := s.checkPeerCert(ctx, md); err != nil {
			s.log.Warn("refused a peer call", "method", info.FullMethod, "err", err)
			return nil, status.Error(codes.Unauthenticated, err.Error())
		}
	}
	if _, err := transport.CheckProtocols(md, transport.Spoken(), s.cfg.NodeID, peerCaller(ctx, md)); err != nil {
		s.tr.LogRefusal(fmt.Sprint("call", md.Get(mdPeerFrom), md.Get(transport.MetadataProtocol)),
			"refused a peer call", "method", info.FullMethod, "err", err)
		return nil, s.toStatus(err, 0)
	}
	if v := md.Get(mdPeerCluster); len(v) > 0 {
		own := strconv.FormatUint(s.clusterMap().GetClusterId(), 16)
		if v[0] != own {
			from, addr := md.Get(mdPeerFrom), "unknown address"
			if p, ok := grpcpeer.FromContext(ctx); ok {
				addr = p.Addr.String()
			}
			err := fmt.Errorf("%w: node %v at %s is of cluster %s, but node %d is of cluster %s", transport.ErrPeerMismatch, from, addr, v[0], s.cfg.NodeID, own)
			s.log.Error("refused a call from another cluster", "method", info.FullMethod, "err", err)
			return nil, s.toStatus(err, 0)
		}
	}
	return handler(ctx, req)
}

// checkPeerCert checks that the caller's verified node certificate names
// the node id (and the call the cluster id) it claims.
func (s *Server) checkPeerCert(ctx context.Context, md metadata.MD) error {
	id, err := transport.PeerCertID(ctx)
	if err != nil {
		return err
	}
	from, cluster := md.Get(mdPeerFrom), md.Get(mdPeerCluster)
	if len(from) == 0 || len(cluster) == 0 {
		return fmt.Errorf("%w: node %d's call carries no cluster or node id", transport.ErrPeerMismatch, id)
	}
	if claimed, err := strconv.ParseUint(from[0], 16, 64); err != nil || claimed != id {
		return fmt.Errorf("%w: a peer with the certificate of node %d claims to be node %s", transport.ErrPeerMismatch, id, from[0])
	}
	return nil
}

// peerCaller names the caller of a peer call for an error: "node 2 at
// 127.0.0.1:2380", or "a caller at ..." when it gives no node id.
func peerCaller(ctx context.Context, md metadata.MD) string {
	addr := "unknown address"
	if p, ok := grpcpeer.FromContext(ctx); ok {
		addr = p.Addr.String()
	}
	if from := md.Get(mdPeerFrom); len(from) > 0 {
		if id, err := strconv.ParseUint(from[0], 16, 64); err == nil {
			return fmt.Sprintf("node %d at %s", id, addr)
		}
	}
	return "a caller at " + addr
}

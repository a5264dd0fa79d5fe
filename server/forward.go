package server

import (
	"context"
	"errors"
	"strconv"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/raftnode"
)

// A request that reaches a follower of its shard is forwarded to the
// shard's leader over the follower's own peer connection, and the
// leader's answer goes back as the follower's. A client that can reach
// one member, and not the client addresses the others advertise (a
// container's service name seen from the host, a node behind NAT), is
// then served all the same: the nodes reach each other at their peer
// addresses, or Raft would not work.
//
// The request travels unchanged, header included, so a write keeps its
// (session, seq) and stays exactly-once: a retry of it, forwarded or
// sent straight to the leader, is answered from the state machine's
// session record. A forwarded request is never forwarded again (a leader
// that lost its leadership meanwhile answers NotLeader, and the client
// retries), so a request cannot loop. When the leader cannot be reached
// either, the client gets the follower's own NotLeader answer, with its
// hint.

// forwardedKV serves, on the peer listener, the KV requests other members
// forward. Only unary calls from a node of this cluster are accepted.
type forwardedKV struct {
	kvpb.UnimplementedKVServer
	s *Server
}

// forwardedKey marks the context of a forwarded request.
type forwardedKey struct{}

// serveForwarded serves one forwarded request with h, the client port's
// handler, under what the client port's interceptors give a request: a
// failed node refuses it, and a panic fails the request alone.
func serveForwarded[Req, Resp any](ctx context.Context, s *Server, method string, req Req, h func(context.Context, Req) (Resp, error)) (resp Resp, err error) {
	defer s.recovered("Forwarded/"+method, &err)
	md, _ := metadata.FromIncomingContext(ctx)
	if len(md.Get(mdPeerCluster)) == 0 || len(md.Get(mdPeerFrom)) == 0 {
		// checkPeerCall has verified a cluster id when there is one.
		return resp, status.Error(codes.PermissionDenied, "the peer port serves KV requests forwarded by members only; send requests to a client address")
	}
	// Any answer, an error included, carries this header: the forwarder
	// tells an answer from a call that never reached us by it.
	if err := grpc.SetHeader(ctx, metadata.Pairs(mdAnsweredBy, strconv.FormatUint(s.cfg.NodeID, 10))); err != nil {
		return resp, status.Errorf(codes.Internal, "set header: %v", err)
	}
	if err := s.failure(); err != nil {
		return resp, s.toStatus(err, 0)
	}
	return h(context.WithValue(ctx, forwardedKey{}, true), req)
}

// mdAnsweredBy is the header of every answer to a forwarded request.
const mdAnsweredBy = "kvd-answered-by"

func (f forwardedKV) Put(ctx context.Context, req *kvpb.PutRequest) (*kvpb.PutResponse, error) {
	return serveForwarded(ctx, f.s, "Put", req, f.s.Put)
}

func (f forwardedKV) Delete(ctx context.Context, req *kvpb.DeleteRequest) (*kvpb.DeleteResponse, error) {
	return serveForwarded(ctx, f.s, "Delete", req, f.s.Delete)
}

func (f forwardedKV) Txn(ctx context.Context, req *kvpb.TxnRequest) (*kvpb.TxnResponse, error) {
	return serveForwarded(ctx, f.s, "Txn", req, f.s.Txn)
}

func (f forwardedKV) Get(ctx context.Context, req *kvpb.GetRequest) (*kvpb.GetResponse, error) {
	return serveForwarded(ctx, f.s, "Get", req, f.s.Get)
}

func (f forwardedKV) Range(ctx context.Context, req *kvpb.RangeRequest) (*kvpb.RangeResponse, error) {
	return serveForwarded(ctx, f.s, "Range", req, f.s.Range)
}

// forward sends a request that failed here with err to shard's leader,
// when err says this node is not the leader and names it, and returns the
// leader's answer with ok set. ok is false when the request is not to be
// forwarded (another error, a leader unknown, a request forwarded to us)
// or the leader could not be reached: the caller then answers err.
func forward[Resp any](ctx context.Context, s *Server, err error, shard uint64, call func(context.Context, kvpb.KVClient, ...grpc.CallOption) (Resp, error)) (resp Resp, ferr error, ok bool) {
	var nl *raftnode.NotLeaderError
	if s.cfg.NoForwarding || !errors.As(err, &nl) || nl.Leader == 0 || nl.Leader == s.cfg.NodeID || ctx.Value(forwardedKey{}) != nil {
		return resp, nil, false
	}
	m := member(s.clusterMap(), nl.Leader)
	if m.GetPeerAddr() == "" {
		return resp, nil, false
	}
	conn, cerr := s.peerConn(m.GetPeerAddr())
	if cerr != nil {
		return resp, nil, false
	}
	var hdr metadata.MD
	resp, ferr = call(ctx, kvpb.NewKVClient(conn), grpc.Header(&hdr),
		grpc.MaxCallRecvMsgSize(s.cfg.Limits.MaxResponseBytes+64<<10),
		grpc.MaxCallSendMsgSize(s.cfg.Limits.MaxRequestBytes+64<<10))
	if ferr != nil && len(hdr.Get(mdAnsweredBy)) == 0 {
		// The leader did not answer (its connection failed, or it does
		// not serve forwarded requests): this node's own NotLeader, with
		// its hint, is the better answer, and the client may reach the
		// leader itself.
		s.metrics.forwards.WithLabelValues("failed").Inc()
		return resp, nil, false
	}
	s.metrics.forwards.WithLabelValues("answered").Inc()
	return resp, ferr, true
}

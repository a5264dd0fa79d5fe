package server

import (
	"context"
	"fmt"
	"runtime/debug"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/proto/kvpb"
)

// A panic in a request handler is a bug, but it is one request's bug: left
// alone it kills the node, and a client retrying the request on the next
// leader kills that one too, until the shard has no quorum. The handlers
// of the client server therefore run under recovered: the request gets
// Internal, the stack goes to the log and kvd_handler_panics_total counts
// it. State is safe to keep serving: a handler changes shard state only
// through Raft proposals, which apply (or not) on their own.

// recoverUnary is the client server's innermost unary interceptor, so the
// metrics interceptor around it records the request as Internal and
// releases its admission.
func (s *Server) recoverUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	defer s.recovered(info.FullMethod, &err)
	return handler(ctx, req)
}

// recoverStream recovers a panic on a stream handler's own goroutine; the
// items of a Batch stream run on goroutines of their own, which
// recoverItems covers.
func (s *Server) recoverStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
	defer s.recovered(info.FullMethod, &err)
	return handler(srv, ss)
}

// recoverItems wraps the serve function of a Batch stream so that a panic
// serving one item fails that item alone with Internal.
func (s *Server) recoverItems(serve func(context.Context, *kvpb.BatchRequestItem) (*kvpb.BatchResponseItem, error)) func(context.Context, *kvpb.BatchRequestItem) (*kvpb.BatchResponseItem, error) {
	return func(ctx context.Context, it *kvpb.BatchRequestItem) (res *kvpb.BatchResponseItem, err error) {
		defer s.recovered("Batch/"+it.Method(), &err)
		return serve(ctx, it)
	}
}

// recovered, deferred by a handler, turns its panic into an Internal error
// in *err, logs the stack and counts it under method.
func (s *Server) recovered(method string, err *error) {
	p := recover()
	if p == nil {
		return
	}
	if i := lastSlash(method); i >= 0 && method[0] == '/' {
		method = method[i+1:]
	}
	s.log.Error("request handler panicked; the request fails with Internal", "method", method, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
	s.metrics.panics.WithLabelValues(method).Inc()
	*err = status.Errorf(codes.Internal, "node %d: internal error serving %s (a bug; the node logged it)", s.cfg.NodeID, method)
}

package kvpb

// Hand-written code for the Batch method that the kvd server and its
// clients share. The server's stream handling is server.serveBatch. `make
// proto` does not touch this file.

import (
	"context"

	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// The flow-control windows of a client connection, which both ends fix:
// the client when it dials a member, the node's client listener when it
// accepts. gRPC's default window grows by estimating the bandwidth-delay
// product, and to do so it keeps a PING in flight on every connection that
// receives data: a frame and its answer per round trip, which on a busy
// connection cost more than they tell (d43c0bf has the measurements).
// 256 KiB per stream is far more than a stream of small requests has in
// flight, and a full 1 MiB batch message crosses it in four window
// updates; fixed on the node's side too, it bounds what one client
// connection can make a node buffer.
const (
	ClientStreamWindow = 256 << 10
	ClientConnWindow   = 1 << 20
)

// Method is the name of the unary method that serves the item's request.
func (it *BatchRequestItem) Method() string {
	switch it.GetRequest().(type) {
	case *BatchRequestItem_Put:
		return "Put"
	case *BatchRequestItem_Get:
		return "Get"
	case *BatchRequestItem_Delete:
		return "Delete"
	case *BatchRequestItem_Txn:
		return "Txn"
	}
	return "Unknown"
}

// Call serves it with srv's unary method and returns the answer, or the
// unary method's error.
func (it *BatchRequestItem) Call(ctx context.Context, srv KVServer) (*BatchResponseItem, error) {
	res := &BatchResponseItem{Id: it.GetId()}
	switch r := it.GetRequest().(type) {
	case *BatchRequestItem_Put:
		p, err := srv.Put(ctx, r.Put)
		if err != nil {
			return nil, err
		}
		res.Response = &BatchResponseItem_Put{Put: p}
	case *BatchRequestItem_Get:
		g, err := srv.Get(ctx, r.Get)
		if err != nil {
			return nil, err
		}
		res.Response = &BatchResponseItem_Get{Get: g}
	case *BatchRequestItem_Delete:
		d, err := srv.Delete(ctx, r.Delete)
		if err != nil {
			return nil, err
		}
		res.Response = &BatchResponseItem_Delete{Delete: d}
	case *BatchRequestItem_Txn:
		t, err := srv.Txn(ctx, r.Txn)
		if err != nil {
			return nil, err
		}
		res.Response = &BatchResponseItem_Txn{Txn: t}
	default:
		return nil, status.Error(codes.InvalidArgument, "batch item carries no request this node knows")
	}
	return res, nil
}

// Inner is the item's request message.
func (it *BatchRequestItem) Inner() proto.Message {
	switch r := it.GetRequest().(type) {
	case *BatchRequestItem_Put:
		return r.Put
	case *BatchRequestItem_Get:
		return r.Get
	case *BatchRequestItem_Delete:
		return r.Delete
	case *BatchRequestItem_Txn:
		return r.Txn
	}
	return it
}

// StatusOf encodes err as the Status of a failed item.
func StatusOf(err error) *Status {
	p := status.Convert(err).Proto()
	return &Status{Code: p.GetCode(), Message: p.GetMessage(), Details: p.GetDetails()}
}

// Err decodes s back into the gRPC status error StatusOf was given, details
// included.
func (s *Status) Err() error {
	return status.ErrorProto(&spb.Status{Code: s.GetCode(), Message: s.GetMessage(), Details: s.GetDetails()})
}

package kvpb

// Hand-written helpers for the Batch method, shared by the kvd server and
// the client's test double (package clienttest), so both serve a stream
// the same way. `make proto` does not touch this file.

import (
	"context"
	"errors"
	"io"
	"runtime"
	"sync"
	"time"

	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// maxBatchResponseBytes bounds one BatchResponse message. Answers beyond it
// go in the next message, so a burst of large Get answers stays under the
// client's 4 MiB receive limit; one answer alone may exceed it only as far
// as a unary answer could.
const maxBatchResponseBytes = 1 << 20

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

// ServeBatch serves a Batch stream: serve runs for each item in a goroutine
// of its own, so a slow proposal does not hold up a read queued behind it,
// with a context that ends at the item's timeout (if set) or with the
// stream. Answers ready together leave in one message. ServeBatch returns
// when the client has half-closed or gone and every item is answered.
func ServeBatch(stream KV_BatchServer, serve func(context.Context, *BatchRequestItem) (*BatchResponseItem, error)) error {
	ctx := stream.Context()
	out := &replyQueue{wake: make(chan struct{}, 1)}
	sent := make(chan error, 1)
	go func() { sent <- out.sendAll(stream) }()

	var items sync.WaitGroup
	var recvErr error
	for {
		req, err := stream.Recv()
		if err != nil {
			recvErr = err
			break
		}
		for _, it := range req.GetItems() {
			items.Add(1)
			go func() {
				defer items.Done()
				out.put(serveItem(ctx, it, serve))
			}()
		}
	}
	items.Wait()
	out.close()
	if err := <-sent; err != nil {
		return err
	}
	if errors.Is(recvErr, io.EOF) {
		return nil
	}
	return recvErr
}

func serveItem(ctx context.Context, it *BatchRequestItem,
	serve func(context.Context, *BatchRequestItem) (*BatchResponseItem, error)) *BatchResponseItem {
	if t := it.GetTimeoutUs(); t > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(t)*time.Microsecond)
		defer cancel()
	}
	res, err := serve(ctx, it)
	if err != nil {
		return &BatchResponseItem{Id: it.GetId(), Error: StatusOf(err)}
	}
	res.Id = it.GetId()
	return res
}

// replyQueue collects answers from the item goroutines for the one
// goroutine that may Send on the stream.
type replyQueue struct {
	mu     sync.Mutex
	items  []*BatchResponseItem
	closed bool
	wake   chan struct{} // cap 1: items or closed changed
}

func (q *replyQueue) put(it *BatchResponseItem) {
	q.mu.Lock()
	q.items = append(q.items, it)
	q.mu.Unlock()
	q.signal()
}

func (q *replyQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.signal()
}

func (q *replyQueue) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// fitting returns how many of items, at least one, fit in one message of
// maxBatchResponseBytes. A lone answer, the usual case, is not sized:
// Send sizes it anyway, and it goes alone whatever its size.
func fitting(items []*BatchResponseItem) int {
	if len(items) == 1 {
		return 1
	}
	size := 0
	for n, it := range items {
		if size += proto.Size(it); n > 0 && size > maxBatchResponseBytes {
			return n
		}
	}
	return len(items)
}

// sendAll sends whatever is queued, one message per wake-up (cut at
// maxBatchResponseBytes), until the queue is closed and empty. After a
// Send error it sends no more, and returns the error once closed.
func (q *replyQueue) sendAll(stream KV_BatchServer) error {
	var sendErr error
	for range q.wake {
		// Yield once before taking the queue, so that item goroutines
		// woken together (a storage round answers many proposals at
		// once, a leadership check many reads) queue their answers for
		// the same message instead of one message each.
		runtime.Gosched()
		q.mu.Lock()
		items, closed := q.items, q.closed
		q.items = nil
		q.mu.Unlock()
		for len(items) > 0 && sendErr == nil {
			n := fitting(items)
			sendErr = stream.Send(&BatchResponse{Items: items[:n]})
			items = items[n:]
		}
		if closed {
			return sendErr
		}
	}
	return sendErr
}

package client

import (
	"context"
	"errors"
	"io"
	"runtime"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/kvpb"
)

// Batch limits. A request larger than maxBatchItemBytes goes by its unary
// method instead, so an oversized one fails alone, as it always has, and
// never takes the stream and its neighbours down with it; a batch message
// is cut at maxBatchBytes, far below the node's 2 MiB receive limit.
const (
	maxBatchItemBytes = 256 << 10
	maxBatchBytes     = 1 << 20
)

// do sends one Put, Get, Delete or Txn to n and waits for its answer.
// Requests travel on n's Batch stream, where everything queued for the
// node while the previous message was being written leaves in the next
// one: when requests queue faster than the sender writes, one pair of
// syscalls carries several, and a lone request goes at once. The returned
// error is the gRPC status the unary method would have returned, so the
// retry loop classifies both alike.
//
// The item is encoded here, on the caller's goroutine (the unary path
// encodes before it returns too), and never read again once do returns:
// the caller may change the item for its next attempt and reuse its key
// and value buffers at once, even after a timeout that leaves the item
// queued or on the wire. (Encoding in the stream's sender raced with
// exactly that reuse and could send a different key than the caller asked
// for.) do sets the item's id and timeout.
func (n *node) do(ctx context.Context, item *kvpb.BatchRequestItem) (*kvpb.BatchResponseItem, error) {
	item.Id = n.itemIDs.Add(1)
	if dl, ok := ctx.Deadline(); ok {
		item.TimeoutUs = max(1, time.Until(dl).Microseconds())
	}
	size := proto.Size(item)
	if size > maxBatchItemBytes {
		return n.unary(ctx, item)
	}
	enc, err := encodeItem(item, size)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "client: encode request: %v", err)
	}
	b, err := n.batchStream(ctx)
	if err != nil {
		return nil, err
	}
	return b.do(ctx, item.Id, enc)
}

// encodeItem returns item as one entry of BatchRequest.items (field 1):
// tag, length and message, ready to be concatenated with others.
func encodeItem(item *kvpb.BatchRequestItem, size int) ([]byte, error) {
	buf := make([]byte, 0, size+protowire.SizeTag(1)+protowire.SizeVarint(uint64(size)))
	buf = protowire.AppendTag(buf, 1, protowire.BytesType)
	buf = protowire.AppendVarint(buf, uint64(size))
	return proto.MarshalOptions{UseCachedSize: true}.MarshalAppend(buf, item)
}

// encodedBatch is a BatchRequest already in wire form: its items'
// encodings, concatenated. batchCodec sends it as it is.
type encodedBatch []byte

// batchCodec is the proto codec, except that it sends an encodedBatch's
// bytes unchanged. Its name stays "proto": on the wire nothing differs.
type batchCodec struct{ encoding.CodecV2 }

func (c batchCodec) Marshal(v any) (mem.BufferSlice, error) {
	if b, ok := v.(encodedBatch); ok {
		return mem.BufferSlice{mem.SliceBuffer(b)}, nil
	}
	return c.CodecV2.Marshal(v)
}

var batchCallCodec = grpc.ForceCodecV2(batchCodec{encoding.GetCodecV2(grpcproto.Name)})

// unary sends item by its own method, through the same dispatch the
// node uses for Batch items.
func (n *node) unary(ctx context.Context, item *kvpb.BatchRequestItem) (*kvpb.BatchResponseItem, error) {
	return item.Call(ctx, unaryKV{kv: n.kv})
}

// unaryKV presents a node's unary KV methods as a kvpb.KVServer, so that
// BatchRequestItem.Call can send an item by its own method.
type unaryKV struct {
	kvpb.UnimplementedKVServer
	kv kvpb.KVClient
}

func (u unaryKV) Put(ctx context.Context, r *kvpb.PutRequest) (*kvpb.PutResponse, error) {
	return u.kv.Put(ctx, r)
}

func (u unaryKV) Get(ctx context.Context, r *kvpb.GetRequest) (*kvpb.GetResponse, error) {
	return u.kv.Get(ctx, r)
}

func (u unaryKV) Delete(ctx context.Context, r *kvpb.DeleteRequest) (*kvpb.DeleteResponse, error) {
	return u.kv.Delete(ctx, r)
}

func (u unaryKV) Txn(ctx context.Context, r *kvpb.TxnRequest) (*kvpb.TxnResponse, error) {
	return u.kv.Txn(ctx, r)
}

// batchStream returns n's open Batch stream, opening one if there is none
// or the last one broke. Opening waits for the connection no longer than
// ctx allows, though the stream itself lives as long as the node: a node
// that accepts connections and never answers (paused, or behind a
// partition) costs each caller one attempt timeout, as a unary call would.
// Callers queue for the right to open, each only as long as its own ctx.
func (n *node) batchStream(ctx context.Context) (*batchStream, error) {
	select {
	case n.batchLock <- struct{}{}:
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	defer func() { <-n.batchLock }()
	if b := n.batch; b != nil && b.alive() {
		return b, nil
	}
	sctx, cancel := context.WithCancel(n.ctx)
	stop := context.AfterFunc(ctx, cancel)
	s, err := n.kv.Batch(sctx, batchCallCodec)
	if !stop() {
		// ctx ended while the stream was being opened; sctx is cancelled.
		cancel()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	if err != nil {
		cancel()
		return nil, err
	}
	b := &batchStream{
		stream:  s,
		cancel:  cancel,
		node:    n,
		waiting: map[uint64]*batchCall{},
		wake:    make(chan struct{}, 1),
	}
	go b.sendLoop(sctx)
	go b.recvLoop()
	n.batch = b
	return b, nil
}

// batchStream is one open Batch stream: callers queue items, sendLoop
// writes them out, recvLoop hands each answer to its caller. When either
// direction fails, every caller waiting on the stream gets that error and
// the next request opens a new stream.
type batchStream struct {
	stream kvpb.KV_BatchClient
	cancel context.CancelFunc
	node   *node
	wake   chan struct{} // cap 1: the queue has items

	mu      sync.Mutex
	queue   []*batchCall          // not yet sent
	waiting map[uint64]*batchCall // sent, by item id
	err     error                 // why the stream broke; nil while it works
}

type batchCall struct {
	// abandoned: the caller gave up after the item was sent; its bulkhead
	// token is released when the answer comes (guarded by batchStream.mu).
	abandoned bool

	ctx  context.Context
	id   uint64
	enc  []byte        // the item, encoded as an entry of BatchRequest.items
	done chan struct{} // closed once resp or err is set
	resp *kvpb.BatchResponseItem
	err  error
}

func (b *batchStream) alive() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err == nil
}

func (b *batchStream) do(ctx context.Context, id uint64, enc []byte) (*kvpb.BatchResponseItem, error) {
	c := &batchCall{ctx: ctx, id: id, enc: enc, done: make(chan struct{})}
	b.mu.Lock()
	if err := b.err; err != nil {
		b.mu.Unlock()
		return nil, err
	}
	b.queue = append(b.queue, c)
	b.mu.Unlock()
	select {
	case b.wake <- struct{}{}:
	default:
	}
	select {
	case <-c.done:
	case <-ctx.Done():
		b.mu.Lock()
		if b.waiting[c.id] == c {
			// Sent: the node works on it until it answers (at its
			// timeout, the same deadline as ctx's, at the latest). Its
			// bulkhead token stays taken until then, so the bulkhead
			// bounds what the node holds, not only who waits.
			c.abandoned = true
			b.node.keepToken()
		}
		b.mu.Unlock()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	if c.err != nil {
		return nil, c.err
	}
	if e := c.resp.GetError(); e != nil {
		return nil, e.Err()
	}
	return c.resp, nil
}

// sendLoop writes out the queue, one message per wake-up (cut at
// maxBatchBytes), skipping callers that have already given up.
func (b *batchStream) sendLoop(ctx context.Context) {
	var calls []*batchCall
	for {
		select {
		case <-b.wake:
		case <-ctx.Done():
			return
		}
		// Yield once before taking the queue: the callers an answer
		// message just woke are runnable but have not queued their next
		// request yet, and on a busy machine this goroutine would
		// otherwise run first and send a message per caller.
		runtime.Gosched()
		b.mu.Lock()
		queue := b.queue
		b.queue = nil
		calls = calls[:0]
		for _, c := range queue {
			if c.ctx.Err() != nil {
				continue
			}
			b.waiting[c.id] = c
			calls = append(calls, c)
		}
		b.mu.Unlock()
		for pending := calls; len(pending) > 0; {
			n, size := 0, 0
			for _, c := range pending {
				if n > 0 && size+len(c.enc) > maxBatchBytes {
					break
				}
				n, size = n+1, size+len(c.enc)
			}
			// A fresh buffer each message: gRPC may still be writing
			// the last one when Send returns.
			msg := make(encodedBatch, 0, size)
			for _, c := range pending[:n] {
				msg = append(msg, c.enc...)
			}
			if err := b.stream.SendMsg(msg); err != nil {
				// Send reports io.EOF when the stream ended; Recv has the cause.
				b.fail(err)
				return
			}
			pending = pending[n:]
		}
		clear(calls) // let answered calls be collected
	}
}

// recvLoop hands answers to their callers until the stream ends.
func (b *batchStream) recvLoop() {
	for {
		resp, err := b.stream.Recv()
		if err != nil {
			b.fail(err)
			return
		}
		b.mu.Lock()
		for _, it := range resp.GetItems() {
			if c := b.waiting[it.GetId()]; c != nil {
				delete(b.waiting, it.GetId())
				c.resp = it
				close(c.done)
				if c.abandoned {
					b.node.releaseKept()
				}
			}
		}
		b.mu.Unlock()
	}
}

// fail ends the stream: every caller still waiting gets err, as a gRPC
// status (a clean end is Unavailable: the node stopped serving it).
func (b *batchStream) fail(err error) {
	if errors.Is(err, io.EOF) {
		err = status.Error(codes.Unavailable, "client: the node closed the batch stream")
	} else if _, ok := status.FromError(err); !ok {
		err = status.Error(codes.Unavailable, err.Error())
	}
	b.mu.Lock()
	if b.err == nil {
		b.err = err
	}
	err = b.err
	calls := b.queue
	for _, c := range b.waiting {
		calls = append(calls, c)
	}
	b.queue, b.waiting = nil, map[uint64]*batchCall{}
	b.mu.Unlock()
	b.cancel()
	for _, c := range calls {
		c.err = err
		close(c.done)
		if c.abandoned {
			b.node.releaseKept()
		}
	}
}

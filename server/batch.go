package server

import (
	"context"
	"errors"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/kvpb"
)

// maxBatchResponseBytes bounds one kvpb.BatchResponse message. Answers beyond it
// go in the next message, so a burst of large Get answers stays under the
// client's 4 MiB receive limit; one answer alone may exceed it only as far
// as a unary answer could.
const maxBatchResponseBytes = 1 << 20

// batchOptions bound what one Batch stream may hold. The zero value takes
// the defaults below.
type batchOptions struct {
	// MaxHeldItems and MaxHeldBytes bound what the stream holds at once:
	// items being served (counted at their request size) plus answers not
	// yet sent (at their answer size). At either bound serveBatch stops
	// calling Recv, so gRPC's flow control pushes back on the client
	// instead of the node buffering its requests, and stops starting the
	// items of a message it has received: a message is held whole (at
	// most the server's receive limit) until its last item starts.
	MaxHeldItems int
	MaxHeldBytes int
	// MaxServing bounds the items being served at once, whose answers'
	// sizes are not known yet (each is held at the stream's average answer
	// so far, and at most 4 are served before 4 answers have been seen):
	// what answers can add beyond MaxHeldBytes is at most this many.
	MaxServing int
	// SendTimeout cuts off a stream whose Send has been blocked this long:
	// its client is not reading its answers, and every answer it does not
	// read would stay in the node's memory.
	SendTimeout time.Duration
	// Charge, when set, is asked to charge each answer's bytes to a
	// node-wide budget: the stream's expected answer size before the item
	// is served, and the rest once the answer is known to be larger. If it
	// refuses, the item is answered with errAnswerRefused instead (not
	// served, or its answer dropped; it should refuse only reads: a
	// write's answer says it was applied). Release gets back what Charge
	// accepted, once the answer is sent or dropped.
	Charge  func(it *kvpb.BatchRequestItem, bytes int64) bool
	Release func(bytes int64)
	// ChargeMessage, when set, is asked to charge a received message to
	// the node-wide budget while its items wait to start: its size and
	// what decoding its items took (decodedItemBytes each; an empty item
	// is 2 bytes on the wire). If it refuses, the stream ends with
	// errMessageRefused and the message is dropped. Release gets it back
	// once the message's last item has started.
	ChargeMessage func(bytes int64) bool
	// CutOff, when set, is called once when the stream is cut off for not
	// reading (a metric).
	CutOff func()
}

// batchSlowStart is how many items a stream serves at once until it has
// answered as many: a stream's first answers could each be as large as a
// value, and until they are seen, their size cannot be held against
// MaxHeldBytes.
const batchSlowStart = 4

// Defaults of batchOptions.
const (
	defaultBatchHeldItems   = 1024
	defaultBatchServing     = 128
	defaultBatchHeldBytes   = 4 << 20
	defaultBatchSendTimeout = 10 * time.Second
)

// errNotReading is the status a Batch stream ends with when its client
// stopped reading its answers for longer than batchOptions.SendTimeout.
var errNotReading = status.Error(codes.ResourceExhausted, "client is not reading its answers: batch stream cut off")

// decodedItemBytes is what one decoded BatchRequestItem takes beyond its
// wire size: a million empty items, 2 MB on the wire, took about 90 MiB.
const decodedItemBytes = 96

// errMessageRefused ends a Batch stream whose message the node-wide
// budget has no room for (batchOptions.ChargeMessage).
var errMessageRefused = status.Error(codes.ResourceExhausted, "node overloaded: no room for this batch message and its items; back off and retry")

// errAnswerRefused answers an item whose answer batchOptions.Charge
// refused: the node holds too many bytes of answers already.
var errAnswerRefused = status.Error(codes.ResourceExhausted, "node overloaded: too many answer bytes waiting to be sent; back off and retry")

func (o *batchOptions) setDefaults() {
	if o.MaxHeldItems <= 0 {
		o.MaxHeldItems = defaultBatchHeldItems
	}
	if o.MaxServing <= 0 {
		o.MaxServing = defaultBatchServing
	}
	if o.MaxHeldBytes <= 0 {
		o.MaxHeldBytes = defaultBatchHeldBytes
	}
	if o.SendTimeout <= 0 {
		o.SendTimeout = defaultBatchSendTimeout
	}
	if o.Charge == nil {
		o.Charge = func(*kvpb.BatchRequestItem, int64) bool { return true }
	}
	if o.Release == nil {
		o.Release = func(int64) {}
	}
	if o.CutOff == nil {
		o.CutOff = func() {}
	}
}

// serveBatch serves a Batch stream: serve runs for each item in a
// goroutine of its own, so a slow proposal does not hold up a read queued
// behind it, with a context that ends at the item's timeout (if set) or
// with the stream. Answers ready together leave in one message. What the
// stream holds is bounded by opts (see batchOptions). serveBatch
// returns when the client has half-closed or gone and every item is
// answered, or, with errNotReading, when a Send stayed blocked for
// opts.SendTimeout; every item goroutine has then ended, and the goroutines
// blocked in Recv and Send end as gRPC closes the stream. Each message is
// sized with proto.Size, which sizes and caches every item, before serve
// gets any: serve, and the stream itself, size an item or its request
// again with proto.MarshalOptions{UseCachedSize: true} (sizedBefore).
func serveBatch(stream kvpb.KV_BatchServer, opts batchOptions, serve func(context.Context, *kvpb.BatchRequestItem) (*kvpb.BatchResponseItem, error)) error {
	opts.setDefaults()
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	b := &batchServer{
		opts:    opts,
		out:     &replyQueue{wake: make(chan struct{}, 1)},
		space:   make(chan struct{}, 1),
		stalled: make(chan struct{}, 1),
	}
	sent := make(chan error, 1)
	go func() { sent <- b.sendAll(stream) }()
	received := make(chan error, 1)
	go func() { received <- b.recvAll(ctx, stream, serve) }()

	var recvErr error
	select {
	case recvErr = <-received:
	case <-b.stalled:
		return b.cutOff(cancel)
	}
	b.items.Wait()
	b.out.close()
	var sendErr error
	select {
	case sendErr = <-sent:
	case <-b.stalled:
		return b.cutOff(cancel)
	}
	if sendErr != nil {
		return sendErr
	}
	if errors.Is(recvErr, io.EOF) {
		return nil
	}
	return recvErr
}

// batchServer is the state of one Batch stream shared by its receiving,
// serving and sending goroutines.
type batchServer struct {
	opts batchOptions
	out  *replyQueue

	mu struct {
		sync.Mutex
		items, bytes int  // held: items being served, answers not yet sent
		serving      int  // items being served
		avgAnswer    int  // moving average of the stream's answer sizes
		answers      int  // answers so far
		stopped      bool // cut off: start no more items
		// pause is how long the stream waits before its next Recv: it
		// doubles with each item refused with ResourceExhausted and is
		// cleared by an item served.
		pause time.Duration
	}
	items   sync.WaitGroup // item goroutines
	space   chan struct{}  // cap 1: held items or bytes went down
	stalled chan struct{}  // cap 1: a Send stayed blocked for SendTimeout
}

// cutOff ends the stream for not reading: no item starts any more, the
// ones running are cancelled and waited for, and their answers dropped.
func (b *batchServer) cutOff(cancel context.CancelFunc) error {
	b.mu.Lock()
	b.mu.stopped = true
	b.mu.Unlock()
	cancel()
	b.items.Wait()
	b.out.drop(b)
	b.opts.CutOff()
	return errNotReading
}

// answered replaces what an item was held at, est, by its answer's size
// n. served is the size of the answer the item was served with, or -1 if
// it was refused unserved: only served answers tell what the stream's
// items cost (refusals, small, would make the next items look cheap).
func (b *batchServer) answered(n, est, served int) {
	b.mu.Lock()
	b.mu.bytes += n - est
	b.mu.serving--
	if served >= 0 {
		b.mu.answers++
		if b.mu.answers == 1 {
			b.mu.avgAnswer = served
		} else {
			b.mu.avgAnswer += (served - b.mu.avgAnswer) / 8
		}
	}
	b.mu.Unlock()
	b.signalSpace()
}

func (b *batchServer) signalSpace() {
	select {
	case b.space <- struct{}{}:
	default:
	}
}

// full reports whether the stream holds as much as it may.
func (b *batchServer) full() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	serving := b.opts.MaxServing
	if b.mu.answers < batchSlowStart {
		// Until answers tell how large they are, few items at a time.
		serving = min(serving, batchSlowStart)
	}
	return b.mu.items >= b.opts.MaxHeldItems || b.mu.bytes >= b.opts.MaxHeldBytes || b.mu.serving >= serving
}

// hold changes what the stream holds by items and bytes.
func (b *batchServer) hold(items, bytes int) {
	b.mu.Lock()
	b.mu.items += items
	b.mu.bytes += bytes
	b.mu.Unlock()
	if items < 0 || bytes < 0 {
		b.signalSpace()
	}
}

// waitRoom waits until the stream holds less than its bounds.
func (b *batchServer) waitRoom(ctx context.Context) error {
	for b.full() {
		select {
		case <-b.space:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// recvAll receives messages and starts their items, waiting before each
// Recv, and before each item of a message, until the stream holds less
// than its bounds: one message may carry any number of items.
func (b *batchServer) recvAll(ctx context.Context, stream kvpb.KV_BatchServer,
	serve func(context.Context, *kvpb.BatchRequestItem) (*kvpb.BatchResponseItem, error)) error {
	for {
		if err := b.waitRoom(ctx); err != nil {
			return err
		}
		if err := b.waitPause(ctx); err != nil {
			return err
		}
		req, err := stream.Recv()
		if err != nil {
			return err
		}
		// Sizing the message sizes each item and caches it, so that
		// startItems and serve read each item's size, not walk it again.
		held := int64(proto.Size(req)) + int64(len(req.GetItems()))*decodedItemBytes
		charged := b.opts.ChargeMessage != nil
		if charged && !b.opts.ChargeMessage(held) {
			return errMessageRefused
		}
		err = b.startItems(ctx, req, serve)
		if charged {
			b.opts.Release(held)
		}
		if err != nil {
			return err
		}
	}
}

// startItems starts the items of req, each once the stream holds less
// than its bounds.
func (b *batchServer) startItems(ctx context.Context, req *kvpb.BatchRequest,
	serve func(context.Context, *kvpb.BatchRequestItem) (*kvpb.BatchResponseItem, error)) error {
	for _, it := range req.GetItems() {
		if err := b.waitRoom(ctx); err != nil {
			return err
		}
		b.mu.Lock()
		if b.mu.stopped {
			b.mu.Unlock()
			return errNotReading
		}
		// An item's answer is expected to take what the stream's
		// recent answers took; its request is held besides.
		est, reqSize := b.mu.avgAnswer, sizedBefore(it)
		b.mu.items++
		b.mu.serving++
		b.mu.bytes += reqSize + est
		b.items.Add(1)
		b.mu.Unlock()
		go func() {
			defer b.items.Done()
			var res *kvpb.BatchResponseItem
			charged, served := 0, -1
			if b.opts.Charge(it, int64(est)) {
				res = serveItem(ctx, it, serve)
				charged = est
				served = proto.Size(res)
			} else {
				res = &kvpb.BatchResponseItem{Id: it.GetId(), Error: kvpb.StatusOf(errAnswerRefused)}
			}
			n := served
			if served < 0 {
				n = proto.Size(res)
			}
			switch {
			case served >= 0 && n > est && !b.opts.Charge(it, int64(n-est)):
				// No room for the answer: drop it.
				b.opts.Release(int64(est))
				res = &kvpb.BatchResponseItem{Id: it.GetId(), Error: kvpb.StatusOf(errAnswerRefused)}
				n, charged = proto.Size(res), 0
			case served >= 0 && n > est:
				charged = n
			case n < charged:
				b.opts.Release(int64(charged - n))
				charged = n
			}
			b.answered(n, reqSize+est, served)
			b.throttle(res)
			b.out.put(reply{it: res, size: n, charged: charged})
		}()
	}
	return nil
}

// Bounds of a stream's pause after refusals (batchServer.mu.pause).
const (
	minRefusedPause = 5 * time.Millisecond
	maxRefusedPause = time.Second
)

// throttle moves the stream's pause by res: a client that sends on
// through ResourceExhausted answers is slowed by gRPC's flow control, as
// the stream stops receiving for a while, instead of having the node
// receive and decode its requests only to refuse them; that work is what
// starved other clients of CPU under a flood of large writes.
func (b *batchServer) throttle(res *kvpb.BatchResponseItem) {
	code := codes.Code(res.GetError().GetCode())
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case code == codes.ResourceExhausted:
		b.mu.pause = min(max(2*b.mu.pause, minRefusedPause), maxRefusedPause)
	case res.GetError() == nil:
		b.mu.pause = 0
	}
}

// waitPause waits out the stream's pause, if any.
func (b *batchServer) waitPause(ctx context.Context) error {
	b.mu.Lock()
	d := b.mu.pause
	b.mu.Unlock()
	if d == 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func serveItem(ctx context.Context, it *kvpb.BatchRequestItem,
	serve func(context.Context, *kvpb.BatchRequestItem) (*kvpb.BatchResponseItem, error)) *kvpb.BatchResponseItem {
	if t := it.GetTimeoutUs(); t > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(t)*time.Microsecond)
		defer cancel()
	}
	res, err := serve(ctx, it)
	if err != nil {
		return &kvpb.BatchResponseItem{Id: it.GetId(), Error: kvpb.StatusOf(err)}
	}
	res.Id = it.GetId()
	return res
}

// reply is an answer waiting to be sent, with its encoded size and what
// of it was charged to the node-wide budget.
type reply struct {
	it            *kvpb.BatchResponseItem
	size, charged int
}

// replyQueue collects answers from the item goroutines for the one
// goroutine that may Send on the stream.
type replyQueue struct {
	mu     sync.Mutex
	items  []reply
	closed bool
	wake   chan struct{} // cap 1: items or closed changed
}

func (q *replyQueue) put(r reply) {
	q.mu.Lock()
	q.items = append(q.items, r)
	q.mu.Unlock()
	q.signal()
}

func (q *replyQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.signal()
}

// drop releases the answers still queued, for a stream that is cut off.
func (q *replyQueue) drop(b *batchServer) {
	q.mu.Lock()
	items := q.items
	q.items, q.closed = nil, true
	q.mu.Unlock()
	q.signal()
	b.sent(items)
}

func (q *replyQueue) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// fitting returns how many of items, at least one, fit in one message of
// maxBatchResponseBytes.
func fitting(items []reply) int {
	size := 0
	for n, it := range items {
		if size += it.size; n > 0 && size > maxBatchResponseBytes {
			return n
		}
	}
	return len(items)
}

// sent releases what items held.
func (b *batchServer) sent(items []reply) {
	if len(items) == 0 {
		return
	}
	n, charged := 0, 0
	for _, it := range items {
		n += it.size
		charged += it.charged
	}
	if charged > 0 {
		b.opts.Release(int64(charged))
	}
	b.hold(-len(items), -n)
}

// sendAll sends whatever is queued, one message per wake-up (cut at
// maxBatchResponseBytes), until the queue is closed and empty. After a
// Send error it sends no more, and returns the error once closed. A Send
// blocked for SendTimeout signals b.stalled; the stream is then cut off,
// which ends the Send.
func (b *batchServer) sendAll(stream kvpb.KV_BatchServer) error {
	q := b.out
	var (
		sendErr error
		sending atomic.Bool
	)
	watchdog := time.AfterFunc(time.Hour, func() {
		if sending.Load() {
			select {
			case b.stalled <- struct{}{}:
			default:
			}
		}
	})
	watchdog.Stop()
	defer watchdog.Stop()
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
		for len(items) > 0 {
			n := fitting(items)
			if sendErr == nil {
				msg := &kvpb.BatchResponse{Items: make([]*kvpb.BatchResponseItem, n)}
				for i := range n {
					msg.Items[i] = items[i].it
				}
				sending.Store(true)
				watchdog.Reset(b.opts.SendTimeout)
				sendErr = stream.Send(msg)
				sending.Store(false)
				watchdog.Stop()
			}
			b.sent(items[:n])
			items = items[n:]
		}
		if closed {
			return sendErr
		}
	}
	return sendErr
}

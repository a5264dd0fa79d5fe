package client

import (
	"cmp"
	"context"
	"fmt"
	"sync"

	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/kvpb"
)

// ReadOption changes how a read is served.
type ReadOption func(*readOptions)

type readOptions struct {
	consistency kvpb.Consistency
}

// WithSerializable lets any replica answer from its local state: faster and
// available without a leader, but possibly stale. Reads are linearizable
// without it.
func WithSerializable() ReadOption {
	return func(o *readOptions) { o.consistency = kvpb.Consistency_SERIALIZABLE }
}

// writeHeader starts a write: a fresh sequence number in this client's
// session. The header is reused for every retry of the write, which is what
// lets the server answer a retry with the recorded result. The caller must
// call c.seqs.finish(h.Seq) when the write returns.
func (c *Client) writeHeader() *kvpb.RequestHeader {
	return &kvpb.RequestHeader{Session: c.session, Seq: c.seqs.start()}
}

// stamp sets the per-attempt fields of a write header: the map epoch and
// ack_below (which may rise between retries; Seq never changes). One
// request serves every attempt: node.do encodes it before it returns.
func (c *Client) stamp(h *kvpb.RequestHeader, epoch uint64) {
	h.Epoch = epoch
	h.AckBelow = c.seqs.ackBelow()
}

// write sends item, a write whose header is h (from writeHeader), to the
// leader of shard until it succeeds, fails for good or ctx ends, and
// finishes h's sequence number. Every attempt sends the same item with
// the same (session, seq), stamped afresh.
func (c *Client) write(ctx context.Context, shard uint64, h *kvpb.RequestHeader, item *kvpb.BatchRequestItem) (*kvpb.BatchResponseItem, error) {
	defer c.seqs.finish(h.Seq)
	var resp *kvpb.BatchResponseItem
	err := c.invoke(ctx, route{shard: shard}, func(ctx context.Context, n *node, epoch uint64) error {
		c.stamp(h, epoch)
		r, err := n.do(ctx, item)
		resp = r
		if err == nil {
			c.answered(shard, n, cmp.Or(r.GetPut().GetHeader(), r.GetDelete().GetHeader(), r.GetTxn().GetHeader()))
		}
		return err
	})
	return resp, err
}

// seqTracker hands out the session's sequence numbers and knows the lowest
// one still in flight, which is what RequestHeader.ack_below reports: every
// write below it has returned (answered, or given up by its caller, who
// will not retry that seq), so the server may drop their recorded results.
type seqTracker struct {
	mu   sync.Mutex
	next uint64          // next seq to hand out; seqs start at 1
	low  uint64          // lowest seq not yet finished (== next when none)
	done map[uint64]bool // finished seqs above low
}

func newSeqTracker() *seqTracker {
	return &seqTracker{next: 1, low: 1, done: map[uint64]bool{}}
}

func (t *seqTracker) start() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.next
	t.next++
	return s
}

func (t *seqTracker) finish(seq uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.done[seq] = true
	for t.done[t.low] {
		delete(t.done, t.low)
		t.low++
	}
}

func (t *seqTracker) ackBelow() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.low
}

// routeKey resolves key's shard, refreshing the map once when the cached
// one has no data shards yet (a cluster still bootstrapping).
func (c *Client) routeKey(ctx context.Context, key []byte) (uint64, error) {
	if c.isClosed() {
		return 0, ErrClosed
	}
	if len(key) == 0 {
		return 0, fmt.Errorf("%w: empty key", ErrInvalidArgument)
	}
	s, err := c.shardOf(key)
	if err == nil {
		return s, nil
	}
	if rerr := c.refreshMap(ctx, c.epoch()+1); rerr != nil {
		return 0, err
	}
	return c.shardOf(key)
}

// Put sets key to value. It is retried across timeouts and leader changes
// until ctx ends, and applied exactly once. Options: WithLease.
func (c *Client) Put(ctx context.Context, key, value []byte, opts ...PutOption) (*kvpb.PutResponse, error) {
	shard, err := c.routeKey(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("put %s: %w", keyString(key), err)
	}
	req := &kvpb.PutRequest{Header: c.writeHeader(), Key: key, Value: value}
	for _, opt := range opts {
		opt(req)
	}
	resp, err := c.write(ctx, shard, req.Header, &kvpb.BatchRequestItem{Request: &kvpb.BatchRequestItem_Put{Put: req}})
	if err != nil {
		return nil, fmt.Errorf("put %s: %w", keyString(key), err)
	}
	return resp.GetPut(), nil
}

// Get reads key. It returns ErrNotFound when the key does not exist.
func (c *Client) Get(ctx context.Context, key []byte, opts ...ReadOption) (*kvpb.KeyValue, error) {
	var o readOptions
	for _, opt := range opts {
		opt(&o)
	}
	shard, err := c.routeKey(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", keyString(key), err)
	}
	req := &kvpb.GetRequest{Header: &kvpb.RequestHeader{}, Key: key, Consistency: o.consistency}
	var resp *kvpb.GetResponse
	r := route{shard: shard, anyReplica: o.consistency == kvpb.Consistency_SERIALIZABLE}
	item := &kvpb.BatchRequestItem{Request: &kvpb.BatchRequestItem_Get{Get: req}}
	err = c.invoke(ctx, r, func(ctx context.Context, n *node, epoch uint64) error {
		req.Header.Epoch = epoch
		g, err := n.do(ctx, item)
		resp = g.GetGet()
		if err == nil {
			c.answered(shard, n, resp.GetHeader())
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", keyString(key), err)
	}
	if resp.GetKv() == nil {
		return nil, fmt.Errorf("get %s: %w", keyString(key), ErrNotFound)
	}
	return resp.GetKv(), nil
}

// Delete removes key. Deleting a missing key succeeds with Deleted == 0.
func (c *Client) Delete(ctx context.Context, key []byte) (*kvpb.DeleteResponse, error) {
	shard, err := c.routeKey(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("delete %s: %w", keyString(key), err)
	}
	req := &kvpb.DeleteRequest{Header: c.writeHeader(), Key: key}
	resp, err := c.write(ctx, shard, req.Header, &kvpb.BatchRequestItem{Request: &kvpb.BatchRequestItem_Delete{Delete: req}})
	if err != nil {
		return nil, fmt.Errorf("delete %s: %w", keyString(key), err)
	}
	return resp.GetDelete(), nil
}

// Txn runs req atomically on one shard: the shard of its first key (in
// the compares, then the success ops, then the failure ops). All its keys
// must live in that shard — use a hash tag such as "{user42}/..." — or the
// server rejects it with ErrInvalidArgument. The client sets req's header;
// req itself is not modified.
func (c *Client) Txn(ctx context.Context, req *kvpb.TxnRequest) (*kvpb.TxnResponse, error) {
	key := firstTxnKey(req)
	if key == nil {
		return nil, fmt.Errorf("txn: %w: no key in compares or operations", ErrInvalidArgument)
	}
	shard, err := c.routeKey(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("txn: %w", err)
	}
	req = proto.Clone(req).(*kvpb.TxnRequest)
	req.Header = c.writeHeader()
	resp, err := c.write(ctx, shard, req.Header, &kvpb.BatchRequestItem{Request: &kvpb.BatchRequestItem_Txn{Txn: req}})
	if err != nil {
		return nil, fmt.Errorf("txn on key %s: %w", keyString(key), err)
	}
	return resp.GetTxn(), nil
}

func firstTxnKey(req *kvpb.TxnRequest) []byte {
	for _, cmp := range req.GetCompare() {
		if len(cmp.GetKey()) > 0 {
			return cmp.GetKey()
		}
	}
	for _, ops := range [][]*kvpb.RequestOp{req.GetSuccess(), req.GetFailure()} {
		for _, op := range ops {
			var k []byte
			switch {
			case op.GetPut() != nil:
				k = op.GetPut().GetKey()
			case op.GetGet() != nil:
				k = op.GetGet().GetKey()
			case op.GetDelete() != nil:
				k = op.GetDelete().GetKey()
			}
			if len(k) > 0 {
				return k
			}
		}
	}
	return nil
}

// keyString quotes key for an error message, cut to a readable length.
func keyString(key []byte) string {
	const max = 64
	if len(key) > max {
		return fmt.Sprintf("%q...(%d bytes)", key[:max], len(key))
	}
	return fmt.Sprintf("%q", key)
}

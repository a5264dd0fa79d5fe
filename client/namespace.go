package client

import (
	"bytes"
	"context"

	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/kvpb"
)

// Namespace is a view of a Client in which every key carries a prefix:
// each key, range, watch and transaction key is prefixed on the way to
// the cluster and stripped from what comes back, so applications sharing
// a cluster under different prefixes never see each other's keys. It
// shares the Client's connections; closing the Client ends it.
//
// The prefix takes part in the key's hash like any other bytes, so keys
// spread over shards as before, and a hash tag in a key ("{user1}name")
// still places it. A prefix that holds a hash tag itself ("{app1}/")
// places the namespace's every key in one shard.
type Namespace struct {
	c      *Client
	prefix []byte
}

// WithNamespace returns c's view under prefix, e.g. "app1/".
func WithNamespace(c *Client, prefix string) *Namespace {
	return &Namespace{c: c, prefix: []byte(prefix)}
}

// Prefix is the namespace's prefix.
func (n *Namespace) Prefix() string { return string(n.prefix) }

func (n *Namespace) key(k []byte) []byte {
	out := make([]byte, 0, len(n.prefix)+len(k))
	return append(append(out, n.prefix...), k...)
}

// strip removes the prefix from kv's key in place. A key outside the
// namespace is left as it is; it cannot come back from a prefixed
// request.
func (n *Namespace) strip(kv *kvpb.KeyValue) {
	if kv != nil {
		kv.Key = bytes.TrimPrefix(kv.GetKey(), n.prefix)
	}
}

// end is the namespaced end of a range: an empty end (the end of the key
// space) is the end of the namespace.
func (n *Namespace) end(end []byte) []byte {
	if len(end) == 0 {
		return PrefixEnd(n.prefix)
	}
	return n.key(end)
}

// Put is Client.Put of the namespaced key.
func (n *Namespace) Put(ctx context.Context, key, value []byte) (*kvpb.PutResponse, error) {
	resp, err := n.c.Put(ctx, n.key(key), value)
	n.strip(resp.GetPrevKv())
	return resp, err
}

// Get is Client.Get of the namespaced key.
func (n *Namespace) Get(ctx context.Context, key []byte, opts ...ReadOption) (*kvpb.KeyValue, error) {
	kv, err := n.c.Get(ctx, n.key(key), opts...)
	n.strip(kv)
	return kv, err
}

// Delete is Client.Delete of the namespaced key.
func (n *Namespace) Delete(ctx context.Context, key []byte) (*kvpb.DeleteResponse, error) {
	resp, err := n.c.Delete(ctx, n.key(key))
	n.strip(resp.GetPrevKv())
	return resp, err
}

// Scan is Client.Scan of [start, end) in the namespace; an empty end is
// the end of the namespace. Tokens (Next, Resume) work with this
// namespace's Scan and Watch.
func (n *Namespace) Scan(ctx context.Context, start, end []byte, opts ScanOptions) (*ScanPage, error) {
	page, err := n.c.Scan(ctx, n.key(start), n.end(end), opts)
	for _, kv := range page.GetKVs() {
		n.strip(kv)
	}
	return page, err
}

// GetKVs is page's KVs; nil for a nil page.
func (p *ScanPage) GetKVs() []*kvpb.KeyValue {
	if p == nil {
		return nil
	}
	return p.KVs
}

// Count is Client.Count of [start, end) in the namespace.
func (n *Namespace) Count(ctx context.Context, start, end []byte, serializable bool) (int64, error) {
	return n.c.Count(ctx, n.key(start), n.end(end), serializable)
}

// Txn is Client.Txn with every compare and operation key namespaced. req
// is not modified.
func (n *Namespace) Txn(ctx context.Context, req *kvpb.TxnRequest) (*kvpb.TxnResponse, error) {
	req = proto.CloneOf(req)
	for _, c := range req.GetCompare() {
		c.Key = n.key(c.GetKey())
	}
	for _, ops := range [][]*kvpb.RequestOp{req.GetSuccess(), req.GetFailure()} {
		for _, op := range ops {
			switch o := op.GetOp().(type) {
			case *kvpb.RequestOp_Put:
				o.Put.Key = n.key(o.Put.GetKey())
			case *kvpb.RequestOp_Get:
				o.Get.Key = n.key(o.Get.GetKey())
			case *kvpb.RequestOp_Delete:
				o.Delete.Key = n.key(o.Delete.GetKey())
			}
		}
	}
	resp, err := n.c.Txn(ctx, req)
	for _, r := range resp.GetResponses() {
		n.strip(r.GetPut().GetPrevKv())
		n.strip(r.GetGet().GetKv())
		n.strip(r.GetDelete().GetPrevKv())
	}
	return resp, err
}

// Watch is Client.Watch of the namespaced key (WithPrefix: of every key
// in the namespace starting with key; an empty key watches the whole
// namespace). Events carry their keys without the prefix.
func (n *Namespace) Watch(ctx context.Context, key []byte, opts ...WatchOption) <-chan WatchResponse {
	in := n.c.Watch(ctx, n.key(key), opts...)
	out := make(chan WatchResponse, cap(in))
	go func() {
		defer close(out)
		for r := range in {
			// A node's watch stream may hand one event to several
			// watches: strip copies.
			evs := make([]*kvpb.Event, len(r.Events))
			for i, ev := range r.Events {
				ev = proto.CloneOf(ev)
				n.strip(ev.Kv)
				n.strip(ev.PrevKv)
				evs[i] = ev
			}
			r.Events = evs
			select {
			case out <- r:
			case <-ctx.Done():
				// The caller stopped reading; drain so the watch
				// below can end.
				for range in {
				}
				return
			}
		}
	}()
	return out
}

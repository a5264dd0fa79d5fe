package client

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/proto/kvpb"
)

// GetAt reads key as it was at revision rev of its shard (from the shard's
// history; see docs/design.md, Reads at a revision). A key absent then is
// ErrNotFound; a revision the shard no longer keeps history for is a
// *CompactedError.
func (c *Client) GetAt(ctx context.Context, key []byte, rev int64) (*kvpb.KeyValue, error) {
	shard, err := c.routeKey(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("get %s at %d: %w", keyString(key), rev, err)
	}
	var resp *kvpb.GetResponse
	err = c.invoke(ctx, route{shard: shard}, func(ctx context.Context, n *node, epoch uint64) error {
		var err error
		resp, err = n.kv.Get(ctx, &kvpb.GetRequest{Header: &kvpb.RequestHeader{Epoch: epoch}, Key: key, Revision: rev})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("get %s at %d: %w", keyString(key), rev, compacted(err))
	}
	if resp.GetKv() == nil {
		return nil, fmt.Errorf("get %s at %d: %w", keyString(key), rev, ErrNotFound)
	}
	return resp.GetKv(), nil
}

// ScanAt returns the keys in [start, end) of one shard as they were at
// its revision rev, in key order: a read at a revision is one shard's,
// since revisions are per shard. It reads every page at rev.
func (c *Client) ScanAt(ctx context.Context, shard uint64, start, end []byte, rev int64) ([]*kvpb.KeyValue, error) {
	var out []*kvpb.KeyValue
	for {
		resp, err := c.rangeShard(ctx, &kvpb.RangeRequest{Header: &kvpb.RequestHeader{}, Shard: shard, Start: start, End: end, Revision: rev})
		if err != nil {
			return nil, fmt.Errorf("scan shard %d at %d: %w", shard, rev, compacted(err))
		}
		out = append(out, resp.GetKvs()...)
		if !resp.GetMore() || len(resp.GetKvs()) == 0 {
			return out, nil
		}
		start = keySuccessor(resp.GetKvs()[len(resp.GetKvs())-1].GetKey())
		if len(end) > 0 && bytes.Compare(start, end) >= 0 {
			return out, nil
		}
	}
}

// Compact drops the history of shard below rev (Cluster.Compact on the
// shard's leader) and returns the oldest revision the shard keeps.
func (c *Client) Compact(ctx context.Context, shard uint64, rev int64) (int64, error) {
	var resp *kvpb.CompactResponse
	err := c.invoke(ctx, route{shard: shard}, func(ctx context.Context, n *node, epoch uint64) error {
		var err error
		resp, err = n.clu.Compact(ctx, &kvpb.CompactRequest{Header: &kvpb.RequestHeader{Epoch: epoch}, Shard: shard, Revision: rev})
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("compact shard %d below %d: %w", shard, rev, err)
	}
	return resp.GetShards()[0].GetOldestRevision(), nil
}

// DataShards lists the cluster's data shards.
func (c *Client) DataShards() []uint64 { return c.dataShards() }

// compacted turns the OutOfRange status of a read below a shard's history
// into a *CompactedError.
func compacted(err error) error {
	var st interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &st) || st.GRPCStatus().Code() != codes.OutOfRange {
		return err
	}
	for _, d := range st.GRPCStatus().Details() {
		if cs, ok := d.(*kvpb.CompactedShard); ok {
			return fmt.Errorf("%w (%v)", &CompactedError{Shard: cs.GetHeader().GetShard(), Oldest: cs.GetOldestRevision()}, st.GRPCStatus().Message())
		}
	}
	return err
}

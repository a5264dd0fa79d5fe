package concurrency

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/proto/kvpb"
)

var (
	// ErrLocked: TryLock found the lock held.
	ErrLocked = errors.New("concurrency: locked by another session")
	// ErrSessionExpired: the session's lease was lost while waiting or
	// holding.
	ErrSessionExpired = errors.New("concurrency: session expired")
	// ErrNotLeader: Proclaim or Resign by a campaigner that does not lead.
	ErrNotLeader = errors.New("concurrency: not the leader")
	// ErrNoLeader: the election has no leader.
	ErrNoLeader = errors.New("concurrency: no leader")
)

// prefixOf is the key prefix of a lock or election: its name as a hash
// tag, so all its keys live in one shard.
func prefixOf(name string) (string, error) {
	if name == "" || strings.ContainsAny(name, "{}") {
		return "", fmt.Errorf("%w: name %q: give a non-empty name without { or }", client.ErrInvalidArgument, name)
	}
	return "{" + name + "}/", nil
}

// keyOf is the session's key under prefix.
func keyOf(prefix string, s *Session) string { return fmt.Sprintf("%s%016x", prefix, int64(s.Lease())) }

// enqueue creates key with value, attached to the session's lease,
// unless the session created it already; it returns the key's create
// revision, its place in the queue, and the key as it was when it
// already existed (nil when enqueue created it).
func enqueue(ctx context.Context, s *Session, key, value string) (int64, *kvpb.KeyValue, error) {
	k := []byte(key)
	put := &kvpb.RequestOp{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: k, Value: []byte(value), Lease: int64(s.Lease())}}}
	get := &kvpb.RequestOp{Op: &kvpb.RequestOp_Get{Get: &kvpb.GetRequest{Key: k}}}
	resp, err := s.c.Txn(ctx, &kvpb.TxnRequest{
		Compare: []*kvpb.Compare{{Key: k, Target: kvpb.Compare_CREATE, Result: kvpb.Compare_EQUAL, CreateRevision: 0}},
		Success: []*kvpb.RequestOp{put},
		Failure: []*kvpb.RequestOp{get},
	})
	if err != nil {
		return 0, nil, sessionErr(s, err)
	}
	if resp.GetSucceeded() {
		return resp.GetHeader().GetRevision(), nil, nil
	}
	kv := resp.GetResponses()[0].GetGet().GetKv()
	return kv.GetCreateRevision(), kv, nil
}

// sessionErr says ErrSessionExpired for a write refused because the
// session's lease is gone.
func sessionErr(s *Session, err error) error {
	if errors.Is(err, client.ErrLeaseNotFound) {
		return fmt.Errorf("%w: %w", ErrSessionExpired, err)
	}
	return err
}

// members lists the keys under prefix.
func members(ctx context.Context, c *client.Client, prefix string) ([]*kvpb.KeyValue, error) {
	kvs, _, err := membersAt(ctx, c, prefix)
	return kvs, err
}

// membersAt is members with the watch resume token of the state it read:
// a prefix watch from it misses no change made after the read.
func membersAt(ctx context.Context, c *client.Client, prefix string) ([]*kvpb.KeyValue, string, error) {
	var out []*kvpb.KeyValue
	opts := client.ScanOptions{}
	for {
		page, err := c.Scan(ctx, []byte(prefix), client.PrefixEnd([]byte(prefix)), opts)
		if err != nil {
			return nil, "", err
		}
		out = append(out, page.KVs...)
		if page.Next == "" {
			return out, page.Resume, nil
		}
		opts.Token = page.Next
	}
}

// first is the key with the lowest create revision (nil when none).
func first(kvs []*kvpb.KeyValue) *kvpb.KeyValue {
	var f *kvpb.KeyValue
	for _, kv := range kvs {
		if f == nil || kv.GetCreateRevision() < f.GetCreateRevision() {
			f = kv
		}
	}
	return f
}

// predecessor is the key created last before rev (nil when none).
func predecessor(kvs []*kvpb.KeyValue, rev int64) *kvpb.KeyValue {
	var p *kvpb.KeyValue
	for _, kv := range kvs {
		if cr := kv.GetCreateRevision(); cr < rev && (p == nil || cr > p.GetCreateRevision()) {
			p = kv
		}
	}
	return p
}

// waitTurn waits until no key under prefix was created before rev: each
// waiter watches only its predecessor, so a release wakes one waiter.
func waitTurn(ctx context.Context, s *Session, prefix string, rev int64) error {
	for {
		kvs, err := members(ctx, s.c, prefix)
		if err != nil {
			return err
		}
		p := predecessor(kvs, rev)
		if p == nil {
			return nil
		}
		if err := waitDeleted(ctx, s, p.GetKey(), rev+1); err != nil {
			return err
		}
	}
}

// waitDeleted waits for a delete of key at revision from or later.
func waitDeleted(ctx context.Context, s *Session, key []byte, from int64) error {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := s.c.Watch(wctx, key, client.WithRevision(from))
	for {
		select {
		case <-s.Done():
			return fmt.Errorf("%w: %w", ErrSessionExpired, s.Err())
		case resp, ok := <-ch:
			if !ok {
				return ctx.Err()
			}
			if resp.Err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				return resp.Err
			}
			for _, ev := range resp.Events {
				if ev.GetType() == kvpb.Event_DELETE {
					return nil
				}
			}
		}
	}
}

// dequeue deletes the session's key if it is still the one created at rev.
func dequeue(ctx context.Context, s *Session, key string, rev int64) (bool, error) {
	k := []byte(key)
	resp, err := s.c.Txn(ctx, &kvpb.TxnRequest{
		Compare: []*kvpb.Compare{{Key: k, Target: kvpb.Compare_CREATE, Result: kvpb.Compare_EQUAL, CreateRevision: rev}},
		Success: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Delete{Delete: &kvpb.DeleteRequest{Key: k}}}},
	})
	if err != nil {
		return false, err
	}
	return resp.GetSucceeded(), nil
}

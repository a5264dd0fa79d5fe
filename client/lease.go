package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/proto/kvpb"
)

// ErrLeaseNotFound: the lease does not exist: never granted, revoked, or
// expired because it was not renewed in time. Keys put with it are gone
// (or were never written).
var ErrLeaseNotFound = errors.New("client: lease not found")

// LeaseID names a lease; 0 is no lease.
type LeaseID int64

// PutOption changes a Put.
type PutOption func(*kvpb.PutRequest)

// WithLease attaches the key to a lease: it is deleted when the lease is
// revoked or expires. A Put with a lease that does not exist fails with
// ErrLeaseNotFound and writes nothing.
func WithLease(id LeaseID) PutOption {
	return func(r *kvpb.PutRequest) { r.Lease = int64(id) }
}

// LeaseStatus is a lease's TTL as its meta shard leader sees it.
type LeaseStatus struct {
	ID LeaseID
	// TTL is what remains before the lease expires; Granted, the TTL it
	// was granted with (and that each renewal restores).
	TTL, Granted time.Duration
	// Keys, from TimeToLive with keys, are the keys attached to it: as
	// many as fit in one answer (4 MiB by default); MoreKeys says it holds
	// more.
	Keys     [][]byte
	MoreKeys bool
}

// Grant creates a lease with the given TTL (whole seconds, at least 1).
// It is retried until ctx ends and grants one lease however many attempts
// it takes.
func (c *Client) Grant(ctx context.Context, ttl time.Duration) (LeaseID, error) {
	secs := int64((ttl + time.Second - 1) / time.Second)
	// A write's header: every attempt carries the same (session, seq), so
	// a retry is answered with the lease the first attempt granted.
	h := c.writeHeader()
	defer c.seqs.finish(h.Seq)
	resp, err := leaseCall(ctx, c, "lease grant", func(ctx context.Context, lc kvpb.LeaseClient) (*kvpb.LeaseGrantResponse, error) {
		h.AckBelow = c.seqs.ackBelow()
		return lc.Grant(ctx, &kvpb.LeaseGrantRequest{TtlSeconds: secs, Header: h})
	})
	if err != nil {
		return 0, err
	}
	return LeaseID(resp.GetId()), nil
}

// Revoke ends a lease now and deletes its keys in every shard; it
// returns how many keys it deleted. A large lease can take longer to
// revoke than an attempt lasts: the node goes on with it, and a retry
// waits for it and answers with its count. A retry that comes after the
// revocation ended finds the lease gone; after an attempt that may have
// started the revocation, that is the revocation's success, and the count
// is 0.
func (c *Client) Revoke(ctx context.Context, id LeaseID) (int64, error) {
	var mayHaveRevoked bool
	resp, err := leaseCall(ctx, c, fmt.Sprintf("lease revoke %d", id), func(ctx context.Context, lc kvpb.LeaseClient) (*kvpb.LeaseRevokeResponse, error) {
		resp, err := lc.Revoke(ctx, &kvpb.LeaseRevokeRequest{Id: int64(id)})
		switch status.Code(err) {
		case codes.OK, codes.NotFound, codes.InvalidArgument, codes.PermissionDenied, codes.Unauthenticated:
		default:
			mayHaveRevoked = true
		}
		return resp, err
	})
	if mayHaveRevoked && errors.Is(err, ErrLeaseNotFound) {
		return 0, nil
	}
	return resp.GetDeleted(), err
}

// TimeToLive says how long a lease has left; with keys, which keys it
// holds.
func (c *Client) TimeToLive(ctx context.Context, id LeaseID, keys bool) (*LeaseStatus, error) {
	resp, err := leaseCall(ctx, c, fmt.Sprintf("lease %d", id), func(ctx context.Context, lc kvpb.LeaseClient) (*kvpb.LeaseTimeToLiveResponse, error) {
		return lc.TimeToLive(ctx, &kvpb.LeaseTimeToLiveRequest{Id: int64(id), Keys: keys})
	})
	if err != nil {
		return nil, err
	}
	return &LeaseStatus{ID: id, TTL: time.Duration(resp.GetTtlSeconds()) * time.Second,
		Granted: time.Duration(resp.GetGrantedTtlSeconds()) * time.Second, Keys: resp.GetKeys(), MoreKeys: resp.GetMoreKeys()}, nil
}

// Leases lists the live leases.
func (c *Client) Leases(ctx context.Context) ([]LeaseStatus, error) {
	resp, err := leaseCall(ctx, c, "lease list", func(ctx context.Context, lc kvpb.LeaseClient) (*kvpb.LeaseLeasesResponse, error) {
		return lc.Leases(ctx, &kvpb.LeaseLeasesRequest{})
	})
	if err != nil {
		return nil, err
	}
	out := make([]LeaseStatus, 0, len(resp.GetLeases()))
	for _, l := range resp.GetLeases() {
		out = append(out, LeaseStatus{ID: LeaseID(l.GetId()), TTL: time.Duration(l.GetTtlSeconds()) * time.Second,
			Granted: time.Duration(l.GetGrantedTtlSeconds()) * time.Second})
	}
	return out, nil
}

// leaseCall calls f on the members in turn until one answers: any member
// serves lease calls (forwarding them to the meta shard's leader), so a
// member that cannot (no leader yet, unreachable) is passed over. NotFound
// is ErrLeaseNotFound.
func leaseCall[T any](ctx context.Context, c *Client, what string, f func(context.Context, kvpb.LeaseClient) (T, error)) (T, error) {
	var notFound error
	r, err := anyNode(ctx, c, what, func(ctx context.Context, n *node) (T, error) {
		r, err := f(ctx, kvpb.NewLeaseClient(n.conn))
		if status.Code(err) == codes.NotFound {
			// Final: passed to anyNode as a refusal it does not retry.
			notFound = fmt.Errorf("%s: %w: %s", what, ErrLeaseNotFound, status.Convert(err).Message())
			return r, status.Error(codes.FailedPrecondition, notFound.Error())
		}
		return r, err
	})
	if notFound != nil {
		return r, notFound
	}
	if err != nil {
		return r, fmt.Errorf("%s: %w", what, err)
	}
	return r, nil
}

// KeepAlive renews lease id in the background, every third of its TTL,
// until ctx ends or the lease is gone. The channel receives the lease's
// TTL after each renewal; it is closed when KeepAlive stops, and the
// returned function then says why: ctx's error, or ErrLeaseNotFound when
// the lease is gone (revoked, or expired while no member could be
// reached). A member that fails is replaced by the next, as any request's
// would be; renewals continue through leader changes.
//
// The caller should read the channel; renewals do not wait for it (a
// value not read is replaced by the next).
func (c *Client) KeepAlive(ctx context.Context, id LeaseID) (<-chan time.Duration, func() error, error) {
	st, err := c.TimeToLive(ctx, id, false)
	if err != nil {
		return nil, nil, err
	}
	ch := make(chan time.Duration, 1)
	done := make(chan struct{})
	var stopErr error
	go func() {
		defer close(done)
		defer close(ch)
		stopErr = c.keepAlive(ctx, id, st.Granted, ch)
	}()
	return ch, func() error { <-done; return stopErr }, nil
}

func (c *Client) keepAlive(ctx context.Context, id LeaseID, ttl time.Duration, ch chan time.Duration) error {
	period := max(ttl/3, 100*time.Millisecond)
	deadline := time.Now().Add(ttl) // when the lease runs out without a renewal
	for attempt := 0; ; attempt++ {
		for _, n := range c.nodesInOrder() {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if c.isClosed() {
				return ErrClosed
			}
			err := c.keepAliveOn(ctx, n, id, period, &deadline, ch)
			if errors.Is(err, ErrLeaseNotFound) || ctx.Err() != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				return err
			}
			if time.Now().After(deadline) {
				// No renewal reached the leader for a TTL: the lease is
				// gone, whatever a later renewal would say.
				return fmt.Errorf("lease %d: %w: not renewed for its TTL (%v): %v", id, ErrLeaseNotFound, ttl, err)
			}
			c.log.Debug("lease keepalive stream ended; trying the next member", "lease", id, "node", n.id, "err", err)
		}
		if !c.sleep(ctx, backoff(attempt)) {
			if c.isClosed() {
				return ErrClosed
			}
			return ctx.Err()
		}
	}
}

// keepAliveOn renews through one member's KeepAlive stream until it
// fails. A renewal that gets no answer within its period ends the stream.
func (c *Client) keepAliveOn(ctx context.Context, n *node, id LeaseID, period time.Duration, deadline *time.Time, ch chan time.Duration) error {
	// A member whose connection is still being made is waited for only
	// ConnectTimeout, not the minutes gRPC would allow.
	if err := c.connected(ctx, n); err != nil {
		return err
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := kvpb.NewLeaseClient(n.conn).KeepAlive(sctx)
	if err != nil {
		return err
	}
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		sent := time.Now()
		if err := stream.Send(&kvpb.LeaseKeepAliveRequest{Id: int64(id)}); err != nil {
			return err
		}
		// The answer must come before the next renewal is due.
		watchdog := time.AfterFunc(period, cancel)
		resp, err := stream.Recv()
		watchdog.Stop()
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("keepalive stream closed by node %d", n.id)
		}
		if err != nil {
			return err
		}
		if resp.GetTtlSeconds() <= 0 {
			return fmt.Errorf("lease %d: %w", id, ErrLeaseNotFound)
		}
		ttl := time.Duration(resp.GetTtlSeconds()) * time.Second
		*deadline = sent.Add(ttl)
		select {
		case <-ch: // drop a value not read
		default:
		}
		ch <- ttl
		t.Reset(max(ttl/3, 100*time.Millisecond))
	}
}

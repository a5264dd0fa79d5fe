package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"

	// Named apart from backoff, the client's own wait function.
	backoffpolicy "github.com/kvd/kvd/internal/backoff"
	"github.com/kvd/kvd/proto/kvpb"
)

// Backoff bounds: full jitter, sleep = uniform[0, min(cap, base·2^n)).
// See "Exponential Backoff And Jitter" (AWS architecture blog, 2015):
// full jitter spreads retries of many clients hitting the same failed
// leader instead of synchronising them.
const (
	backoffBase = 20 * time.Millisecond
	backoffCap  = 250 * time.Millisecond
)

var retryBackoff = backoffpolicy.Policy{Base: backoffBase, Max: backoffCap, Jitter: backoffpolicy.Full}

// backoff is the wait before the retry that follows attempt earlier waits.
func backoff(attempt int) time.Duration { return retryBackoff.Delay(attempt) }

// errNotConnected: a member's connection did not come up within
// ConnectTimeout.
var errNotConnected = errors.New("connection not up")

// connected waits until n's connection is up, for at most ConnectTimeout
// within ctx. Only a connection that is being made is waited for: one in
// transient failure lets the RPC fail at once, as it always has.
func (c *Client) connected(ctx context.Context, n *node) error {
	s := n.conn.GetState()
	if s == connectivity.Ready {
		return nil
	}
	wctx, cancel := context.WithTimeout(ctx, c.cfg.ConnectTimeout)
	defer cancel()
	for {
		switch s {
		case connectivity.Idle:
			n.conn.Connect()
		case connectivity.Connecting:
		default: // Ready, TransientFailure, Shutdown
			return nil
		}
		if !n.conn.WaitForStateChange(wctx, s) {
			if ctx.Err() != nil {
				// The attempt's own deadline, or the caller's: reported
				// as an RPC that ran out of time would be.
				return status.FromContextError(ctx.Err()).Err()
			}
			return fmt.Errorf("%w after %v", errNotConnected, c.cfg.ConnectTimeout)
		}
		s = n.conn.GetState()
	}
}

// route says where a request may go.
type route struct {
	shard uint64
	// anyReplica: any replica may answer (serializable reads); otherwise
	// only the shard's leader can.
	anyReplica bool
}

// attemptFunc performs one RPC on n with the given cluster-map epoch.
type attemptFunc func(ctx context.Context, n *node, epoch uint64) error

// verdict is what the retry loop does after an attempt.
type verdict int

const (
	done       verdict = iota // return err to the caller
	retryNow                  // go to another node at once
	retryLater                // back off, then retry
)

// invoke runs fn against the right node of r.shard until it succeeds, fails
// for good, or ctx ends. It follows leader hints, fails over to other
// replicas, refreshes the map on StaleEpoch and backs off with full jitter.
// fn must build its request once, outside invoke's loop, so that every
// attempt of a write carries the same (session, seq).
func (c *Client) invoke(ctx context.Context, r route, fn attemptFunc) error {
	var (
		lastErr  error
		backoffs int
		hops     int    // immediate retries since the last backoff
		hint     uint64 // the last leader a NotLeader answer named
	)
	for {
		if c.isClosed() {
			return ErrClosed
		}
		if err := ctx.Err(); err != nil {
			return c.giveUpShard(ctx, r.shard, hint, lastErr)
		}
		n, epoch, nreps, err := c.pick(r)
		if err != nil {
			lastErr = err
		} else if n == nil {
			lastErr = fmt.Errorf("every replica of shard %d is down or busy", r.shard)
		} else {
			// ownTimeout: this attempt ends by AttemptTimeout before the
			// caller's deadline, so a timeout is the node's fault. When
			// the caller's deadline comes first, the server may report
			// DeadlineExceeded an instant before ctx does (it counts down
			// the propagated grpc-timeout): that says nothing of the node.
			dl, hasDL := ctx.Deadline()
			ownTimeout := !hasDL || time.Until(dl) > c.cfg.AttemptTimeout
			start := time.Now()
			actx, cancel := c.attemptCtx(ctx)
			if err = c.connected(actx, n); err == nil {
				err = fn(actx, n, epoch)
			}
			cancel()
			n.release()
			if err == nil {
				n.success()
				return nil
			}
			if c.log.Enabled(ctx, slog.LevelDebug) {
				c.log.Debug("client: attempt failed", "shard", r.shard, "node", n.id, "addr", n.addr,
					"took", time.Since(start).Round(time.Millisecond), "err", err)
			}
			if st, ok := status.FromError(err); ok {
				if nl := notLeader(st); nl != nil && nl.GetLeaderId() != 0 {
					hint = nl.GetLeaderId()
				}
			}
			var v verdict
			v, err = c.classify(ctx, r, n, err, ownTimeout)
			switch v {
			case done:
				return err
			case retryNow:
				lastErr = err
				// Hints and failover go at once, but a cluster
				// electing a leader answers "not leader" from every
				// replica: after one round of the replicas, back off.
				if hops++; hops <= nreps {
					continue
				}
			default:
				lastErr = err
			}
		}
		hops = 0
		if !c.sleep(ctx, backoff(backoffs)) {
			if c.isClosed() {
				return ErrClosed
			}
			return c.giveUpShard(ctx, r.shard, hint, lastErr)
		}
		backoffs++
	}
}

// giveUp builds the error for a request whose context ended.
func (c *Client) giveUp(ctx context.Context, what string, lastErr error) error {
	if errors.Is(ctx.Err(), context.Canceled) {
		return fmt.Errorf("client: %s: %w", what, ctx.Err())
	}
	if lastErr == nil {
		return fmt.Errorf("%w: %s: %w", ErrUnavailable, what, ctx.Err())
	}
	return fmt.Errorf("%w: %s: %w (last error: %v)", ErrUnavailable, what, ctx.Err(), lastErr)
}

// giveUpShard is giveUp for a request to shard that ran out of time; it
// names the cause when the client saw one:
//   - a replica named a leader the client cannot reach, and could not
//     forward the request to it; or a majority of the replicas is out of
//     reach at addresses the client was not given and never reached:
//     an UnreachableError (the members advertise addresses this client
//     cannot use, the cluster may be healthy);
//   - a majority of the replicas is unreachable (breaker open, or a
//     connection that failed): "shard 7 has no quorum (2 of 3 replicas
//     unreachable: ...)". The last replica's "not the leader; leader
//     unknown" only describes the symptom.
func (c *Client) giveUpShard(ctx context.Context, shard, hint uint64, lastErr error) error {
	what := fmt.Sprintf("shard %d", shard)
	if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return c.giveUp(ctx, what, lastErr)
	}
	if hint != 0 {
		if desc, unverified := c.reach(hint); desc != "" && unverified {
			return &UnreachableError{Shard: shard, Nodes: []string{desc}}
		}
	}
	c.mu.RLock()
	reps := c.mu.shards[shard]
	c.mu.RUnlock()
	var down, unverified []string
	for _, id := range reps {
		if desc, u := c.reach(id); u {
			unverified = append(unverified, desc)
		} else if desc != "" {
			down = append(down, desc)
		}
	}
	switch n := len(down) + len(unverified); {
	case len(reps) == 0 || 2*n < len(reps):
		return c.giveUp(ctx, what, lastErr)
	case len(unverified) > 0:
		return &UnreachableError{Shard: shard, Nodes: unverified}
	default:
		return fmt.Errorf("%w: %s has no quorum (%d of %d replicas unreachable: %s): %w",
			ErrUnavailable, what, n, len(reps), strings.Join(down, "; "), ctx.Err())
	}
}

// reach describes member id when it is out of the client's reach
// (breaker open, or its connection failed): "node 2 at ADDR: why"; ""
// when it is reachable. unverified is set when the client never reached
// it, its address is not one the caller gave and nothing there refused
// the connection: an advertised address this client may be unable to use
// at all (a name it cannot resolve), however healthy the member.
func (c *Client) reach(id uint64) (desc string, unverified bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	n := c.mu.nodes[id]
	if n == nil {
		return fmt.Sprintf("node %d: no address", id), false
	}
	n.mu.Lock()
	state, lastErr, everOK := n.mu.state, n.mu.lastErr, !n.mu.lastOK.IsZero()
	n.mu.Unlock()
	if state == breakerClosed && n.conn.GetState() != connectivity.TransientFailure {
		return "", false
	}
	why := "not answering"
	if lastErr != nil {
		why = lastErr.Error()
	}
	// A refused connection reached the member's host: it is down, not
	// out of reach.
	refused := strings.Contains(why, "connection refused")
	return fmt.Sprintf("node %d at %s: %s", id, n.addr, why), !everOK && !refused && !slices.Contains(c.cfg.Endpoints, n.addr)
}

// sleep waits d, or less if ctx ends or the client closes; false then.
func (c *Client) sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	case <-c.base.Done():
		return false
	}
}

// pick chooses the node for the next attempt and takes a bulkhead slot on
// it (the caller releases it). The cached leader comes first; other
// replicas follow for anyReplica routes, or when the leader is down or
// busy (a follower then answers with a leader hint). Nodes with an open
// breaker are skipped. nil means every replica is down or busy.
func (c *Client) pick(r route) (n *node, epoch uint64, nreps int, err error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	reps, ok := c.mu.shards[r.shard]
	if !ok || len(reps) == 0 {
		return nil, 0, 0, fmt.Errorf("shard %d is not in cluster map epoch %d", r.shard, c.mu.cmap.GetEpoch())
	}
	epoch = c.mu.cmap.GetEpoch()
	leader := c.mu.leaders[r.shard]
	start := 0
	for i, id := range reps {
		if id == leader {
			start = i
		}
	}
	for i := range reps {
		cand := c.mu.nodes[reps[(start+i)%len(reps)]]
		if cand == nil || !cand.available() {
			continue
		}
		if cand.acquire() {
			return cand, epoch, len(reps), nil
		}
	}
	return nil, epoch, len(reps), nil
}

// classify turns an attempt's error into a verdict and the error to keep,
// and updates the leader cache, the breaker and the map on the way.
func (c *Client) classify(ctx context.Context, r route, n *node, err error, ownTimeout bool) (verdict, error) {
	if ctx.Err() != nil {
		return retryLater, err // the loop reports the deadline
	}
	if c.isClosed() {
		return done, ErrClosed
	}
	wrapped := fmt.Errorf("node %d (%s): %w", n.id, n.addr, err)
	st, _ := status.FromError(err)
	code := st.Code()
	if errors.Is(err, errNotConnected) {
		// Our connect timeout fired, not the caller's deadline: the
		// node is as good as hung.
		code, ownTimeout = codes.DeadlineExceeded, true
	}
	switch code {
	case codes.InvalidArgument:
		return done, fmt.Errorf("%w: %s", ErrInvalidArgument, st.Message())
	case codes.PermissionDenied, codes.Unauthenticated:
		return done, fmt.Errorf("%w: %s", ErrPermissionDenied, st.Message())
	case codes.NotFound:
		// The only NotFound a write gets: its lease does not exist.
		return done, fmt.Errorf("%w: %s", ErrLeaseNotFound, st.Message())
	case codes.Aborted:
		// The only Aborted a node answers: the write applied on an
		// earlier attempt and its result is gone. Not transient.
		return done, fmt.Errorf("%w: %s", ErrResultNotKept, st.Message())
	case codes.Unavailable:
		if nl := notLeader(st); nl != nil {
			if nl.GetLeaderId() != 0 && nl.GetLeaderId() != n.id {
				c.setLeader(ctx, r.shard, nl.GetLeaderId())
				return retryNow, wrapped
			}
			// The node answered but knows no leader: an election or a
			// lost quorum. Another replica may know more.
			c.nextLeader(r.shard, n.id)
			return retryNow, wrapped
		}
		// No detail: either the node could not be reached (the
		// connection is then not Ready) or it answered "no quorum /
		// timed out". Only the first is the node's fault: a quorum
		// loss must not open the breakers of healthy nodes.
		if n.conn.GetState() != connectivity.Ready {
			n.failure(err)
		}
		c.nextLeader(r.shard, n.id)
		return retryNow, wrapped
	case codes.DeadlineExceeded:
		if !ownTimeout {
			return retryLater, wrapped // the caller's deadline; the loop reports it
		}
		// Our per-attempt or connect timeout fired (the caller's did
		// not): the node is hung, partitioned or unreachable.
		n.trip(err)
		c.nextLeader(r.shard, n.id)
		return retryNow, wrapped
	case codes.Canceled:
		// Not the caller's ctx (checked above): the connection closed
		// under us (member removed from the map). Try again.
		return retryNow, wrapped
	case codes.FailedPrecondition:
		if se := staleEpoch(st); se != nil {
			if rerr := c.refreshMap(ctx, se.GetEpoch()); rerr != nil {
				return retryLater, fmt.Errorf("%w; %w", wrapped, rerr)
			}
			return retryNow, wrapped
		}
		return done, fmt.Errorf("client: %w", wrapped)
	case codes.ResourceExhausted:
		if r.anyReplica {
			c.nextLeader(r.shard, n.id)
		}
		return retryLater, wrapped
	}
	return done, fmt.Errorf("client: %w", wrapped)
}

func notLeader(st *status.Status) *kvpb.NotLeader {
	for _, d := range st.Details() {
		if nl, ok := d.(*kvpb.NotLeader); ok {
			return nl
		}
	}
	return nil
}

func staleEpoch(st *status.Status) *kvpb.StaleEpoch {
	for _, d := range st.Details() {
		if se, ok := d.(*kvpb.StaleEpoch); ok {
			return se
		}
	}
	return nil
}

// setLeader caches id as the leader of shard. A leader the map does not
// know (a member added since our map) triggers a map refresh.
func (c *Client) setLeader(ctx context.Context, shard, id uint64) {
	c.mu.Lock()
	_, known := c.mu.nodes[id]
	if known {
		c.mu.leaders[shard] = id
	}
	c.mu.Unlock()
	if !known {
		if err := c.refreshMap(ctx, c.epoch()+1); err == nil {
			c.mu.Lock()
			if _, ok := c.mu.nodes[id]; ok {
				c.mu.leaders[shard] = id
			}
			c.mu.Unlock()
		}
	}
}

// answered notes who answered a request sent to n: a header naming
// another node means n forwarded it to that node, the shard's leader
// (see server/forward.go). The client caches it as the leader when it can
// reach it itself, so the next request goes there directly instead of
// costing a hop through n; one it cannot reach (an address only the
// nodes resolve) it goes on reaching through n.
func (c *Client) answered(shard uint64, n *node, h *kvpb.ResponseHeader) {
	id := h.GetNode()
	if id == 0 || id == n.id {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if l := c.mu.nodes[id]; l != nil && l.available() && l.conn.GetState() != connectivity.TransientFailure &&
		slices.Contains(c.mu.shards[shard], id) {
		c.mu.leaders[shard] = id
	}
}

// nextLeader moves the cached leader of shard past failed, unless another
// goroutine already moved it.
func (c *Client) nextLeader(shard, failed uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.mu.leaders[shard] != failed {
		return
	}
	reps := c.mu.shards[shard]
	for i, id := range reps {
		if id == failed {
			c.mu.leaders[shard] = reps[(i+1)%len(reps)]
			return
		}
	}
}

// shardOf maps key to its shard with the cached ring.
func (c *Client) shardOf(key []byte) (uint64, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.mu.ring == nil {
		return 0, fmt.Errorf("%w: cluster map epoch %d has no data shards", ErrUnavailable, c.mu.cmap.GetEpoch())
	}
	return c.mu.ring.Shard(key), nil
}

package client

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/kvd/kvd/proto/kvpb"
)

// NodeStatus is one member's answer to Cluster.Status, with the client's
// own view of its health.
type NodeStatus struct {
	ID   uint64
	Addr string
	// Healthy: the node answered Status now and its breaker is closed.
	Healthy bool
	// Breaker is the client's circuit-breaker state for the node:
	// "closed", "open" or "half-open".
	Breaker string
	// Status is the node's answer; nil when Err is set.
	Status *kvpb.StatusResponse
	// Err is why the node did not answer.
	Err error
	// Latency of the Status call.
	Latency time.Duration
}

// Status asks every member of the cluster (as the freshest map the client
// can get lists them) for its status, in parallel, in map order. It fails
// with ErrUnavailable only when no member answers; otherwise per-node
// failures are in NodeStatus.Err.
func (c *Client) Status(ctx context.Context) ([]NodeStatus, error) {
	if c.isClosed() {
		return nil, ErrClosed
	}
	// Best effort: a stale map still lists the members worth asking.
	_ = c.refreshMap(ctx, 0)

	c.mu.RLock()
	var nodes []*node
	for _, m := range c.mu.cmap.GetMembers() {
		if n := c.mu.nodes[m.GetId()]; n != nil {
			nodes = append(nodes, n)
		}
	}
	c.mu.RUnlock()

	out := make([]NodeStatus, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Go(func() {
			st := NodeStatus{ID: n.id, Addr: n.addr}
			actx, cancel := c.attemptCtx(ctx)
			t0 := time.Now()
			resp, err := n.clu.Status(actx, &kvpb.StatusRequest{})
			st.Latency = time.Since(t0)
			cancel()
			state, _ := n.state()
			st.Breaker = state.String()
			if err != nil {
				st.Err = err
			} else {
				st.Status = resp
				st.Healthy = state == breakerClosed
			}
			out[i] = st
		})
	}
	wg.Wait()
	if c.isClosed() {
		return nil, ErrClosed
	}
	var errs []error
	for _, st := range out {
		if st.Err == nil {
			return out, nil
		}
		errs = append(errs, fmt.Errorf("node %d (%s): %w", st.ID, st.Addr, st.Err))
	}
	return out, fmt.Errorf("status: %w: no member answered: %w", ErrUnavailable, errors.Join(errs...))
}

// MemberList asks the cluster for its members, from any node that answers.
func (c *Client) MemberList(ctx context.Context) (*kvpb.MemberListResponse, error) {
	if c.isClosed() {
		return nil, ErrClosed
	}
	var (
		resp    *kvpb.MemberListResponse
		lastErr error
	)
	for attempt := 0; ; attempt++ {
		for _, n := range c.nodesInOrder() {
			actx, cancel := c.attemptCtx(ctx)
			r, err := n.clu.MemberList(actx, &kvpb.MemberListRequest{})
			cancel()
			if err == nil {
				resp = r
				return resp, nil
			}
			lastErr = fmt.Errorf("node %d (%s): %w", n.id, n.addr, err)
			if ctx.Err() != nil || c.isClosed() {
				break
			}
		}
		if c.isClosed() {
			return nil, ErrClosed
		}
		if !c.sleep(ctx, backoff(attempt)) {
			if c.isClosed() {
				return nil, ErrClosed
			}
			return nil, c.giveUp(ctx, "member list", lastErr)
		}
	}
}

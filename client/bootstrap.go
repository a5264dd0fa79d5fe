package client

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/kvd/kvd/proto/kvpb"
)

// overrideGrace is how long New waits, once it holds a cluster map, for
// endpoints that have not yet said which member they reach. A live node
// answers within milliseconds; one that was just killed behind a port
// forwarder can hold the connection open for the whole DialTimeout, and a
// fresh kvctl must not pay that. A late answer still takes effect (see
// lateProbes).
const overrideGrace = 250 * time.Millisecond

// probe is what one endpoint said during bootstrap.
type probe struct {
	ep   string
	m    *kvpb.ClusterMap // nil if the endpoint did not answer
	node uint64           // the member ep reaches, when ep is not an advertised address; else 0
	err  error
}

// bootstrap asks every endpoint at once for the cluster map and, for an
// endpoint that is not the advertised address of any member (a published
// container port, say), which member it reaches, so that member is dialed
// there. It applies the newest map it got once it knows an address for
// every member, or overrideGrace after the first map, whichever is first.
// Probes still running go on in the background (lateProbes).
func (c *Client) bootstrap(ctx context.Context) error {
	results := c.probeAll()
	var (
		best    *kvpb.ClusterMap
		errs    []error
		pending = len(c.cfg.Endpoints)
		grace   <-chan time.Time
	)
wait:
	for pending > 0 && !(best != nil && c.knowsEveryMember(best)) {
		select {
		case r := <-results:
			pending--
			if r.err != nil {
				errs = append(errs, &EndpointError{Endpoint: r.ep, Err: r.err})
				continue
			}
			best = c.absorb(r, best)
			if grace == nil {
				t := time.NewTimer(overrideGrace)
				defer t.Stop()
				grace = t.C
			}
		case <-grace:
			break wait
		case <-ctx.Done():
			if best == nil {
				errs = append(errs, ctx.Err())
			}
			break wait
		}
	}
	if best == nil {
		return fmt.Errorf("%w: no endpoint answered: %w", ErrUnavailable, errors.Join(errs...))
	}
	if err := c.applyMap(best); err != nil {
		return err
	}
	if pending > 0 {
		c.probes.Add(1)
		go c.lateProbes(results, pending)
	}
	return nil
}

// probeAll probes every endpoint at once (tracked by c.probes, so Close
// waits for them); the channel has room for every answer.
func (c *Client) probeAll() <-chan probe {
	eps := c.cfg.Endpoints
	results := make(chan probe, len(eps))
	c.probes.Add(len(eps))
	for _, ep := range eps {
		go func() {
			defer c.probes.Done()
			results <- c.probe(ep)
		}()
	}
	return results
}

// absorb takes in one endpoint's answer: the endpoint becomes the address
// of the member behind it, when it said which, and the newer of best and
// its map is returned.
func (c *Client) absorb(r probe, best *kvpb.ClusterMap) *kvpb.ClusterMap {
	if r.err != nil {
		return best
	}
	if r.node != 0 {
		c.useEndpoint(r.node, r.ep)
	}
	if best == nil || r.m.GetEpoch() > best.GetEpoch() {
		return r.m
	}
	return best
}

// probe asks ep for the cluster map and, if ep is not an address the map
// advertises, for the id of the member behind it.
func (c *Client) probe(ep string) probe {
	r := probe{ep: ep}
	n, err := dialNode(0, ep, 1, c.dialOpts, c.log)
	if err != nil {
		r.err = err
		return r
	}
	defer n.close(false)
	ctx, cancel := context.WithTimeout(c.base, c.cfg.DialTimeout)
	defer cancel()
	m, err := n.clu.Map(ctx, &kvpb.MapRequest{})
	if err != nil {
		r.err = err
		return r
	}
	r.m = m
	if slices.ContainsFunc(m.GetMembers(), func(mem *kvpb.Member) bool { return mem.GetClientAddr() == ep }) {
		return r
	}
	if st, err := n.clu.Status(ctx, &kvpb.StatusRequest{}); err == nil {
		r.node = st.GetNode()
	}
	return r
}

// knowsEveryMember reports whether every member of m can be dialed: at an
// advertised address the caller gave, or through an endpoint found to
// reach it.
func (c *Client) knowsEveryMember(m *kvpb.ClusterMap) bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	for _, mem := range m.GetMembers() {
		if _, ok := c.mu.overrides[mem.GetId()]; !ok && !slices.Contains(c.cfg.Endpoints, mem.GetClientAddr()) {
			return false
		}
	}
	return true
}

// lateProbes applies what the probes New stopped waiting for say: an
// endpoint that turns out to reach a member becomes that member's address.
func (c *Client) lateProbes(results <-chan probe, pending int) {
	defer c.probes.Done()
	for ; pending > 0; pending-- {
		c.absorb(<-results, nil)
	}
}

// useEndpoint makes ep the address of member id, redialing it if it was
// dialed elsewhere.
func (c *Client) useEndpoint(id uint64, ep string) {
	c.mu.Lock()
	if c.mu.closed || c.mu.overrides[id] == ep {
		c.mu.Unlock()
		return
	}
	c.mu.overrides[id] = ep
	c.log.Info("client: reaching member through configured endpoint", "node", id, "endpoint", ep)
	old, ok := c.mu.nodes[id]
	if !ok || old.addr == ep {
		c.mu.Unlock()
		return
	}
	n, err := dialNode(id, ep, c.cfg.MaxInFlightPerNode, c.dialOpts, c.log)
	if err != nil {
		c.mu.Unlock()
		return
	}
	c.mu.nodes[id] = n
	go n.heartbeat(c.cfg.HeartbeatInterval, c.probeTimeout())
	c.mu.Unlock()
	old.close(true)
}

// repairMap runs until Close. While the cached map leaves a member without
// an address (a cluster that is still publishing them when the client
// started), it asks the configured endpoints for a newer map, backing off
// from HeartbeatInterval to 5 s. Without it such a client would only ever
// talk to the members it knew, and a partition of those would strand it:
// nothing else makes it ask for a new map.
func (c *Client) repairMap() {
	defer c.repair.Done()
	const maxWait = 5 * time.Second
	wait := c.cfg.HeartbeatInterval
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		select {
		case <-c.base.Done():
			return
		case <-t.C:
		}
		if !c.mapIncomplete() {
			wait = c.cfg.HeartbeatInterval
		} else if !c.fetchNewerMap() {
			wait = min(2*wait, maxWait)
		}
		t.Reset(wait)
	}
}

// mapIncomplete reports whether a member of the cached map has no
// connection (its address is not known yet).
func (c *Client) mapIncomplete() bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	for _, mem := range c.mu.cmap.GetMembers() {
		if _, ok := c.mu.nodes[mem.GetId()]; !ok {
			return true
		}
	}
	return false
}

// fetchNewerMap asks every configured endpoint for the map at once and
// applies the newest; true if it was newer than the cached one.
func (c *Client) fetchNewerMap() bool {
	results := c.probeAll()
	var best *kvpb.ClusterMap
	for range c.cfg.Endpoints {
		best = c.absorb(<-results, best)
	}
	if best == nil || best.GetEpoch() <= c.epoch() {
		return false
	}
	return c.applyMap(best) == nil
}

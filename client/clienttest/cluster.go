// Package clienttest starts real kvd clusters in the test's process, for
// tests of code that uses package client (and kvctl).
//
// Every node is a real kvd server (package server): real Raft, bbolt in a
// temporary directory, gRPC on 127.0.0.1:0. In front of each node's client
// listener stands a proxy, as etcd's integration bridge does, and the
// cluster map advertises the proxy: every call a client makes to the
// node, leader hints followed included, passes through it. Through the
// proxy a test takes a node down or makes it hang, fails its next calls
// with a status, delays them, hides leader hints, and counts and inspects
// what reached the node. What Raft decides (leaders, epochs) is changed by
// real commands: a leadership transfer, a cluster map proposal, a node
// stopped and started again.
package clienttest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/fsm"
	"github.com/kvd/kvd/hashring"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/server"
)

// waitTimeout bounds every wait of the package for the cluster to reach a
// state: an election, a transfer, a map spreading to every node.
const waitTimeout = 20 * time.Second

// The nodes' Raft timing. A follower campaigns after 0.5-1 s without a
// leader: test machines run loaded, and every election a test did not ask
// for moves leaders under its feet. Elections the cluster needs (at start,
// after a restart) are not waited for: WaitReady has a replica campaign.
const (
	tick           = 10 * time.Millisecond
	electionTicks  = 50
	heartbeatTicks = 2
)

// MaxKeySize is the nodes' key limit, the server's default
// (docs/design.md, Limits).
const MaxKeySize = 4 << 10

// Cluster is a set of kvd nodes in this process. Its methods are safe for
// concurrent use.
type Cluster struct {
	Nodes []*Node

	dir string
}

// Node is one kvd server with its proxy.
type Node struct {
	ID uint64
	// Addr is the proxy's address: what the cluster map advertises as the
	// node's client address and what clients dial.
	Addr string

	proxy *proxy

	mu struct {
		sync.Mutex
		cfg server.Config
		srv *server.Server // nil while stopped
	}
}

// New starts nodes nodes (ids 1..nodes) holding data shards 1..shards with
// replicas copies each, and returns once every shard has a leader and
// every member has published its address. Close it when done.
func New(nodes, shards, replicas int) (*Cluster, error) {
	if nodes < 1 || shards < 1 || replicas < 1 || replicas > nodes {
		return nil, errors.New("clienttest: need nodes ≥ 1, shards ≥ 1, 1 ≤ replicas ≤ nodes")
	}
	dir, err := os.MkdirTemp("", "clienttest")
	if err != nil {
		return nil, err
	}
	c := &Cluster{dir: dir}
	if err := c.start(nodes, shards, replicas); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func listen() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }

func (c *Cluster) start(nodes, shards, replicas int) error {
	initial := map[uint64]string{}
	type lis struct{ client, peer, proxy net.Listener }
	all := make([]lis, nodes)
	for i := range all {
		for _, l := range []*net.Listener{&all[i].client, &all[i].peer, &all[i].proxy} {
			var err error
			if *l, err = listen(); err != nil {
				for _, a := range all[:i+1] {
					for _, l := range []net.Listener{a.client, a.peer, a.proxy} {
						if l != nil {
							l.Close()
						}
					}
				}
				return err
			}
		}
		initial[uint64(i+1)] = all[i].peer.Addr().String()
	}
	logger := slog.New(slog.DiscardHandler)
	if os.Getenv("KVD_TEST_LOG") != "" {
		logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	for i, l := range all {
		id := uint64(i + 1)
		p, err := newProxy(l.proxy, l.client.Addr().String())
		if err != nil {
			l.client.Close()
			l.peer.Close()
			l.proxy.Close()
			return err
		}
		n := &Node{ID: id, Addr: l.proxy.Addr().String(), proxy: p}
		n.mu.cfg = server.Config{
			NodeID:          id,
			DataDir:         filepath.Join(c.dir, fmt.Sprint(id)),
			ClientListener:  l.client,
			PeerListener:    l.peer,
			AdvertiseClient: n.Addr,
			InitialCluster:  initial,
			Shards:          shards,
			Replicas:        replicas,
			TickInterval:    tick,
			ElectionTicks:   electionTicks,
			HeartbeatTicks:  heartbeatTicks,
			Limits:          server.Limits{MaxKeyBytes: MaxKeySize},
			Logger:          logger.With("node", id),
			// A follower answers NotLeader: forwarding would carry
			// requests to the leader around the proxies, and the tests
			// are of the client's own routing.
			NoForwarding: true,
		}
		c.Nodes = append(c.Nodes, n)
	}
	// Opening a node's storage takes a while; the nodes open theirs at
	// once.
	errs := make([]error, len(c.Nodes))
	var wg sync.WaitGroup
	for i, n := range c.Nodes {
		wg.Go(func() { errs[i] = n.Start() })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return c.WaitReady()
}

// WaitReady waits until every running node knows a leader of every shard
// it holds and lists every member with its address. A shard without a
// leader has one of its running replicas campaign, now and then.
func (c *Cluster) WaitReady() error {
	var lastCampaign time.Time
	return c.waitFor("every shard to have a leader and every member an address", func() bool {
		// One replica per shard campaigns: several at once split the vote.
		var campaigned map[uint64]bool
		if time.Since(lastCampaign) > 20*tick {
			campaigned = map[uint64]bool{}
		}
		ready := true
		for _, n := range c.Nodes {
			srv := n.Server()
			if srv == nil {
				continue
			}
			for _, rn := range srv.Host().Nodes() {
				if rn.Leader() != 0 {
					continue
				}
				ready = false
				if campaigned != nil && !campaigned[rn.Shard()] {
					campaigned[rn.Shard()] = true
					lastCampaign = time.Now()
					ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
					_ = rn.Campaign(ctx)
					cancel()
				}
			}
			if !ready {
				continue
			}
			m, err := srv.Map(context.Background(), nil)
			if err != nil || len(m.GetMembers()) != len(c.Nodes) {
				ready = false
				continue
			}
			for _, mem := range m.GetMembers() {
				if mem.GetClientAddr() == "" {
					ready = false
				}
			}
		}
		return ready
	})
}

// waitFor polls cond until it holds or waitTimeout passes.
func (c *Cluster) waitFor(what string, cond func() bool) error {
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("clienttest: timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil
}

// Close stops every node and its proxy and removes their data.
func (c *Cluster) Close() {
	for _, n := range c.Nodes {
		n.proxy.setMode(Up)
	}
	for _, n := range c.Nodes {
		_ = n.Stop()
		n.proxy.close()
	}
	os.RemoveAll(c.dir)
}

// Endpoints lists the nodes' client addresses (their proxies).
func (c *Cluster) Endpoints() []string {
	var eps []string
	for _, n := range c.Nodes {
		eps = append(eps, n.Addr)
	}
	return eps
}

// Node returns the node with id, or nil.
func (c *Cluster) Node(id uint64) *Node {
	for _, n := range c.Nodes {
		if n.ID == id {
			return n
		}
	}
	return nil
}

// clusterMap is the cluster map of the first running node.
func (c *Cluster) clusterMap() *kvpb.ClusterMap {
	for _, n := range c.Nodes {
		if srv := n.Server(); srv != nil {
			if m, err := srv.Map(context.Background(), nil); err == nil {
				return m
			}
		}
	}
	return nil
}

// ShardOf is the shard key belongs to, by the cluster's ring.
func (c *Cluster) ShardOf(key []byte) uint64 {
	ring, err := hashring.FromMap(c.clusterMap())
	if err != nil {
		return 0
	}
	return ring.Shard(key)
}

// Replicas lists shard's replica ids.
func (c *Cluster) Replicas(shard uint64) []uint64 {
	for _, s := range c.clusterMap().GetShards() {
		if s.GetId() == shard {
			return slices.Clone(s.GetReplicas())
		}
	}
	return nil
}

// Epoch is the cluster-map epoch.
func (c *Cluster) Epoch() uint64 { return c.clusterMap().GetEpoch() }

// Leader is the id of the running node that leads shard (0: none).
func (c *Cluster) Leader(shard uint64) uint64 {
	for _, n := range c.Nodes {
		if srv := n.Server(); srv != nil {
			if rn := srv.Host().Node(shard); rn != nil && rn.IsLeader() {
				return n.ID
			}
		}
	}
	return 0
}

// SetLeader makes node id the leader of shard by a Raft leadership
// transfer, and returns once every replica running knows it.
func (c *Cluster) SetLeader(shard, id uint64) error {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	return c.waitFor(fmt.Sprintf("node %d to lead shard %d", id, shard), func() bool {
		cur := c.Leader(shard)
		if cur == id {
			return c.everyReplicaKnows(shard, id)
		}
		if cur == 0 {
			return false // an election is under way
		}
		if srv := c.Node(cur).Server(); srv != nil {
			if rn := srv.Host().Node(shard); rn != nil {
				_ = rn.TransferLeadership(ctx, id)
			}
		}
		return false
	})
}

func (c *Cluster) everyReplicaKnows(shard, leader uint64) bool {
	for _, n := range c.Nodes {
		if srv := n.Server(); srv != nil {
			if rn := srv.Host().Node(shard); rn != nil && rn.Leader() != leader {
				return false
			}
		}
	}
	return true
}

// WaitLeader waits until shard has a leader every running replica knows,
// and returns its id.
func (c *Cluster) WaitLeader(shard uint64) (uint64, error) {
	var id uint64
	err := c.waitFor(fmt.Sprintf("a leader of shard %d", shard), func() bool {
		id = c.Leader(shard)
		return id != 0 && c.everyReplicaKnows(shard, id)
	})
	return id, err
}

// SetClientAddr publishes addr as member id's client address ("": none),
// as the member itself does when it starts, through the meta shard; the
// epoch moves by one. It returns once every running node has the new map.
func (c *Cluster) SetClientAddr(id uint64, addr string) error {
	m := c.clusterMap()
	for _, mem := range m.GetMembers() {
		if mem.GetId() == id {
			mem = proto.CloneOf(mem)
			mem.ClientAddr = addr
			return c.proposeMeta(m.GetEpoch()+1, &peerpb.Command{Op: &peerpb.Command_UpdateMember{UpdateMember: &peerpb.UpdateMember{Member: mem}}})
		}
	}
	return fmt.Errorf("clienttest: no member %d", id)
}

// BumpEpoch replicates the cluster map again with the next epoch:
// requests routed with an older one then fail with StaleEpoch until the
// client refreshes.
func (c *Cluster) BumpEpoch() error {
	m := c.clusterMap()
	m.Epoch++
	return c.proposeMeta(m.GetEpoch(), &peerpb.Command{Op: &peerpb.Command_SetClusterMap{SetClusterMap: &peerpb.SetClusterMap{Map: m}}})
}

// proposeMeta replicates cmd on the meta shard through its leader and
// waits until every running node uses a map of at least epoch.
func (c *Cluster) proposeMeta(epoch uint64, cmd *peerpb.Command) error {
	b, err := proto.Marshal(cmd)
	if err != nil {
		return err
	}
	leader, err := c.WaitLeader(server.MetaShard)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	srv := c.Node(leader).Server()
	if srv == nil {
		return fmt.Errorf("clienttest: node %d, the meta shard's leader, stopped", leader)
	}
	resp, err := srv.Propose(ctx, &peerpb.ProposeRequest{Shard: server.MetaShard, Command: b})
	if err != nil {
		return fmt.Errorf("clienttest: propose on the meta shard: %w", err)
	}
	if _, err := fsm.DecodeResult(resp.GetResult()); err != nil {
		return fmt.Errorf("clienttest: the meta shard refused: %w", err)
	}
	return c.waitFor(fmt.Sprintf("epoch %d on every node", epoch), func() bool {
		for _, n := range c.Nodes {
			if srv := n.Server(); srv != nil {
				if m, err := srv.Map(ctx, nil); err != nil || m.GetEpoch() < epoch {
					return false
				}
			}
		}
		return true
	})
}

// Server is the node's kvd server, nil while it is stopped.
func (n *Node) Server() *server.Server {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.mu.srv
}

// Start starts the node's server, on the data and addresses it had: a
// restart of a stopped node. Its proxy stays up while it is stopped, and
// answers Unavailable meanwhile.
func (n *Node) Start() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.mu.srv != nil {
		return nil
	}
	srv, err := server.New(n.mu.cfg)
	if err != nil {
		return fmt.Errorf("clienttest: start node %d: %w", n.ID, err)
	}
	n.mu.srv = srv
	// The proxy's connection backs off while the node is stopped; a
	// started node is to be reached at once, as a client would, so Start
	// returns once the proxy's connection is up again: a call made
	// meanwhile would fail fast with the refusal it last saw.
	n.proxy.cc.ResetConnectBackoff()
	n.proxy.cc.Connect()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for st := n.proxy.cc.GetState(); st != connectivity.Ready; st = n.proxy.cc.GetState() {
		if st == connectivity.TransientFailure {
			n.proxy.cc.ResetConnectBackoff()
		}
		if !n.proxy.cc.WaitForStateChange(ctx, st) {
			return fmt.Errorf("clienttest: node %d started, but its proxy does not reach it: %s", n.ID, st)
		}
	}
	// A restart binds the addresses it had itself.
	n.mu.cfg.ClientListener, n.mu.cfg.PeerListener = nil, nil
	n.mu.cfg.ListenClient, n.mu.cfg.ListenPeer = srv.ClientAddr(), srv.PeerAddr()
	return nil
}

// Stop stops the node's server; Start starts it again.
func (n *Node) Stop() error {
	n.mu.Lock()
	srv := n.mu.srv
	n.mu.srv = nil
	n.mu.Unlock()
	if srv == nil {
		return nil
	}
	return srv.Stop()
}

// SetMode switches what the proxy does with calls.
func (n *Node) SetMode(m Mode) { n.proxy.setMode(m) }

// HideLeaderHint makes NotLeader answers reach clients with leader id 0
// and no address, as from a replica that does not know the leader.
func (n *Node) HideLeaderHint(hide bool) {
	n.proxy.mu.Lock()
	defer n.proxy.mu.Unlock()
	n.proxy.mu.hideHint = hide
}

// AnswerNext makes the next k KV calls (unary calls and Batch streams)
// get err, a gRPC status error, without reaching the node.
func (n *Node) AnswerNext(k int, err error) {
	n.proxy.mu.Lock()
	defer n.proxy.mu.Unlock()
	for range k {
		n.proxy.mu.answers = append(n.proxy.mu.answers, err)
	}
}

// FailNext makes the next k KV calls answer Unavailable without a detail.
func (n *Node) FailNext(k int) {
	n.AnswerNext(k, status.Error(codes.Unavailable, "clienttest: injected failure"))
}

// ExhaustNext makes the next k KV calls answer ResourceExhausted, as an
// overloaded node does.
func (n *Node) ExhaustNext(k int) {
	n.AnswerNext(k, status.Error(codes.ResourceExhausted, "clienttest: too many pending proposals"))
}

// FailAfterApply makes the next k unary writes reach the node and then
// answer Unavailable, like a leader that commits but times out replying.
func (n *Node) FailAfterApply(k int) {
	n.proxy.mu.Lock()
	defer n.proxy.mu.Unlock()
	n.proxy.mu.failAfter = k
}

// Delay holds every call but a Batch stream for d before it is forwarded
// (0: no delay).
func (n *Node) Delay(d time.Duration) {
	n.proxy.mu.Lock()
	defer n.proxy.mu.Unlock()
	n.proxy.mu.delay = d
}

// Calls counts the calls that reached the proxy, by method name ("Put",
// "Get", "Delete", "Range", "Txn", "Batch", "Map", "Status",
// "MemberList", "Check"); each item of a Batch stream also counts as a
// call of its method.
func (n *Node) Calls(method string) int {
	n.proxy.mu.Lock()
	defer n.proxy.mu.Unlock()
	return n.proxy.mu.calls[method]
}

// WriteHeaders returns the request headers of every write that reached
// the proxy, Batch items included, in arrival order.
func (n *Node) WriteHeaders() []*kvpb.RequestHeader { return n.proxy.snapshotHeaders() }

// MaxInFlight is the most KV calls the proxy ever held at once.
func (n *Node) MaxInFlight() int {
	n.proxy.mu.Lock()
	defer n.proxy.mu.Unlock()
	return n.proxy.mu.maxInFlight
}

// NotLeaderAnswers counts the NotLeader answers the node gave through the
// proxy for shard, Batch items included: calls that did not reach its
// leader.
func (n *Node) NotLeaderAnswers(shard uint64) int {
	n.proxy.mu.Lock()
	defer n.proxy.mu.Unlock()
	return n.proxy.mu.notLeader[shard]
}

// Term is the highest Raft term a running replica of shard is in: it
// moves with every election.
func (c *Cluster) Term(shard uint64) uint64 {
	var term uint64
	for _, n := range c.Nodes {
		if srv := n.Server(); srv != nil {
			if rn := srv.Host().Node(shard); rn != nil {
				term = max(term, rn.Term())
			}
		}
	}
	return term
}

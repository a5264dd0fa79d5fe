package client

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/client/clienttest"
	"github.com/kvd/kvd/proto/kvpb"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// newCluster starts a cluster of real in-process nodes that stops when
// the test ends.
func newCluster(t *testing.T, nodes, shards, replicas int) *clienttest.Cluster {
	t.Helper()
	f, err := clienttest.New(nodes, shards, replicas)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	return f
}

// newClient connects to f; cfg's zero fields get test-friendly defaults.
func newClient(t *testing.T, f *clienttest.Cluster, cfg Config) *Client {
	t.Helper()
	cfg.Endpoints = f.Endpoints()
	if cfg.HeartbeatInterval == 0 {
		// A heartbeat times out after two intervals: real nodes on a
		// loaded machine need more than the 40 ms of a 20 ms interval.
		cfg.HeartbeatInterval = 100 * time.Millisecond
	}
	if cfg.AttemptTimeout == 0 {
		// Real nodes sync their writes: on a loaded machine an attempt
		// can take a while without anything being wrong.
		cfg.AttemptTimeout = time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// waitFor polls cond until it holds or the deadline passes: a condition
// with a deadline, not a sleep.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// keyIn finds a key of shard.
func keyIn(f *clienttest.Cluster, shard uint64, tag string) []byte {
	for i := 0; ; i++ {
		k := fmt.Appendf(nil, "%s-%d", tag, i)
		if f.ShardOf(k) == shard {
			return k
		}
	}
}

// silentListener returns the address of a listener that accepts
// connections and never says a word on them: a gRPC connection to it
// never comes up.
func silentListener(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var held []net.Conn
	var heldMu sync.Mutex
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			heldMu.Lock()
			held = append(held, conn)
			heldMu.Unlock()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		heldMu.Lock()
		defer heldMu.Unlock()
		for _, c := range held {
			c.Close()
		}
	})
	return l.Addr().String()
}

// breakerOf returns the state of member id's breaker.
func breakerOf(c *Client, id uint64) breakerState {
	c.mu.RLock()
	n := c.mu.nodes[id]
	c.mu.RUnlock()
	s, _ := n.state()
	return s
}

// stopAllBut stops every node but keep.
func stopAllBut(t *testing.T, f *clienttest.Cluster, keep uint64) {
	t.Helper()
	for _, n := range f.Nodes {
		if n.ID != keep {
			if err := n.Stop(); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// startAll starts the stopped nodes and waits for every shard's leader.
func startAll(t *testing.T, f *clienttest.Cluster) {
	t.Helper()
	for _, n := range f.Nodes {
		if err := n.Start(); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.WaitReady(); err != nil {
		t.Fatal(err)
	}
}

func totalCalls(f *clienttest.Cluster, method string) int {
	n := 0
	for _, node := range f.Nodes {
		n += node.Calls(method)
	}
	return n
}

func TestRoutesByRingToLeader(t *testing.T) {
	f := newCluster(t, 3, 8, 3)
	// Spread the leaders so routing to the wrong node would show.
	for s := uint64(1); s <= 8; s++ {
		if err := f.SetLeader(s, f.Replicas(s)[int(s)%3]); err != nil {
			t.Fatal(err)
		}
	}
	c := newClient(t, f, Config{AttemptTimeout: 5 * time.Second}) // a slow attempt is not rerouted
	// The client starts with each shard's first replica as leader: the
	// first write per shard may take one hint. Warm up, then count.
	for s := uint64(1); s <= 8; s++ {
		if _, err := c.Put(ctxT(t, 5*time.Second), keyIn(f, s, "warm"), []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	// An election on a loaded machine moves a leader under the client's
	// feet: only shards whose term held still tell how the client routes.
	missed := func(s uint64) (n int) {
		for _, node := range f.Nodes {
			n += node.NotLeaderAnswers(s)
		}
		return n
	}
	before := map[uint64][2]uint64{} // shard → misses, term
	for s := uint64(1); s <= 8; s++ {
		before[s] = [2]uint64{uint64(missed(s)), f.Term(s)}
	}
	for i := range 200 {
		k := fmt.Appendf(nil, "key-%d", i)
		if _, err := c.Put(ctxT(t, 5*time.Second), k, []byte("v")); err != nil {
			t.Fatal(err)
		}
	}
	measured := 0
	for s := uint64(1); s <= 8; s++ {
		if f.Term(s) != before[s][1] {
			t.Logf("shard %d held an election during the puts", s)
			continue
		}
		measured++
		if n := uint64(missed(s)) - before[s][0]; n > 0 {
			t.Errorf("shard %d: %d puts reached a replica that was not the leader, want every put straight to the leader", s, n)
		}
	}
	if measured == 0 {
		t.Fatal("every shard held an election during the puts: nothing measured")
	}
	kv, err := c.Get(ctxT(t, 5*time.Second), []byte("key-7"))
	if err != nil || string(kv.Value) != "v" {
		t.Fatalf("Get = %v, %v", kv, err)
	}
}

func TestFollowsLeaderHint(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	c := newClient(t, f, Config{})
	const shard = 2
	reps := f.Replicas(shard)
	old, nu := f.Node(reps[0]), f.Node(reps[2])
	if err := f.SetLeader(shard, nu.ID); err != nil {
		t.Fatal(err)
	}
	k := keyIn(f, shard, "hint")
	if _, err := c.Put(ctxT(t, 5*time.Second), k, []byte("1")); err != nil {
		t.Fatal(err)
	}
	// An attempt that timed out on a loaded machine is retried on the
	// leader the client knows: only the old leader's count is exact.
	if old.Calls("Put") != 1 || old.NotLeaderAnswers(shard) != 1 || nu.Calls("Put") < 1 {
		t.Fatalf("puts: old leader %d (%d NotLeader), new leader %d; want 1 (1) and at least 1", old.Calls("Put"), old.NotLeaderAnswers(shard), nu.Calls("Put"))
	}
	// The hint is cached: the next write goes straight to the new leader.
	before := nu.Calls("Put")
	if _, err := c.Put(ctxT(t, 5*time.Second), k, []byte("2")); err != nil {
		t.Fatal(err)
	}
	if old.Calls("Put") != 1 || nu.Calls("Put") <= before {
		t.Fatalf("after caching: old %d, new %d puts; want 1 and more than %d", old.Calls("Put"), nu.Calls("Put"), before)
	}
}

func TestNoHintTriesOtherReplicas(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	c := newClient(t, f, Config{})
	const shard = 3
	reps := f.Replicas(shard)
	for _, id := range reps {
		f.Node(id).HideLeaderHint(true)
	}
	if err := f.SetLeader(shard, reps[2]); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Put(ctxT(t, 5*time.Second), keyIn(f, shard, "nohint"), []byte("x")); err != nil {
		t.Fatal(err)
	}
	// Each follower refused once; the leader got the put (more than once
	// only if an attempt timed out on a loaded machine).
	for _, id := range reps {
		got := f.Node(id).Calls("Put")
		if (id != reps[2] && got != 1) || got < 1 {
			t.Errorf("node %d got %d puts, want 1 (replicas tried in turn)", id, got)
		}
	}
}

func TestRetryKeepsSessionAndSeq(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	c := newClient(t, f, Config{})
	k := keyIn(f, 1, "dedup")
	leader := f.Node(f.Leader(1))

	// The leader applies the write, then "times out" twice: the client
	// retries (failing over to followers, which point back), and the
	// server answers the retry from its dedup table.
	leader.FailAfterApply(2)
	if _, err := c.Put(ctxT(t, 5*time.Second), k, []byte("once")); err != nil {
		t.Fatal(err)
	}
	var hs []*kvpb.RequestHeader
	for _, n := range f.Nodes {
		hs = append(hs, n.WriteHeaders()...)
	}
	if len(hs) < 3 {
		t.Fatalf("%d write attempts reached the cluster, want ≥ 3", len(hs))
	}
	for _, h := range hs {
		if h.Session != c.Session() || h.Seq != hs[0].Seq || h.Session == 0 {
			t.Fatalf("attempt header %v differs from first %v (session %d)", h, hs[0], c.Session())
		}
	}
	kv, err := c.Get(ctxT(t, 5*time.Second), k)
	if err != nil {
		t.Fatal(err)
	}
	if kv.Version != 1 {
		t.Fatalf("version %d after one retried put, want 1 (applied once)", kv.Version)
	}

	// Failures before apply: same header again, and the next write gets
	// the next seq.
	leader.FailNext(2)
	if _, err := c.Put(ctxT(t, 5*time.Second), k, []byte("twice")); err != nil {
		t.Fatal(err)
	}
	hs2 := leader.WriteHeaders()
	last := hs2[len(hs2)-1]
	if last.Seq != hs[0].Seq+1 || last.Session != c.Session() {
		t.Fatalf("next write header %v, want seq %d", last, hs[0].Seq+1)
	}
}

func TestAckBelow(t *testing.T) {
	tr := newSeqTracker()
	a, b, c := tr.start(), tr.start(), tr.start()
	if tr.ackBelow() != a {
		t.Fatalf("ackBelow = %d with %d in flight", tr.ackBelow(), a)
	}
	tr.finish(b)
	if tr.ackBelow() != a {
		t.Fatalf("ackBelow = %d: passed in-flight %d", tr.ackBelow(), a)
	}
	tr.finish(a)
	if tr.ackBelow() != c {
		t.Fatalf("ackBelow = %d, want %d", tr.ackBelow(), c)
	}
	tr.finish(c)
	if d := tr.start(); tr.ackBelow() != d || len(tr.done) != 0 {
		t.Fatalf("ackBelow = %d, want %d; done set %v", tr.ackBelow(), d, tr.done)
	}
}

func TestWriteHeadersCarryAckBelow(t *testing.T) {
	f := newCluster(t, 1, 2, 1)
	c := newClient(t, f, Config{})
	for i := range 3 {
		if _, err := c.Put(ctxT(t, 5*time.Second), []byte("k"), []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	for _, h := range f.Node(1).WriteHeaders() {
		// Sequential writes: everything below this one was answered.
		if h.AckBelow != h.Seq {
			t.Fatalf("header %v: ack_below should equal seq", h)
		}
	}
}

func TestBackoffBoundedByContext(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	c := newClient(t, f, Config{})
	k := keyIn(f, 1, "nol")
	// Shard 1 loses its quorum, and with it its leader: one replica is
	// left, and it cannot win an election.
	stopAllBut(t, f, f.Replicas(1)[0])

	start := time.Now()
	_, err := c.Put(ctxT(t, 300*time.Millisecond), k, []byte("x"))
	el := time.Since(start)
	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want ErrUnavailable wrapping DeadlineExceeded", err)
	}
	if el > 600*time.Millisecond {
		t.Fatalf("Put took %v with a 300ms deadline", el)
	}
	// Backoff, not a hot loop: with base 20ms and cap 1s, 300ms allow a
	// few rounds of three replicas, not hundreds.
	if n := totalCalls(f, "Put"); n > 60 {
		t.Fatalf("%d attempts in 300ms: backoff is not working", n)
	}

	// The quorum comes back: the same client recovers.
	startAll(t, f)
	if _, err := c.Put(ctxT(t, 5*time.Second), k, []byte("x")); err != nil {
		t.Fatal(err)
	}
}

func TestAllNodesDown(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	c := newClient(t, f, Config{})
	for _, n := range f.Nodes {
		n.SetMode(clienttest.Down)
	}
	_, err := c.Get(ctxT(t, 200*time.Millisecond), []byte("a"))
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("err = %v, want ErrUnavailable", err)
	}
	for _, n := range f.Nodes {
		n.SetMode(clienttest.Up)
	}
	// Breakers close on the next heartbeats.
	if _, err := c.Put(ctxT(t, 5*time.Second), []byte("a"), []byte("b")); err != nil {
		t.Fatal(err)
	}
}

func TestBreakerOpensOnHungNodeAndCloses(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	c := newClient(t, f, Config{HeartbeatInterval: 50 * time.Millisecond, AttemptTimeout: 200 * time.Millisecond})
	hung := f.Node(1)
	state := func(id uint64) breakerState { return breakerOf(c, id) }
	hung.SetMode(clienttest.Hang)
	waitFor(t, "breaker of hung node 1 to open", func() bool { return state(1) != breakerClosed })
	if state(2) != breakerClosed || state(3) != breakerClosed {
		t.Fatal("breakers of healthy nodes opened")
	}

	// Requests skip the open node: a serializable read of a shard node 1
	// leads goes to another replica without waiting on node 1.
	var shard uint64
	for s := uint64(1); s <= 4; s++ {
		if f.Leader(s) == 1 {
			shard = s
		}
	}
	k := keyIn(f, shard, "skip")
	before := hung.Calls("Get")
	start := time.Now()
	if _, err := c.Get(ctxT(t, 5*time.Second), k, WithSerializable()); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get = %v, want ErrNotFound from another replica", err)
	}
	if el := time.Since(start); el > 90*time.Millisecond {
		t.Fatalf("serializable Get took %v: it waited on the hung node", el)
	}
	if hung.Calls("Get") != before {
		t.Fatal("a request went to the node whose breaker is open")
	}

	// Leadership moves away from the hung node (as Raft would do); the
	// client finds the new leader and writes succeed.
	for s := uint64(1); s <= 4; s++ {
		if f.Leader(s) == 1 {
			if err := f.SetLeader(s, f.Replicas(s)[1]); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := c.Put(ctxT(t, 5*time.Second), k, []byte("v")); err != nil {
		t.Fatal(err)
	}

	hung.SetMode(clienttest.Up)
	waitFor(t, "breaker of node 1 to close", func() bool { return state(1) == breakerClosed })
}

func TestHungLeaderFailsOverWithinDeadline(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	// Slow heartbeats: the per-attempt timeout, not the breaker, must
	// rescue this request.
	c := newClient(t, f, Config{HeartbeatInterval: time.Hour, AttemptTimeout: 100 * time.Millisecond})
	const shard = 1
	reps := f.Replicas(shard)
	k := keyIn(f, shard, "hung")
	f.Node(reps[0]).SetMode(clienttest.Hang)
	if err := f.SetLeader(shard, reps[1]); err != nil {
		t.Fatal(err)
	}
	f.Node(reps[1]).HideLeaderHint(true) // irrelevant for the leader itself
	start := time.Now()
	if _, err := c.Put(ctxT(t, 2*time.Second), k, []byte("v")); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > time.Second {
		t.Fatalf("failover took %v", el)
	}
}

// Followers that have not yet noticed their leader's death keep naming it
// in their hints. Once an attempt on it timed out, the client must not go
// back and wait on it again for every hint (a fresh kvctl, whose breakers
// start closed, spent 5 s so after a docker kill).
func TestHintToATimedOutNodeIsNotFollowedBack(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	// No heartbeats in this test: only request outcomes move breakers.
	c := newClient(t, f, Config{HeartbeatInterval: time.Hour, AttemptTimeout: 100 * time.Millisecond})
	const shard = 1
	hung := f.Node(f.Leader(shard))
	hung.SetMode(clienttest.Hang)
	t.Cleanup(func() { hung.SetMode(clienttest.Up) })
	k := keyIn(f, shard, "hint")
	if _, err := c.Put(ctxT(t, time.Second), k, []byte("v")); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Put while the leader hangs = %v, want ErrUnavailable", err)
	}
	if n := hung.Calls("Put"); n != 1 {
		t.Fatalf("the hung leader got %d attempts; after the first timed out, hints to it must be skipped", n)
	}
	// An election moves leadership; the next hint leads to the new leader.
	if err := f.SetLeader(shard, f.Replicas(shard)[1]); err != nil {
		t.Fatal(err)
	}
	if f.Leader(shard) == hung.ID {
		if err := f.SetLeader(shard, f.Replicas(shard)[2]); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Put(ctxT(t, 5*time.Second), k, []byte("v")); err != nil {
		t.Fatal(err)
	}
}

func TestBulkheadBoundsInFlight(t *testing.T) {
	f := newCluster(t, 1, 2, 1)
	c := newClient(t, f, Config{MaxInFlightPerNode: 2, AttemptTimeout: time.Second, HeartbeatInterval: time.Hour})
	n := f.Node(1)
	n.SetMode(clienttest.Hang)
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Go(func() {
			_, errs[i] = c.Get(ctxT(t, 300*time.Millisecond), fmt.Appendf(nil, "k%d", i))
		})
	}
	wg.Wait()
	if got := n.MaxInFlight(); got > 2 {
		t.Fatalf("node saw %d calls in flight, bulkhead is 2", got)
	}
	for _, err := range errs {
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("err = %v, want ErrUnavailable", err)
		}
	}
	n.SetMode(clienttest.Up)
	if _, err := c.Put(ctxT(t, 5*time.Second), []byte("k"), []byte("v")); err != nil {
		t.Fatal(err)
	}
}

func TestResourceExhaustedBacksOff(t *testing.T) {
	f := newCluster(t, 1, 2, 1)
	c := newClient(t, f, Config{})
	f.Node(1).ExhaustNext(3)
	if _, err := c.Put(ctxT(t, 5*time.Second), []byte("k"), []byte("v")); err != nil {
		t.Fatal(err)
	}
	if got := f.Node(1).Calls("Put"); got != 4 {
		t.Fatalf("%d attempts, want 4", got)
	}
}

func TestStaleEpochRefreshesMap(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	c := newClient(t, f, Config{})
	// New may still be probing endpoints it did not wait for.
	c.probes.Wait()
	maps := totalCalls(f, "Map")
	if err := f.BumpEpoch(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Put(ctxT(t, 5*time.Second), []byte("k"), []byte("v")); err != nil {
		t.Fatal(err)
	}
	if totalCalls(f, "Map") != maps+1 {
		t.Fatalf("map fetched %d times, want 1", totalCalls(f, "Map")-maps)
	}
	if c.epoch() != f.Epoch() {
		t.Fatalf("client epoch %d, cluster %d", c.epoch(), f.Epoch())
	}
}

func TestInvalidArgumentNotRetried(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	c := newClient(t, f, Config{})
	big := bytes.Repeat([]byte("k"), clienttest.MaxKeySize+1)
	_, err := c.Put(ctxT(t, 5*time.Second), big, []byte("v"))
	if !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("err = %v, want ErrInvalidArgument", err)
	}
	if n := totalCalls(f, "Put"); n > 1 {
		t.Fatalf("%d attempts, want 1", n)
	}
	if _, err := c.Get(ctxT(t, time.Second), nil); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("empty key: %v", err)
	}
}

func TestGetDeleteTxn(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	c := newClient(t, f, Config{})
	ctx := ctxT(t, 5*time.Second)
	if _, err := c.Get(ctx, []byte("nope")); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get missing = %v, want ErrNotFound", err)
	}
	if _, err := c.Put(ctx, []byte("{u1}/a"), []byte("1")); err != nil {
		t.Fatal(err)
	}
	req := &kvpb.TxnRequest{
		Compare: []*kvpb.Compare{{Key: []byte("{u1}/a"), Target: kvpb.Compare_VALUE, Value: []byte("1")}},
		Success: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: []byte("{u1}/b"), Value: []byte("2")}}}},
	}
	orig := proto.Clone(req)
	resp, err := c.Txn(ctx, req)
	if err != nil || !resp.Succeeded {
		t.Fatalf("Txn = %v, %v", resp, err)
	}
	if !proto.Equal(orig, req) {
		t.Fatal("Txn modified the caller's request")
	}
	if kv, err := c.Get(ctx, []byte("{u1}/b")); err != nil || string(kv.Value) != "2" {
		t.Fatalf("Get = %v, %v", kv, err)
	}
	// Keys in two shards: rejected, never retried.
	a := keyIn(f, 1, "x")
	b := keyIn(f, 2, "x")
	cross := &kvpb.TxnRequest{Success: []*kvpb.RequestOp{
		{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: a}}},
		{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: b}}},
	}}
	if _, err := c.Txn(ctx, cross); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("cross-shard Txn = %v, want ErrInvalidArgument", err)
	}
	if _, err := c.Txn(ctx, &kvpb.TxnRequest{}); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("empty Txn = %v", err)
	}
	d, err := c.Delete(ctx, []byte("{u1}/a"))
	if err != nil || d.Deleted != 1 {
		t.Fatalf("Delete = %v, %v", d, err)
	}
	if _, err := c.Get(ctx, []byte("{u1}/a")); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get deleted = %v", err)
	}
}

func TestScanMergesShardsInOrder(t *testing.T) {
	f := newCluster(t, 3, 8, 3)
	c := newClient(t, f, Config{})
	ctx := ctxT(t, time.Minute) // 250 synced writes one after the other
	var want []string
	for i := range 250 {
		k := fmt.Sprintf("k%03d", i)
		want = append(want, k)
		if _, err := c.Put(ctx, []byte(k), []byte("v"+k)); err != nil {
			t.Fatal(err)
		}
	}
	for _, k := range []string{"a", "j", "l", "z"} { // outside the prefix
		if _, err := c.Put(ctx, []byte(k), []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	shardsSeen := map[uint64]bool{}
	for _, k := range want {
		shardsSeen[f.ShardOf([]byte(k))] = true
	}
	if len(shardsSeen) < 4 {
		t.Fatalf("keys spread over only %d shards; the test needs several", len(shardsSeen))
	}

	for _, limit := range []int{1, 7, 100, 250, 1000} {
		var got []string
		tok, pages := "", 0
		for {
			p, err := c.Scan(ctx, []byte("k"), PrefixEnd([]byte("k")), ScanOptions{Limit: limit, Token: tok})
			if err != nil {
				t.Fatal(err)
			}
			if len(p.KVs) > limit {
				t.Fatalf("limit %d: page of %d", limit, len(p.KVs))
			}
			for _, kv := range p.KVs {
				if string(kv.Value) != "v"+string(kv.Key) {
					t.Fatalf("value of %q = %q", kv.Key, kv.Value)
				}
				got = append(got, string(kv.Key))
			}
			pages++
			if tok = p.Next; tok == "" {
				break
			}
		}
		if !slices.Equal(got, want) {
			t.Fatalf("limit %d: scan returned %d keys %v..., want %d in order", limit, len(got), got[:min(5, len(got))], len(want))
		}
		if wantPages := (250 + limit - 1) / limit; pages < wantPages || pages > wantPages+1 {
			t.Fatalf("limit %d: %d pages, want %d", limit, pages, wantPages)
		}
	}

	// Whole key space, keys only, serializable.
	p, err := c.Scan(ctx, nil, nil, ScanOptions{KeysOnly: true, Serializable: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(p.KVs) != 254 || p.Next != "" || p.KVs[0].Value != nil || string(p.KVs[0].Key) != "a" || string(p.KVs[253].Key) != "z" {
		t.Fatalf("full scan: %d keys, next %q", len(p.KVs), p.Next)
	}
	// Empty range.
	if p, err := c.Scan(ctx, []byte("m"), []byte("n"), ScanOptions{}); err != nil || len(p.KVs) != 0 || p.Next != "" {
		t.Fatalf("empty scan = %v, %v", p, err)
	}
}

func TestCountSumsEveryShard(t *testing.T) {
	f := newCluster(t, 3, 8, 3)
	c := newClient(t, f, Config{})
	ctx := ctxT(t, time.Minute) // 120 synced writes one after the other
	for i := range 120 {
		if _, err := c.Put(ctx, []byte(fmt.Sprintf("c%03d", i)), []byte("v")); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Put(ctx, []byte("d"), []byte("outside")); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		start, end string
		want       int64
	}{
		{"c", string(PrefixEnd([]byte("c"))), 120},
		{"c010", "c020", 10},
		{"", "", 121},
		{"c050", "", 71},
		{"z", "a", 0},
	} {
		for _, ser := range []bool{false, true} {
			n, err := c.Count(ctx, []byte(tc.start), []byte(tc.end), ser)
			if err != nil || n != tc.want {
				t.Errorf("Count(%q, %q, serializable=%v) = %d, %v; want %d", tc.start, tc.end, ser, n, err, tc.want)
			}
		}
	}
	// One count-only Range per shard: no key crosses the wire.
	ranges := 0
	for _, n := range f.Nodes {
		ranges += n.Calls("Range")
	}
	if want := 8 * 2 * 4; ranges != want { // 8 shards × 2 consistencies × 4 non-empty ranges
		t.Errorf("%d Range calls, want %d", ranges, want)
	}
}

func TestScanBadToken(t *testing.T) {
	f := newCluster(t, 1, 2, 1)
	c := newClient(t, f, Config{})
	good := encodeToken(scanToken{resume: []byte("k5")})
	raw := []byte(good)
	flipped := string(append(raw[:len(raw)-1:len(raw)-1], raw[len(raw)-1]^1))
	for _, tok := range []string{"!!!", "AA", good[:len(good)-2], flipped, encodeToken(scanToken{resume: []byte("a")})} {
		_, err := c.Scan(ctxT(t, time.Second), []byte("k"), nil, ScanOptions{Token: tok})
		if !errors.Is(err, ErrInvalidToken) {
			t.Errorf("token %q: err = %v, want ErrInvalidToken", tok, err)
		}
	}
}

func TestTokenRoundTrip(t *testing.T) {
	for _, k := range [][]byte{{0}, []byte("k"), bytes.Repeat([]byte{0xff}, 300)} {
		for _, revs := range []map[uint64]int64{{}, {1: 0, 2: 7, 300: math.MaxInt64}} {
			got, err := decodeToken(encodeToken(scanToken{resume: k, revs: revs}))
			if err != nil || !bytes.Equal(got.resume, k) || !maps.Equal(got.revs, revs) {
				t.Fatalf("round trip of %q %v = %q %v, %v", k, revs, got.resume, got.revs, err)
			}
		}
	}
}

func FuzzDecodeToken(f *testing.F) {
	f.Add(encodeToken(scanToken{resume: []byte("key")}))
	f.Add(encodeToken(scanToken{resume: []byte("key"), revs: map[uint64]int64{1: 5, 2: 0}}))
	f.Add("")
	f.Add("AQ")
	f.Fuzz(func(t *testing.T, tok string) {
		k, err := decodeToken(tok)
		if err != nil {
			if !errors.Is(err, ErrInvalidToken) {
				t.Fatalf("error %v is not ErrInvalidToken", err)
			}
			return
		}
		if encodeToken(k) != tok {
			t.Fatalf("accepted a non-canonical token %q", tok)
		}
	})
}

func TestPrefixEnd(t *testing.T) {
	for _, tc := range []struct{ in, want []byte }{
		{[]byte("a"), []byte("b")},
		{[]byte("a\xff"), []byte("b")},
		{[]byte("\xff\xff"), nil},
		{nil, nil},
	} {
		if got := PrefixEnd(tc.in); !bytes.Equal(got, tc.want) {
			t.Errorf("PrefixEnd(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestBackoffFullJitter(t *testing.T) {
	for attempt := range 40 {
		ceil := min(backoffCap, backoffBase<<min(attempt, 16))
		for range 50 {
			if d := backoff(attempt); d < 0 || d >= ceil {
				t.Fatalf("backoff(%d) = %v, want in [0, %v)", attempt, d, ceil)
			}
		}
	}
}

func TestStatusAndMembers(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	c := newClient(t, f, Config{})
	f.Node(2).SetMode(clienttest.Down)
	st, err := c.Status(ctxT(t, 5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 3 || st[1].ID != 2 || st[1].Err == nil || st[1].Healthy || st[0].Err != nil || !st[0].Healthy {
		t.Fatalf("status = %+v", st)
	}
	if len(st[0].Status.Shards) == 0 {
		t.Fatal("node 1 reports no shards")
	}
	ml, err := c.MemberList(ctxT(t, 5*time.Second))
	if err != nil || len(ml.Members) != 3 {
		t.Fatalf("MemberList = %v, %v", ml, err)
	}
	m, err := c.Map(ctxT(t, 5*time.Second))
	if err != nil || len(m.Shards) != 5 { // 4 data shards and the meta shard
		t.Fatalf("Map = %v, %v", m, err)
	}
	for _, n := range f.Nodes {
		n.SetMode(clienttest.Down)
	}
	if _, err := c.Status(ctxT(t, 5*time.Second)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Status with all down = %v", err)
	}
	if _, err := c.MemberList(ctxT(t, 200*time.Millisecond)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("MemberList with all down = %v", err)
	}
}

func TestNewFailsWhenNoEndpointAnswers(t *testing.T) {
	f := newCluster(t, 1, 1, 1)
	f.Node(1).SetMode(clienttest.Down)
	_, err := New(ctxT(t, 5*time.Second), Config{Endpoints: []string{f.Nodes[0].Addr, "127.0.0.1:1"}, DialTimeout: 200 * time.Millisecond})
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("New = %v, want ErrUnavailable", err)
	}
	if _, err := New(context.Background(), Config{}); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("New without endpoints = %v", err)
	}
}

func TestBootstrapSkipsDeadEndpoint(t *testing.T) {
	f := newCluster(t, 1, 1, 1)
	c, err := New(ctxT(t, 5*time.Second), Config{Endpoints: []string{"127.0.0.1:1", f.Nodes[0].Addr}, DialTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Put(ctxT(t, 5*time.Second), []byte("a"), []byte("b")); err != nil {
		t.Fatal(err)
	}
}

func TestCloseIdempotent(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	c := newClient(t, f, Config{})
	f.Node(1).SetMode(clienttest.Hang)
	// A request stuck on a hung node is released by Close.
	errc := make(chan error, 1)
	go func() {
		_, err := c.Get(context.Background(), keyIn(f, 1, "c"))
		errc <- err
	}()
	waitFor(t, "the request to reach the hung node", func() bool { return f.Node(1).Calls("Get") > 0 })
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; !errors.Is(err, ErrClosed) {
		t.Fatalf("in-flight Get after Close = %v, want ErrClosed", err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Put(context.Background(), []byte("a"), nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Put after Close = %v", err)
	}
	if _, err := c.Scan(context.Background(), nil, nil, ScanOptions{}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Scan after Close = %v", err)
	}
}

// TestConcurrentUse exercises the client from many goroutines while
// leaders move, for the race detector.
func TestConcurrentUse(t *testing.T) {
	f := newCluster(t, 3, 8, 3)
	c := newClient(t, f, Config{})
	ctx := ctxT(t, time.Minute)
	stop := make(chan struct{})
	var mover sync.WaitGroup
	// A leadership transfer every 20 ms: a leader stops taking proposals
	// while it hands over, so back to back transfers would leave none.
	mover.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			s := uint64(i%8 + 1)
			if err := f.SetLeader(s, f.Replicas(s)[i%3]); err != nil {
				t.Error(err)
			}
		}
	})
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Go(func() {
			for i := range 40 {
				k := fmt.Appendf(nil, "g%d-%d", g, i)
				if _, err := c.Put(ctx, k, k); err != nil {
					t.Error(err)
					return
				}
				kv, err := c.Get(ctx, k)
				if err != nil || !bytes.Equal(kv.Value, k) {
					t.Errorf("Get %q = %v, %v", k, kv, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(stop)
	mover.Wait()
	p, err := c.Scan(ctx, []byte("g"), PrefixEnd([]byte("g")), ScanOptions{Limit: 10000})
	if err != nil || len(p.KVs) != 16*40 {
		t.Fatalf("scan: %d keys, %v", len(p.KVs), err)
	}
}

// Concurrent requests to a node share one Batch stream, and each caller
// gets its own answer; a request too large to batch goes by its unary
// method and arrives whole.
func TestConcurrentRequestsShareOneStream(t *testing.T) {
	f := newCluster(t, 1, 1, 1)
	c := newClient(t, f, Config{AttemptTimeout: 5 * time.Second})
	ctx := ctxT(t, 20*time.Second)
	const writers, each = 50, 20
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				k, v := fmt.Appendf(nil, "k%d-%d", w, i), fmt.Appendf(nil, "v%d-%d", w, i)
				if _, err := c.Put(ctx, k, v); err != nil {
					errs <- err
					return
				}
				kv, err := c.Get(ctx, k)
				if err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(kv.GetValue(), v) {
					errs <- fmt.Errorf("get %s = %q, want %q", k, kv.GetValue(), v)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := f.Node(1).Calls("Put"); got != writers*each {
		t.Errorf("node served %d puts, want %d", got, writers*each)
	}
	if got := f.Node(1).Calls("Batch"); got != 1 {
		t.Errorf("%d Batch streams, want 1 for all %d requests", got, 2*writers*each)
	}

	big := bytes.Repeat([]byte("b"), maxBatchItemBytes+1)
	if _, err := c.Put(ctx, []byte("big"), big); err != nil {
		t.Fatalf("put of %d bytes: %v", len(big), err)
	}
	kv, err := c.Get(ctx, []byte("big"))
	if err != nil || !bytes.Equal(kv.GetValue(), big) {
		t.Fatalf("get big: %d bytes, %v; want %d bytes", len(kv.GetValue()), err, len(big))
	}
}

// A member that accepts connections and never speaks (a paused process, a
// partition that holds connections open) costs a request one attempt
// timeout, here shorter than ConnectTimeout: opening its Batch stream
// gives up with the attempt, the breaker opens, and the request goes to
// the new leader.
func TestSilentMemberCostsOneAttempt(t *testing.T) {
	f := newCluster(t, 3, 1, 3)
	silent := silentListener(t)
	if err := f.SetClientAddr(1, silent); err != nil {
		t.Fatal(err)
	}
	if err := f.SetLeader(1, 2); err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t, 10*time.Second)
	c, err := New(ctx, Config{Endpoints: f.Endpoints()[1:], HeartbeatInterval: time.Hour, AttemptTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })

	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			defer cancel()
			if _, err := c.Put(pctx, fmt.Appendf(nil, "k%d", i), []byte("v")); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := f.Node(2).Calls("Put"); got != 20 {
		t.Errorf("the new leader served %d puts, want 20", got)
	}
}

// TestCallerMayReuseBuffersAfterGivingUp: once Put returns, on success or
// on a timeout that leaves its request queued or in flight, the caller
// owns its key and value again. Every writer here overwrites its buffers
// with X the moment Put returns; had the stream's sender still been
// encoding the request, a key or value of X would reach the node (and the
// race detector would flag the overlap).
func TestCallerMayReuseBuffersAfterGivingUp(t *testing.T) {
	f := newCluster(t, 1, 1, 1)
	c := newClient(t, f, Config{AttemptTimeout: 5 * time.Second})
	const writers, each = 32, 100
	var wg sync.WaitGroup
	var timedOut atomic.Int64
	for w := range writers {
		wg.Go(func() {
			key, val := make([]byte, 0, 16), make([]byte, 0, 64)
			for i := range each + 1 {
				key = fmt.Appendf(key[:0], "k%02d-%03d", w, i)
				val = fmt.Appendf(val[:0], "value of %s", key)
				// Deadlines from 0 to ~3 ms: some answered, some given
				// up while queued, some while on the wire. The last put
				// has time to succeed, so the check below has writes to
				// look at however slow the machine.
				timeout := time.Duration(i%8) * 400 * time.Microsecond
				if i == each {
					timeout = 10 * time.Second
				}
				ctx, cancel := context.WithTimeout(context.Background(), timeout)
				if _, err := c.Put(ctx, key, val); err != nil {
					timedOut.Add(1)
				}
				cancel()
				for j := range key {
					key[j] = 'X'
				}
				for j := range val {
					val[j] = 'X'
				}
			}
		})
	}
	wg.Wait()
	page, err := c.Scan(ctxT(t, 10*time.Second), nil, nil, ScanOptions{Limit: writers * (each + 1)})
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range page.KVs {
		if bytes.ContainsRune(kv.GetKey(), 'X') || string(kv.GetValue()) != "value of "+string(kv.GetKey()) {
			t.Errorf("the node stored %q = %q: a buffer the caller reused after Put returned", kv.GetKey(), kv.GetValue())
		}
	}
	t.Logf("%d puts stored, %d of %d gave up", len(page.KVs), timedOut.Load(), writers*(each+1))
	if len(page.KVs) < writers || timedOut.Load() == 0 {
		t.Fatalf("the test needs both outcomes: %d stored, %d gave up", len(page.KVs), timedOut.Load())
	}
}

// A cached leader whose connection never comes up (its advertised name
// does not resolve, or its address drops packets: here, a listener that
// never speaks HTTP/2) costs a request ConnectTimeout, not AttemptTimeout.
func TestUnconnectedLeaderCostsConnectTimeout(t *testing.T) {
	f := newCluster(t, 3, 1, 3)
	silent := silentListener(t)
	const shard = 1
	if err := f.SetClientAddr(1, silent); err != nil {
		t.Fatal(err)
	}
	if err := f.SetLeader(shard, 1); err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t, 20*time.Second)
	// The attempt timeout is far longer than the connect timeout, and no
	// heartbeat runs: only the connect timeout can end the wait on node 1.
	c, err := New(ctx, Config{Endpoints: f.Endpoints()[1:], HeartbeatInterval: time.Hour,
		AttemptTimeout: 10 * time.Second, ConnectTimeout: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	// An election the client has not heard of.
	if err := f.SetLeader(shard, 2); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	if _, err := c.Put(ctx, keyIn(f, shard, "unconnected"), []byte("v")); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("Put took %v: it waited for the attempt timeout, not the connect timeout", el)
	}
	if got := f.Node(2).Calls("Put"); got != 1 {
		t.Errorf("the new leader served %d puts, want 1", got)
	}
	if st := breakerOf(c, 1); st == breakerClosed {
		t.Errorf("node 1's breaker is %v after its connection timed out, want open", st)
	}
}

// TestNoQuorumSaysSo: with two of three replicas down, a write that runs
// out of time says the shard has no quorum and names the replicas the
// client could not reach, rather than repeat the last replica's
// "leader unknown".
func TestNoQuorumSaysSo(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	c := newClient(t, f, Config{})
	for _, id := range []uint64{2, 3} {
		f.Node(id).SetMode(clienttest.Down)
		if err := f.Node(id).Stop(); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "heartbeats to mark nodes 2 and 3 down", func() bool {
		d2, _ := c.reach(2)
		d3, _ := c.reach(3)
		return d2 != "" && d3 != ""
	})
	_, err := c.Put(ctxT(t, 300*time.Millisecond), []byte("a"), []byte("b"))
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "has no quorum (2 of 3 replicas unreachable: ") ||
		!strings.Contains(err.Error(), "node 2 at "+f.Node(2).Addr+": ") || !strings.Contains(err.Error(), "node 3 at "+f.Node(3).Addr+": ") {
		t.Fatalf("err = %v, want ErrUnavailable saying the shard has no quorum", err)
	}
	var ue *UnreachableError
	if errors.As(err, &ue) {
		t.Fatalf("err = %v: members at addresses the caller gave are down, not out of reach", err)
	}
}

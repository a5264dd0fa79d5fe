// Package e2e runs real kvd processes and drives them through kvctl and the
// Go client, the way users do.
package e2e

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/hashring"
	"github.com/kvd/kvd/internal/proccluster"
)

func TestKvctlAgainstCluster(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 8})

	mustKvctl := func(stdin string, args ...string) string {
		t.Helper()
		out, errOut, code := c.Kvctl(stdin, args...)
		if code != 0 {
			t.Fatalf("kvctl %v: exit %d: %s", args, code, errOut)
		}
		return out
	}

	mustKvctl("", "put", "greeting", "hello")
	if got := mustKvctl("", "get", "greeting"); got != "hello\n" {
		t.Fatalf("get greeting = %q, want the value alone on one line", got)
	}
	mustKvctl("from stdin", "put", "piped", "-")
	if got := mustKvctl("", "get", "piped"); got != "from stdin\n" {
		t.Fatalf("get piped = %q", got)
	}

	// A prefix scan over keys that land in many shards comes back ordered.
	var want []string
	for i := 0; i < 40; i++ {
		k := fmt.Sprintf("scan/%03d", i)
		mustKvctl("", "put", k, "v"+k)
		want = append(want, k)
	}
	out := mustKvctl("", "get", "--prefix", "scan/", "--keys-only")
	got := strings.Fields(out)
	if !sort.StringsAreSorted(got) || strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("prefix scan keys = %v, want %v in order", got, want)
	}
	shards := map[uint64]bool{}
	js := mustKvctl("", "get", "--prefix", "scan/", "-o", "json")
	if !strings.Contains(js, `"mod_revision"`) && !strings.Contains(js, `"modRevision"`) {
		t.Fatalf("json output lacks revisions: %s", js)
	}
	for _, k := range want {
		shards[shardOf(t, c, k)] = true
	}
	if len(shards) < 4 {
		t.Fatalf("scan keys landed in only %d shards; the test wants many", len(shards))
	}

	mustKvctl("", "del", "greeting")
	if _, _, code := c.Kvctl("", "get", "greeting"); code != 1 {
		t.Fatalf("get of deleted key: exit %d, want 1", code)
	}

	// Exit codes: 1 not found, 2 bad usage/input, 3 unavailable.
	for _, tc := range []struct {
		args []string
		want int
	}{
		{[]string{"get", "no-such-key"}, 1},
		{[]string{"get"}, 2},
		{[]string{"put", "onlykey"}, 2},
		{[]string{"--bogus-flag", "get", "x"}, 2},
		{[]string{"-o", "yaml", "get", "x"}, 2},
		{[]string{"put", strings.Repeat("k", 5000), "v"}, 2},
		{[]string{"--endpoints", "127.0.0.1:1", "--timeout", "500ms", "get", "x"}, 3},
	} {
		_, errOut, code := c.Kvctl("", tc.args...)
		if code != tc.want {
			t.Errorf("kvctl %.60v: exit %d, want %d (stderr %q)", tc.args, code, tc.want, errOut)
		}
		if code != 0 && strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
			t.Errorf("kvctl %.60v: error is not one line: %q", tc.args, errOut)
		}
	}

	status := mustKvctl("", "cluster", "status")
	for _, s := range []string{"leader", "1", "2", "3"} {
		if !strings.Contains(strings.ToLower(status), s) {
			t.Fatalf("cluster status lacks %q:\n%s", s, status)
		}
	}
	members := mustKvctl("", "member", "list")
	for _, nd := range c.Nodes {
		if !strings.Contains(members, nd.ClientAddr) {
			t.Fatalf("member list lacks %s:\n%s", nd.ClientAddr, members)
		}
	}
}

func TestUnavailableWithoutQuorum(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 2})
	if _, errOut, code := c.Kvctl("", "put", "k", "v"); code != 0 {
		t.Fatalf("put: %d %s", code, errOut)
	}
	c.Kill(c.Node(2))
	c.Kill(c.Node(3))
	// The message names the cause the client saw (two replicas whose
	// connections are refused), not the symptom of the last attempt.
	noQuorum := fmt.Sprintf("has no quorum (2 of 3 replicas unreachable: node 2 at %s: dial tcp %[1]s: connect: connection refused; node 3 at %s:",
		c.Node(2).ClientAddr, c.Node(3).ClientAddr)
	_, errOut, code := c.Kvctl("", "--timeout", "2s", "put", "k", "v2")
	if code != 3 || !strings.Contains(errOut, noQuorum) {
		t.Fatalf("put without quorum: exit %d, want 3 and %q in stderr %q", code, noQuorum, errOut)
	}
	_, errOut, code = c.Kvctl("", "--timeout", "2s", "get", "k")
	if code != 3 || !strings.Contains(errOut, noQuorum) {
		t.Fatalf("linearizable get without quorum: exit %d, want 3 and %q in stderr %q", code, noQuorum, errOut)
	}
	out, errOut, code := c.Kvctl("", "cluster", "status")
	if code != 3 || !strings.Contains(errOut, "3 of 3 shards have no leader (shard 0, 1, 2)") || strings.Count(out, " NONE ") != 3 {
		t.Fatalf("cluster status without quorum: exit %d, want 3, every shard marked NONE: stdout:\n%s\nstderr: %s", code, out, errOut)
	}

	// Every node down: said at once, not after the timeout.
	c.Kill(c.Node(1))
	start := time.Now()
	_, errOut, code = c.Kvctl("", "--timeout", "5s", "put", "k", "v3")
	if took := time.Since(start); code != 3 || took > 3*time.Second ||
		!strings.Contains(errOut, "connection refused by every endpoint: "+strings.ReplaceAll(c.Endpoints(), ",", ", ")) {
		t.Fatalf("put with every node down: exit %d after %v, stderr %q", code, took, errOut)
	}
}

// shardOf computes a key's shard from the cluster map, as clients do.
func shardOf(t *testing.T, c *proccluster.Cluster, key string) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m, err := newClient(t, c).Map(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []uint64
	for _, s := range m.GetShards() {
		if s.GetId() != 0 {
			ids = append(ids, s.GetId())
		}
	}
	ring, err := hashring.New(ids, int(m.GetVnodes()))
	if err != nil {
		t.Fatal(err)
	}
	return ring.Shard([]byte(key))
}

func newClient(t *testing.T, c *proccluster.Cluster) *client.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := client.New(ctx, client.Config{Endpoints: strings.Split(c.Endpoints(), ",")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

// writer puts keys in a loop and records which were acknowledged and the
// longest gap between two acknowledgements.
type writer struct {
	mu     sync.Mutex
	acked  map[string]string
	last   time.Time
	maxGap time.Duration
	errs   int
}

func (w *writer) run(ctx context.Context, cl *client.Client, prefix string) {
	w.mu.Lock()
	w.acked = map[string]string{}
	w.last = time.Now()
	w.mu.Unlock()
	for i := 0; ctx.Err() == nil; i++ {
		k, v := fmt.Sprintf("%s/%06d", prefix, i), fmt.Sprintf("v%d", i)
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := cl.Put(rctx, []byte(k), []byte(v))
		cancel()
		now := time.Now()
		w.mu.Lock()
		if err == nil {
			w.acked[k] = v
			if gap := now.Sub(w.last); gap > w.maxGap {
				w.maxGap = gap
			}
			w.last = now
		} else {
			w.errs++
		}
		w.mu.Unlock()
	}
}

func (w *writer) ackedCount() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.acked)
}

func TestFailoverKillLeaderAndRestart(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 8})
	cl := newClient(t, c)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var w writer
	done := make(chan struct{})
	go func() { defer close(done); w.run(ctx, cl, "fo") }()

	proccluster.WaitFor(t, 10*time.Second, "writes to flow", func() bool { return w.ackedCount() >= 50 })
	victim := c.MostLeader(context.Background())
	before := w.ackedCount()
	killedAt := time.Now()
	c.Kill(victim)
	proccluster.WaitFor(t, 15*time.Second, "writes to resume after kill -9", func() bool { return w.ackedCount() >= before+100 })
	w.mu.Lock()
	gap := w.maxGap
	w.mu.Unlock()
	t.Logf("kill -9 of node %d (most shard leaderships): longest gap between acknowledged writes %d ms (budget 1500 ms); resumed %d ms after the kill",
		victim.ID, gap.Milliseconds(), time.Since(killedAt).Milliseconds())

	c.StartNode(victim)
	c.WaitReady(30 * time.Second)
	proccluster.WaitFor(t, 10*time.Second, "more writes after restart", func() bool { return w.ackedCount() >= before+200 })
	cancel()
	<-done

	// Every acknowledged write is readable from the restarted node's own
	// state once it has caught up.
	w.mu.Lock()
	acked := w.acked
	w.mu.Unlock()
	rctx, rcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer rcancel()
	for k, v := range acked {
		proccluster.WaitFor(t, 20*time.Second, "restarted node to have "+k, func() bool {
			kv, err := proccluster.LocalGet(rctx, victim.ClientAddr, k)
			return err == nil && kv != nil && string(kv.GetValue()) == v
		})
	}
	t.Logf("restarted node %d serves all %d acknowledged writes from local state", victim.ID, len(acked))
}

func TestFullRestartKeepsAcknowledgedWrites(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 4})
	cl := newClient(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	acked := map[string]string{}
	for i := 0; i < 200; i++ {
		k, v := fmt.Sprintf("dur/%04d", i), fmt.Sprintf("value-%d", i)
		if _, err := cl.Put(ctx, []byte(k), []byte(v)); err != nil {
			t.Fatal(err)
		}
		acked[k] = v
	}
	cl.Close()
	// Two nodes die hard, one shuts down cleanly: both paths must keep data.
	c.Kill(c.Node(1))
	c.Kill(c.Node(2))
	c.Stop(c.Node(3))
	for _, nd := range c.Nodes {
		c.StartNode(nd)
	}
	c.WaitReady(30 * time.Second)
	cl2 := newClient(t, c)
	for k, v := range acked {
		kv, err := cl2.Get(ctx, []byte(k))
		if err != nil {
			t.Fatalf("get %s after full restart: %v", k, err)
		}
		if string(kv.GetValue()) != v {
			t.Fatalf("get %s after full restart = %q, want %q", k, kv.GetValue(), v)
		}
	}
}

func TestClientBreakerOnPausedNode(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 4})
	cl := newClient(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := cl.Put(ctx, []byte("warm"), []byte("up")); err != nil {
		t.Fatal(err)
	}
	victim := c.Node(2)
	c.Pause(victim)
	breaker := func(id uint64) string {
		sctx, scancel := context.WithTimeout(ctx, 3*time.Second)
		defer scancel()
		st, err := cl.Status(sctx)
		if err != nil {
			return "error: " + err.Error()
		}
		for _, ns := range st {
			if ns.ID == id {
				return ns.Breaker
			}
		}
		return "missing"
	}
	// While the node stays hung its breaker cycles open → half-open (the
	// heartbeat probing) → open; in both states requests skip it.
	proccluster.WaitFor(t, 15*time.Second, "breaker of the paused node to open", func() bool {
		b := breaker(victim.ID)
		return b == "open" || b == "half-open"
	})

	// With the breaker open, requests do not wait on the hung node: once
	// its shards have elected other leaders, writes go through quickly.
	proccluster.WaitFor(t, 10*time.Second, "writes to succeed while node 2 is paused", func() bool {
		wctx, wcancel := context.WithTimeout(ctx, 2*time.Second)
		defer wcancel()
		for i := 0; i < 20; i++ {
			if _, err := cl.Put(wctx, []byte(fmt.Sprintf("paused/%d", i)), []byte("x")); err != nil {
				return false
			}
		}
		return true
	})
	start := time.Now()
	for i := 0; i < 50; i++ {
		if _, err := cl.Put(ctx, []byte(fmt.Sprintf("paused2/%d", i)), []byte("x")); err != nil {
			t.Fatalf("put while node paused: %v", err)
		}
	}
	t.Logf("50 writes with node %d paused took %d ms", victim.ID, time.Since(start).Milliseconds())

	c.Resume(victim)
	proccluster.WaitFor(t, 10*time.Second, "breaker to close after SIGCONT", func() bool { return breaker(victim.ID) == "closed" })
	// The node is used again: a serializable read served by it works.
	proccluster.WaitFor(t, 10*time.Second, "resumed node to serve reads", func() bool {
		kv, err := proccluster.LocalGet(ctx, victim.ClientAddr, "paused2/49")
		return err == nil && kv != nil
	})
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		t.Fatal("test ran out of time")
	}
}

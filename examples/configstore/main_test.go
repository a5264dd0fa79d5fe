package main

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/client/concurrency"
	"github.com/kvd/kvd/embed"
)

// startNode is a real embedded node with four shards, ready.
func startNode(t *testing.T) *embed.Node {
	t.Helper()
	node, err := embed.Start(t.Context(), embed.Config{DataDir: t.TempDir(), Shards: 4})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = node.Close() })
	select {
	case <-node.Ready():
	case err := <-node.Err():
		t.Fatal(err)
	case <-time.After(30 * time.Second):
		t.Fatal("node not ready")
	}
	return node
}

// waitUntil polls cond until it holds, failing the test after within; it
// returns how long that took.
func waitUntil(t *testing.T, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > within {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(10 * time.Millisecond) // poll interval
	}
	return time.Since(start)
}

// testTTL is the lease TTL of the tests' sessions: short, so a dead
// instance's keys go quickly.
const testTTL = 2 * time.Second

// expiryBound is how long after its last renewal a lease's keys may
// still be read: its TTL, plus an election timeout (a new meta shard
// leader adds one to every lease), plus a second of slack for the
// revocation's commits and the poll.
func expiryBound() time.Duration {
	d := embed.DefaultConfig()
	return testTTL + 2*time.Duration(d.ElectionTicks)*d.TickInterval + time.Second
}

// An instance's registration is visible while its session renews the
// lease, past the TTL, and vanishes within the bound once the instance
// stops renewing without revoking (as a killed process does).
func TestRegistrationVanishesWhenInstanceDies(t *testing.T) {
	node := startNode(t)
	ctx := t.Context()
	c := node.Client()
	s, err := concurrency.NewSession(ctx, c, concurrency.WithTTL(testTTL))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Orphan)
	if err := register(ctx, s, "a"); err != nil {
		t.Fatal(err)
	}
	key := []byte(registryPrefix + "a")
	registered := func() bool {
		_, err := c.Get(ctx, key)
		if err != nil && !errors.Is(err, client.ErrNotFound) {
			t.Fatalf("get %s: %v", key, err)
		}
		return err == nil
	}
	// Alive: the key stays for longer than one TTL, renewals keep it.
	for start := time.Now(); time.Since(start) < testTTL+testTTL/2; time.Sleep(100 * time.Millisecond) {
		if !registered() {
			t.Fatalf("registration gone after %v while the session renews it", time.Since(start))
		}
	}
	if page, err := c.Scan(ctx, []byte(registryPrefix), client.PrefixEnd([]byte(registryPrefix)), client.ScanOptions{}); err != nil || len(page.KVs) != 1 {
		t.Fatalf("registry scan: %v, %d keys, want 1", err, len(page.KVs))
	}
	s.Orphan() // dies: no more renewals, no revoke
	took := waitUntil(t, expiryBound(), "registration gone", func() bool { return !registered() })
	t.Logf("registration gone %v after the instance stopped renewing (TTL %v, bound %v)", took, testTTL, expiryBound())
}

// instance is one configstore replica's campaign, on its own session.
type instance struct {
	id     string
	s      *concurrency.Session
	cancel context.CancelFunc
	led    chan struct{} // closed when it first leads
	done   chan error    // lead's result
	once   sync.Once
}

func startInstance(t *testing.T, c *client.Client, id string) *instance {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s, err := concurrency.NewSession(ctx, c, concurrency.WithTTL(testTTL))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	in := &instance{id: id, s: s, cancel: cancel, led: make(chan struct{}), done: make(chan error, 1)}
	var ledOnce sync.Once
	go func() {
		in.done <- lead(ctx, s, id, 100*time.Millisecond, func() { ledOnce.Do(func() { close(in.led) }) })
	}()
	t.Cleanup(in.stop)
	return in
}

// stop ends the instance cleanly: it resigns and revokes its lease.
func (in *instance) stop() {
	in.once.Do(func() {
		in.cancel()
		<-in.done
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = in.s.Close(ctx)
	})
}

// die ends the instance as a crash does: no resign, no revoke, the lease
// just stops being renewed.
func (in *instance) die() {
	in.once.Do(func() {
		in.s.Orphan()
		<-in.done
		in.cancel()
	})
}

func (in *instance) leads() bool {
	select {
	case <-in.led:
		return true
	default:
		return false
	}
}

// Two instances campaign: exactly one leads, and Observe names it. When
// it resigns the other takes over at once; when the new leader dies
// without resigning, a third takes over within the lease bound.
func TestElectionOneLeaderAndTakeover(t *testing.T) {
	node := startNode(t)
	c := node.Client()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var mu sync.Mutex
	var current string
	go observe(ctx, c, func(id string) {
		mu.Lock()
		current = id
		mu.Unlock()
	})
	observed := func(want string) func() bool {
		return func() bool {
			mu.Lock()
			defer mu.Unlock()
			return current == want
		}
	}

	a, b := startInstance(t, c, "a"), startInstance(t, c, "b")
	waitUntil(t, 10*time.Second, "a leader", func() bool { return a.leads() || b.leads() })
	first, second := a, b
	if b.leads() {
		first, second = b, a
	}
	waitUntil(t, 10*time.Second, "observe names "+first.id, observed(first.id))
	if second.leads() {
		t.Fatal("both instances lead")
	}
	if l, err := concurrency.Leader(ctx, c, electionName); err != nil || string(l.GetValue()) != first.id {
		t.Fatalf("leader: %v, %v; want %s", l, err, first.id)
	}

	first.stop() // resigns
	took := waitUntil(t, 5*time.Second, second.id+" takes over", second.leads)
	t.Logf("%s took over %v after %s resigned", second.id, took, first.id)
	waitUntil(t, 5*time.Second, "observe names "+second.id, observed(second.id))

	third := startInstance(t, c, "c")
	second.die()
	took = waitUntil(t, expiryBound(), third.id+" takes over", third.leads)
	t.Logf("%s took over %v after %s died (TTL %v, bound %v)", third.id, took, second.id, testTTL, expiryBound())
	waitUntil(t, 5*time.Second, "observe names "+third.id, observed(third.id))
}

// The configuration follows the keys under its prefix on a real
// embedded node: loaded at once, reloaded on a put and on a delete, blind
// to keys outside the prefix.
func TestFollowReloadsOnChange(t *testing.T) {
	node := startNode(t)
	ctx, cancel := context.WithCancel(t.Context())
	c := node.Client()
	cfg := client.WithNamespace(c, "config/")
	if _, err := cfg.Put(ctx, []byte("log-level"), []byte("info")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Put(ctx, []byte("other/app"), []byte("x")); err != nil {
		t.Fatal(err)
	}

	var mu sync.Mutex
	var seen []string
	done := make(chan error, 1)
	go func() {
		done <- follow(ctx, cfg, func(c Config) {
			mu.Lock()
			seen = append(seen, c.String())
			mu.Unlock()
		})
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	waitFor := func(want string) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			mu.Lock()
			last := ""
			if len(seen) > 0 {
				last = seen[len(seen)-1]
			}
			mu.Unlock()
			if last == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("configuration is %q, want %q", last, want)
			}
			time.Sleep(10 * time.Millisecond) // poll interval
		}
	}
	waitFor("config: log-level=info")
	if _, err := cfg.Put(ctx, []byte("max-conns"), []byte("10")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Put(ctx, []byte("other/app"), []byte("y")); err != nil {
		t.Fatal(err)
	}
	waitFor("config: log-level=info max-conns=10")
	if _, err := cfg.Delete(ctx, []byte("log-level")); err != nil {
		t.Fatal(err)
	}
	waitFor("config: max-conns=10")
}

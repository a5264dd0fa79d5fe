package concurrency_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/client/clienttest"
	"github.com/kvd/kvd/client/concurrency"
	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/proto/kvpb"
)

func newClient(t *testing.T) *client.Client {
	t.Helper()
	f, err := clienttest.New(3, 2, 3)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.New(ctx, client.Config{Endpoints: f.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func newSession(t *testing.T, ctx context.Context, c *client.Client, ttl time.Duration) *concurrency.Session {
	t.Helper()
	s, err := concurrency.NewSession(ctx, c, concurrency.WithTTL(ttl))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Orphan)
	return s
}

func newMutex(t *testing.T, s *concurrency.Session, name string) *concurrency.Mutex {
	t.Helper()
	m, err := concurrency.NewMutex(s, name)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestMutexExcludesAndFences: one holder at a time; the next waiter gets
// the lock when it is released, with a larger fencing token, and the old
// holder's fenced write fails.
func TestMutexExcludesAndFences(t *testing.T) {
	c := newClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	m1 := newMutex(t, newSession(t, ctx, c, 10*time.Second), "db")
	m2 := newMutex(t, newSession(t, ctx, c, 10*time.Second), "db")
	if err := m1.Lock(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m2.TryLock(ctx); !errors.Is(err, concurrency.ErrLocked) {
		t.Fatalf("TryLock of a held lock: %v, want ErrLocked", err)
	}
	locked := make(chan error, 1)
	go func() { locked <- m2.Lock(ctx) }()
	// While m2 waits, m1's fenced writes apply. The protected key shares
	// the lock's hash tag, so one transaction compares both.
	fenced := func(m *concurrency.Mutex, v string) bool {
		t.Helper()
		resp, err := c.Txn(ctx, &kvpb.TxnRequest{
			Compare: []*kvpb.Compare{m.IsOwner()},
			Success: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: []byte("{db}.data"), Value: []byte(v)}}}},
		})
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetSucceeded()
	}
	if !fenced(m1, "one") {
		t.Fatal("the holder's fenced write failed")
	}
	select {
	case err := <-locked:
		t.Fatalf("second Lock returned while the first held the lock: %v", err)
	default:
	}
	token1 := m1.Token()
	stale := *m1.IsOwner()
	if err := m1.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-locked; err != nil {
		t.Fatalf("second Lock: %v", err)
	}
	if m2.Token() <= token1 {
		t.Fatalf("fencing tokens %d then %d; want them to grow", token1, m2.Token())
	}
	resp, err := c.Txn(ctx, &kvpb.TxnRequest{
		Compare: []*kvpb.Compare{&stale},
		Success: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: []byte("{db}.data"), Value: []byte("stale")}}}},
	})
	if err != nil || resp.GetSucceeded() {
		t.Fatalf("the old holder's fenced write: %v, %v; want it refused", resp, err)
	}
	if !fenced(m2, "two") {
		t.Fatal("the new holder's fenced write failed")
	}
}

// TestLockReleasedWhenHolderDies: a holder that stops renewing its
// session loses the lock once the lease expires; the session's Done
// says so.
func TestLockReleasedWhenHolderDies(t *testing.T) {
	c := newClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dead := newSession(t, ctx, c, time.Second)
	if err := newMutex(t, dead, "job").Lock(ctx); err != nil {
		t.Fatal(err)
	}
	dead.Orphan() // the holder dies: no more renewals, no revoke
	start := time.Now()
	if err := newMutex(t, newSession(t, ctx, c, 10*time.Second), "job").Lock(ctx); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("lock taken over %v after its holder died; the TTL is 1 s", d)
	}

	s := newSession(t, ctx, c, 10*time.Second)
	if _, err := c.Revoke(ctx, s.Lease()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.Done():
	case <-ctx.Done():
		t.Fatal("session not done after its lease was revoked")
	}
	if !errors.Is(s.Err(), client.ErrLeaseNotFound) {
		t.Fatalf("session ended with %v, want ErrLeaseNotFound", s.Err())
	}
	if err := newMutex(t, s, "job2").Lock(ctx); !errors.Is(err, concurrency.ErrSessionExpired) {
		t.Fatalf("Lock on an expired session: %v, want ErrSessionExpired", err)
	}
	if _, err := concurrency.NewMutex(s, "bad{name}"); !errors.Is(err, client.ErrInvalidArgument) {
		t.Fatalf("mutex name with braces: %v", err)
	}
}

// TestElection: campaigners lead in turn; Observe sees each leader and
// each proclaimed value.
func TestElection(t *testing.T) {
	c := newClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	obs, err := concurrency.Observe(ctx, c, "svc")
	if err != nil {
		t.Fatal(err)
	}
	// Each campaign and proclamation writes the leader key once, so the
	// observer sees each leader and value once, in order.
	next := func(want string) {
		t.Helper()
		select {
		case kv := <-obs:
			if string(kv.GetValue()) != want {
				t.Fatalf("observer saw %q, want %q", kv.GetValue(), want)
			}
		case <-ctx.Done():
			t.Fatalf("observer never saw %q", want)
		}
	}
	e1, _ := concurrency.NewElection(newSession(t, ctx, c, 10*time.Second), "svc")
	e2, _ := concurrency.NewElection(newSession(t, ctx, c, 10*time.Second), "svc")
	if _, err := e1.Leader(ctx); !errors.Is(err, concurrency.ErrNoLeader) {
		t.Fatalf("leader of an empty election: %v", err)
	}
	if err := e1.Campaign(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if l, err := e1.Leader(ctx); err != nil || l.GetVersion() != 1 {
		t.Fatalf("leader after one campaign: %v, %v; want its key written once", l, err)
	}
	next("a")
	won := make(chan error, 1)
	go func() { won <- e2.Campaign(ctx, "b") }()
	if err := e1.Proclaim(ctx, "a2"); err != nil {
		t.Fatal(err)
	}
	next("a2")
	if l, err := e2.Leader(ctx); err != nil || string(l.GetValue()) != "a2" {
		t.Fatalf("leader: %v, %v", l, err)
	}
	if err := e1.Resign(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-won; err != nil {
		t.Fatal(err)
	}
	next("b")
	// Campaigning again with the candidacy held changes its value;
	// proclaiming the same value again is no change to observe.
	if err := e2.Campaign(ctx, "b2"); err != nil {
		t.Fatal(err)
	}
	next("b2")
	if err := e2.Proclaim(ctx, "b2"); err != nil {
		t.Fatal(err)
	}
	if err := e2.Proclaim(ctx, "b3"); err != nil {
		t.Fatal(err)
	}
	next("b3")
	if err := e1.Proclaim(ctx, "x"); !errors.Is(err, concurrency.ErrNotLeader) {
		t.Fatalf("proclaim after resigning: %v, want ErrNotLeader", err)
	}
	proccluster.WaitFor(t, 5*time.Second, "e2 leads", func() bool {
		l, err := concurrency.Leader(ctx, c, "svc")
		return err == nil && string(l.GetValue()) == "b3"
	})
}

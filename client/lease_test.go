package client_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"testing"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/client/clienttest"
	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/server"
)

func newLeaseCluster(t *testing.T) (*clienttest.Cluster, *client.Client) {
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
	return f, c
}

// TestKeepAliveOutlivesTheMetaLeader: a lease kept alive by the client
// survives the meta shard leader's stop, and its key with it; once the
// keep-alive ends, the lease expires and takes the key.
func TestKeepAliveOutlivesTheMetaLeader(t *testing.T) {
	f, c := newLeaseCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	id, err := c.Grant(ctx, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Put(ctx, []byte("owned"), []byte("v"), client.WithLease(id)); err != nil {
		t.Fatal(err)
	}
	kctx, kcancel := context.WithCancel(ctx)
	defer kcancel()
	renewals, stop, err := c.KeepAlive(kctx, id)
	if err != nil {
		t.Fatal(err)
	}
	leader := f.Leader(server.MetaShard)
	if err := f.Node(leader).Stop(); err != nil {
		t.Fatal(err)
	}
	// Renewals go on through the new leader for several TTLs.
	until := time.Now().Add(5 * time.Second)
	for time.Now().Before(until) {
		if _, ok := <-renewals; !ok {
			t.Fatalf("keep-alive ended after the meta leader stopped: %v", stop())
		}
	}
	if _, err := c.Get(ctx, []byte("owned")); err != nil {
		t.Fatalf("leased key after the leader stopped: %v", err)
	}
	if err := f.Node(leader).Start(); err != nil {
		t.Fatal(err)
	}
	kcancel()
	if err := stop(); !errors.Is(err, context.Canceled) {
		t.Fatalf("keep-alive ended with %v, want context.Canceled", err)
	}
	proccluster.WaitFor(t, 20*time.Second, "leased key expired", func() bool {
		_, err := c.Get(ctx, []byte("owned"))
		return errors.Is(err, client.ErrNotFound)
	})
	if _, err := c.TimeToLive(ctx, id, false); !errors.Is(err, client.ErrLeaseNotFound) {
		t.Fatalf("time to live of the expired lease: %v, want ErrLeaseNotFound", err)
	}
}

// TestKeepAliveLearnsOfRevocation: a revoked lease ends its keep-alive
// with ErrLeaseNotFound, and a put with it is refused.
func TestKeepAliveLearnsOfRevocation(t *testing.T) {
	_, c := newLeaseCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	id, err := c.Grant(ctx, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 4 {
		if _, err := c.Put(ctx, []byte(fmt.Sprint("k", i)), []byte("v"), client.WithLease(id)); err != nil {
			t.Fatal(err)
		}
	}
	st, err := c.TimeToLive(ctx, id, true)
	if err != nil || len(st.Keys) != 4 || st.Granted != 30*time.Second {
		t.Fatalf("time to live: %+v, %v", st, err)
	}
	renewals, stop, err := c.KeepAlive(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	<-renewals
	if n, err := c.Revoke(ctx, id); err != nil || n != 4 {
		t.Fatalf("revoke: %d keys, %v", n, err)
	}
	for range renewals {
	}
	if err := stop(); !errors.Is(err, client.ErrLeaseNotFound) {
		t.Fatalf("keep-alive ended with %v, want ErrLeaseNotFound", err)
	}
	if _, err := c.Put(ctx, []byte("k0"), []byte("late"), client.WithLease(id)); !errors.Is(err, client.ErrLeaseNotFound) {
		t.Fatalf("put with a revoked lease: %v, want ErrLeaseNotFound", err)
	}
	if _, err := c.Revoke(ctx, id); !errors.Is(err, client.ErrLeaseNotFound) {
		t.Fatalf("second revoke: %v, want ErrLeaseNotFound", err)
	}
	if _, err := c.Grant(ctx, 0); !errors.Is(err, client.ErrInvalidArgument) {
		t.Fatalf("grant of TTL 0: %v, want ErrInvalidArgument", err)
	}
	if ls, err := c.Leases(ctx); err != nil || len(ls) != 0 {
		t.Fatalf("leases: %v, %v", ls, err)
	}
}

// A lease keeps a key alive while its owner renews it; revoking the lease
// (or the owner dying) deletes the key.
func ExampleClient_Grant() {
	cluster := startCluster()
	defer cluster.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.New(ctx, client.Config{Endpoints: cluster.Endpoints()})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	id, err := c.Grant(ctx, 5*time.Second)
	if err != nil {
		log.Fatal(err)
	}
	if _, err := c.Put(ctx, []byte("service/a"), []byte("10.0.0.1"), client.WithLease(id)); err != nil {
		log.Fatal(err)
	}
	kctx, stopRenewing := context.WithCancel(ctx)
	renewals, stopped, err := c.KeepAlive(kctx, id)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("renewed to", <-renewals)

	if _, err := c.Revoke(ctx, id); err != nil {
		log.Fatal(err)
	}
	for range renewals {
	}
	fmt.Println(errors.Is(stopped(), client.ErrLeaseNotFound))
	stopRenewing()
	_, err = c.Get(ctx, []byte("service/a"))
	fmt.Println(errors.Is(err, client.ErrNotFound))
	// Output:
	// renewed to 5s
	// true
	// true
}

// TestKeepAliveGivesUpWhenNoMemberAnswers: with every member down, the
// keep-alive reports the lease lost once a TTL passed without a renewal,
// rather than retrying forever.
func TestKeepAliveGivesUpWhenNoMemberAnswers(t *testing.T) {
	f, c := newLeaseCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	id, err := c.Grant(ctx, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	renewals, stop, err := c.KeepAlive(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	<-renewals
	for _, n := range f.Nodes {
		if err := n.Stop(); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	for range renewals {
	}
	if err := stop(); !errors.Is(err, client.ErrLeaseNotFound) {
		t.Fatalf("keep-alive with every member down ended with %v, want ErrLeaseNotFound", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("keep-alive gave up %v after the members stopped; the TTL is 2 s", d)
	}
}

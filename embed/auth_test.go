package embed_test

import (
	"context"
	"testing"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/embed"
	"github.com/kvd/kvd/proto/kvpb"
)

// A node whose cluster has auth enabled is ready, and its client reads
// and writes, only as a user: WithClientAuth gives it one.
func TestClientAuthOnAuthEnabledCluster(t *testing.T) {
	dir := t.TempDir()
	cfg := embed.Config{DataDir: dir, Shards: 2}
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()

	n, err := embed.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	waitReady(t, n)
	c := n.Client()
	if _, err := c.Put(ctx, []byte("k"), []byte("v")); err != nil {
		t.Fatal(err)
	}
	for _, ch := range []*kvpb.AuthChangeRequest{
		{Change: &kvpb.AuthChangeRequest_UserAdd{UserAdd: &kvpb.UserAdd{Name: "root", Password: "s3cret"}}},
		{Change: &kvpb.AuthChangeRequest_UserGrantRole{UserGrantRole: &kvpb.UserGrantRole{User: "root", Role: "root"}}},
		{Change: &kvpb.AuthChangeRequest_Enable{Enable: &kvpb.AuthEnable{}}},
	} {
		if err := c.Auth(ctx, ch); err != nil && !userExists(ctx, t, c, ch) {
			t.Fatalf("auth change %v: %v", ch, err)
		}
	}
	// Auth is on: this client has no user and is refused.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := c.Get(ctx, []byte("k")); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a client without a user still reads with auth enabled")
		}
		time.Sleep(50 * time.Millisecond) // poll interval: the node caches the auth state briefly
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}

	// Restarted on the same data dir (auth stays enabled) with the user.
	n, err = embed.Start(ctx, cfg, embed.WithClientAuth("root", "s3cret"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Close() })
	waitReady(t, n) // Ready's own reads and writes need the user
	c = n.Client()
	if kv, err := c.Get(ctx, []byte("k")); err != nil || string(kv.GetValue()) != "v" {
		t.Fatalf("get as root: %v, %v", kv, err)
	}
	if _, err := c.Put(ctx, []byte("k2"), []byte("v2")); err != nil {
		t.Fatalf("put as root: %v", err)
	}
	// The watch starts at the put's revision: one started "now" could be
	// created after the put and wait for an event that has passed.
	pr, err := c.Put(ctx, []byte("k3"), []byte("v3"))
	if err != nil {
		t.Fatalf("put as root: %v", err)
	}
	w := c.Watch(ctx, []byte("k3"), client.WithRevision(pr.GetHeader().GetRevision()))
	for resp := range w {
		if resp.Err != nil {
			t.Fatalf("watch as root: %v", resp.Err)
		}
		if len(resp.Events) > 0 {
			break
		}
	}
}

// userExists says whether ch adds a user that exists: under -race the
// password's bcrypt can outlast the client's attempt timeout, and the
// retry of an auth change, which carries no session, then finds the user
// its first attempt added.
func userExists(ctx context.Context, t *testing.T, c *client.Client, ch *kvpb.AuthChangeRequest) bool {
	add := ch.GetUserAdd()
	if add == nil {
		return false
	}
	st, err := c.AuthStatus(ctx)
	if err != nil {
		t.Fatalf("auth status: %v", err)
	}
	for _, u := range st.GetUsers() {
		if u.GetName() == add.GetName() {
			return true
		}
	}
	return false
}

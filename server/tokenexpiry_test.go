package server

import (
	"context"
	"testing"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/proto/kvpb"
)

// A client's Batch stream carries the token it opened with, and a client
// that only writes never opens another: its writes must go on being
// served after that token's TTL, as long as the user may make them.
func TestStreamOutlivesItsToken(t *testing.T) {
	const ttl = 2 * time.Second
	c := newTestCluster(t, 1, 1, func(cfg *Config) { cfg.AuthTokenTTL = ttl })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	admin := c.client()
	if _, err := admin.Put(ctx, []byte("k"), []byte("v")); err != nil {
		t.Fatal(err)
	}
	for _, ch := range []*kvpb.AuthChangeRequest{
		{Change: &kvpb.AuthChangeRequest_UserAdd{UserAdd: &kvpb.UserAdd{Name: "root", Password: "s3cret"}}},
		{Change: &kvpb.AuthChangeRequest_UserGrantRole{UserGrantRole: &kvpb.UserGrantRole{User: "root", Role: "root"}}},
		{Change: &kvpb.AuthChangeRequest_Enable{Enable: &kvpb.AuthEnable{}}},
	} {
		if err := admin.Auth(ctx, ch); err != nil {
			t.Fatalf("auth change %v: %v", ch, err)
		}
	}
	root, err := client.New(ctx, client.Config{Endpoints: c.endpoints(), Username: "root", Password: "s3cret"})
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	// Writes for three TTLs, each of which must succeed (the first opens
	// the stream, with a token good for one TTL).
	n := 0
	for start := time.Now(); time.Since(start) < 3*ttl; n++ {
		if _, err := root.Put(ctx, []byte("k"), []byte("v")); err != nil {
			t.Fatalf("put %d, %v after the first: %v", n, time.Since(start).Round(time.Millisecond), err)
		}
		time.Sleep(50 * time.Millisecond) // the pace of the writes
	}
	t.Logf("%d puts over %v", n, 3*ttl)
}

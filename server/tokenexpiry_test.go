package server

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

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
	enableAuth(ctx, t, admin)
	root, err := client.New(ctx, client.Config{Endpoints: c.endpoints(), Username: "root", Password: "s3cret"})
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	// The first put opens the client's Batch stream with its token.
	if _, err := root.Put(ctx, []byte("k"), []byte("v")); err != nil {
		t.Fatal(err)
	}
	// A token taken after that expires after the stream's: once a unary
	// call with it is refused as expired, so would the stream's be.
	conn := clientConn(t, c.servers[0])
	auth, err := kvpb.NewAuthClient(conn).Authenticate(ctx, &kvpb.AuthenticateRequest{Name: "root", Password: "s3cret"})
	if err != nil {
		t.Fatal(err)
	}
	tokCtx := metadata.AppendToOutgoingContext(ctx, "token", auth.GetToken())
	authc := kvpb.NewAuthClient(conn)
	if _, err := authc.Status(tokCtx, &kvpb.AuthStatusRequest{}); err != nil {
		t.Fatalf("a fresh token refused: %v", err)
	}
	waitFor(t, 10*ttl, "the later token to expire", func() bool {
		_, err := authc.Status(tokCtx, &kvpb.AuthStatusRequest{})
		return status.Code(err) == codes.Unauthenticated
	})
	for i := range 3 {
		if _, err := root.Put(ctx, []byte("k"), []byte("v")); err != nil {
			t.Fatalf("put %d on the stream after its token expired: %v", i, err)
		}
	}
}

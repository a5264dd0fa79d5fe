package embed_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/client/concurrency"
	"github.com/kvd/kvd/embed"
)

// A single-node store in a directory, served to this process only.
func Example() {
	dir, err := os.MkdirTemp("", "kvd-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	ctx := context.Background()
	node, err := embed.Start(ctx, embed.Config{DataDir: dir})
	if err != nil {
		log.Fatal(err)
	}
	defer node.Close()
	<-node.Ready()

	c := node.Client()
	if _, err := c.Put(ctx, []byte("greeting"), []byte("hello")); err != nil {
		log.Fatal(err)
	}
	kv, err := c.Get(ctx, []byte("greeting"))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s = %s\n", kv.GetKey(), kv.GetValue())
	// Output: greeting = hello
}

// An instance registers itself under a session's lease: the key lives
// while the session renews the lease, and goes when it is closed (or,
// had the instance died, when the TTL ran out).
func Example_registration() {
	dir, err := os.MkdirTemp("", "kvd-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	ctx := context.Background()
	node, err := embed.Start(ctx, embed.Config{DataDir: dir})
	if err != nil {
		log.Fatal(err)
	}
	defer node.Close()
	<-node.Ready()
	c := node.Client()

	s, err := concurrency.NewSession(ctx, c, concurrency.WithTTL(10*time.Second))
	if err != nil {
		log.Fatal(err)
	}
	key := []byte("services/app/instance-1")
	if _, err := c.Put(ctx, key, []byte("127.0.0.1:8080"), client.WithLease(s.Lease())); err != nil {
		log.Fatal(err)
	}
	kv, err := c.Get(ctx, key)
	fmt.Printf("registered: %s, %v\n", kv.GetValue(), err)

	if err := s.Close(ctx); err != nil { // revokes the lease
		log.Fatal(err)
	}
	_, err = c.Get(ctx, key)
	fmt.Println("after close, not found:", errors.Is(err, client.ErrNotFound))
	// Output:
	// registered: 127.0.0.1:8080, <nil>
	// after close, not found: true
}

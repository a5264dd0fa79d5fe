package embed_test

import (
	"context"
	"fmt"
	"log"
	"os"

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

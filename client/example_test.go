package client_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/client/clienttest"
	"github.com/kvd/kvd/proto/kvpb"
)

// startCluster stands in for a running kvd cluster: three in-process
// nodes. Real code passes the client addresses of kvd nodes.
func startCluster() *clienttest.Cluster {
	f, err := clienttest.New(3, 4, 3)
	if err != nil {
		log.Fatal(err)
	}
	return f
}

func Example() {
	cluster := startCluster()
	defer cluster.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.New(ctx, client.Config{Endpoints: cluster.Endpoints()})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	if _, err := c.Put(ctx, []byte("greeting"), []byte("hello")); err != nil {
		log.Fatal(err)
	}
	kv, err := c.Get(ctx, []byte("greeting"))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s=%s version=%d\n", kv.Key, kv.Value, kv.Version)

	_, err = c.Get(ctx, []byte("missing"))
	fmt.Println(errors.Is(err, client.ErrNotFound))
	// Output:
	// greeting=hello version=1
	// true
}

func ExampleClient_Scan() {
	cluster := startCluster()
	defer cluster.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.New(ctx, client.Config{Endpoints: cluster.Endpoints()})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	for _, k := range []string{"user/3", "user/1", "other", "user/2"} {
		if _, err := c.Put(ctx, []byte(k), []byte("v")); err != nil {
			log.Fatal(err)
		}
	}
	// Keys live in different shards; Scan merges them in key order, two
	// per page here.
	prefix := []byte("user/")
	opts := client.ScanOptions{Limit: 2, KeysOnly: true}
	for {
		page, err := c.Scan(ctx, prefix, client.PrefixEnd(prefix), opts)
		if err != nil {
			log.Fatal(err)
		}
		for _, kv := range page.KVs {
			fmt.Println(string(kv.Key))
		}
		if page.Next == "" {
			break
		}
		opts.Token = page.Next
	}
	// Output:
	// user/1
	// user/2
	// user/3
}

func ExampleClient_Txn() {
	cluster := startCluster()
	defer cluster.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.New(ctx, client.Config{Endpoints: cluster.Endpoints()})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	// The hash tag {acct7} puts both keys in one shard, so the
	// transaction is atomic.
	if _, err := c.Put(ctx, []byte("{acct7}/state"), []byte("open")); err != nil {
		log.Fatal(err)
	}
	resp, err := c.Txn(ctx, &kvpb.TxnRequest{
		Compare: []*kvpb.Compare{{Key: []byte("{acct7}/state"), Target: kvpb.Compare_VALUE, Value: []byte("open")}},
		Success: []*kvpb.RequestOp{
			{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: []byte("{acct7}/state"), Value: []byte("closed")}}},
			{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: []byte("{acct7}/closed_by"), Value: []byte("ops")}}},
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("succeeded:", resp.Succeeded)
	// Output: succeeded: true
}

func ExampleClient_Count() {
	cluster := startCluster()
	defer cluster.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.New(ctx, client.Config{Endpoints: cluster.Endpoints()})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	for _, k := range []string{"user/ann", "user/bob", "user/eve", "group/x"} {
		if _, err := c.Put(ctx, []byte(k), []byte("1")); err != nil {
			log.Fatal(err)
		}
	}
	prefix := []byte("user/")
	n, err := c.Count(ctx, prefix, client.PrefixEnd(prefix), false)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(n)
	// Output: 3
}

package client

import (
	"context"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/kvd/kvd/server"
)

// TestWatchesShareOneStreamPerNode: a Client's watches on one node share
// one Watch stream, which closes with the last of them.
func TestWatchesShareOneStreamPerNode(t *testing.T) {
	cl, err1 := net.Listen("tcp", "127.0.0.1:0")
	pl, err2 := net.Listen("tcp", "127.0.0.1:0")
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	s, err := server.New(server.Config{
		NodeID: 1, DataDir: t.TempDir(), ClientListener: cl, PeerListener: pl,
		InitialCluster: map[uint64]string{1: pl.Addr().String()}, Shards: 2,
		TickInterval: 20 * time.Millisecond, Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := New(ctx, Config{Endpoints: []string{s.ClientAddr()}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Put(ctx, []byte("a"), []byte("1")); err != nil {
		t.Fatal(err)
	}
	w1, stop1 := context.WithCancel(ctx)
	w2, stop2 := context.WithCancel(ctx)
	ch1 := c.Watch(w1, []byte("a"))
	ch2 := c.Watch(w2, []byte("p/"), WithPrefix()) // both shards
	// A watch starts "now" once created: put until each has an event.
	first := func(ch <-chan WatchResponse, key string) {
		t.Helper()
		for {
			if _, err := c.Put(ctx, []byte(key), []byte("v")); err != nil {
				t.Fatal(err)
			}
			select {
			case r := <-ch:
				if r.Err != nil {
					t.Fatal(r.Err)
				}
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	first(ch1, "a")
	first(ch2, "p/x")
	streams := func() (n, subs int) {
		c.mu.RLock()
		defer c.mu.RUnlock()
		for _, nd := range c.mu.nodes {
			nd.watch.Lock()
			if m := nd.watch.mux; m != nil && nd.addr == s.ClientAddr() {
				n++
				m.mu.Lock()
				subs += len(m.subs)
				m.mu.Unlock()
			}
			nd.watch.Unlock()
		}
		return n, subs
	}
	waitFor(t, "one stream carrying 3 watches (one key, a prefix on two shards)", func() bool {
		n, subs := streams()
		return n == 1 && subs == 3
	})
	stop1()
	stop2()
	for range ch1 {
	}
	for range ch2 {
	}
	waitFor(t, "no stream left after every watch ended", func() bool {
		n, _ := streams()
		return n == 0
	})
}

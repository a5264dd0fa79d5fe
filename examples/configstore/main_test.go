package main

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/embed"
)

// The configuration follows the keys under its prefix on a real
// embedded node: loaded at once, reloaded on a put and on a delete, blind
// to keys outside the prefix.
func TestFollowReloadsOnChange(t *testing.T) {
	node, err := embed.Start(t.Context(), embed.Config{DataDir: t.TempDir(), Shards: 4})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = node.Close() })
	select {
	case <-node.Ready():
	case <-time.After(30 * time.Second):
		t.Fatal("node not ready")
	}
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

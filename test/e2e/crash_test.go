package e2e

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/kvd/kvd/internal/proccluster"
)

// TestKill9MidWriteLosesNothingAcknowledged runs ONE node, so no replica
// can hide a lost write: concurrent writers put keys, the node is killed
// with SIGKILL in the middle of its write rounds, and after a restart from
// the same data dir every write that was acknowledged must be readable.
// Repeated for several kills.
func TestKill9MidWriteLosesNothingAcknowledged(t *testing.T) {
	c := proccluster.Start(t, 1, proccluster.Options{Shards: 4})
	nd := c.Node(1)
	acked := map[string]string{}
	var mu sync.Mutex
	for round := 0; round < 3; round++ {
		cl := newClient(t, c)
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		var count int
		for w := 0; w < 8; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; ctx.Err() == nil; i++ {
					k, v := fmt.Sprintf("crash/%d/%d/%06d", round, w, i), fmt.Sprintf("v%d", i)
					rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
					_, err := cl.Put(rctx, []byte(k), []byte(v))
					rcancel()
					if err == nil {
						mu.Lock()
						acked[k] = v
						count++
						mu.Unlock()
					}
				}
			}()
		}
		proccluster.WaitFor(t, 20*time.Second, "writes in flight", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return count >= 300
		})
		c.Kill(nd) // writers are mid-request: some rounds are half done
		cancel()
		wg.Wait()
		cl.Close()
		c.StartNode(nd)
		c.WaitReady(30 * time.Second)

		check := newClient(t, c)
		rctx, rcancel := context.WithTimeout(context.Background(), 60*time.Second)
		mu.Lock()
		for k, v := range acked {
			kv, err := check.Get(rctx, []byte(k))
			if err != nil {
				t.Fatalf("after kill %d: acknowledged %s: %v", round+1, k, err)
			}
			if string(kv.GetValue()) != v {
				t.Fatalf("after kill %d: %s = %q, want %q", round+1, k, kv.GetValue(), v)
			}
		}
		t.Logf("kill -9 %d: all %d acknowledged writes survived", round+1, len(acked))
		mu.Unlock()
		rcancel()
	}
}

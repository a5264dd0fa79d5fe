package e2e

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/proto/kvpb"
)

// replay folds the shard's history from revision 1 up to the event of
// marker into the state it describes, checking the revisions are dense.
func replay(t *testing.T, cl *client.Client, prefix, marker string) map[string]*kvpb.KeyValue {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	state := map[string]*kvpb.KeyValue{}
	var last int64
	for r := range cl.Watch(ctx, []byte(prefix), client.WithPrefix(), client.WithRevision(1)) {
		if r.Err != nil {
			t.Fatalf("replay: %v", r.Err)
		}
		for _, ev := range r.Events {
			rev := ev.GetKv().GetModRevision()
			if rev != last && rev != last+1 {
				t.Fatalf("replay: revision %d after %d", rev, last)
			}
			last = rev
			k := string(ev.GetKv().GetKey())
			if k == marker {
				return state
			}
			if k > "a/~" { // an earlier round's marker
				continue
			}
			if ev.GetType() == kvpb.Event_DELETE {
				delete(state, k)
			} else {
				state[k] = ev.GetKv()
			}
		}
	}
	t.Fatal("replay ended before the marker")
	return nil
}

// TestHistoryAtomicWithDataAcrossKill9: one node, writers overwriting
// and deleting a few keys, SIGKILL in the middle of write rounds, a
// restart: replaying the history from revision 1 gives exactly the state
// stored, so no round kept a change without its event or the reverse.
func TestHistoryAtomicWithDataAcrossKill9(t *testing.T) {
	c := proccluster.Start(t, 1, proccluster.Options{Shards: 1})
	nd := c.Node(1)
	for round := range 2 {
		cl := newClient(t, c)
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		var mu sync.Mutex
		done := 0
		for w := range 4 {
			wg.Go(func() {
				for i := 0; ctx.Err() == nil; i++ {
					k := []byte(fmt.Sprintf("a/%d", (w*7+i)%16))
					rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
					var err error
					if i%5 == 4 {
						_, err = cl.Delete(rctx, k)
					} else {
						_, err = cl.Put(rctx, k, []byte(fmt.Sprint(round, "/", w, "/", i)))
					}
					rcancel()
					if err == nil {
						mu.Lock()
						done++
						mu.Unlock()
					}
				}
			})
		}
		proccluster.WaitFor(t, 20*time.Second, "writes in flight", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return done >= 200
		})
		c.Kill(nd)
		cancel()
		wg.Wait()
		cl.Close()
		c.StartNode(nd)
		c.WaitReady(30 * time.Second)

		check := newClient(t, c)
		rctx, rcancel := context.WithTimeout(context.Background(), 30*time.Second)
		marker := fmt.Sprint("a/~marker", round)
		if _, err := check.Put(rctx, []byte(marker), []byte("end")); err != nil {
			t.Fatal(err)
		}
		page, err := check.Scan(rctx, []byte("a/"), []byte("a/~"), client.ScanOptions{Limit: 1000})
		rcancel()
		if err != nil {
			t.Fatal(err)
		}
		state := replay(t, check, "a/", marker)
		if len(state) != len(page.KVs) {
			t.Fatalf("round %d: the history replays %d keys, the shard stores %d", round, len(state), len(page.KVs))
		}
		for _, kv := range page.KVs {
			h := state[string(kv.GetKey())]
			if h == nil || !bytes.Equal(h.GetValue(), kv.GetValue()) || h.GetModRevision() != kv.GetModRevision() ||
				h.GetVersion() != kv.GetVersion() || h.GetCreateRevision() != kv.GetCreateRevision() {
				t.Fatalf("round %d: %s stored as %v, the history replays %v", round, kv.GetKey(), kv, h)
			}
		}
	}
}

// TestWatchSurvivesLeaderDeath: a watch keeps every change, once each,
// while the node leading its shard is killed with SIGKILL.
func TestWatchSurvivesLeaderDeath(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 1})
	cl := newClient(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if _, err := cl.Put(ctx, []byte("d/start"), []byte("v")); err != nil {
		t.Fatal(err)
	}
	ch := cl.Watch(ctx, []byte("d/"), client.WithPrefix(), client.WithRevision(1))
	seen := map[string]int{}
	var last int64
	recv := func(until string) {
		t.Helper()
		for {
			r, ok := <-ch
			if !ok || r.Err != nil {
				t.Fatalf("watch ended: %v", r.Err)
			}
			for _, ev := range r.Events {
				if ev.GetKv().GetModRevision() <= last {
					t.Fatalf("event at %d after %d", ev.GetKv().GetModRevision(), last)
				}
				last = ev.GetKv().GetModRevision()
				seen[string(ev.GetKv().GetKey())]++
				if string(ev.GetKv().GetKey()) == until {
					return
				}
			}
		}
	}
	recv("d/start")
	put := func(k string) {
		t.Helper()
		pctx, pcancel := context.WithTimeout(ctx, 20*time.Second)
		defer pcancel()
		if _, err := cl.Put(pctx, []byte(k), []byte("v")); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 10 {
		put(fmt.Sprint("d/", i))
	}
	var leader *proccluster.Node
	proccluster.WaitFor(t, 20*time.Second, "a leader of shard 1", func() bool {
		leader = c.LeaderOf(ctx, 1)
		return leader != nil
	})
	c.Kill(leader)
	for i := 10; i < 20; i++ {
		put(fmt.Sprint("d/", i))
	}
	recv("d/19")
	for i := range 20 {
		if k := fmt.Sprint("d/", i); seen[k] != 1 {
			t.Fatalf("%s seen %d times", k, seen[k])
		}
	}
}

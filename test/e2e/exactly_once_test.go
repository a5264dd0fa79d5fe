package e2e

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/proto/kvpb"
)

// TestExactlyOnceUnderLeaderKills has concurrent clients increment
// counters while the leader of their shard is killed with SIGKILL and
// restarted, again and again. Every request gets a long deadline, so with a
// quorum always up each one eventually succeeds: the counters must then
// equal the acknowledged increments exactly.
//
//   - cas counters: read v, then txn(value == v → put v+1). A retry of an
//     applied cas that were executed again would fail its compare, and the
//     worker would increment once more: the counter would exceed the acks.
//   - blind puts: every put of the same key bumps its version, so the
//     final version counts applied puts; a double apply shows as extra.
func TestExactlyOnceUnderLeaderKills(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 2})
	const (
		casKey     = "{ctr}cas"
		blindKey   = "{ctr}blind"
		casWorkers = 3
		putWorkers = 3
		kills      = 3
	)
	setup := newClient(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := setup.Put(ctx, []byte(casKey), []byte("0")); err != nil {
		t.Fatal(err)
	}
	shard := shardOf(t, c, casKey)

	stop := make(chan struct{})
	var casAcked, putAcked, casConflicts atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, casWorkers+putWorkers)
	for w := 0; w < casWorkers; w++ {
		cl := newClient(t, c) // each worker is its own client: its own session
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				ok, err := casIncrement(ctx, cl, casKey)
				if err != nil {
					errc <- fmt.Errorf("cas worker: %w", err)
					return
				}
				if ok {
					casAcked.Add(1)
				} else {
					casConflicts.Add(1)
				}
			}
		}()
	}
	for w := 0; w < putWorkers; w++ {
		cl := newClient(t, c)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				rctx, rcancel := context.WithTimeout(ctx, 30*time.Second)
				_, err := cl.Put(rctx, []byte(blindKey), []byte("x"))
				rcancel()
				if err != nil {
					errc <- fmt.Errorf("blind put: %w", err)
					return
				}
				putAcked.Add(1)
			}
		}()
	}

	for k := 0; k < kills; k++ {
		base := casAcked.Load() + putAcked.Load()
		proccluster.WaitFor(t, 30*time.Second, "increments to flow", func() bool {
			return casAcked.Load()+putAcked.Load() >= base+30
		})
		var leader *proccluster.Node
		proccluster.WaitFor(t, 15*time.Second, fmt.Sprintf("a leader of shard %d", shard), func() bool {
			leader = c.LeaderOf(ctx, shard)
			return leader != nil
		})
		c.Kill(leader)
		t.Logf("kill %d: SIGKILL node %d (leader of shard %d) at %d acknowledged increments", k+1, leader.ID, shard, casAcked.Load()+putAcked.Load())
		base = casAcked.Load() + putAcked.Load()
		proccluster.WaitFor(t, 30*time.Second, "increments to continue without the old leader", func() bool {
			return casAcked.Load()+putAcked.Load() >= base+30
		})
		c.StartNode(leader)
		c.WaitReady(30 * time.Second)
	}
	close(stop)
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}

	check := newClient(t, c)
	kv, err := check.Get(ctx, []byte(casKey))
	if err != nil {
		t.Fatal(err)
	}
	got, _ := strconv.Atoi(string(kv.GetValue()))
	t.Logf("cas counter: %d, acknowledged increments: %d (compare conflicts retried: %d)", got, casAcked.Load(), casConflicts.Load())
	if int64(got) != casAcked.Load() {
		t.Errorf("cas counter is %d, but %d increments were acknowledged", got, casAcked.Load())
	}
	kv, err = check.Get(ctx, []byte(blindKey))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("blind puts: version %d, acknowledged puts: %d", kv.GetVersion(), putAcked.Load())
	if kv.GetVersion() != putAcked.Load() {
		t.Errorf("blind key has version %d, but %d puts were acknowledged: a write was applied %s",
			kv.GetVersion(), putAcked.Load(), map[bool]string{true: "twice", false: "never"}[kv.GetVersion() > putAcked.Load()])
	}
}

// casIncrement reads the counter and tries to move it one up. It reports
// false when another writer won the race (the compare failed).
func casIncrement(ctx context.Context, cl *client.Client, key string) (bool, error) {
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	kv, err := cl.Get(rctx, []byte(key))
	if err != nil {
		return false, err
	}
	n, err := strconv.Atoi(string(kv.GetValue()))
	if err != nil {
		return false, errors.New("counter is not a number: " + string(kv.GetValue()))
	}
	resp, err := cl.Txn(rctx, &kvpb.TxnRequest{
		Compare: []*kvpb.Compare{{Key: []byte(key), Target: kvpb.Compare_VALUE, Result: kvpb.Compare_EQUAL, Value: kv.GetValue()}},
		Success: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: []byte(key), Value: []byte(strconv.Itoa(n + 1))}}}},
	})
	if err != nil {
		return false, err
	}
	return resp.GetSucceeded(), nil
}

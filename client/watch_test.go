package client_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/server"
)

// realCluster is n in-process kvd servers on loopback ports, for what the
// fake cluster does not serve (watches, history).
type realCluster struct {
	servers []*server.Server
	dir     string
}

func startReal(n, shards int) (*realCluster, error) {
	dir, err := os.MkdirTemp("", "kvd-client-watch")
	if err != nil {
		return nil, err
	}
	rc := &realCluster{dir: dir}
	initial := map[uint64]string{}
	var cls, pls []net.Listener
	for i := 1; i <= n; i++ {
		cl, err1 := net.Listen("tcp", "127.0.0.1:0")
		pl, err2 := net.Listen("tcp", "127.0.0.1:0")
		if err := errors.Join(err1, err2); err != nil {
			return nil, err
		}
		cls, pls = append(cls, cl), append(pls, pl)
		initial[uint64(i)] = pl.Addr().String()
	}
	for i := 1; i <= n; i++ {
		s, err := server.New(server.Config{
			NodeID: uint64(i), DataDir: filepath.Join(dir, fmt.Sprint(i)),
			ClientListener: cls[i-1], PeerListener: pls[i-1],
			InitialCluster: initial, Shards: shards, TickInterval: 20 * time.Millisecond,
			WatchProgressInterval: 100 * time.Millisecond,
			Logger:                slog.New(slog.DiscardHandler),
		})
		if err != nil {
			rc.Close()
			return nil, err
		}
		rc.servers = append(rc.servers, s)
	}
	return rc, nil
}

func (rc *realCluster) Endpoints() []string {
	var eps []string
	for _, s := range rc.servers {
		eps = append(eps, s.ClientAddr())
	}
	return eps
}

func (rc *realCluster) Close() {
	for _, s := range rc.servers {
		_ = s.Stop()
	}
	os.RemoveAll(rc.dir)
}

// connect returns a client once the cluster answers a write.
func (rc *realCluster) connect(ctx context.Context) (*client.Client, error) {
	c, err := client.New(ctx, client.Config{Endpoints: rc.Endpoints()})
	if err != nil {
		return nil, err
	}
	for {
		_, err := c.Put(ctx, []byte("ready"), []byte("1"))
		if err == nil {
			return c, nil
		}
		if ctx.Err() != nil {
			c.Close()
			return nil, err
		}
	}
}

// startRealClient starts n servers and a client of them, both closed when
// the test ends, with a context that ends after timeout.
func startRealClient(t *testing.T, n, shards int, timeout time.Duration) (*realCluster, *client.Client, context.Context) {
	t.Helper()
	rc, err := startReal(n, shards)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rc.Close)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	c, err := rc.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return rc, c, ctx
}

func ExampleClient_Watch() {
	cluster, err := startReal(1, 1)
	if err != nil {
		log.Fatal(err)
	}
	defer cluster.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := cluster.connect(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	resp, err := c.Put(ctx, []byte("color"), []byte("red"))
	if err != nil {
		log.Fatal(err)
	}
	if _, err := c.Put(ctx, []byte("color"), []byte("green")); err != nil {
		log.Fatal(err)
	}
	if _, err := c.Delete(ctx, []byte("color")); err != nil {
		log.Fatal(err)
	}
	// Replay the key's changes from the first put on.
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	n := 0
	for r := range c.Watch(wctx, []byte("color"), client.WithRevision(resp.GetHeader().GetRevision()), client.WithPrevKV()) {
		if r.Err != nil {
			log.Fatal(r.Err)
		}
		for _, ev := range r.Events {
			line := fmt.Sprint(ev.GetType(), " ", string(ev.GetKv().GetKey()))
			if ev.GetType() == kvpb.Event_PUT {
				line += " = " + string(ev.GetKv().GetValue())
			}
			if p := ev.GetPrevKv(); p != nil {
				line += " (was " + string(p.GetValue()) + ")"
			}
			fmt.Println(line)
			if n++; n == 3 {
				stop()
			}
		}
		if n == 3 {
			break
		}
	}
	// Output:
	// PUT color = red
	// PUT color = green (was red)
	// DELETE color (was green)
}

// collect reads ch until want events arrived, failing on an error.
func collect(t *testing.T, ch <-chan client.WatchResponse, want int) (evs []*kvpb.Event, resume string) {
	t.Helper()
	for len(evs) < want {
		r, ok := <-ch
		if !ok {
			t.Fatalf("watch closed after %d events", len(evs))
		}
		if r.Err != nil {
			t.Fatalf("watch ended after %d events: %v", len(evs), r.Err)
		}
		for _, ev := range r.Events {
			if !strings.HasPrefix(string(ev.GetKv().GetKey()), probePrefix) {
				evs = append(evs, ev)
			}
		}
		resume = r.Resume
	}
	return evs, resume
}

// probePrefix marks the puts a test makes to see its watch started; collect
// leaves their events out.
const probePrefix = "p/probe/"

// checkOnce fails unless evs holds each put of keys exactly once, in
// revision order per shard.
func checkOnce(t *testing.T, evs []*kvpb.Event, keys int) {
	t.Helper()
	seen := map[string]int{}
	last := map[uint64]int64{}
	for _, ev := range evs {
		seen[string(ev.GetKv().GetKey())]++
		if r := ev.GetKv().GetModRevision(); r <= last[ev.GetShard()] {
			t.Fatalf("shard %d: event at %d after %d", ev.GetShard(), r, last[ev.GetShard()])
		}
		last[ev.GetShard()] = ev.GetKv().GetModRevision()
	}
	for i := range keys {
		if k := fmt.Sprint("p/", i); seen[k] != 1 {
			t.Fatalf("%s seen %d times", k, seen[k])
		}
	}
	if len(evs) != keys {
		t.Fatalf("%d events for %d puts", len(evs), keys)
	}
}

// TestWatchFollowsLeaderChangesAndResumes: a prefix watch over every
// shard delivers each put once while leaders move, and a watch resumed
// with the token of the last response delivered continues with no gap
// and no duplicate.
func TestWatchFollowsLeaderChangesAndResumes(t *testing.T) {
	rc, c, ctx := startRealClient(t, 3, 2, 2*time.Minute)

	wctx, stop := context.WithCancel(ctx)
	ch := c.Watch(wctx, []byte("p/"), client.WithPrefix())
	// The watch starts "now" on each shard once created there: probe puts
	// until an event from each of the 2 shards says it is. collect leaves
	// the probes out.
	shardsSeen := map[uint64]bool{}
	for i := 0; len(shardsSeen) < 2; i++ {
		if _, err := c.Put(ctx, []byte(fmt.Sprint(probePrefix, i)), []byte("v")); err != nil {
			t.Fatal(err)
		}
		select {
		case r := <-ch:
			if r.Err != nil {
				t.Fatal(r.Err)
			}
			for _, ev := range r.Events {
				shardsSeen[ev.GetShard()] = true
			}
		case <-time.After(100 * time.Millisecond):
		}
	}
	const total = 60
	if _, err := c.Put(ctx, []byte("p/0"), []byte("v")); err != nil {
		t.Fatal(err)
	}
	first, _ := collect(t, ch, 1)
	put := func(from, to int) {
		for i := from; i < to; i++ {
			if _, err := c.Put(ctx, []byte(fmt.Sprint("p/", i)), []byte("v")); err != nil {
				t.Error(err)
				return
			}
			if i%10 == 0 {
				moveLeaders(ctx, t, rc)
			}
		}
	}
	put(1, total/2)
	evs, resume := collect(t, ch, total/2-1)
	stop()
	for range ch {
	}
	ch2 := c.Watch(ctx, []byte("p/"), client.WithPrefix(), client.WithResume(resume))
	put(total/2, total)
	rest, _ := collect(t, ch2, total-total/2)
	checkOnce(t, append(append(first, evs...), rest...), total)

	// A start the shard no longer holds is ErrCompacted.
	shard := rest[0].GetShard()
	oldest, err := c.Compact(ctx, shard, rest[len(rest)-1].GetKv().GetModRevision())
	if err != nil {
		t.Fatal(err)
	}
	r := <-c.Watch(ctx, rest[0].GetKv().GetKey(), client.WithRevision(1))
	var ce *client.CompactedError
	if !errors.As(r.Err, &ce) || ce.Oldest != oldest {
		t.Fatalf("watch below the history: %v", r.Err)
	}
}

// moveLeaders has the leader of every data shard hand it to another node
// and waits until it has.
func moveLeaders(ctx context.Context, t *testing.T, rc *realCluster) {
	t.Helper()
	for shard := uint64(1); leaderOf(rc, shard) >= 0; shard++ {
		proccluster.WaitFor(t, 20*time.Second, fmt.Sprintf("a leader of shard %d", shard), func() bool {
			return leaderOf(rc, shard) < len(rc.servers)
		})
		from := leaderOf(rc, shard)
		to := (from + 1) % len(rc.servers)
		proccluster.WaitFor(t, 20*time.Second, fmt.Sprintf("shard %d led by another node than %d", shard, from+1), func() bool {
			if n := rc.servers[from].Host().Node(shard); n != nil && n.IsLeader() {
				tctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
				_ = n.TransferLeadership(tctx, uint64(to+1))
				cancel()
			}
			l := leaderOf(rc, shard)
			return l != from && l < len(rc.servers)
		})
	}
}

// leaderOf is the index of the server leading shard; -1 if no server
// hosts it.
func leaderOf(rc *realCluster, shard uint64) int {
	hosted := false
	for i, s := range rc.servers {
		if n := s.Host().Node(shard); n != nil {
			hosted = true
			if n.IsLeader() {
				return i
			}
		}
	}
	if hosted {
		return len(rc.servers) // hosted, leader unknown
	}
	return -1
}

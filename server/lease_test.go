package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/hashring"
	"github.com/kvd/kvd/proto/kvpb"
)

func leaseClient(t *testing.T, s *Server) kvpb.LeaseClient {
	return kvpb.NewLeaseClient(clientConn(t, s))
}

// grantOn grants a lease through s, retrying while the meta shard's
// leader loads its leases.
func grantOn(t *testing.T, ctx context.Context, s *Server, ttl int64) int64 {
	t.Helper()
	lc := leaseClient(t, s)
	var id int64
	waitFor(t, 10*time.Second, "lease granted", func() bool {
		resp, err := lc.Grant(ctx, &kvpb.LeaseGrantRequest{TtlSeconds: ttl})
		if status.Code(err) == codes.Unavailable {
			return false
		}
		if err != nil {
			t.Fatalf("grant: %v", err)
		}
		id = resp.GetId()
		return true
	})
	return id
}

// putLeased puts keys through s (any node: puts are forwarded).
func putLeased(t *testing.T, ctx context.Context, s *Server, lease int64, keys ...[]byte) {
	t.Helper()
	kv := kvClient(t, s)
	for _, k := range keys {
		if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: k, Value: []byte("v"), Lease: lease}); err != nil {
			t.Fatalf("put %q with lease %d: %v", k, lease, err)
		}
	}
}

// exists reads key (linearizably: the node forwards to the leader).
func exists(ctx context.Context, kv kvpb.KVClient, key []byte) (bool, error) {
	resp, err := kv.Get(ctx, &kvpb.GetRequest{Key: key})
	return resp.GetKv() != nil, err
}

// leasedKeys is two keys in every data shard.
func leasedKeys(c *testCluster) [][]byte {
	var keys [][]byte
	for _, shard := range hashring.DataShards(c.servers[0].clusterMap()) {
		keys = append(keys, keysIn(c.servers[0], shard, 2)...)
	}
	return keys
}

// TestLeaseExpiresWithoutKeepAlive: a lease nobody renews expires after
// its TTL, within an election timeout and a second, and takes its keys
// in every shard with it; it is then gone for every call.
func TestLeaseExpiresWithoutKeepAlive(t *testing.T) {
	c := newTestCluster(t, 3, 2, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	kv0 := kvClient(t, c.servers[0])
	const ttl = 2 * time.Second
	start := time.Now()
	id := grantOn(t, ctx, c.servers[1], int64(ttl/time.Second))
	keys := leasedKeys(c)
	putLeased(t, ctx, c.servers[2], id, keys...)
	lc := leaseClient(t, c.servers[0])
	ttlResp, err := lc.TimeToLive(ctx, &kvpb.LeaseTimeToLiveRequest{Id: id, Keys: true})
	if err != nil || len(ttlResp.GetKeys()) != len(keys) || ttlResp.GetGrantedTtlSeconds() != 2 {
		t.Fatalf("time to live: %v, %v; want %d keys", ttlResp, err, len(keys))
	}
	var gone time.Duration
	waitFor(t, 20*time.Second, "leased keys deleted", func() bool {
		for _, k := range keys {
			if ok, err := exists(ctx, kv0, k); ok || err != nil {
				return false
			}
		}
		gone = time.Since(start)
		return true
	})
	electionTimeout := time.Duration(c.servers[0].cfg.ElectionTicks) * c.servers[0].cfg.TickInterval
	if gone < ttl || gone > ttl+electionTimeout+time.Second {
		t.Fatalf("keys gone %v after the grant; want within [%v, %v]", gone, ttl, ttl+electionTimeout+time.Second)
	}
	if _, err := lc.TimeToLive(ctx, &kvpb.LeaseTimeToLiveRequest{Id: id}); status.Code(err) != codes.NotFound {
		t.Fatalf("time to live of an expired lease: %v, want NotFound", err)
	}
	if ttl := keepAliveOnce(t, ctx, lc, id); ttl != 0 {
		t.Fatalf("keep alive of an expired lease: TTL %d, want 0", ttl)
	}
	if _, err := kvClient(t, c.servers[0]).Put(ctx, &kvpb.PutRequest{Key: keys[0], Lease: id}); status.Code(err) != codes.NotFound {
		t.Fatalf("put with an expired lease: %v, want NotFound", err)
	}
	if v, ok := metricSum(scrape(t, c.leaderOf(MetaShard)), "kvd_leases_expired_total"); !ok || v < 1 {
		t.Fatalf("kvd_leases_expired_total on the meta leader: %v (found %v)", v, ok)
	}
}

// keepAlive renews id every period through the nodes in turn until ctx
// ends, moving to the next node on any error; it reports the last TTL.
func keepAlive(ctx context.Context, t *testing.T, c *testCluster, id int64, period time.Duration, gone func()) {
	for i := 0; ctx.Err() == nil; i++ {
		s := c.servers[i%len(c.servers)]
		if s == nil {
			continue
		}
		st, err := leaseClient(t, s).KeepAlive(ctx)
		if err != nil {
			continue
		}
		for ctx.Err() == nil {
			if err := st.Send(&kvpb.LeaseKeepAliveRequest{Id: id}); err != nil {
				break
			}
			resp, err := st.Recv()
			if err != nil {
				break
			}
			if resp.GetTtlSeconds() == 0 {
				gone()
				return
			}
			select {
			case <-ctx.Done():
			case <-time.After(period):
			}
		}
	}
}

// TestLeaseKeptAliveSurvivesLeaderChanges: a lease of 2 s renewed every
// 300 ms outlives thirty of its TTLs while the meta shard's leadership
// moves from node to node every TTL, for a minute.
func TestLeaseKeptAliveSurvivesLeaderChanges(t *testing.T) {
	c := newTestCluster(t, 3, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	kv0 := kvClient(t, c.servers[0])
	id := grantOn(t, ctx, c.servers[0], 2)
	key := keysIn(c.servers[0], 1, 1)[0]
	putLeased(t, ctx, c.servers[0], id, key)

	kctx, kcancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var lost sync.Once
	lostc := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		keepAlive(kctx, t, c, id, 300*time.Millisecond, func() { lost.Do(func() { close(lostc) }) })
	}()
	defer func() { kcancel(); wg.Wait() }()

	for round := range 30 {
		target := c.servers[(round+1)%3]
		waitFor(t, 30*time.Second, fmt.Sprintf("node %d leads the meta shard", target.cfg.NodeID), func() bool {
			if l := c.leaderOf(MetaShard); l != nil && l != target {
				tctx, tcancel := context.WithTimeout(ctx, time.Second)
				_ = l.host.Node(MetaShard).TransferLeadership(tctx, target.cfg.NodeID)
				tcancel()
			}
			return target.host.Node(MetaShard).IsLeader()
		})
		// Stay a TTL under this leader.
		deadline := time.Now().Add(2 * time.Second)
		waitFor(t, 10*time.Second, "a TTL under the new leader", func() bool {
			select {
			case <-lostc:
				t.Fatalf("lease lost after leader change %d", round)
			default:
			}
			return time.Now().After(deadline)
		})
	}
	ok, err := exists(ctx, kv0, key)
	if err != nil || !ok {
		t.Fatalf("leased key after the leader changes: exists %v, %v", ok, err)
	}
	resp, err := leaseClient(t, c.servers[0]).TimeToLive(ctx, &kvpb.LeaseTimeToLiveRequest{Id: id})
	if err != nil || resp.GetTtlSeconds() <= 0 {
		t.Fatalf("time to live: %v, %v", resp, err)
	}
	// Once renewals stop, the lease expires under the last leader.
	kcancel()
	wg.Wait()
	waitFor(t, 10*time.Second, "lease expired", func() bool {
		ok, err := exists(ctx, kv0, key)
		return err == nil && !ok
	})
}

// TestLeaseRevokeDeletesKeysInEveryShard: a revocation deletes the
// lease's keys in every shard, each shard's watchers see a DELETE per key,
// and a put with the revoked lease, or one never granted, is refused.
func TestLeaseRevokeDeletesKeysInEveryShard(t *testing.T) {
	c := newTestCluster(t, 3, 3, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	kv0 := kvClient(t, c.servers[0])
	id := grantOn(t, ctx, c.servers[2], 60)
	other := grantOn(t, ctx, c.servers[2], 60)
	keys := leasedKeys(c)
	putLeased(t, ctx, c.servers[1], id, keys...)
	// A key moved to another lease leaves the first one's index.
	moved := keysIn(c.servers[0], 1, 3)[2]
	putLeased(t, ctx, c.servers[1], id, moved)
	putLeased(t, ctx, c.servers[1], other, moved)

	shards := hashring.DataShards(c.servers[0].clusterMap())
	type watch struct {
		shard uint64
		want  [][]byte
		done  chan []*kvpb.Event
	}
	var watches []watch
	for _, shard := range shards {
		w := watch{shard: shard, done: make(chan []*kvpb.Event, 1)}
		for _, k := range keys {
			if sh, _ := c.servers[0].route(nil, k); sh == shard {
				w.want = append(w.want, k)
			}
		}
		st := watchOn(t, ctx, c.leaderOf(shard))
		createWatch(t, st, &kvpb.WatchCreateRequest{WatchId: 1, Shard: shard, Key: []byte("key/"), Prefix: true})
		recvUntil(t, st, 1, func(r *kvpb.WatchResponse, _ []*kvpb.Event) bool { return r.GetCreated() })
		go func() {
			var evs []*kvpb.Event
			for len(evs) < len(w.want) {
				resp, err := st.Recv()
				if err != nil {
					break
				}
				evs = append(evs, resp.GetEvents()...)
			}
			w.done <- evs
		}()
		watches = append(watches, w)
	}

	lc := leaseClient(t, c.servers[0])
	start := time.Now()
	resp, err := lc.Revoke(ctx, &kvpb.LeaseRevokeRequest{Id: id})
	if err != nil || resp.GetDeleted() != int64(len(keys)) {
		t.Fatalf("revoke: %v, %v; want %d deleted", resp, err, len(keys))
	}
	// The bound between the first shard's deletion and the last one's.
	t.Logf("revoked %d keys in %d shards in %v", len(keys), len(shards), time.Since(start))
	for _, w := range watches {
		evs := <-w.done
		var got [][]byte
		for _, ev := range evs {
			if ev.GetType() != kvpb.Event_DELETE {
				t.Fatalf("shard %d: event %v, want only DELETEs", w.shard, ev)
			}
			got = append(got, ev.GetKv().GetKey())
		}
		slices.SortFunc(got, func(a, b []byte) int { return slices.Compare(a, b) })
		if !slices.EqualFunc(got, w.want, slices.Equal) {
			t.Fatalf("shard %d: DELETE events for %q, want %q", w.shard, got, w.want)
		}
		// One apply per shard: the deletions share one revision.
		for _, ev := range evs {
			if ev.GetKv().GetModRevision() != evs[0].GetKv().GetModRevision() {
				t.Fatalf("shard %d: deletions at revisions %d and %d", w.shard, evs[0].GetKv().GetModRevision(), ev.GetKv().GetModRevision())
			}
		}
	}
	for _, k := range keys {
		if ok, err := exists(ctx, kv0, k); ok || err != nil {
			t.Fatalf("key %q after revoke: exists %v, %v", k, ok, err)
		}
	}
	if ok, err := exists(ctx, kv0, moved); !ok || err != nil {
		t.Fatalf("key moved to another lease after revoke: exists %v, %v", ok, err)
	}
	kv := kvClient(t, c.servers[1])
	for _, l := range []int64{id, 1 << 40} {
		if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: keys[0], Value: []byte("late"), Lease: l}); status.Code(err) != codes.NotFound {
			t.Fatalf("put with lease %d: %v, want NotFound", l, err)
		}
		txn := &kvpb.TxnRequest{Success: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: keys[0], Lease: l}}}}}
		if _, err := kv.Txn(ctx, txn); status.Code(err) != codes.NotFound {
			t.Fatalf("txn put with lease %d: %v, want NotFound", l, err)
		}
	}
	if _, err := lc.Revoke(ctx, &kvpb.LeaseRevokeRequest{Id: id}); status.Code(err) != codes.NotFound {
		t.Fatalf("second revoke: %v, want NotFound", err)
	}
	list, err := lc.Leases(ctx, &kvpb.LeaseLeasesRequest{})
	if err != nil || len(list.GetLeases()) != 1 || list.GetLeases()[0].GetId() != other {
		t.Fatalf("leases: %v, %v; want only %d", list, err, other)
	}
}

// TestLeasesSurviveRestart: leases and their keys outlive a restart of
// every node, with the TTL they had, not a new one.
func TestLeasesSurviveRestart(t *testing.T) {
	c := newTestCluster(t, 3, 2, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	id := grantOn(t, ctx, c.servers[0], 600)
	keys := leasedKeys(c)
	putLeased(t, ctx, c.servers[0], id, keys...)
	c.stopAll()
	for i := range c.servers {
		c.start(i)
	}
	c.waitReady()
	lc := leaseClient(t, c.servers[1])
	var resp *kvpb.LeaseTimeToLiveResponse
	waitFor(t, 20*time.Second, "lease readable after restart", func() bool {
		var err error
		resp, err = lc.TimeToLive(ctx, &kvpb.LeaseTimeToLiveRequest{Id: id, Keys: true})
		if status.Code(err) == codes.Unavailable {
			return false
		}
		if err != nil {
			t.Fatalf("time to live: %v", err)
		}
		return true
	})
	if resp.GetGrantedTtlSeconds() != 600 || resp.GetTtlSeconds() > 600+1 || len(resp.GetKeys()) != len(keys) {
		t.Fatalf("after restart: %v; want granted 600, %d keys", resp, len(keys))
	}
	// The lease is still usable.
	next := grantOn(t, ctx, c.servers[2], 5)
	if next <= id {
		t.Fatalf("lease id %d after restart, not above %d", next, id)
	}
	putLeased(t, ctx, c.servers[2], id, []byte("after-restart"))
}

// TestLeaseBadInputGetsDocumentedCodes: invalid TTLs and ids are
// InvalidArgument, unknown leases NotFound, and nothing panics.
func TestLeaseBadInputGetsDocumentedCodes(t *testing.T) {
	c := newTestCluster(t, 1, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	grantOn(t, ctx, c.servers[0], 1) // leases loaded
	lc := leaseClient(t, c.servers[0])
	for _, ttl := range []int64{0, -1, -1 << 62, int64(MaxLeaseTTL/time.Second) + 1, 1 << 62} {
		if _, err := lc.Grant(ctx, &kvpb.LeaseGrantRequest{TtlSeconds: ttl}); status.Code(err) != codes.InvalidArgument {
			t.Errorf("grant TTL %d: %v, want InvalidArgument", ttl, err)
		}
	}
	for _, id := range []int64{0, -5} {
		if _, err := lc.Revoke(ctx, &kvpb.LeaseRevokeRequest{Id: id}); status.Code(err) != codes.InvalidArgument {
			t.Errorf("revoke %d: %v, want InvalidArgument", id, err)
		}
		if _, err := lc.TimeToLive(ctx, &kvpb.LeaseTimeToLiveRequest{Id: id}); status.Code(err) != codes.InvalidArgument {
			t.Errorf("time to live %d: %v, want InvalidArgument", id, err)
		}
	}
	for _, id := range []int64{12345, 1<<63 - 1} {
		if _, err := lc.Revoke(ctx, &kvpb.LeaseRevokeRequest{Id: id}); status.Code(err) != codes.NotFound {
			t.Errorf("revoke %d: %v, want NotFound", id, err)
		}
		if _, err := lc.TimeToLive(ctx, &kvpb.LeaseTimeToLiveRequest{Id: id, Keys: true}); status.Code(err) != codes.NotFound {
			t.Errorf("time to live %d: %v, want NotFound", id, err)
		}
	}
	if _, err := kvClient(t, c.servers[0]).Put(ctx, &kvpb.PutRequest{Key: []byte("k"), Lease: -1}); status.Code(err) != codes.NotFound {
		t.Errorf("put with lease -1: %v, want NotFound", err)
	}
	for _, id := range []int64{0, -1, 12345} {
		if ttl := keepAliveOnce(t, ctx, lc, id); ttl != 0 {
			t.Errorf("keep alive %d: TTL %d, want 0", id, ttl)
		}
	}
}

// TestLeaderChangeKeepsRemainingTTL: a new meta shard leader starts a
// lease nobody renews from its checkpointed remaining TTL (plus an
// election timeout), not from a fresh TTL.
func TestLeaderChangeKeepsRemainingTTL(t *testing.T) {
	c := newTestCluster(t, 3, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	id := grantOn(t, ctx, c.servers[0], 12)
	lc := leaseClient(t, c.servers[0])
	// The checkpoint records what remains once it moved by a quarter TTL.
	waitFor(t, 20*time.Second, "lease at 7 s or less", func() bool {
		resp, err := lc.TimeToLive(ctx, &kvpb.LeaseTimeToLiveRequest{Id: id})
		return err == nil && resp.GetTtlSeconds() <= 7
	})
	old := c.leaderOf(MetaShard)
	waitFor(t, 20*time.Second, "another meta shard leader", func() bool {
		l := c.leaderOf(MetaShard)
		if l == old {
			next := c.servers[(int(old.cfg.NodeID))%3]
			tctx, tcancel := context.WithTimeout(ctx, time.Second)
			_ = l.host.Node(MetaShard).TransferLeadership(tctx, next.cfg.NodeID)
			tcancel()
		}
		return l != nil && l != old
	})
	var resp *kvpb.LeaseTimeToLiveResponse
	waitFor(t, 10*time.Second, "lease readable on the new leader", func() bool {
		var err error
		resp, err = lc.TimeToLive(ctx, &kvpb.LeaseTimeToLiveRequest{Id: id})
		return err == nil
	})
	if resp.GetTtlSeconds() > 9+1 {
		t.Fatalf("TTL %d s on the new leader; want what remained (at most 9 s) plus an election timeout", resp.GetTtlSeconds())
	}
}

// TestLeaseThroughANodeWithoutMetaReplica: a node that hosts no replica
// of the meta shard grants, renews and reads leases through the others.
func TestLeaseThroughANodeWithoutMetaReplica(t *testing.T) {
	c := newTestCluster(t, 4, 2, func(cfg *Config) { cfg.Replicas = 3 })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var outside *Server
	for _, s := range c.servers {
		if s.host.Node(MetaShard) == nil {
			outside = s
		}
	}
	if outside == nil {
		t.Fatal("every node hosts the meta shard")
	}
	id := grantOn(t, ctx, outside, 30)
	putLeased(t, ctx, outside, id, []byte("outside"))
	lc := leaseClient(t, outside)
	if ttl := keepAliveOnce(t, ctx, lc, id); ttl != 30 {
		t.Fatalf("keep alive through node %d: TTL %d, want 30", outside.cfg.NodeID, ttl)
	}
	resp, err := lc.TimeToLive(ctx, &kvpb.LeaseTimeToLiveRequest{Id: id, Keys: true})
	if err != nil || len(resp.GetKeys()) != 1 {
		t.Fatalf("time to live through node %d: %v, %v", outside.cfg.NodeID, resp, err)
	}
}

// TestLeaseGrantIsExactlyOnce: a grant retried with its session and seq,
// through another node, gets the lease the first attempt granted; once
// that lease is gone, the retry is NotFound rather than a lease revived.
func TestLeaseGrantIsExactlyOnce(t *testing.T) {
	c := newTestCluster(t, 3, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	grantOn(t, ctx, c.servers[0], 5) // leases loaded
	req := &kvpb.LeaseGrantRequest{TtlSeconds: 30, Header: &kvpb.RequestHeader{Session: 77, Seq: 1}}
	first, err := leaseClient(t, c.servers[0]).Grant(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	again, err := leaseClient(t, c.servers[2]).Grant(ctx, req)
	if err != nil || again.GetId() != first.GetId() {
		t.Fatalf("retried grant: %v, %v; want lease %d again", again, err, first.GetId())
	}
	lc := leaseClient(t, c.servers[1])
	if list, err := lc.Leases(ctx, &kvpb.LeaseLeasesRequest{}); err != nil || len(list.GetLeases()) != 2 {
		t.Fatalf("leases: %v, %v; want 2", list, err)
	}
	if _, err := lc.Revoke(ctx, &kvpb.LeaseRevokeRequest{Id: first.GetId()}); err != nil {
		t.Fatal(err)
	}
	if _, err := lc.Grant(ctx, req); status.Code(err) != codes.NotFound {
		t.Fatalf("retry of the grant of a revoked lease: %v, want NotFound", err)
	}
	if _, err := lc.TimeToLive(ctx, &kvpb.LeaseTimeToLiveRequest{Id: first.GetId()}); status.Code(err) != codes.NotFound {
		t.Fatalf("the revoked lease after the retry: %v, want NotFound", err)
	}
}

// TestFailedRevocationIsFinished: a revocation that cannot reach a
// shard (no quorum) leaves the lease dead at once, and the meta shard's
// leader finishes it once the shard is back.
func TestFailedRevocationIsFinished(t *testing.T) {
	c := newTestCluster(t, 5, 4, func(cfg *Config) { cfg.Replicas = 3 })
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	m := c.servers[0].clusterMap()
	meta := replicasOf(m, MetaShard)
	// A data shard two of whose replicas can stop while the meta shard
	// keeps a quorum: at most one of the two is a meta replica.
	var shard uint64
	var down []uint64
	for _, sh := range hashring.DataShards(m) {
		var in, out []uint64
		for _, id := range replicasOf(m, sh) {
			if slices.Contains(meta, id) {
				in = append(in, id)
			} else {
				out = append(out, id)
			}
		}
		if len(out) >= 1 {
			shard, down = sh, append(out[:1], in[0])
			if len(out) >= 2 {
				down = out[:2]
			}
			break
		}
	}
	if down == nil {
		t.Fatal("every data shard has the meta shard's replicas: this placement cannot take one shard out of quorum alone")
	}
	var entry *Server
	for _, s := range c.servers {
		if !slices.Contains(down, s.cfg.NodeID) && slices.Contains(meta, s.cfg.NodeID) {
			entry = s
		}
	}
	id := grantOn(t, ctx, entry, 60)
	key := keysIn(entry, shard, 1)[0]
	putLeased(t, ctx, entry, id, key)
	for _, n := range down {
		c.stop(int(n) - 1)
	}
	lc := leaseClient(t, entry)
	revoke := func() {
		rctx, rcancel := context.WithTimeout(ctx, 3*time.Second)
		defer rcancel()
		if _, err := lc.Revoke(rctx, &kvpb.LeaseRevokeRequest{Id: id}); err == nil {
			t.Fatal("revoke succeeded with a shard out of quorum")
		}
	}
	revoke()
	// A revoke that failed before the meta shard recorded it (its leader
	// was one of the stopped nodes and no other was elected yet) changed
	// nothing, and the client's answer to an error is to try again.
	waitFor(t, 30*time.Second, "the lease dead", func() bool {
		_, err := lc.TimeToLive(ctx, &kvpb.LeaseTimeToLiveRequest{Id: id})
		if status.Code(err) == codes.NotFound {
			return true
		}
		if err == nil {
			revoke()
		}
		return false
	})
	for _, n := range down {
		c.start(int(n) - 1)
	}
	kv := kvClient(t, entry)
	waitFor(t, 60*time.Second, "the revocation finished", func() bool {
		ok, err := exists(ctx, kv, key)
		return err == nil && !ok
	})
	if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: key, Value: []byte("late"), Lease: id}); status.Code(err) != codes.NotFound {
		t.Fatalf("put with the revoked lease: %v, want NotFound", err)
	}
}

// keepAliveOnce renews lease id once, on a KeepAlive stream of its own,
// and returns the TTL the answer gives (0: no such lease).
func keepAliveOnce(t *testing.T, ctx context.Context, lc kvpb.LeaseClient, id int64) int64 {
	t.Helper()
	ka, err := lc.KeepAlive(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ka.CloseSend() }()
	if err := ka.Send(&kvpb.LeaseKeepAliveRequest{Id: id}); err != nil {
		t.Fatal(err)
	}
	resp, err := ka.Recv()
	if err != nil {
		t.Fatalf("keep alive %d: %v", id, err)
	}
	return resp.GetTtlSeconds()
}

// A lease is anyone's, its keys are not: with auth on, TimeToLive lists a
// lease's keys only to a user who may read them all.
func TestLeaseKeysNeedReadPermission(t *testing.T) {
	c := newTestCluster(t, 1, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	admin := c.client()
	id, err := admin.Grant(ctx, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Put(ctx, []byte("secret/x"), []byte("v"), client.WithLease(id)); err != nil {
		t.Fatal(err)
	}
	enableAuth(ctx, t, admin,
		&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_RoleAdd{RoleAdd: &kvpb.RoleAdd{Name: "pub"}}},
		&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_RoleGrantPermission{RoleGrantPermission: &kvpb.RoleGrantPermission{Role: "pub",
			Perm: &kvpb.Permission{Key: []byte("pub/"), RangeEnd: []byte("pub0")}}}},
		&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserAdd{UserAdd: &kvpb.UserAdd{Name: "u", Password: "p"}}},
		&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserGrantRole{UserGrantRole: &kvpb.UserGrantRole{User: "u", Role: "pub"}}})
	as := func(user, password string) *client.Client {
		cl, err := client.New(ctx, client.Config{Endpoints: c.endpoints(), Username: user, Password: password})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cl.Close() })
		return cl
	}
	u, root := as("u", "p"), as("root", "s3cret")
	if _, err := u.TimeToLive(ctx, id, true); !errors.Is(err, client.ErrPermissionDenied) {
		t.Fatalf("u listed the keys of a lease on secret/x: %v, want ErrPermissionDenied", err)
	}
	if st, err := u.TimeToLive(ctx, id, false); err != nil || st.TTL <= 0 {
		t.Fatalf("u's TimeToLive without keys: %+v, %v", st, err)
	}
	if st, err := root.TimeToLive(ctx, id, true); err != nil || len(st.Keys) != 1 || string(st.Keys[0]) != "secret/x" {
		t.Fatalf("root's TimeToLive with keys: %+v, %v", st, err)
	}
}

// A TimeToLive with keys is a small request whose answer can be large: it
// is charged to the in-flight budget like a read's, and refused when the
// budget has no room for it.
func TestLeaseKeysAnswerIsCharged(t *testing.T) {
	const budget = 256 << 10 // an answer this large may use 192 KiB of it
	c := newTestCluster(t, 1, 1, func(cfg *Config) { cfg.Limits.MaxInFlightBytes = budget })
	s := c.servers[0]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	lc := kvpb.NewLeaseClient(clientConn(t, s))
	var g *kvpb.LeaseGrantResponse
	waitFor(t, 10*time.Second, "a lease granted", func() bool {
		var err error
		g, err = lc.Grant(ctx, &kvpb.LeaseGrantRequest{TtlSeconds: 3600})
		return err == nil
	})
	kv := kvClient(t, s)
	for i := range 64 { // 256 KB of keys
		key := fmt.Appendf(nil, "%02d/%s", i, bytes.Repeat([]byte("k"), 4000))
		if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: key, Value: []byte("v"), Lease: g.GetId()}); err != nil {
			t.Fatal(err)
		}
	}
	_, err := lc.TimeToLive(ctx, &kvpb.LeaseTimeToLiveRequest{Id: g.GetId(), Keys: true})
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "answer of") {
		t.Fatalf("TimeToLive listing 256 KB of keys on a 256 KiB budget: %v, want ResourceExhausted for its answer", err)
	}
	if _, err := lc.TimeToLive(ctx, &kvpb.LeaseTimeToLiveRequest{Id: g.GetId()}); err != nil {
		t.Fatalf("TimeToLive without keys: %v", err)
	}
}

// largeLease grants a lease on a 3-node, 1-shard cluster and attaches to
// it large keys of 64 KiB, then small keys of 1 byte ("key/000" on).
func largeLease(t *testing.T, ctx context.Context, large, small int) (*testCluster, int64, kvpb.KVClient) {
	t.Helper()
	c := newTestCluster(t, 3, 1, nil)
	id := grantOn(t, ctx, c.servers[0], 600)
	kv := kvClient(t, c.servers[1])
	big := bytes.Repeat([]byte("v"), 64<<10)
	for i := range large + small {
		v := big
		if i >= large {
			v = []byte("s")
		}
		if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: fmt.Appendf(nil, "key/%03d", i), Value: v, Lease: id}); err != nil {
			t.Fatal(err)
		}
	}
	return c, id, kv
}

// checkNoKeysLeft fails unless shard 1 holds no key under "key/".
func checkNoKeysLeft(t *testing.T, ctx context.Context, kv kvpb.KVClient) {
	t.Helper()
	if got, err := kv.Range(ctx, &kvpb.RangeRequest{Shard: 1, Start: []byte("key/"), End: []byte("key0"), CountOnly: true}); err != nil || got.GetCount() != 0 {
		t.Fatalf("after the revocation: %v keys, %v", got.GetCount(), err)
	}
}

// TestLargeLeaseRevokedInBoundedApplies: a shard whose keys of a lease
// hold more than one apply should carry loses them in applies of at most
// revokeChunkBytes of values (one value more at most) and revokeChunkKeys
// keys; every key goes, and the revocation counts each once.
func TestLargeLeaseRevokedInBoundedApplies(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	const large, small = 150, 100
	c, id, kv := largeLease(t, ctx, large, small)
	resp, err := leaseClient(t, c.servers[2]).Revoke(ctx, &kvpb.LeaseRevokeRequest{Id: id})
	if err != nil || resp.GetDeleted() != large+small {
		t.Fatalf("revoke: %v, %v; want %d deleted", resp, err, large+small)
	}
	checkNoKeysLeft(t, ctx, kv)
	s := c.leaderOf(1)
	var deletes map[int64][]*kvpb.Event
	waitFor(t, 10*time.Second, "the deletes in the leader's history", func() bool {
		evs, _ := localEvents(t, s, 1)
		deletes = map[int64][]*kvpb.Event{}
		n := 0
		for _, ev := range evs {
			if ev.GetType() == kvpb.Event_DELETE {
				deletes[ev.GetKv().GetModRevision()] = append(deletes[ev.GetKv().GetModRevision()], ev)
				n++
			}
		}
		return n == large+small
	})
	for rev, evs := range deletes {
		var size int
		for _, ev := range evs {
			size += len(ev.GetPrevKv().GetValue())
		}
		if len(evs) > revokeChunkKeys || size > revokeChunkBytes+64<<10 {
			t.Fatalf("revision %d deleted %d keys of %d bytes; the bounds are %d keys, %d bytes", rev, len(evs), size, revokeChunkKeys, revokeChunkBytes)
		}
	}
	if len(deletes) < 3 {
		t.Fatalf("the deletes went in %d revisions; 9.4 MiB of values need at least 3", len(deletes))
	}
}

// TestLeaseKeysAnswerFitsTheReceiveLimit: TimeToLive with keys answers
// with as many keys as fit in --max-response-bytes and says there are
// more; with room for all, it lists all and says nothing more.
func TestLeaseKeysAnswerFitsTheReceiveLimit(t *testing.T) {
	const limit = 16 << 10
	c := newTestCluster(t, 1, 2, func(cfg *Config) { cfg.Limits.MaxResponseBytes = limit })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	id := grantOn(t, ctx, c.servers[0], 600)
	var keys [][]byte
	for i := range 40 {
		keys = append(keys, fmt.Appendf(nil, "key/%03d/%s", i, bytes.Repeat([]byte("k"), 1000)))
	}
	putLeased(t, ctx, c.servers[0], id, keys...)
	lc := leaseClient(t, c.servers[0])
	resp, err := lc.TimeToLive(ctx, &kvpb.LeaseTimeToLiveRequest{Id: id, Keys: true})
	if err != nil {
		t.Fatal(err)
	}
	if n := proto.Size(resp); n > limit || !resp.GetMoreKeys() || len(resp.GetKeys()) < 10 {
		t.Fatalf("an answer of %d bytes, %d keys, more %v; want at most %d bytes, more set, at least 10 keys", n, len(resp.GetKeys()), resp.GetMoreKeys(), limit)
	}
	few := grantOn(t, ctx, c.servers[0], 600)
	putLeased(t, ctx, c.servers[0], few, []byte("key/a"), []byte("key/b"))
	resp, err = lc.TimeToLive(ctx, &kvpb.LeaseTimeToLiveRequest{Id: few, Keys: true})
	if err != nil || len(resp.GetKeys()) != 2 || resp.GetMoreKeys() {
		t.Fatalf("a lease of two keys: %v, %v", resp, err)
	}
}

// TestRevokeOutlastingItsAttemptsAnswersOnce: a revocation that takes
// longer than the client's attempts goes on when an attempt gives up, and
// a retry waits for it and answers with its count; a retry that comes
// after it ended finds the lease gone, which the client takes as the
// success it is (count 0). Either way the call succeeds, never "lease not
// found", and no key is left.
func TestRevokeOutlastingItsAttemptsAnswersOnce(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	const keys = 150
	c, id, kv := largeLease(t, ctx, keys, 0)
	cl, err := client.New(ctx, client.Config{Endpoints: c.endpoints(), AttemptTimeout: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	deleted, err := cl.Revoke(ctx, client.LeaseID(id))
	if err != nil || deleted != keys && deleted != 0 {
		t.Fatalf("revoke: %d deleted, %v; want %d (or 0)", deleted, err, keys)
	}
	checkNoKeysLeft(t, ctx, kv)
}

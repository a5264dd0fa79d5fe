package server

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/kvpb"
)

// watchOn opens a Watch stream to s that ends with the test.
func watchOn(t *testing.T, ctx context.Context, s *Server) kvpb.Watch_WatchClient {
	t.Helper()
	conn, err := grpc.NewClient(s.ClientAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ctx, cancel := context.WithCancel(ctx)
	t.Cleanup(cancel)
	st, err := kvpb.NewWatchClient(conn).Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// fixedWindowConn is a connection to s whose receive windows stay at
// 64 KiB (no BDP growth), so that a client that does not read soon stops
// gRPC flow control. It ends with the test.
func fixedWindowConn(t *testing.T, s *Server) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(s.ClientAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func createWatch(t *testing.T, st kvpb.Watch_WatchClient, c *kvpb.WatchCreateRequest) {
	t.Helper()
	if err := st.Send(&kvpb.WatchRequest{Request: &kvpb.WatchRequest_Create{Create: c}}); err != nil {
		t.Fatal(err)
	}
}

// recvUntil receives responses of watch id until done says so, and
// returns the events among them. It fails on a response out of revision
// order or on the stream's end.
func recvUntil(t *testing.T, st kvpb.Watch_WatchClient, id int64, done func(*kvpb.WatchResponse, []*kvpb.Event) bool) []*kvpb.Event {
	t.Helper()
	var evs []*kvpb.Event
	var seen int64
	for {
		resp, err := st.Recv()
		if err != nil {
			t.Fatalf("watch stream ended: %v", err)
		}
		if resp.GetWatchId() != id {
			continue
		}
		if r := resp.GetHeader().GetRevision(); r < seen && !resp.GetCanceled() {
			t.Fatalf("response through revision %d after one through %d", r, seen)
		} else if !resp.GetCanceled() {
			seen = r
		}
		for _, ev := range resp.GetEvents() {
			if n := len(evs); n > 0 && ev.GetKv().GetModRevision() < evs[n-1].GetKv().GetModRevision() {
				t.Fatalf("event at %d after one at %d", ev.GetKv().GetModRevision(), evs[n-1].GetKv().GetModRevision())
			}
			if r := ev.GetKv().GetModRevision(); r > resp.GetHeader().GetRevision() && !(resp.GetFragment() && r == resp.GetHeader().GetRevision()+1) {
				t.Fatalf("event at %d in a response through %d", ev.GetKv().GetModRevision(), resp.GetHeader().GetRevision())
			}
		}
		evs = append(evs, resp.GetEvents()...)
		if done(resp, evs) {
			return evs
		}
		if resp.GetCanceled() {
			t.Fatalf("watch canceled: %v", resp.GetError())
		}
	}
}

// TestWatchReplaysAndFollows: a prefix watch from revision 1 replays the
// shard's changes in order, with values and prev kvs, then follows new
// ones; a one-key watch from now sees only its key; a start below the
// history is answered with the oldest revision, never a gap.
func TestWatchReplaysAndFollows(t *testing.T) {
	c := newTestCluster(t, 1, 1, func(cfg *Config) { cfg.WatchProgressInterval = 100 * time.Millisecond })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	kv := kvClient(t, c.servers[0])
	for i := range 30 {
		if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte(fmt.Sprint("w/", i%4)), Value: []byte(fmt.Sprint("v", i))}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := kv.Delete(ctx, &kvpb.DeleteRequest{Key: []byte("w/0")}); err != nil {
		t.Fatal(err)
	}
	st := watchOn(t, ctx, c.servers[0])
	createWatch(t, st, &kvpb.WatchCreateRequest{WatchId: 1, Shard: 1, Key: []byte("w/"), Prefix: true, StartRevision: 1, PrevKv: true})
	createWatch(t, st, &kvpb.WatchCreateRequest{WatchId: 2, Key: []byte("w/3")})
	evs := recvUntil(t, st, 1, func(_ *kvpb.WatchResponse, evs []*kvpb.Event) bool { return len(evs) >= 31 })
	for i, ev := range evs[:30] {
		if ev.GetType() != kvpb.Event_PUT || string(ev.GetKv().GetKey()) != fmt.Sprint("w/", i%4) ||
			string(ev.GetKv().GetValue()) != fmt.Sprint("v", i) || ev.GetKv().GetModRevision() != int64(i+1) ||
			ev.GetKv().GetVersion() != int64(i/4+1) || ev.GetShard() != 1 {
			t.Fatalf("event %d: %v", i, ev)
		}
		if i >= 4 && string(ev.GetPrevKv().GetValue()) != fmt.Sprint("v", i-4) {
			t.Fatalf("event %d: prev %v", i, ev.GetPrevKv())
		}
	}
	if del := evs[30]; del.GetType() != kvpb.Event_DELETE || string(del.GetKv().GetKey()) != "w/0" || string(del.GetPrevKv().GetValue()) != "v28" {
		t.Fatalf("delete event: %v", del)
	}
	// Live: a put reaches both watches, another key only the prefix one.
	if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte("w/1"), Value: []byte("live1")}); err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte("w/3"), Value: []byte("live3")}); err != nil {
		t.Fatal(err)
	}
	one := recvUntil(t, st, 2, func(_ *kvpb.WatchResponse, evs []*kvpb.Event) bool { return len(evs) >= 1 })
	if string(one[0].GetKv().GetValue()) != "live3" || one[0].GetPrevKv() != nil {
		t.Fatalf("one-key watch got %v", one)
	}
	// An idle watch is told how far it has seen.
	resp := recvUntil(t, st, 2, func(r *kvpb.WatchResponse, _ []*kvpb.Event) bool { return r.GetProgress() })
	_ = resp

	// Compacted start.
	if _, err := clusterClient(t, c.servers[0]).Compact(ctx, &kvpb.CompactRequest{Shard: 1, Revision: 10}); err != nil {
		t.Fatal(err)
	}
	createWatch(t, st, &kvpb.WatchCreateRequest{WatchId: 3, Shard: 1, Key: []byte("w/"), Prefix: true, StartRevision: 5})
	for {
		r, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if r.GetWatchId() != 3 {
			continue
		}
		if !r.GetCanceled() || r.GetCompactRevision() != 10 || codes.Code(r.GetError().GetCode()) != codes.OutOfRange {
			t.Fatalf("watch below the history: %v", r)
		}
		break
	}
}

// TestWatchProgressWhenIdle: a watch on a key nobody writes still hears
// the shard's revision, and it moves when other keys change.
func TestWatchProgressWhenIdle(t *testing.T) {
	c := newTestCluster(t, 1, 1, func(cfg *Config) { cfg.WatchProgressInterval = 50 * time.Millisecond })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st := watchOn(t, ctx, c.servers[0])
	createWatch(t, st, &kvpb.WatchCreateRequest{WatchId: 7, Key: []byte("idle")})
	recvUntil(t, st, 7, func(r *kvpb.WatchResponse, _ []*kvpb.Event) bool { return r.GetProgress() })
	resp, err := kvClient(t, c.servers[0]).Put(ctx, &kvpb.PutRequest{Key: []byte("other"), Value: []byte("v")})
	if err != nil {
		t.Fatal(err)
	}
	rev := resp.GetHeader().GetRevision()
	evs := recvUntil(t, st, 7, func(r *kvpb.WatchResponse, _ []*kvpb.Event) bool {
		return r.GetProgress() && r.GetHeader().GetRevision() >= rev
	})
	if len(evs) > 0 {
		t.Fatalf("a watch on idle got %v", evs)
	}
}

// TestWatchEndsOnStepDownAndResumesOnSnapshotReplica: a leader that
// gives up its shard ends its watches with NotLeader; the new leader,
// which joined by snapshot, replays the same events from the same
// revision.
func TestWatchEndsOnStepDownAndResumesOnSnapshotReplica(t *testing.T) {
	const shard = 1
	c := newTestCluster(t, 1, 1, func(cfg *Config) { cfg.Replicas = 3 })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cl := c.client()
	for i := range 20 {
		if _, err := cl.Put(ctx, []byte(fmt.Sprint("s/", i%5)), []byte(fmt.Sprint("v", i))); err != nil {
			t.Fatal(err)
		}
	}
	c.joinNode(2, 0)
	c.joinNode(3, 0)
	waitFor(t, 90*time.Second, "three voters on shard 1", func() bool {
		voters, learners := c.shardVoters(shard)
		return len(voters) == 3 && len(learners) == 0
	})
	if c.servers[2].host.SnapshotsReceived() == 0 {
		t.Fatal("node 3 received no snapshot")
	}
	leader := c.leaderOf(shard)
	st := watchOn(t, ctx, leader)
	createWatch(t, st, &kvpb.WatchCreateRequest{WatchId: 1, Shard: shard, Key: []byte("s/"), Prefix: true, StartRevision: 1, PrevKv: true})
	before := recvUntil(t, st, 1, func(_ *kvpb.WatchResponse, evs []*kvpb.Event) bool { return len(evs) >= 20 })

	target := c.servers[2]
	waitFor(t, 30*time.Second, "node 3 leads shard 1", func() bool {
		if target.host.Node(shard).IsLeader() {
			return true
		}
		if l := c.leaderOf(shard); l != nil {
			tctx, tcancel := context.WithTimeout(ctx, time.Second)
			_ = l.host.Node(shard).TransferLeadership(tctx, 3)
			tcancel()
		}
		return target.host.Node(shard).IsLeader()
	})
	if leader != target {
		end := recvUntil(t, st, 1, func(r *kvpb.WatchResponse, _ []*kvpb.Event) bool { return r.GetCanceled() })
		_ = end
	}
	st3 := watchOn(t, ctx, target)
	createWatch(t, st3, &kvpb.WatchCreateRequest{WatchId: 1, Shard: shard, Key: []byte("s/"), Prefix: true, StartRevision: 1, PrevKv: true})
	after := recvUntil(t, st3, 1, func(_ *kvpb.WatchResponse, evs []*kvpb.Event) bool { return len(evs) >= 20 })
	if !sameEvents(before, after) {
		t.Fatalf("the snapshot replica replays\n%v\nthe old leader replayed\n%v", after, before)
	}
}

// TestSlowWatcherIsCutOff: a client that stops reading its events is cut
// off after BatchSendTimeout instead of having them held without end, and
// what its stream held is released.
func TestSlowWatcherIsCutOff(t *testing.T) {
	c := newTestCluster(t, 1, 1, func(cfg *Config) {
		cfg.Limits.MaxBatchStreamBytes = 64 << 10
		cfg.BatchSendTimeout = 200 * time.Millisecond
	})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	kv := kvClient(t, c.servers[0])
	value := make([]byte, 16<<10)
	for i := range 200 {
		if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte(fmt.Sprint("big/", i)), Value: value}); err != nil {
			t.Fatal(err)
		}
	}
	st, err := kvpb.NewWatchClient(fixedWindowConn(t, c.servers[0])).Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	createWatch(t, st, &kvpb.WatchCreateRequest{WatchId: 1, Shard: 1, Key: []byte("big/"), Prefix: true, StartRevision: 1})
	// Read nothing: the node must give up on the stream.
	s := c.servers[0]
	waitFor(t, 30*time.Second, "the stream cut off and its bytes released", func() bool {
		cut, _ := metricSum(scrape(t, s), "kvd_watch_streams_cut_off_total")
		return cut >= 1 && s.adm.inFlight.Load() == 0 && s.watch.streams.Load() == 0
	})
}

// TestWatchSendsWithinTicksOfApply: a put reaches a watch about a tick
// after it applies, not when the open bbolt transaction would commit by
// itself (--commit-interval, here far longer than the test waits): the
// watched shard asks for the commit.
func TestWatchSendsWithinTicksOfApply(t *testing.T) {
	const commitInterval = 20 * time.Second
	c := newTestCluster(t, 1, 1, func(cfg *Config) {
		cfg.CommitInterval = commitInterval
		cfg.WatchProgressInterval = time.Hour // no progress responses to wait through
	})
	// Half the commit interval: an event held until the commit comes
	// later than this, one sent within ticks long before.
	ctx, cancel := context.WithTimeout(context.Background(), commitInterval/2)
	defer cancel()
	st := watchOn(t, ctx, c.servers[0])
	createWatch(t, st, &kvpb.WatchCreateRequest{WatchId: 1, Key: []byte("k")})
	if resp, err := st.Recv(); err != nil || !resp.GetCreated() {
		t.Fatalf("create: %v %v", resp, err)
	}
	put := time.Now()
	if _, err := kvClient(t, c.servers[0]).Put(ctx, &kvpb.PutRequest{Key: []byte("k"), Value: []byte("v")}); err != nil {
		t.Fatal(err)
	}
	for {
		resp, err := st.Recv()
		if err != nil {
			t.Fatalf("no event %v after the put (%v): the watch waits for the commit interval", time.Since(put).Round(time.Millisecond), err)
		}
		if evs := resp.GetEvents(); len(evs) > 0 {
			if string(evs[0].GetKv().GetValue()) != "v" {
				t.Fatalf("event %v", evs[0])
			}
			t.Logf("event %v after the put was sent", time.Since(put))
			return
		}
	}
}

// A Watch stream takes no further request while it holds its budget of
// unsent answers: a client that floods cancels and reads nothing is held
// by flow control, and the node's bytes stay bounded, not one answer per
// request. Once the client reads, every request is answered.
func TestWatchRequestsWaitWhileAnswersQueue(t *testing.T) {
	const limit = 16 << 10
	c := newTestCluster(t, 1, 1, func(cfg *Config) { cfg.Limits.MaxBatchStreamBytes = limit })
	s := c.servers[0]
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	st, err := kvpb.NewWatchClient(fixedWindowConn(t, s)).Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	const cancels = 30000
	sendErr := make(chan error, 1)
	go func() {
		for i := range cancels {
			if err := st.Send(&kvpb.WatchRequest{Request: &kvpb.WatchRequest_Cancel{Cancel: &kvpb.WatchCancelRequest{WatchId: int64(i + 1)}}}); err != nil {
				sendErr <- err
				return
			}
		}
		sendErr <- nil
	}()
	// The answers fill the stream's budget; it must stop there.
	const slack = 1 << 10 // the one answer that crosses the limit
	waitFor(t, 30*time.Second, "the answers to fill the stream's budget", func() bool { return s.adm.inFlight.Load() >= limit/2 })
	got := 0
	for got < cancels {
		if held := s.adm.inFlight.Load(); held > limit+slack {
			t.Fatalf("after %d answers read, the node holds %d bytes of answers; the stream's budget is %d", got, held, limit)
		}
		resp, err := st.Recv()
		if err != nil {
			t.Fatalf("after %d answers: %v", got, err)
		}
		if !resp.GetCanceled() {
			t.Fatalf("answer %d: %v, want canceled", got, resp)
		}
		got++
	}
	if err := <-sendErr; err != nil {
		t.Fatal(err)
	}
}

// A panic serving a Watch request, which runs on the stream's receiving
// goroutine beyond the stream interceptor's reach, fails the stream with
// Internal and is counted; it does not take the node down.
func TestWatchRequestPanicIsRecovered(t *testing.T) {
	c := newTestCluster(t, 1, 1, nil)
	s := c.servers[0]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	waitFor(t, 10*time.Second, "a leader of shard 1", func() bool { return c.leaderOf(1) != nil })
	// A stream without its map of watches: adding the watch panics.
	ws := &watchStream{s: s, limit: 1 << 20, wake: make(chan struct{}, 1), room: make(chan struct{}, 1)}
	err := ws.serve(ctx, &kvpb.WatchRequest{Request: &kvpb.WatchRequest_Create{Create: &kvpb.WatchCreateRequest{WatchId: 1, Key: []byte("k")}}})
	if status.Code(err) != codes.Internal {
		t.Fatalf("a panicking watch create: %v, want Internal", err)
	}
	if v, ok := metricSum(scrape(t, s), `kvd_handler_panics_total{method="Watch"}`); !ok || v != 1 {
		t.Fatalf(`kvd_handler_panics_total{method="Watch"} = %v (found %v), want 1`, v, ok)
	}
}

// A create the node cannot serve is answered on the stream with the
// watch canceled and the status a unary call would get; keys longer than
// a key can be are refused, since a watch keeps them while it lives.
func TestWatchBadCreatesCanceled(t *testing.T) {
	c := newTestCluster(t, 1, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	waitFor(t, 10*time.Second, "a leader of shard 1", func() bool { return c.leaderOf(1) != nil })
	st := watchOn(t, ctx, c.servers[0])
	long := bytes.Repeat([]byte("k"), 4097)
	for i, tc := range []struct {
		c    *kvpb.WatchCreateRequest
		want string
	}{
		{&kvpb.WatchCreateRequest{Shard: 1, Key: long, Prefix: true}, "limit is 4096"},
		{&kvpb.WatchCreateRequest{Shard: 1, Key: []byte("a"), RangeEnd: long}, "limit is 4096"},
		{&kvpb.WatchCreateRequest{Shard: 1, Key: []byte("b"), RangeEnd: []byte("a")}, "is empty"},
		{&kvpb.WatchCreateRequest{Shard: 1, Key: []byte("a"), Prefix: true, RangeEnd: long}, "limit is 4096"},
	} {
		tc.c.WatchId = int64(i + 1)
		createWatch(t, st, tc.c)
		resp, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if !resp.GetCanceled() || resp.GetWatchId() != tc.c.WatchId || codes.Code(resp.GetError().GetCode()) != codes.InvalidArgument ||
			!strings.Contains(resp.GetError().GetMessage(), tc.want) {
			t.Fatalf("create %d: %v, want canceled with InvalidArgument saying %q", i+1, resp, tc.want)
		}
	}
}

// TestWatchResponsesKeepToMaxResponseBytes: no events response is larger
// than --max-response-bytes, the client's receive limit: a run of large
// puts goes over several, and a transaction whose events alone are larger
// is sent in fragments, each but the last marked, that add up to it.
func TestWatchResponsesKeepToMaxResponseBytes(t *testing.T) {
	const limit = 64 << 10
	c := newTestCluster(t, 1, 1, func(cfg *Config) { cfg.Limits.MaxResponseBytes = limit })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	kv := kvClient(t, c.servers[0])
	const keys = 6
	val := func(i, gen int) []byte { return bytes.Repeat([]byte{byte('a' + i + gen)}, 20<<10) }
	txn := &kvpb.TxnRequest{}
	for i := range keys {
		k := []byte(fmt.Sprint("f/", i))
		if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: k, Value: val(i, 0)}); err != nil {
			t.Fatal(err)
		}
		txn.Success = append(txn.Success, &kvpb.RequestOp{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: k, Value: val(i, 1)}}})
	}
	if _, err := kv.Txn(ctx, txn); err != nil {
		t.Fatal(err)
	}
	st := watchOn(t, ctx, c.servers[0])
	createWatch(t, st, &kvpb.WatchCreateRequest{WatchId: 1, Shard: 1, Key: []byte("f/"), Prefix: true, StartRevision: 1, PrevKv: true})
	var responses, fragments int
	evs := recvUntil(t, st, 1, func(r *kvpb.WatchResponse, evs []*kvpb.Event) bool {
		if len(r.GetEvents()) == 0 {
			return false
		}
		responses++
		if n := proto.Size(r); n > limit {
			t.Fatalf("a response of %d bytes, %d events; the limit is %d", n, len(r.GetEvents()), limit)
		}
		if r.GetFragment() {
			fragments++
			for _, ev := range r.GetEvents() {
				if ev.GetKv().GetModRevision() != r.GetHeader().GetRevision()+1 {
					t.Fatalf("a fragment through %d holds an event at %d", r.GetHeader().GetRevision(), ev.GetKv().GetModRevision())
				}
			}
		}
		return len(evs) >= 2*keys
	})
	if len(evs) != 2*keys {
		t.Fatalf("%d events, want %d", len(evs), 2*keys)
	}
	for i, ev := range evs {
		k, gen := i%keys, i/keys
		if string(ev.GetKv().GetKey()) != fmt.Sprint("f/", k) || !bytes.Equal(ev.GetKv().GetValue(), val(k, gen)) ||
			gen == 1 && !bytes.Equal(ev.GetPrevKv().GetValue(), val(k, 0)) {
			t.Fatalf("event %d: key %q, %d bytes", i, ev.GetKv().GetKey(), len(ev.GetKv().GetValue()))
		}
	}
	// Six puts of 20 KiB fit in two responses of 64 KiB at best, the
	// transaction's 240 KiB in four.
	if fragments < 3 || responses < 6 {
		t.Fatalf("%d responses, %d of them fragments; want at least 6 and 3", responses, fragments)
	}
}

package server

import (
	"bytes"
	"context"
	"encoding/binary"
	"math"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/fsm"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/storage"
)

func sessionHeader(session, seq uint64) *kvpb.RequestHeader {
	return &kvpb.RequestHeader{Session: session, Seq: seq}
}

// A Delete and a Txn reusing a Put's (session, seq) once made the leader
// dereference the recorded Put result as theirs and crash; the client's
// retry on the next leader crashed that one too. They are now refused as
// a reused seq, and the node goes on serving.
func TestSeqReusedByAnotherOperationIsRefused(t *testing.T) {
	c := newTestCluster(t, 3, 2, nil)
	leader, _ := leaderAndFollower(t, c)
	kv := kvClient(t, leader)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	key := keysIn(leader, 1, 1)[0]
	const session = 0x5eed
	if _, err := kv.Put(ctx, &kvpb.PutRequest{Header: sessionHeader(session, 1), Key: key, Value: []byte("v1")}); err != nil {
		t.Fatal(err)
	}
	_, err := kv.Delete(ctx, &kvpb.DeleteRequest{Header: sessionHeader(session, 1), Key: key})
	checkSeqReused(t, "delete", err)
	_, err = kv.Txn(ctx, &kvpb.TxnRequest{Header: sessionHeader(session, 1), Success: []*kvpb.RequestOp{put(string(key))}})
	checkSeqReused(t, "txn", err)
	// Batched, the same.
	answers := batchAnswers(t, leader, &kvpb.BatchRequestItem{Id: 1, Request: &kvpb.BatchRequestItem_Delete{Delete: &kvpb.DeleteRequest{Header: sessionHeader(session, 1), Key: key}}})
	checkSeqReused(t, "batched delete", answers[1].GetError().Err())

	// The node is alive, still leads, and serves the next write.
	if l := c.leaderOf(1); l != leader {
		t.Fatalf("leader of shard 1 changed from node %d", leader.cfg.NodeID)
	}
	if _, err := kv.Put(ctx, &kvpb.PutRequest{Header: sessionHeader(session, 2), Key: key, Value: []byte("v2")}); err != nil {
		t.Fatalf("next put: %v", err)
	}
}

// A different Put reusing (session, seq) was answered with the first
// write's result and never applied.
func TestSeqReusedByAnotherPutIsRefused(t *testing.T) {
	leader, _ := leaderAndFollower(t, newTestCluster(t, 3, 2, nil))
	kv := kvClient(t, leader)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	keys := keysIn(leader, 1, 2)
	first, err := kv.Put(ctx, &kvpb.PutRequest{Header: sessionHeader(7, 1), Key: keys[0], Value: []byte("first")})
	if err != nil {
		t.Fatal(err)
	}
	for name, req := range map[string]*kvpb.PutRequest{
		"other value": {Header: sessionHeader(7, 1), Key: keys[0], Value: []byte("second")},
		"other key":   {Header: sessionHeader(7, 1), Key: keys[1], Value: []byte("first")},
	} {
		_, err := kv.Put(ctx, req)
		checkSeqReused(t, name, err)
	}
	for i, want := range []string{"first", ""} {
		r, err := kv.Get(ctx, &kvpb.GetRequest{Key: keys[i]})
		if err != nil || string(r.GetKv().GetValue()) != want {
			t.Fatalf("%s = %q (%v), want %q", keys[i], r.GetKv().GetValue(), err, want)
		}
	}
	// A true retry still gets the first answer.
	again, err := kv.Put(ctx, &kvpb.PutRequest{Header: sessionHeader(7, 1), Key: keys[0], Value: []byte("first")})
	if err != nil || again.GetHeader().GetRevision() != first.GetHeader().GetRevision() {
		t.Fatalf("retry: %v (%v), want revision %d", again, err, first.GetHeader().GetRevision())
	}
}

func checkSeqReused(t *testing.T, what string, err error) {
	t.Helper()
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "reused for a different request") {
		t.Fatalf("%s reusing (session, seq): %v; want InvalidArgument saying the seq was reused", what, err)
	}
}

// batchAnswers sends items on one Batch stream and returns the answers by id.
func batchAnswers(t *testing.T, s *Server, items ...*kvpb.BatchRequestItem) map[uint64]*kvpb.BatchResponseItem {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stream, err := kvClient(t, s).Batch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&kvpb.BatchRequest{Items: items}); err != nil {
		t.Fatal(err)
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	got := map[uint64]*kvpb.BatchResponseItem{}
	for len(got) < len(items) {
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("batch: %v after %d answers", err, len(got))
		}
		for _, it := range resp.GetItems() {
			got[it.GetId()] = it
		}
	}
	return got
}

// slowTicks gives a test cluster of 1 MiB values 100 ms ticks: under the
// race detector on a loaded machine, appending them can outlast the
// 20 ms ticks' election timeout, and leaders would change mid-test.
func slowTicks(cfg *Config) { cfg.TickInterval = 100 * time.Millisecond }

// putLarge writes 1 MiB values under keys of shard 1. A put that meets a
// leader change (Unavailable: 1 MiB entries on a loaded machine can
// outlast the 20 ms ticks' election timeout) is put again: writing the
// same value twice is the same state.
func putLarge(ctx context.Context, t *testing.T, kv kvpb.KVClient, keys [][]byte) {
	t.Helper()
	big := bytes.Repeat([]byte("v"), 1<<20)
	for _, k := range keys {
		for {
			_, err := kv.Put(ctx, &kvpb.PutRequest{Key: k, Value: big})
			if err == nil {
				break
			}
			if status.Code(err) != codes.Unavailable || ctx.Err() != nil {
				t.Fatal(err)
			}
			time.Sleep(50 * time.Millisecond) // poll interval, bounded by ctx
		}
	}
}

func gets(keys [][]byte) []*kvpb.RequestOp {
	var ops []*kvpb.RequestOp
	for _, k := range keys {
		ops = append(ops, &kvpb.RequestOp{Op: &kvpb.RequestOp_Get{Get: &kvpb.GetRequest{Key: k}}})
	}
	return ops
}

// A transaction whose reads would exceed the response cap is refused
// before it changes anything.
func TestTxnOfLargeReadsIsRefused(t *testing.T) {
	leader, _ := leaderAndFollower(t, newTestCluster(t, 3, 2, slowTicks))
	kv := kvClient(t, leader)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	keys := keysIn(leader, 1, 6)
	putLarge(ctx, t, kv, keys[:5])
	before, err := kv.Get(ctx, &kvpb.GetRequest{Key: keys[0]})
	if err != nil {
		t.Fatal(err)
	}
	// 125 Gets of 1 MiB values: once built in full on every replica.
	var ops []*kvpb.RequestOp
	for range 25 {
		ops = append(ops, gets(keys[:5])...)
	}
	ops = append(ops, put(string(keys[5])))
	_, err = kv.Txn(ctx, &kvpb.TxnRequest{Header: sessionHeader(3, 1), Success: ops})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "transaction would return") || !strings.Contains(err.Error(), "read fewer or smaller keys") {
		t.Fatalf("txn of 125 MiB of reads: %v; want InvalidArgument naming the limit", err)
	}
	r, err := kv.Get(ctx, &kvpb.GetRequest{Key: keys[5]})
	if err != nil || r.GetKv() != nil {
		t.Fatalf("the refused txn's put applied: %v (%v)", r.GetKv(), err)
	}
	if rev := r.GetHeader().GetRevision(); rev != before.GetHeader().GetRevision() {
		t.Fatalf("the refused txn moved the revision from %d to %d", before.GetHeader().GetRevision(), rev)
	}
}

// The exactly-once record of a transaction that read megabytes stays
// small on every replica; a retry of it is told its reads were not kept,
// with Aborted, which clients do not retry.
func TestRecordedTxnResultsStaySmall(t *testing.T) {
	c := newTestCluster(t, 3, 2, slowTicks)
	leader, _ := leaderAndFollower(t, c)
	kv := kvClient(t, leader)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	keys := keysIn(leader, 1, 3)
	putLarge(ctx, t, kv, keys)
	const session = 11
	txn := &kvpb.TxnRequest{Header: sessionHeader(session, 1), Success: gets(keys)}
	first, err := kv.Txn(ctx, txn)
	if err != nil || len(first.GetResponses()) != 3 || len(first.GetResponses()[2].GetGet().GetKv().GetValue()) != 1<<20 {
		t.Fatalf("first attempt: %v", err)
	}
	rkey := binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64([]byte("r/"), session), 1)
	for _, s := range c.servers {
		var n int
		waitFor(t, 10*time.Second, "the record on every replica", func() bool {
			sh, err := s.engine.OpenShard(1)
			if err != nil {
				t.Fatal(err)
			}
			_ = sh.View(func(r *storage.Reader) error { n = len(r.GetMeta(rkey)); return nil })
			return n > 0
		})
		if n > fsm.MaxRecordedReadBytes {
			t.Fatalf("node %d keeps a %d-byte record for a 3 MiB read; want at most %d", s.cfg.NodeID, n, fsm.MaxRecordedReadBytes)
		}
	}
	_, err = kv.Txn(ctx, txn)
	want := "applied at revision " + strconv.FormatInt(first.GetHeader().GetRevision(), 10) + " (succeeded=true)"
	if status.Code(err) != codes.Aborted || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "read the keys again") {
		t.Fatalf("retry of a txn whose reads were dropped: %v; want Aborted saying %q", err, want)
	}
}

// A panic in a handler fails that request with Internal and is counted;
// the node keeps serving.
func TestHandlerPanicIsRecovered(t *testing.T) {
	c := newTestCluster(t, 1, 1, nil)
	s := c.servers[0]
	ctx := context.Background()
	boom := func(context.Context, any) (any, error) { panic("boom") }
	info := &grpc.UnaryServerInfo{FullMethod: "/kvd.kv.v1.KV/Put"}
	// As the server chains them: metrics around admission around recovery.
	_, err := s.metrics.interceptor(ctx, &kvpb.PutRequest{Key: []byte("k")}, info, func(ctx context.Context, req any) (any, error) {
		return s.adm.unary(ctx, req, info, func(ctx context.Context, req any) (any, error) {
			return s.recoverUnary(ctx, req, info, boom)
		})
	})
	if status.Code(err) != codes.Internal {
		t.Fatalf("unary panic: %v, want Internal", err)
	}
	if n := s.adm.inFlight.Load(); n != 0 {
		t.Fatalf("a recovered panic left %d bytes charged in flight", n)
	}
	err = s.recoverStream(nil, nil, &grpc.StreamServerInfo{FullMethod: "/kvd.kv.v1.KV/Batch"}, func(any, grpc.ServerStream) error { panic("boom") })
	if status.Code(err) != codes.Internal {
		t.Fatalf("stream panic: %v, want Internal", err)
	}
	// As Batch serves an item: admitted and observed inside the recovery.
	serve := s.recoverItems(func(_ context.Context, it *kvpb.BatchRequestItem) (*kvpb.BatchResponseItem, error) {
		_, err := s.metrics.observe(it.Method(), func() (any, error) {
			return s.adm.serve(requestCharge(it.Inner(), proto.Size), func() (any, error) { panic("boom") })
		})
		return nil, err
	})
	if _, err := serve(ctx, &kvpb.BatchRequestItem{Request: &kvpb.BatchRequestItem_Get{Get: &kvpb.GetRequest{Key: []byte("k")}}}); status.Code(err) != codes.Internal {
		t.Fatalf("batch item panic: %v, want Internal", err)
	}
	if n := s.adm.inFlight.Load(); n != 0 {
		t.Fatalf("a recovered batch item panic left %d bytes charged in flight", n)
	}
	text := scrape(t, s)
	for _, m := range []string{`kvd_handler_panics_total{method="Put"}`, `kvd_handler_panics_total{method="Batch"}`, `kvd_handler_panics_total{method="Batch/Get"}`} {
		if v, ok := metricSum(text, m); !ok || v != 1 {
			t.Errorf("%s = %v (found %v), want 1", m, v, ok)
		}
	}
	if _, err := kvClient(t, s).Put(ctx, &kvpb.PutRequest{Key: []byte("k"), Value: []byte("v")}); err != nil {
		t.Fatalf("put after recovered panics: %v", err)
	}
}

// Expiring more sessions than one command drops takes several commands,
// each bounded, and leaves none idle: a client may use a new session for
// every write.
func TestSessionExpiryInBoundedCommands(t *testing.T) {
	c := newTestCluster(t, 1, 1, nil)
	s := c.servers[0]
	kv := kvClient(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const sessions = 2*expireBatch + 500
	errs := make(chan error, 8)
	for w := range 8 {
		go func() {
			for i := w; i < sessions; i += 8 {
				if _, err := kv.Put(ctx, &kvpb.PutRequest{Header: sessionHeader(uint64(i+1), 1), Key: []byte("k"), Value: []byte("v")}); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	n := s.host.Node(1)
	sh, err := s.engine.OpenShard(1)
	if err != nil {
		t.Fatal(err)
	}
	before := n.Commit()
	if err := s.expireShardSessions(n, time.Now().Add(2*s.cfg.SessionTTL)); err != nil {
		t.Fatal(err)
	}
	if err := waitVisible(ctx, sh, n.Commit()); err != nil {
		t.Fatal(err)
	}
	var left bool
	if err := sh.View(func(r *storage.Reader) error { _, left = fsm.ExpiryCutoff(r, math.MaxInt64, 0); return nil }); err != nil {
		t.Fatal(err)
	}
	if left {
		t.Fatal("sessions left after expiring every idle one")
	}
	if rounds := n.Commit() - before; rounds < 3 {
		t.Fatalf("%d sessions expired in %d commands, want at least 3 of at most %d", sessions, rounds, expireBatch)
	}
}

package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/proto/kvpb"
)

// TestBatchNeverReadingClientIsBoundedAndCutOff: a client that sends Gets
// on a Batch stream and never reads the answers makes the node stop
// reading its stream once the stream holds its bound, instead of serving
// every request and queueing every answer; after BatchSendTimeout the
// stream ends with ResourceExhausted and what it held is released.
func TestBatchNeverReadingClientIsBoundedAndCutOff(t *testing.T) {
	c := newTestCluster(t, 1, 1, func(cfg *Config) {
		cfg.BatchSendTimeout = 500 * time.Millisecond
		cfg.Limits.MaxBatchStreamBytes = 1 << 20
	})
	s := c.servers[0]
	// A fixed, small receive window: what the node manages to Send stays
	// small too, so the items it receives measure what it held.
	conn, err := grpc.NewClient(s.ClientAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithStaticStreamWindowSize(64<<10), grpc.WithStaticConnWindowSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	kv := kvpb.NewKVClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const valueBytes = 16 << 10
	if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte("big"), Value: bytes.Repeat([]byte("v"), valueBytes)}); err != nil {
		t.Fatal(err)
	}
	stream, err := kv.Batch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// 5,000 Gets of 16 KiB: 80 MiB of answers if the node served them all.
	const messages, perMessage = 500, 10
	sendDone := make(chan error, 1)
	go func() {
		id := uint64(0)
		for range messages {
			req := &kvpb.BatchRequest{}
			for range perMessage {
				id++
				req.Items = append(req.Items, &kvpb.BatchRequestItem{Id: id, Request: &kvpb.BatchRequestItem_Get{
					Get: &kvpb.GetRequest{Key: []byte("big")}}})
			}
			if err := stream.Send(req); err != nil {
				sendDone <- err
				return
			}
		}
		sendDone <- nil
	}()
	waitFor(t, 10*time.Second, "the stream to be cut off", func() bool {
		return counterValue(s.metrics.batchCutOff) == 1
	})
	// Held: 1 MiB of answers (64), up to 128 items in service and their
	// answers, one message's overshoot, and what Send took (a 1 MiB
	// message and the 64 KiB window): about 400 at most.
	received := counterValue(s.metrics.batchItems)
	t.Logf("the node received %v of the %d items sent before it cut the stream off", received, messages*perMessage)
	if received > 1000 {
		t.Errorf("the node received %v of %d items from a client that reads nothing; want it to stop reading at its bound", received, messages*perMessage)
	}
	var last error
	for {
		if _, last = stream.Recv(); last != nil {
			break
		}
	}
	if status.Code(last) != codes.ResourceExhausted || !strings.Contains(last.Error(), "not reading its answers") {
		t.Errorf("stream ended with %v, want ResourceExhausted: client is not reading its answers", last)
	}
	cancel()
	<-sendDone
	waitFor(t, 10*time.Second, "the in-flight budget to be released", func() bool {
		return s.adm.inFlight.Load() == 0
	})
}

// TestBatchReadingClientIsServedInFull: the bounds only pace a stream;
// one that reads its answers gets all of them, more than the bound holds.
func TestBatchReadingClientIsServedInFull(t *testing.T) {
	c := newTestCluster(t, 1, 1, func(cfg *Config) { cfg.Limits.MaxBatchStreamBytes = 256 << 10 })
	kv := kvClient(t, c.servers[0])
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte("big"), Value: bytes.Repeat([]byte("v"), 16<<10)}); err != nil {
		t.Fatal(err)
	}
	stream, err := kv.Batch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	const n = 200 // 3.2 MiB of answers through a 256 KiB bound
	go func() {
		for i := range n {
			item := &kvpb.BatchRequestItem{Id: uint64(i + 1), Request: &kvpb.BatchRequestItem_Get{
				Get: &kvpb.GetRequest{Key: []byte("big")}}}
			if stream.Send(&kvpb.BatchRequest{Items: []*kvpb.BatchRequestItem{item}}) != nil {
				return
			}
		}
		_ = stream.CloseSend()
	}()
	seen := map[uint64]bool{}
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		for _, it := range resp.GetItems() {
			if it.GetError() != nil || len(it.GetGet().GetKv().GetValue()) != 16<<10 {
				t.Fatalf("item %d: %v", it.GetId(), it.GetError())
			}
			seen[it.GetId()] = true
		}
	}
	if len(seen) != n {
		t.Fatalf("got %d answers, want %d", len(seen), n)
	}
}

// TestRangePagesByBytes: a Range over large values stops at
// MaxResponseBytes with More set, long before its key limit, and always
// returns at least one kv; Scan pages through all of them.
func TestRangePagesByBytes(t *testing.T) {
	const maxResp = 256 << 10
	c := newTestCluster(t, 1, 1, func(cfg *Config) { cfg.Limits.MaxResponseBytes = maxResp })
	kv := kvClient(t, c.servers[0])
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	put := func(k string, n int) {
		t.Helper()
		if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte(k), Value: bytes.Repeat([]byte("v"), n)}); err != nil {
			t.Fatal(err)
		}
	}
	const keys = 20
	for i := range keys {
		put(fmt.Sprintf("r/%02d", i), 60<<10)
	}
	put("s/huge", 400<<10) // alone over the cap

	var got []string
	start := []byte("r/")
	for pages := 0; ; pages++ {
		if pages > keys {
			t.Fatalf("no end after %d pages", pages)
		}
		resp, err := kv.Range(ctx, &kvpb.RangeRequest{Shard: 1, Start: start, End: []byte("r0"), Limit: 1000})
		if err != nil {
			t.Fatal(err)
		}
		if sz := proto.Size(resp); sz > maxResp {
			t.Fatalf("page of %d kvs is %d bytes; the cap is %d", len(resp.GetKvs()), sz, maxResp)
		}
		if len(resp.GetKvs()) == 0 {
			t.Fatalf("empty page (more=%v)", resp.GetMore())
		}
		for _, kv := range resp.GetKvs() {
			got = append(got, string(kv.GetKey()))
		}
		if !resp.GetMore() {
			break
		}
		if len(resp.GetKvs()) > 4 {
			t.Fatalf("page of %d kvs of 60 KiB; want at most 4 under %d bytes", len(resp.GetKvs()), maxResp)
		}
		start = append(bytes.Clone(resp.GetKvs()[len(resp.GetKvs())-1].GetKey()), 0)
	}
	if len(got) != keys {
		t.Fatalf("paged through %d keys, want %d: %v", len(got), keys, got)
	}

	resp, err := kv.Range(ctx, &kvpb.RangeRequest{Shard: 1, Start: []byte("r/19"), End: []byte("t")})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetKvs()) != 1 || !resp.GetMore() {
		t.Fatalf("range before a value over the cap: %d kvs, more=%v; want the first alone, more set", len(resp.GetKvs()), resp.GetMore())
	}
	resp, err = kv.Range(ctx, &kvpb.RangeRequest{Shard: 1, Start: []byte("s/"), End: []byte("t")})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetKvs()) != 1 || resp.GetMore() {
		t.Fatalf("range over a value over the cap: %d kvs, more=%v; want it alone, no more", len(resp.GetKvs()), resp.GetMore())
	}

	// The client's Scan pages on More with fewer kvs than it asked for.
	cl := c.client()
	var scanned []string
	tok := ""
	for {
		page, err := cl.Scan(ctx, []byte("r/"), []byte("r0"), client.ScanOptions{Limit: 15, Token: tok})
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range page.KVs {
			scanned = append(scanned, string(kv.GetKey()))
		}
		if tok = page.Next; tok == "" {
			break
		}
	}
	if fmt.Sprint(scanned) != fmt.Sprint(got) {
		t.Fatalf("scan: %v, want %v", scanned, got)
	}
}

// TestAdmissionKeepsRoomForSmallRequests: large requests fill at most
// three quarters of the budget; small ones still get in.
func TestAdmissionKeepsRoomForSmallRequests(t *testing.T) {
	a := newAdmission(8 << 20)
	large := int64(100 << 10)
	n := 0
	for a.acquire(large) {
		n++
	}
	if got := a.inFlight.Load(); got > 6<<20 {
		t.Fatalf("large requests took %d bytes of an 8 MiB budget; want at most 6 MiB", got)
	}
	for i := range 400 {
		if !a.acquire(5 << 10) {
			t.Fatalf("small request %d refused with %d of %d bytes in flight", i, a.inFlight.Load(), a.limit)
		}
	}
	a.hold(4 << 20) // answers waiting to be sent
	if a.acquire(large) {
		t.Fatal("large request admitted over the budget")
	}
}

// TestSmallReadsServedDuringLargeWriteFlood: while clients flood a node
// with large puts, more than its in-flight budget holds, and some are
// refused with ResourceExhausted, every small linearizable get is served.
func TestSmallReadsServedDuringLargeWriteFlood(t *testing.T) {
	c := newTestCluster(t, 1, 1, func(cfg *Config) { cfg.Limits.MaxInFlightBytes = 1 << 20 })
	kv := kvClient(t, c.servers[0])
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte("small"), Value: []byte("v")}); err != nil {
		t.Fatal(err)
	}
	var (
		refused, served atomic.Int64
		wg              sync.WaitGroup
		stop            = make(chan struct{})
	)
	for w := range 32 {
		wg.Go(func() {
			for i := 0; i < 100; i++ {
				select {
				case <-stop:
					return
				default:
				}
				// 66 to 130 KiB: each over the small class, in sizes
				// that leave any gap in the budget.
				n := 66<<10 + (w*7919+i*104729)%(64<<10)
				_, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte(fmt.Sprintf("w/%d", w)), Value: make([]byte, n)})
				switch status.Code(err) {
				case codes.OK:
					served.Add(1)
				case codes.ResourceExhausted:
					refused.Add(1)
				default:
					t.Errorf("put: %v", err)
					return
				}
			}
		})
	}
	var once sync.Once
	stopFlood := func() { once.Do(func() { close(stop); wg.Wait() }) }
	defer stopFlood()
	waitFor(t, 20*time.Second, "large puts to be refused", func() bool { return refused.Load() > 0 })
	failed := 0
	var firstErr error
	const gets = 300
	for range gets {
		gctx, gcancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := kv.Get(gctx, &kvpb.GetRequest{Key: []byte("small")})
		gcancel()
		if err != nil {
			failed++
			if firstErr == nil {
				firstErr = err
			}
		}
	}
	stopFlood()
	if failed > 0 {
		t.Fatalf("%d of %d small gets failed during the flood (first: %v); puts served %d, refused %d",
			failed, gets, firstErr, served.Load(), refused.Load())
	}
	t.Logf("puts served %d, refused %d; %d small gets all served", served.Load(), refused.Load(), gets)
}

func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		return -1
	}
	return m.GetCounter().GetValue()
}

// TestClientConnsCappedAndIdleClosed: connections beyond MaxClientConns
// are closed on accept, an idle connection is closed after
// ClientConnIdle, and the kvd client, which health-checks its
// connections, keeps the ones it has.
func TestClientConnsCappedAndIdleClosed(t *testing.T) {
	c := newTestCluster(t, 1, 1, func(cfg *Config) {
		cfg.Limits.MaxClientConns = 3
		cfg.ClientConnIdle = time.Second
	})
	s := c.servers[0]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	cl := c.client()
	if _, err := cl.Put(ctx, []byte("k"), []byte("v")); err != nil {
		t.Fatal(err)
	}
	kept := s.conns.accepted.Load()

	// Raw connections: two fit beside the client's, the third does not.
	var raw []*grpc.ClientConn
	for range 3 {
		conn, err := grpc.NewClient(s.ClientAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		raw = append(raw, conn)
	}
	for i, conn := range raw[:2] {
		if _, err := kvpb.NewKVClient(conn).Get(ctx, &kvpb.GetRequest{Key: []byte("k")}); err != nil {
			t.Fatalf("connection %d under the cap: %v", i+1, err)
		}
	}
	gctx, gcancel := context.WithTimeout(ctx, time.Second)
	_, err := kvpb.NewKVClient(raw[2]).Get(gctx, &kvpb.GetRequest{Key: []byte("k")}, grpc.WaitForReady(false))
	gcancel()
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("connection over the cap: got %v, want Unavailable", err)
	}
	if counterValue(s.conns.refused) == 0 {
		t.Fatal("no connection counted as refused")
	}
	raw[2].Close() // or it redials once there is room

	// The raw connections go idle and are closed; the client's stay.
	waitFor(t, 10*time.Second, "idle connections to be closed", func() bool { return s.conns.open.Load() <= 1 })
	if _, err := cl.Get(ctx, []byte("k")); err != nil {
		t.Fatal(err)
	}
	if got := s.conns.accepted.Load(); got != kept+2 {
		t.Fatalf("%d connections accepted; want the client's %d and the two raw ones: the client's connection was replaced", got, kept+2)
	}
}

// TestRangePageOfManySmallKvsFitsTheCap: a page of thousands of small kvs,
// where each kv's field tag adds up to more than the page keeps for its
// header, still stays within MaxResponseBytes.
func TestRangePageOfManySmallKvsFitsTheCap(t *testing.T) {
	const maxResp = 32 << 10
	c := newTestCluster(t, 1, 1, func(cfg *Config) { cfg.Limits.MaxResponseBytes = maxResp })
	kv := kvClient(t, c.servers[0])
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const keys, perTxn = 3000, 100
	for i := 0; i < keys; i += perTxn {
		txn := &kvpb.TxnRequest{}
		for j := i; j < i+perTxn; j++ {
			txn.Success = append(txn.Success, &kvpb.RequestOp{Op: &kvpb.RequestOp_Put{
				Put: &kvpb.PutRequest{Key: []byte(fmt.Sprintf("m/%04d", j)), Value: []byte("v")}}})
		}
		if _, err := kv.Txn(ctx, txn); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := kv.Range(ctx, &kvpb.RangeRequest{Shard: 1, Start: []byte("m/"), End: []byte("m0"), Limit: keys})
	if err != nil {
		t.Fatal(err)
	}
	if !resp.GetMore() || len(resp.GetKvs()) < 1024 {
		t.Fatalf("page of %d kvs, more=%v; want over 1024 kvs, cut by bytes", len(resp.GetKvs()), resp.GetMore())
	}
	if sz := proto.Size(resp); sz > maxResp {
		t.Fatalf("page of %d kvs is %d bytes; the cap is %d", len(resp.GetKvs()), sz, maxResp)
	}
}

// TestReadAnswersAreChargedUntilSent: a unary read's answer counts against
// the in-flight budget from when it is computed until gRPC has written it.
// A client that asks for a large Range page and does not read it keeps the
// page charged, so the next large answer is refused with
// ResourceExhausted while small reads are still served; once the first
// client reads, the charge is released and the same Range succeeds.
func TestReadAnswersAreChargedUntilSent(t *testing.T) {
	const budget = 4 << 20 // large answers may fill 3 MiB of it
	c := newTestCluster(t, 1, 1, func(cfg *Config) { cfg.Limits.MaxInFlightBytes = budget })
	s := c.servers[0]
	kv := kvClient(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := range 3 {
		if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte(fmt.Sprintf("big/%d", i)), Value: bytes.Repeat([]byte("v"), 900<<10)}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte("small"), Value: []byte("v")}); err != nil {
		t.Fatal(err)
	}
	page := &kvpb.RangeRequest{Shard: 1, Start: []byte("big/"), End: []byte("big0")}

	// The stalled reader: a connection whose receive window stays at
	// 64 KiB, and a Range call whose answer it never reads.
	conn := fixedWindowConn(t, s)
	stalled, err := conn.NewStream(ctx, &grpc.StreamDesc{StreamName: "Range"}, "/"+kvpb.KV_ServiceDesc.ServiceName+"/Range")
	if err != nil {
		t.Fatal(err)
	}
	if err := stalled.SendMsg(page); err != nil {
		t.Fatal(err)
	}
	if err := stalled.CloseSend(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the unread page to be charged", func() bool { return s.adm.inFlight.Load() >= 2700<<10 })

	_, err = kv.Range(ctx, page)
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "answer of") {
		t.Fatalf("second large Range while the first is unread: %v, want ResourceExhausted for its answer", err)
	}
	if _, err := kv.Get(ctx, &kvpb.GetRequest{Key: []byte("small")}); err != nil {
		t.Fatalf("small get while a large answer is unread: %v", err)
	}

	var got kvpb.RangeResponse
	if err := stalled.RecvMsg(&got); err != nil {
		t.Fatal(err)
	}
	if len(got.GetKvs()) != 3 {
		t.Fatalf("stalled Range read %d kvs, want 3", len(got.GetKvs()))
	}
	waitFor(t, 10*time.Second, "the read page's charge to be released", func() bool { return s.adm.inFlight.Load() == 0 })
	resp, err := kv.Range(ctx, page)
	if err != nil || len(resp.GetKvs()) != 3 {
		t.Fatalf("Range after the first was read: %d kvs, %v", len(resp.GetKvs()), err)
	}
	if v := counterValue(s.adm.refused.WithLabelValues("answer")); v != 1 {
		t.Errorf("kvd_admission_refused_total{class=answer} = %v, want 1", v)
	}
}

// TestUnreadUnaryAnswersAreBoundedAndCutOff: a client that sends Range
// after Range of megabytes on one connection and reads nothing makes the
// node hold at most its in-flight budget of answers (the rest are
// refused), and once nothing has been written to the connection for
// BatchSendTimeout the node closes it and releases them. Before answers
// were charged until sent, 200 such calls held 760 MiB.
func TestUnreadUnaryAnswersAreBoundedAndCutOff(t *testing.T) {
	const budget = 8 << 20
	c := newTestCluster(t, 1, 1, func(cfg *Config) {
		cfg.Limits.MaxInFlightBytes = budget
		cfg.BatchSendTimeout = time.Second
	})
	s := c.servers[0]
	kv := kvClient(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := range 3 {
		if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte(fmt.Sprintf("big/%d", i)), Value: bytes.Repeat([]byte("v"), 900<<10)}); err != nil {
			t.Fatal(err)
		}
	}
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)

	conn := fixedWindowConn(t, s)
	const calls = 50
	var streams []grpc.ClientStream
	for range calls {
		st, err := conn.NewStream(ctx, &grpc.StreamDesc{StreamName: "Range"}, "/"+kvpb.KV_ServiceDesc.ServiceName+"/Range")
		if err != nil {
			t.Fatal(err)
		}
		if err := st.SendMsg(&kvpb.RangeRequest{Shard: 1, Start: []byte("big/"), End: []byte("big0")}); err != nil {
			t.Fatal(err)
		}
		streams = append(streams, st)
	}
	waitFor(t, 20*time.Second, "every Range to be answered or refused", func() bool {
		v, _ := metricSum(scrape(t, s), `kvd_requests_total{code="OK",method="Range"}`)
		r, _ := metricSum(scrape(t, s), `kvd_requests_total{code="ResourceExhausted",method="Range"}`)
		return v+r == calls
	})
	if n := s.adm.inFlight.Load(); n > budget {
		t.Fatalf("%d bytes charged in flight; the budget is %d", n, budget)
	}
	if v := counterValue(s.adm.refused.WithLabelValues("answer")); v == 0 {
		t.Fatal("no answer refused: the node took every unread page")
	}
	runtime.GC()
	var during runtime.MemStats
	runtime.ReadMemStats(&during)
	if grew := int64(during.HeapInuse) - int64(before.HeapInuse); grew > 3*budget {
		t.Fatalf("heap grew by %d MiB holding unread answers; the budget is %d MiB", grew>>20, budget>>20)
	}

	waitFor(t, 20*time.Second, "the stalled connection to be cut off", func() bool {
		return counterValue(s.conns.cutOff) == 1 && s.adm.inFlight.Load() == 0
	})
	// Each call was refused, or lost with the connection.
	codesSeen := map[codes.Code]int{}
	for _, st := range streams {
		var resp kvpb.RangeResponse
		codesSeen[status.Code(st.RecvMsg(&resp))]++
	}
	if codesSeen[codes.Unavailable] == 0 || codesSeen[codes.Unavailable]+codesSeen[codes.ResourceExhausted] != calls {
		t.Fatalf("reads on the cut-off connection ended with %v; want Unavailable (cut off) or ResourceExhausted (refused)", codesSeen)
	}
	if resp, err := kv.Range(ctx, &kvpb.RangeRequest{Shard: 1, Start: []byte("big/"), End: []byte("big0")}); err != nil || len(resp.GetKvs()) != 3 {
		t.Fatalf("Range on another connection after the cut-off: %d kvs, %v", len(resp.GetKvs()), err)
	}
}

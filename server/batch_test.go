package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/kvpb"
)

// TestFittingCutsAtOneMessage: answers are packed up to
// maxBatchResponseBytes, and every message carries at least one.
func TestFittingCutsAtOneMessage(t *testing.T) {
	answer := func(n int) reply {
		it := &kvpb.BatchResponseItem{Response: &kvpb.BatchResponseItem_Get{Get: &kvpb.GetResponse{Kv: &kvpb.KeyValue{Value: bytes.Repeat([]byte("v"), n)}}}}
		return reply{it: it, size: proto.Size(it)}
	}
	big := 600 << 10
	for _, tc := range []struct {
		name  string
		items []reply
		want  int
	}{
		{"one answer over the limit goes alone", []reply{answer(2 << 20)}, 1},
		{"small answers share a message", []reply{answer(10), answer(10), answer(10)}, 3},
		{"the answer that crosses the limit opens the next message", []reply{answer(big), answer(big), answer(10)}, 1},
		{"up to the limit", []reply{answer(10), answer(big), answer(big)}, 2},
	} {
		if got := fitting(tc.items); got != tc.want {
			t.Errorf("%s: fitting = %d, want %d", tc.name, got, tc.want)
		}
	}
}

// serveKV serves srv's KV service on a loopback port and returns a
// connection to it; both end with the test.
func serveKV(t *testing.T, srv kvpb.KVServer, opts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	kvpb.RegisterKVServer(gs, srv)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// batchOnly serves Batch with serveBatch; gets of "slow" wait for
// the stream to end, other gets answer a 64 KiB value at once.
type batchOnly struct {
	kvpb.UnimplementedKVServer
	opts batchOptions
	done chan error // what each Batch handler returned
}

func (b batchOnly) Batch(stream kvpb.KV_BatchServer) error {
	err := serveBatch(stream, b.opts, func(ctx context.Context, it *kvpb.BatchRequestItem) (*kvpb.BatchResponseItem, error) {
		if string(it.GetGet().GetKey()) == "slow" {
			<-ctx.Done()
			return nil, ctx.Err()
		}
		return &kvpb.BatchResponseItem{Response: &kvpb.BatchResponseItem_Get{Get: &kvpb.GetResponse{Kv: &kvpb.KeyValue{Value: make([]byte, 64<<10)}}}}, nil
	})
	b.done <- err
	return err
}

// TestServeBatchCutsOffAClientNotReading: a client that sends and never
// reads makes serveBatch stop receiving at its bound, and once Send
// has been blocked for SendTimeout the handler returns errNotReading,
// with every goroutine it started (item, receiver, sender) ended soon
// after and every byte charged released.
func TestServeBatchCutsOffAClientNotReading(t *testing.T) {
	var charged atomic.Int64
	srv := batchOnly{done: make(chan error, 4), opts: batchOptions{
		MaxHeldBytes: 256 << 10,
		SendTimeout:  200 * time.Millisecond,
		Charge:       func(_ *kvpb.BatchRequestItem, n int64) bool { charged.Add(n); return true },
		Release:      func(n int64) { charged.Add(-n) },
	}}
	conn := serveKV(t, srv, grpc.WithStaticStreamWindowSize(64<<10), grpc.WithStaticConnWindowSize(64<<10))
	kv := kvpb.NewKVClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	// A well-behaved stream first: the connection and its goroutines
	// are then part of the baseline.
	s, err := kv.Batch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("empty stream: %v", err)
	}
	if err := <-srv.done; err != nil {
		t.Fatal(err)
	}
	baseline := runtime.NumGoroutine()

	sctx, scancel := context.WithCancel(ctx)
	defer scancel()
	s, err = kv.Batch(sctx)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for i := uint64(1); i <= 2000; i++ {
			key := "fast"
			if i%50 == 0 {
				key = "slow"
			}
			item := &kvpb.BatchRequestItem{Id: i, Request: &kvpb.BatchRequestItem_Get{Get: &kvpb.GetRequest{Key: []byte(key)}}}
			if s.Send(&kvpb.BatchRequest{Items: []*kvpb.BatchRequestItem{item}}) != nil {
				return
			}
		}
	}()
	select {
	case err := <-srv.done:
		if !errors.Is(err, errNotReading) {
			t.Fatalf("handler returned %v, want errNotReading", err)
		}
	case <-ctx.Done():
		t.Fatal("the stream of a client not reading was never cut off")
	}
	// The server's side is done. gRPC keeps a goroutine on the client's
	// side until the client reads the stream's status or cancels it, and
	// this client reads nothing: cancel it, as its owner would, so that
	// what is left to count is the server's.
	scancel()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > baseline || charged.Load() != 0 {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines, %d before the stream; %d bytes still charged\n%s",
				runtime.NumGoroutine(), baseline, charged.Load(), buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond) // poll interval, not synchronisation
	}
}

// A stream whose items are refused with ResourceExhausted waits longer
// before each next Recv, up to a bound, and an item served ends the wait.
func TestBatchPauseAfterRefusals(t *testing.T) {
	b := &batchServer{}
	refused := &kvpb.BatchResponseItem{Error: kvpb.StatusOf(status.Error(codes.ResourceExhausted, "full"))}
	invalid := &kvpb.BatchResponseItem{Error: kvpb.StatusOf(status.Error(codes.InvalidArgument, "bad"))}
	want := []time.Duration{minRefusedPause, 2 * minRefusedPause, 4 * minRefusedPause}
	for i, w := range want {
		b.throttle(refused)
		if b.mu.pause != w {
			t.Fatalf("after %d refusals the pause is %v, want %v", i+1, b.mu.pause, w)
		}
	}
	b.throttle(invalid)
	if b.mu.pause != want[len(want)-1] {
		t.Fatalf("an InvalidArgument answer moved the pause to %v", b.mu.pause)
	}
	for range 20 {
		b.throttle(refused)
	}
	if b.mu.pause != maxRefusedPause {
		t.Fatalf("pause after many refusals is %v, want the bound %v", b.mu.pause, maxRefusedPause)
	}
	b.throttle(&kvpb.BatchResponseItem{})
	if b.mu.pause != 0 {
		t.Fatalf("an item served left a pause of %v", b.mu.pause)
	}
	ctx, cancel := context.WithCancel(context.Background())
	b.throttle(refused)
	cancel()
	if err := b.waitPause(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("waitPause on a cancelled stream: %v, want context.Canceled", err)
	}
}

// gatedBatch serves Batch with serveBatch; every item waits for open to
// close, and inFlight and maxInFlight count the items being served.
type gatedBatch struct {
	kvpb.UnimplementedKVServer
	open                  chan struct{}
	inFlight, maxInFlight atomic.Int64
}

func (g *gatedBatch) Batch(stream kvpb.KV_BatchServer) error {
	return serveBatch(stream, batchOptions{}, func(ctx context.Context, it *kvpb.BatchRequestItem) (*kvpb.BatchResponseItem, error) {
		n := g.inFlight.Add(1)
		defer g.inFlight.Add(-1)
		for m := g.maxInFlight.Load(); n > m && !g.maxInFlight.CompareAndSwap(m, n); m = g.maxInFlight.Load() {
		}
		select {
		case <-g.open:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return &kvpb.BatchResponseItem{Response: &kvpb.BatchResponseItem_Get{Get: &kvpb.GetResponse{}}}, nil
	})
}

// One message may carry any number of items, yet the stream starts them
// only as its bounds allow: a single message of 20,000 items is served
// at most the slow start's few at a time, not with 20,000 goroutines.
func TestOneMessageOfManyItemsStaysWithinBounds(t *testing.T) {
	srv := &gatedBatch{open: make(chan struct{})}
	conn := serveKV(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := kvpb.NewKVClient(conn).Batch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	const items = 20000
	req := &kvpb.BatchRequest{}
	for i := uint64(1); i <= items; i++ {
		req.Items = append(req.Items, &kvpb.BatchRequestItem{Id: i, Request: &kvpb.BatchRequestItem_Get{Get: &kvpb.GetRequest{Key: []byte("k")}}})
	}
	if err := s.Send(req); err != nil {
		t.Fatal(err)
	}
	if err := s.CloseSend(); err != nil {
		t.Fatal(err)
	}
	// Until answers are seen the stream serves batchSlowStart at once.
	waitFor(t, 10*time.Second, fmt.Sprint(batchSlowStart, " items in flight"), func() bool { return srv.inFlight.Load() >= batchSlowStart })
	close(srv.open)
	got := 0
	for {
		resp, err := s.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("after %d answers: %v", got, err)
		}
		got += len(resp.GetItems())
	}
	if got != items {
		t.Fatalf("%d answers, want %d", got, items)
	}
	if m := srv.maxInFlight.Load(); m > defaultBatchServing {
		t.Fatalf("%d items served at once, want at most %d", m, defaultBatchServing)
	}
}

// A Batch message is charged to the node-wide budget, at what decoding it
// took, while its items wait to start: one whose decoded items the budget
// has no room for ends the stream with ResourceExhausted at once, rather
// than sit in memory while its items trickle out, and smaller ones on
// other streams are served.
func TestBatchMessageChargedAsDecoded(t *testing.T) {
	c := newTestCluster(t, 1, 1, func(cfg *Config) { cfg.Limits.MaxInFlightBytes = 1 << 20 })
	s := c.servers[0]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	kv := kvClient(t, s)
	st, err := kv.Batch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// 100,000 empty items: 200 KB on the wire, about 9 MiB decoded.
	req := &kvpb.BatchRequest{Items: make([]*kvpb.BatchRequestItem, 100000)}
	for i := range req.Items {
		req.Items[i] = &kvpb.BatchRequestItem{}
	}
	if err := st.Send(req); err != nil {
		t.Fatal(err)
	}
	for {
		_, err := st.Recv()
		if err == nil {
			continue
		}
		if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "batch message") {
			t.Fatalf("a message of 100,000 items on a 1 MiB budget: %v, want ResourceExhausted for the message", err)
		}
		break
	}
	answers := batchAnswers(t, s, &kvpb.BatchRequestItem{Id: 1, Request: &kvpb.BatchRequestItem_Put{Put: &kvpb.PutRequest{Key: []byte("k"), Value: []byte("v")}}})
	if len(answers) != 1 || answers[1].GetError() != nil {
		t.Fatalf("a one-item message after: %v", answers)
	}
	waitFor(t, 10*time.Second, "the budget released", func() bool { return s.adm.inFlight.Load() == 0 })
}

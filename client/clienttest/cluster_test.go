package clienttest

import (
	"context"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/proto/kvpb"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestProxyFaultsOnARealNode drives one real node through its proxy with
// a plain gRPC client: each fault does what it says, the node behind it
// keeps its data across a stop and start.
func TestProxyFaultsOnARealNode(t *testing.T) {
	c, err := New(1, 1, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	n := c.Node(1)
	cc, err := grpc.NewClient(n.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	kv := kvpb.NewKVClient(cc)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	code := func(err error) codes.Code { return status.Code(err) }
	get := func() (*kvpb.GetResponse, error) { return kv.Get(ctx, &kvpb.GetRequest{Key: []byte("k")}) }

	h := &kvpb.RequestHeader{Session: 7, Seq: 1}
	if _, err := kv.Put(ctx, &kvpb.PutRequest{Header: h, Key: []byte("k"), Value: []byte("1")}); err != nil {
		t.Fatal(err)
	}
	if n.Calls("Put") != 1 || len(n.WriteHeaders()) != 1 || n.WriteHeaders()[0].GetSeq() != 1 {
		t.Fatalf("calls %d, headers %v", n.Calls("Put"), n.WriteHeaders())
	}

	n.FailNext(2)
	for i := range 2 {
		if _, err := get(); code(err) != codes.Unavailable {
			t.Fatalf("get %d with FailNext(2): %v, want Unavailable", i, err)
		}
	}
	if r, err := get(); err != nil || string(r.GetKv().GetValue()) != "1" {
		t.Fatalf("get after the failures: %v, %v", r, err)
	}

	n.Delay(100 * time.Millisecond)
	start := time.Now()
	if _, err := get(); err != nil || time.Since(start) < 100*time.Millisecond {
		t.Fatalf("delayed get: %v after %v", err, time.Since(start))
	}
	n.Delay(0)

	n.SetMode(Down)
	if _, err := get(); code(err) != codes.Unavailable {
		t.Fatalf("get from a down node: %v", err)
	}
	if _, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{}); code(err) != codes.Unavailable {
		t.Fatalf("health of a down node: %v", err)
	}
	n.SetMode(Up)

	n.FailAfterApply(1)
	if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte("k"), Value: []byte("2")}); code(err) != codes.Unavailable {
		t.Fatalf("put with FailAfterApply: %v", err)
	}
	if r, err := get(); err != nil || string(r.GetKv().GetValue()) != "2" {
		t.Fatalf("the put that failed after apply was not applied: %v, %v", r, err)
	}

	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := get(); code(err) != codes.Unavailable {
		t.Fatalf("get from a stopped node: %v", err)
	}
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitReady(); err != nil {
		t.Fatal(err)
	}
	if r, err := get(); err != nil || string(r.GetKv().GetValue()) != "2" || r.GetKv().GetVersion() != 2 {
		t.Fatalf("get after a restart: %v, %v", r, err)
	}
}

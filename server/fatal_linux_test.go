package server

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/internal/testkit"
	"github.com/kvd/kvd/proto/kvpb"
)

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// A node whose engine failed stops serving: health says NOT_SERVING,
// /healthz and /readyz 503 with the reason, and reads of keys it
// acknowledged are refused with Unavailable rather than answered from a
// state that may have lost them.
func TestFailedEngineStopsServing(t *testing.T) {
	c := newTestCluster(t, 1, 2, nil)
	s := c.servers[0]
	var leader *Server
	waitFor(t, 10*time.Second, "a leader of shard 1", func() bool { leader = c.leaderOf(1); return leader != nil })
	kv := kvClient(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	keys := keysIn(s, 1, 2)
	if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: keys[0], Value: []byte("v")}); err != nil {
		t.Fatal(err)
	}
	if code, _ := httpGet(t, "http://"+s.MetricsAddr()+"/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz before the failure = %d", code)
	}

	// A Batch stream opened, and used, before the failure.
	early, err := kv.Batch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	getItem := func(id uint64) *kvpb.BatchRequest {
		return &kvpb.BatchRequest{Items: []*kvpb.BatchRequestItem{{Id: id, Request: &kvpb.BatchRequestItem_Get{
			Get: &kvpb.GetRequest{Key: keys[0]}}}}}
	}
	if err := early.Send(getItem(1)); err != nil {
		t.Fatal(err)
	}
	if _, err := early.Recv(); err != nil {
		t.Fatalf("Batch before the failure: %v", err)
	}

	testkit.BreakWAL(t, c.cfgs[0].DataDir)
	if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: keys[1], Value: []byte("v")}); err == nil {
		t.Fatal("Put on a node whose WAL cannot sync succeeded")
	}
	var fatal error
	select {
	case fatal = <-s.Fatal():
	case <-ctx.Done():
		t.Fatal("the node did not turn fatal after its engine failed")
	}
	if !strings.Contains(fatal.Error(), "engine failed") || !strings.Contains(fatal.Error(), "must be restarted") {
		t.Fatalf("fatal error %q does not say the engine failed and the node must restart", fatal)
	}

	conn, err := grpc.NewClient(s.ClientAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hr, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || hr.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("health = %v, %v; want NOT_SERVING", hr, err)
	}
	for _, path := range []string{"/healthz", "/readyz"} {
		code, body := httpGet(t, "http://"+s.MetricsAddr()+path)
		if code != http.StatusServiceUnavailable || !strings.Contains(body, "engine failed") {
			t.Fatalf("%s = %d %q, want 503 with the reason", path, code, body)
		}
	}
	for _, cons := range []kvpb.Consistency{kvpb.Consistency_SERIALIZABLE, kvpb.Consistency_LINEARIZABLE} {
		_, err := kv.Get(ctx, &kvpb.GetRequest{Key: keys[0], Consistency: cons})
		if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "node 1 failed") || !strings.Contains(err.Error(), "must be restarted") {
			t.Fatalf("%v Get on a failed node = %v, want Unavailable naming the failure", cons, err)
		}
	}
	if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: keys[0], Value: []byte("w")}); status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "node 1 failed") {
		t.Fatalf("Put on a failed node = %v, want Unavailable naming the failure", err)
	}
	// A Batch stream is refused too.
	bs, err := kv.Batch(ctx)
	if err == nil {
		_, err = bs.Recv()
	}
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "node 1 failed") {
		t.Fatalf("Batch on a failed node = %v, want Unavailable naming the failure", err)
	}
	// The stream opened before the failure is ended at its next request,
	// without an answer.
	_ = early.Send(getItem(2)) // may fail with io.EOF once the server ended it
	if resp, err := early.Recv(); status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "node 1 failed") {
		t.Fatalf("Batch stream opened before the failure answered %v, %v; want Unavailable naming the failure", resp, err)
	}
}

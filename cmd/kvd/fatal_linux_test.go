package main

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/internal/testkit"
	"github.com/kvd/kvd/proto/kvpb"
)

// A node whose engine fails exits on its own, non-zero, with the reason
// in one line.
func TestFailedEngineExitsWithReason(t *testing.T) {
	dir, err := filepath.Abs(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	client := freePort(t)
	args := []string{"--data-dir", dir, "--listen-client", client, "--listen-peer", freePort(t), "--listen-metrics", "", "--shards", "1"}
	stop := make(chan struct{})
	defer close(stop)
	var out proccluster.SyncBuffer
	done := make(chan int, 1)
	go func() { done <- run(args, &out, &out, stop) }()

	conn, err := grpc.NewClient(client, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	kv := kvpb.NewKVClient(conn)
	put := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte("k"), Value: []byte("v")})
		return err
	}
	proccluster.WaitFor(t, 20*time.Second, "a first put", func() bool { return put() == nil })
	testkit.BreakWAL(t, dir)
	_ = put() // fails: its WAL sync does

	select {
	case code := <-done:
		last := lastLine(out.String())
		if code != exitNodeFailed || !strings.HasPrefix(last, "kvd: node 1 failed: ") || !strings.Contains(last, "engine failed") || !strings.HasSuffix(last, "it must be restarted") {
			t.Fatalf("exit %d, last line %q; want %d and the engine's failure", code, last, exitNodeFailed)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("kvd kept running after its engine failed:\n%s", out.String())
	}
}

package embed_test

import (
	"context"
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/kvd/kvd/embed"
	"github.com/kvd/kvd/internal/testkit"
	"github.com/kvd/kvd/server"
)

func openFDs(t *testing.T) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	return len(fds)
}

// Starting and closing a node many times in one process leaves no
// goroutine and no file descriptor behind.
func TestStartCloseLeaksNothing(t *testing.T) {
	dir := t.TempDir()
	cycle := func() {
		n, err := embed.Start(t.Context(), embed.Config{DataDir: dir, Shards: 2})
		if err != nil {
			t.Fatal(err)
		}
		waitReady(t, n)
		if _, err := n.Client().Put(t.Context(), []byte("k"), []byte("v")); err != nil {
			t.Fatal(err)
		}
		if err := n.Close(); err != nil {
			t.Fatal(err)
		}
	}
	cycle() // a first run opens what the process keeps (loggers, pools)
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	before := openFDs(t)
	for range 5 {
		cycle()
	}
	deadline := time.Now().Add(10 * time.Second)
	for openFDs(t) > before {
		if time.Now().After(deadline) {
			t.Fatalf("%d file descriptors open after 5 start/close cycles, %d before", openFDs(t), before)
		}
		time.Sleep(10 * time.Millisecond) // poll interval
	}
}

func listen(t *testing.T) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// Three embedded nodes in one process form a cluster over loopback; the
// first is not ready while it has no quorum, all are once it has.
func TestThreeEmbeddedNodesFormACluster(t *testing.T) {
	var cfgs []embed.Config
	members := map[uint64]string{}
	for id := uint64(1); id <= 3; id++ {
		peer := listen(t)
		members[id] = peer.Addr().String()
		cfgs = append(cfgs, embed.Config{
			NodeID: id, DataDir: t.TempDir(), Shards: 2,
			ClientListener: listen(t), PeerListener: peer,
			TickInterval: 20 * time.Millisecond,
		})
	}
	for i := range cfgs {
		cfgs[i].InitialCluster = members
	}
	n1 := start(t, cfgs[0])
	// Alone, node 1 has no quorum: it cannot write, so it is not ready.
	// Watched for a while, as there is no event to wait for.
	select {
	case <-n1.Ready():
		t.Fatal("node 1 ready without a quorum")
	case <-time.After(2 * time.Second):
	}
	n2, n3 := start(t, cfgs[1]), start(t, cfgs[2])
	for _, n := range []*embed.Node{n1, n2, n3} {
		waitReady(t, n)
	}
	ctx := t.Context()
	if _, err := n1.Client().Put(ctx, []byte("shared"), []byte("from 1")); err != nil {
		t.Fatal(err)
	}
	kv, err := n3.Client().Get(ctx, []byte("shared"))
	if err != nil || string(kv.GetValue()) != "from 1" {
		t.Fatalf("node 3 reads %v %q, want \"from 1\"", err, kv.GetValue())
	}
	// Each node leads some shards (or not); between them, requests for
	// the keys they lead were served in memory.
	for i := range 20 {
		k := []byte{'k', byte('a' + i)}
		for _, n := range []*embed.Node{n1, n2, n3} {
			if _, err := n.Client().Put(ctx, k, []byte("v")); err != nil {
				t.Fatal(err)
			}
		}
	}
	if n1.LocalCalls()+n2.LocalCalls()+n3.LocalCalls() == 0 {
		t.Fatal("no request of three embedded clients went to its own node in memory")
	}
}

// Err reports a data dir removed under a running node.
func TestErrReportsLostDataDir(t *testing.T) {
	dir := t.TempDir()
	n := start(t, embed.Config{DataDir: dir, Shards: 1})
	waitReady(t, n)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-n.Err():
		if !errors.Is(err, server.ErrNodeFailed) {
			t.Fatalf("Err: %v, want ErrNodeFailed", err)
		}
		t.Logf("Err: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("no error 20s after the data dir was removed")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
	defer cancel()
	if _, err := n.Client().Put(ctx, []byte("k"), []byte("v")); err == nil {
		t.Fatal("a failed node took a write")
	}
}

// Err reports an engine whose disk fails a write.
func TestErrReportsEngineFailure(t *testing.T) {
	dir := t.TempDir()
	n := start(t, embed.Config{DataDir: dir, Shards: 1})
	waitReady(t, n)
	testkit.BreakWAL(t, dir)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
	defer cancel()
	go func() { _, _ = n.Client().Put(ctx, []byte("k"), []byte("v")) }() // fails: its WAL write does
	select {
	case err := <-n.Err():
		if !errors.Is(err, server.ErrNodeFailed) {
			t.Fatalf("Err: %v, want ErrNodeFailed", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no error 20s after the WAL broke")
	}
}

// A node joins a running embedded node's cluster through its client
// address, as kvd --join does, and reads what was written before.
func TestJoinAnEmbeddedNode(t *testing.T) {
	n1 := start(t, embed.Config{DataDir: t.TempDir(), Shards: 2, ClientListener: listen(t), PeerListener: listen(t)})
	waitReady(t, n1)
	ctx := t.Context()
	if _, err := n1.Client().Put(ctx, []byte("before"), []byte("join")); err != nil {
		t.Fatal(err)
	}
	n2 := start(t, embed.Config{NodeID: 2, DataDir: t.TempDir(), ClientListener: listen(t), PeerListener: listen(t), Join: n1.Server().ClientAddr()})
	waitReady(t, n2)
	kv, err := n2.Client().Get(ctx, []byte("before"))
	if err != nil || string(kv.GetValue()) != "join" {
		t.Fatalf("joined node reads %v %q, want join", err, kv.GetValue())
	}
	m, err := n2.Client().MemberList(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(m.GetMembers()) != 2 {
		t.Fatalf("members after the join: %v, want 2", m.GetMembers())
	}
}

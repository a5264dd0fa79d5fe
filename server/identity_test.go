package server

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/internal/testkit"
	"github.com/kvd/kvd/proto/kvpb"
)

// A node whose data dir was wiped and that restarts under its old id is
// refused by its peers and turns fatal with a reason that says so, instead
// of taking the leader's heartbeats for a log it no longer has.
func TestWipedNodeRefusedClearly(t *testing.T) {
	c := newTestCluster(t, 3, 2, nil)
	cl := c.client()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, k := range []string{"a", "b", "c", "d"} {
		if _, err := cl.Put(ctx, []byte(k), []byte("v")); err != nil {
			t.Fatal(err)
		}
	}
	c.stop(2)
	if err := os.RemoveAll(c.cfgs[2].DataDir); err != nil {
		t.Fatal(err)
	}
	c.start(2)
	var err error
	select {
	case err = <-c.servers[2].Fatal():
	case <-ctx.Done():
		t.Fatal("the wiped node was not refused")
	}
	if !errors.Is(err, ErrNodeFailed) || !strings.Contains(err.Error(), "data dir") || !strings.Contains(err.Error(), "new member") {
		t.Fatalf("fatal error %q does not say the data dir is new and it must rejoin as a new member", err)
	}
	// The others are not affected.
	for i := range 2 {
		if e := c.servers[i].failure(); e != nil {
			t.Fatalf("node %d turned fatal: %v", i+1, e)
		}
	}
	if _, err := cl.Put(ctx, []byte("e"), []byte("v")); err != nil {
		t.Fatalf("put with the wiped node refused: %v", err)
	}
}

// A bootstrapping node whose --initial-cluster entry is not its
// advertised peer address refuses to start.
func TestAdvertisePeerMismatchRefused(t *testing.T) {
	pl := listenLocal(t)
	defer pl.Close()
	cl := listenLocal(t)
	defer cl.Close()
	_, err := New(Config{
		NodeID: 1, DataDir: t.TempDir(), ClientListener: cl, PeerListener: pl,
		InitialCluster: map[uint64]string{1: "127.0.0.1:1", 2: "127.0.0.1:2"},
	})
	if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "127.0.0.1:1") || !strings.Contains(err.Error(), pl.Addr().String()) {
		t.Fatalf("New = %v, want ErrConfig naming both addresses", err)
	}
}

// A node refuses Internal and Cluster calls on its peer listener from a
// node of another cluster: a wrong peer address must not feed it another
// cluster's commands or map.
func TestPeerCallFromAnotherClusterRefused(t *testing.T) {
	c := newTestCluster(t, 1, 1, nil)
	s := c.servers[0]
	conn, err := grpc.NewClient(s.PeerAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	own := strconv.FormatUint(s.clusterMap().GetClusterId(), 16)
	call := func(cluster string) error {
		cctx := metadata.AppendToOutgoingContext(ctx, "kvd-cluster-id", cluster, "kvd-from", "9")
		_, err := kvpb.NewClusterClient(conn).Map(cctx, &kvpb.MapRequest{})
		return err
	}
	if err := call(own + "1"); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "cluster") {
		t.Fatalf("Map from another cluster = %v, want FailedPrecondition", err)
	}
	if err := call(own); err != nil {
		t.Fatalf("Map from this cluster = %v", err)
	}
}

// A second process started with the id of a running node (here with its
// advertised peer address too, so its configuration checks pass) is
// refused by the peers it dials, which log it; the cluster keeps serving
// through the original node.
func TestSecondServerWithSameIDRefused(t *testing.T) {
	var log3 testkit.LogBuffer
	c := newTestCluster(t, 3, 2, func(cfg *Config) {
		if cfg.NodeID == 3 {
			cfg.Logger = slog.New(slog.NewTextHandler(&log3, nil))
		}
	})
	cfg := c.cfgs[1]
	cfg.DataDir = t.TempDir()
	cfg.ClientListener, cfg.PeerListener = listenLocal(t), listenLocal(t)
	cfg.ListenClient, cfg.ListenPeer = "", ""
	cfg.AdvertisePeer = c.servers[1].PeerAddr()
	dup, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer dup.Stop()
	waitFor(t, 20*time.Second, "node 3 to log the refused second node 2", func() bool {
		for _, line := range strings.Split(log3.String(), "\n") {
			if strings.Contains(line, "level=ERROR") && strings.Contains(line, "from=2") && strings.Contains(line, "second process") {
				return true
			}
		}
		return false
	})
	if dup.tr.Stats().Peers[3].Connected {
		t.Fatal("the second node 2 has a stream to node 3")
	}
	cl := c.client()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i := range 20 {
		if _, err := cl.Put(ctx, []byte(strconv.Itoa(i)), []byte("v")); err != nil {
			t.Fatalf("put %d with a second node 2 running: %v", i, err)
		}
	}
	for i, s := range c.servers {
		if err := s.failure(); err != nil {
			t.Fatalf("node %d turned fatal: %v", i+1, err)
		}
		if i != 1 && !s.tr.Stats().Peers[2].Connected {
			t.Fatalf("node %d lost its link to the original node 2", i+1)
		}
	}
}

package server

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/proto/kvpb"
)

// joinNode starts node id as a new member joining through the running
// node at index via.
func (c *testCluster) joinNode(id uint64, via int) {
	c.t.Helper()
	cfg := c.cfgs[0]
	cfg.NodeID = id
	cfg.DataDir = filepath.Join(filepath.Dir(c.cfgs[0].DataDir), fmt.Sprint(id))
	cfg.ClientListener, cfg.PeerListener = listenLocal(c.t), listenLocal(c.t)
	cfg.InitialCluster = nil
	cfg.Join = c.servers[via].ClientAddr()
	cfg.Logger = testLogger().With("node", id)
	c.cfgs = append(c.cfgs, cfg)
	c.servers = append(c.servers, nil)
	c.start(len(c.servers) - 1)
}

// shardVoters returns the voters and learners of shard as its leader sees
// them, or nil when it has no leader.
func (c *testCluster) shardVoters(shard uint64) (voters, learners []uint64) {
	s := c.leaderOf(shard)
	if s == nil {
		return nil, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	st, err := s.host.Node(shard).Status(ctx)
	if err != nil {
		return nil, nil
	}
	for id := range st.Config.Learners {
		learners = append(learners, id)
	}
	slices.Sort(learners)
	return st.Config.Voters[0].Slice(), learners
}

// TestJoinGrowsClusterToThreeReplicas bootstraps one node asking for three
// replicas, writes, joins two nodes, and checks that every shard ends with
// three voters holding the data: the first node can then die and every
// write is still readable and writes go on.
func TestJoinGrowsClusterToThreeReplicas(t *testing.T) {
	const shards = 4
	c := newTestCluster(t, 1, shards, func(cfg *Config) { cfg.Replicas = 3 })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cl := c.client()
	const keys = 200
	for i := range keys {
		if _, err := cl.Put(ctx, []byte(fmt.Sprintf("k/%03d", i)), []byte(fmt.Sprint(i))); err != nil {
			t.Fatalf("put before join: %v", err)
		}
	}

	c.joinNode(2, 0)
	c.joinNode(3, 1) // through the second node: any member will do

	waitFor(t, 90*time.Second, "three voters on every shard", func() bool {
		for shard := uint64(0); shard <= shards; shard++ {
			voters, learners := c.shardVoters(shard)
			if !slices.Equal(voters, []uint64{1, 2, 3}) || len(learners) > 0 {
				return false
			}
		}
		m := c.servers[0].readReplicatedMap()
		for _, sh := range m.GetShards() {
			if len(sh.GetReplicas()) != 3 {
				return false
			}
		}
		return true
	})
	for _, s := range c.servers {
		waitFor(t, 30*time.Second, fmt.Sprintf("node %d runs every shard", s.cfg.NodeID), func() bool {
			return len(s.host.Nodes()) == shards+1
		})
	}
	if got := c.servers[2].host.SnapshotsReceived(); got == 0 {
		t.Errorf("node 3 received no snapshot; new replicas must catch up from one")
	}

	// Node 1, the only original copy, goes away: nodes 2 and 3 are a
	// quorum of every shard and hold every acknowledged write.
	c.stop(0)
	cl2, err := client.New(ctx, client.Config{Endpoints: []string{c.servers[1].ClientAddr(), c.servers[2].ClientAddr()}})
	if err != nil {
		t.Fatal(err)
	}
	defer cl2.Close()
	for i := range keys {
		kv, err := cl2.Get(ctx, []byte(fmt.Sprintf("k/%03d", i)))
		if err != nil {
			t.Fatalf("get k/%03d after node 1 stopped: %v", i, err)
		}
		if string(kv.GetValue()) != fmt.Sprint(i) {
			t.Fatalf("k/%03d = %q, want %q", i, kv.GetValue(), fmt.Sprint(i))
		}
	}
	if _, err := cl2.Put(ctx, []byte("after"), []byte("x")); err != nil {
		t.Fatalf("put with node 1 stopped: %v", err)
	}
}

func TestJoinRefusesATakenID(t *testing.T) {
	c := newTestCluster(t, 1, 2, nil)
	cfg := c.cfgs[0]
	cfg.DataDir = filepath.Join(t.TempDir(), "other")
	cfg.ClientListener, cfg.PeerListener = listenLocal(t), listenLocal(t)
	cfg.InitialCluster = nil
	cfg.Join = c.servers[0].ClientAddr()
	s, err := New(cfg) // same id 1, another peer address
	if err == nil {
		s.Stop()
		t.Fatal("a node joined with the id of an existing member")
	}
	if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "already a member") {
		t.Fatalf("err = %v, want a config error saying the id is taken", err)
	}
}

func TestPlanReplica(t *testing.T) {
	m := &kvpb.ClusterMap{
		Epoch:    7,
		Replicas: 3,
		Members:  []*kvpb.Member{{Id: 1}, {Id: 2}, {Id: 3}},
		Shards: []*kvpb.ShardReplicas{
			{Id: 0, Replicas: []uint64{1, 2, 3}},
			{Id: 1, Replicas: []uint64{1, 2}},
			{Id: 2, Replicas: []uint64{1}},
		},
	}
	next := planReplica(m)
	if next.GetEpoch() != 8 || !slices.Equal(next.GetShards()[1].GetReplicas(), []uint64{1, 2, 3}) {
		t.Fatalf("first plan: %v", next)
	}
	next = planReplica(next)
	// Shard 2 lacks two; nodes 2 and 3 hold two replicas each: lowest id.
	if next.GetEpoch() != 9 || !slices.Equal(next.GetShards()[2].GetReplicas(), []uint64{1, 2}) {
		t.Fatalf("second plan: %v", next)
	}
	next = planReplica(planReplica(next))
	if next != nil {
		t.Fatalf("plan after every shard has three replicas: %v", next)
	}
	// The member holding the fewest replicas gets the new one.
	next = planReplica(&kvpb.ClusterMap{Replicas: 2, Members: []*kvpb.Member{{Id: 1}, {Id: 2}, {Id: 3}},
		Shards: []*kvpb.ShardReplicas{{Id: 0, Replicas: []uint64{1, 2}}, {Id: 1, Replicas: []uint64{2}}}})
	if !slices.Equal(next.GetShards()[1].GetReplicas(), []uint64{2, 3}) {
		t.Fatalf("plan by load: %v", next)
	}
	if planReplica(&kvpb.ClusterMap{Members: []*kvpb.Member{{Id: 1}}, Shards: []*kvpb.ShardReplicas{{Id: 0, Replicas: []uint64{1}}}}) != nil {
		t.Fatal("a map without a replica count (before it was recorded) must not be changed")
	}
}

// A change of the meta shard (a member add, an auth change) that reaches
// a node the moment it has bootstrapped, before its cluster map is
// applied, is refused as Unavailable (a joiner and the client retry it),
// never as a failed precondition or an invalid argument (a joiner takes
// the first for a configuration error and exits, a client gives up on
// both); a retry then makes the change.
func TestMetaChangeRightAfterBootstrap(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(context.Context, *grpc.ClientConn) error
	}{
		{"member add", func(ctx context.Context, conn *grpc.ClientConn) error {
			_, err := kvpb.NewClusterClient(conn).MemberAdd(ctx, &kvpb.MemberAddRequest{Member: &kvpb.Member{Id: 2, PeerAddr: "127.0.0.1:1", ClientAddr: "127.0.0.1:1"}})
			return err
		}},
		{"auth change", func(ctx context.Context, conn *grpc.ClientConn) error {
			_, err := kvpb.NewAuthClient(conn).Change(ctx, &kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserAdd{UserAdd: &kvpb.UserAdd{Name: "u", Password: "p"}}})
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cl, pl := listenLocal(t), listenLocal(t)
			s, err := New(Config{
				NodeID: 1, DataDir: t.TempDir(), ClientListener: cl, PeerListener: pl,
				InitialCluster: map[uint64]string{1: pl.Addr().String()}, Shards: 1,
				TickInterval: 20 * time.Millisecond, Logger: testLogger(),
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = s.Stop() })
			conn := clientConn(t, s)
			deadline := time.Now().Add(20 * time.Second)
			for {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				err := tc.change(ctx, conn)
				cancel()
				if err == nil {
					return
				}
				if code := status.Code(err); code != codes.Unavailable && code != codes.DeadlineExceeded {
					t.Fatalf("%s right after bootstrap: %v; want success or Unavailable", tc.name, err)
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s not done after 20 s: %v", tc.name, err)
				}
			}
		})
	}
}

package e2e

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kvd/kvd/internal/proccluster"
)

// TestJoinGrowsAClusterOfOne starts one kvd that asks for three replicas,
// writes through kvctl, starts two more with --join, and waits until every
// shard has three voters. Then the first node is killed with -9: the two
// that joined hold every acknowledged write and keep taking writes. A
// joined node restarted with the same command line recovers from its data
// dir instead of joining again.
func TestJoinGrowsAClusterOfOne(t *testing.T) {
	const shards = 4
	c := proccluster.Start(t, 1, proccluster.Options{Shards: shards, Args: []string{"--replicas=3"}})
	kvctl := func(args ...string) string {
		t.Helper()
		out, errOut, code := c.Kvctl("", args...)
		if code != 0 {
			t.Fatalf("kvctl %v: exit %d: %s", args, code, errOut)
		}
		return out
	}
	const keys = 30
	for i := range keys {
		kvctl("put", fmt.Sprintf("j/%02d", i), fmt.Sprint(i))
	}

	first := c.Node(1)
	n2 := c.AddNode(first.ClientAddr)
	n3 := c.AddNode(first.ClientAddr + "," + n2.ClientAddr)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	waitThreeVoters(ctx, t, c, shards, 90*time.Second)
	if out := kvctl("member", "list", "-o", "simple"); len(out) == 0 {
		t.Fatal("member list printed nothing")
	}

	c.Kill(first)
	for i := range keys {
		if got := kvctl("get", fmt.Sprintf("j/%02d", i)); got != fmt.Sprintf("%d\n", i) {
			t.Fatalf("after kill -9 of node 1: get j/%02d = %q, want %d", i, got, i)
		}
	}
	kvctl("put", "after-kill", "yes")

	// Restart n3 with its --join flag still given: it recovers.
	c.Kill(n3)
	c.StartNode(n3)
	proccluster.WaitFor(t, 30*time.Second, "node 3 back with every shard", func() bool {
		st, err := c.Status(ctx, n3)
		return err == nil && len(st.GetShards()) == shards+1
	})
	if got := kvctl("get", "after-kill"); got != "yes\n" {
		t.Fatalf("get after-kill = %q", got)
	}
	if !strings.Contains(n3.Logs(), "join flags ignored") {
		t.Fatalf("restarted node 3 does not say it ignored --join:\n%s", n3.Logs())
	}
}

// waitThreeVoters waits until every shard, the meta shard 0 and data
// shards 1..shards, has a leader whose status lists voters 1, 2 and 3.
func waitThreeVoters(ctx context.Context, t *testing.T, c *proccluster.Cluster, shards uint64, timeout time.Duration) {
	t.Helper()
	proccluster.WaitFor(t, timeout, "three voters on every shard", func() bool {
		for shard := uint64(0); shard <= shards; shard++ {
			leader := c.LeaderOf(ctx, shard)
			if leader == nil {
				return false
			}
			st, err := c.Status(ctx, leader)
			if err != nil {
				return false
			}
			for _, s := range st.GetShards() {
				if s.GetShard() == shard && !slices.Equal(s.GetVoters(), []uint64{1, 2, 3}) {
					return false
				}
			}
		}
		return true
	})
}

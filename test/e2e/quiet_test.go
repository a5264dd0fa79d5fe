package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/kvd/kvd/internal/proccluster"
)

// TestHealthyClusterLogsNoWarnings forms a cluster as compose does (one
// node, two more started at once with --join, all with peer and client
// mutual TLS: without peer TLS a node warns that its peer port is open to
// anyone, TestPeerPortWithoutTLSActsForAnyone), waits until every shard
// has three voters, runs a minute of writes and reads, and checks
// that no node logged a line at WARN or above: in a healthy cluster
// doing what it is asked, a WARN means an operator should look. Joining
// once logged a WARN per replica placed ("cluster map epoch must advance
// by one") and per join attempt made before the seed answered.
func TestHealthyClusterLogsNoWarnings(t *testing.T) {
	const shards = 4
	p := newTestPKI(t, 3)
	opts := tlsOptions(t, p)
	opts.Shards, opts.Args = shards, []string{"--replicas=3"}
	c := proccluster.Start(t, 1, opts)
	seed := c.Node(1).ClientAddr
	c.AddNode(seed)
	c.AddNode(seed)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	waitThreeVoters(ctx, t, c, shards, 45*time.Second)
	if _, errOut, code := c.Kvctl("", "bench", "mixed", "--duration", "60s", "--clients", "8", "--key-space", "1000"); code != 0 {
		t.Fatalf("kvctl bench mixed: exit %d: %s", code, errOut)
	}
	if _, errOut, code := c.Kvctl("", "cluster", "status"); code != 0 {
		t.Fatalf("kvctl cluster status: exit %d: %s", code, errOut)
	}
	for _, nd := range c.Nodes {
		for _, line := range strings.Split(nd.Logs(), "\n") {
			if strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR") {
				t.Errorf("node %d: %s", nd.ID, line)
			}
		}
	}
}

package jepsenlite

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"time"

	"github.com/kvd/kvd/internal/proccluster"
)

// Faults the nemesis can inject; select them with -jepsen.faults.
const (
	faultKill       = "kill"             // kill -9 of a random node
	faultKillLeader = "kill-leader"      // kill -9 of the leader of a random shard
	faultKillAll    = "kill-all"         // kill -9 of every node, then restart
	faultPause      = "pause"            // SIGSTOP, later SIGCONT, of a random node
	faultPartLeader = "partition-leader" // isolate the leader of a random shard
	faultSplit      = "split"            // a random node | the other two
	faultBridge     = "bridge"           // a - b - c: a and c cut, b sees both
	faultSlow       = "slow"             // every link delayed 10-120 ms
)

// AllFaults is the default fault set.
var AllFaults = []string{faultKill, faultKillLeader, faultKillAll, faultPause, faultPartLeader, faultSplit, faultBridge, faultSlow}

func isPartition(f string) bool {
	return f == faultPartLeader || f == faultSplit || f == faultBridge
}

// nemesis injects faults on a schedule drawn from its own seeded random
// source: every random choice is drawn in the same order whatever the
// cluster does, so a seed replays the same schedule of faults (what a
// choice such as "the leader of shard 3" resolves to depends on the run).
type nemesis struct {
	c      *proccluster.Cluster
	net    *Net
	h      *History
	rng    *rand.Rand
	faults []string
	shards int // data shards; shard ids 0 (meta) ..shards
	logf   func(format string, args ...any)

	// hold and quiet bound how long a fault lasts and the calm between
	// faults: the workload's schedule, drawn from rng.
	holdMin, holdMax, quietMin, quietMax time.Duration

	paused   map[uint64]bool
	injected int
}

func (n *nemesis) nodeIDs() []uint64 {
	ids := make([]uint64, len(n.c.Nodes))
	for i, nd := range n.c.Nodes {
		ids[i] = nd.ID
	}
	return ids
}

func (n *nemesis) between(lo, hi time.Duration) time.Duration {
	if hi <= lo {
		return lo
	}
	return lo + time.Duration(n.rng.Int64N(int64(hi-lo)))
}

// run injects faults until end, healing after each; it runs on the test
// goroutine (proccluster reports failures with t.Fatal).
func (n *nemesis) run(end time.Time) {
	for {
		quiet := n.between(n.quietMin, n.quietMax)
		if !time.Now().Add(quiet).Before(end) {
			return
		}
		<-time.After(quiet)
		picked := n.pick()
		hold := n.between(n.holdMin, n.holdMax)
		var descs []string
		for _, f := range picked {
			descs = append(descs, n.inject(f))
		}
		msg := strings.Join(descs, " + ")
		n.h.event("start %s", msg)
		n.logf("nemesis: %s for %v", msg, hold.Round(time.Millisecond))
		<-time.After(hold)
		n.heal()
	}
}

// pick chooses one fault, or with probability 0.3 two that combine (two
// partitions would overwrite each other; kill-all stands alone).
func (n *nemesis) pick() []string {
	first := n.faults[n.rng.IntN(len(n.faults))]
	combine := n.rng.Float64() < 0.3
	second := n.faults[n.rng.IntN(len(n.faults))]
	if !combine || first == faultKillAll || second == faultKillAll || second == first ||
		(isPartition(first) && isPartition(second)) {
		return []string{first}
	}
	return []string{first, second}
}

// inject applies fault f and describes what it did.
func (n *nemesis) inject(f string) string {
	ids := n.nodeIDs()
	// Draw every choice up front, used or not, so the random stream does
	// not depend on what the cluster answers.
	node := ids[n.rng.IntN(len(ids))]
	shard := uint64(n.rng.IntN(n.shards + 1))
	withClients := n.rng.IntN(2) == 0
	perm := n.rng.Perm(len(ids))
	delays := make([]time.Duration, 0, 16)
	for range (len(ids) + 1) * len(ids) {
		delays = append(delays, 10*time.Millisecond+time.Duration(n.rng.Int64N(int64(110*time.Millisecond))))
	}
	n.injected++

	leader := func() (uint64, string) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if nd := n.c.LeaderOf(ctx, shard); nd != nil {
			return nd.ID, fmt.Sprintf("leader of shard %d, node %d", shard, nd.ID)
		}
		return node, fmt.Sprintf("node %d (shard %d has no leader)", node, shard)
	}
	isolate := func(x uint64, what string) string {
		others := slices.DeleteFunc(slices.Clone(ids), func(id uint64) bool { return id == x })
		n.net.Cut([]uint64{x}, others)
		if withClients {
			n.net.Cut([]uint64{x}, []uint64{clientID})
			return fmt.Sprintf("%s: isolate %s from peers and clients", f, what)
		}
		return fmt.Sprintf("%s: isolate %s from peers (clients still reach it)", f, what)
	}

	switch f {
	case faultKill:
		n.c.Kill(n.c.Node(node))
		return fmt.Sprintf("kill -9 node %d", node)
	case faultKillLeader:
		id, what := leader()
		n.c.Kill(n.c.Node(id))
		return "kill -9 " + what
	case faultKillAll:
		for _, nd := range n.c.Nodes {
			n.c.Kill(nd)
		}
		return "kill -9 every node"
	case faultPause:
		if nd := n.c.Node(node); nd.Running() {
			n.c.Pause(nd)
			n.paused[node] = true
		}
		return fmt.Sprintf("SIGSTOP node %d", node)
	case faultPartLeader:
		id, what := leader()
		return isolate(id, what)
	case faultSplit:
		return isolate(node, fmt.Sprintf("node %d", node))
	case faultBridge:
		a, b, c := ids[perm[0]], ids[perm[1]], ids[perm[2]]
		n.net.Cut([]uint64{a}, []uint64{c})
		return fmt.Sprintf("bridge: %d - %d - %d (%d and %d cut)", a, b, c, a, c)
	case faultSlow:
		i := 0
		for _, a := range append([]uint64{clientID}, ids...) {
			for _, b := range ids {
				if a < b {
					n.net.Slow(a, b, delays[i])
				}
				i++
			}
		}
		return "slow links: " + n.net.String()
	}
	panic("jepsen-lite: unknown fault " + f) // flags are validated before the run
}

// heal ends every fault: links restored, paused nodes continued, dead
// nodes restarted, and waits until every node is ready again.
func (n *nemesis) heal() {
	n.net.Heal()
	for id := range n.paused {
		n.c.Resume(n.c.Node(id))
	}
	clear(n.paused)
	var restarted []string
	for _, nd := range n.c.Nodes {
		if !nd.Running() {
			n.c.StartNode(nd)
			restarted = append(restarted, fmt.Sprint(nd.ID))
		}
	}
	msg := "heal"
	if len(restarted) > 0 {
		msg += ", restart nodes " + strings.Join(restarted, ",")
	}
	n.h.event("%s", msg)
	n.logf("nemesis: %s", msg)
	n.c.WaitReady(60 * time.Second)
	// Where a fault's effect ends: the lock check's takeover deadlines
	// count from here.
	n.h.event("ready")
}

func validateFaults(fs []string) error {
	for _, f := range fs {
		if !slices.Contains(AllFaults, f) {
			return fmt.Errorf("unknown fault %q; choose from %s", f, strings.Join(AllFaults, ","))
		}
	}
	if len(fs) == 0 {
		return fmt.Errorf("no faults; choose from %s", strings.Join(AllFaults, ","))
	}
	return nil
}

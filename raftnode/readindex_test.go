package raftnode

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/proto/peerpb"
)

// checkNet records the leader checks a leaderChecks sends.
type checkNet struct {
	mu   sync.Mutex
	sent map[uint64][]*peerpb.LeaderCheck // peer → checks, in order
}

func (c *checkNet) send(to uint64, lc *peerpb.LeaderCheck) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sent == nil {
		c.sent = make(map[uint64][]*peerpb.LeaderCheck)
	}
	c.sent[to] = append(c.sent[to], lc)
}

// nth waits for the n-th check sent to peer and returns it.
func (c *checkNet) nth(t *testing.T, peer uint64, n int) *peerpb.LeaderCheck {
	t.Helper()
	proccluster.WaitFor(t, 5*time.Second, fmt.Sprintf("check #%d to peer %d", n, peer), func() bool { return c.count(peer) >= n })
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sent[peer][n-1]
}

func (c *checkNet) count(peer uint64) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.sent[peer])
}

func reply(id uint64, terms ...uint64) *peerpb.LeaderCheck {
	return &peerpb.LeaderCheck{Id: id, Reply: true, Terms: terms}
}

// replica is node 1's replica of shard, leading it in term 5.
func replica(shard uint64) *Node {
	n := &Node{cfg: Config{NodeID: 1, Shard: shard}}
	n.term.Store(5)
	n.readyTerm.Store(5)
	n.leader.Store(1)
	return n
}

// confirmAsync runs confirm on its own goroutine; the channel gets its
// result.
func confirmAsync(ctx context.Context, lc *leaderChecks, n *Node, term uint64, voters ...uint64) chan error {
	ch := make(chan error, 1)
	go func() { ch <- lc.confirm(ctx, n, term, voters) }()
	return ch
}

func outcome(t *testing.T, ch chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("confirm did not return")
		return nil
	}
}

// pending fails unless the newest round still has an unanswered read.
// answer is synchronous, so this reads the outcome of the answers so far.
func pending(t *testing.T, lc *leaderChecks) {
	t.Helper()
	lc.mu.Lock()
	defer lc.mu.Unlock()
	if k := len(lc.rounds); k == 0 || lc.rounds[k-1].open == 0 {
		t.Fatal("a read was answered before a quorum confirmed it")
	}
}

// waitQueued waits until n reads wait for the next round.
func waitQueued(t *testing.T, lc *leaderChecks, n int) {
	t.Helper()
	proccluster.WaitFor(t, 5*time.Second, fmt.Sprintf("%d reads queued", n), func() bool {
		lc.mu.Lock()
		defer lc.mu.Unlock()
		return len(lc.queued) == n
	})
}

func TestLeaderCheckNeedsAQuorumOfTermsNoNewerThanTheLeaders(t *testing.T) {
	ctx := context.Background()

	t.Run("one peer of three with the same term confirms", func(t *testing.T) {
		var net checkNet
		lc := newLeaderChecks(1, time.Hour, net.send)
		ch := confirmAsync(ctx, lc, replica(7), 5, 1, 2, 3)
		q := net.nth(t, 2, 1)
		if q.GetReply() || !slices.Equal(q.GetShards(), []uint64{7}) {
			t.Fatalf("question to peer 2 = %v, want shard 7", q)
		}
		net.nth(t, 3, 1)
		lc.answer(2, reply(q.GetId(), 5))
		if err := outcome(t, ch); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("an older term counts, no replica does not, a newer term refuses", func(t *testing.T) {
		var net checkNet
		lc := newLeaderChecks(1, time.Hour, net.send)
		ch := confirmAsync(ctx, lc, replica(7), 5, 1, 2, 3)
		id := net.nth(t, 2, 1).GetId()
		lc.answer(2, reply(id, 0)) // peer 2 holds no replica of shard 7
		pending(t, lc)
		lc.answer(3, reply(id, 4)) // peer 3 has not heard of term 5 yet
		if err := outcome(t, ch); err != nil {
			t.Fatal(err)
		}

		ch = confirmAsync(ctx, lc, replica(7), 5, 1, 2, 3)
		id = net.nth(t, 2, 2).GetId()
		lc.answer(2, reply(id, 6))
		var nl *NotLeaderError
		if err := outcome(t, ch); !errors.As(err, &nl) || nl.Shard != 7 {
			t.Fatalf("confirm after a term-6 answer = %v, want NotLeaderError for shard 7", err)
		}
	})

	t.Run("five voters need two peers; others and repeats do not count", func(t *testing.T) {
		var net checkNet
		lc := newLeaderChecks(1, time.Hour, net.send)
		ch := confirmAsync(ctx, lc, replica(7), 5, 1, 2, 3, 4, 5)
		id := net.nth(t, 2, 1).GetId()
		lc.answer(2, reply(id, 5))
		lc.answer(2, reply(id, 5)) // the same peer again
		lc.answer(9, reply(id, 5)) // not a voter
		lc.answer(3, reply(id-1, 5))
		pending(t, lc)
		lc.answer(4, reply(id, 5))
		if err := outcome(t, ch); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("a single voter needs nobody", func(t *testing.T) {
		var net checkNet
		lc := newLeaderChecks(1, time.Hour, net.send)
		if err := lc.confirm(ctx, replica(7), 5, []uint64{1}); err != nil {
			t.Fatal(err)
		}
		if net.count(2) != 0 {
			t.Fatal("a single-voter shard sent a check")
		}
	})
}

// Reads that arrive while a round is in flight share the next round: one
// question per peer, listing each of their shards once.
func TestLeaderChecksBatchReadsOfAllShards(t *testing.T) {
	ctx := context.Background()
	var net checkNet
	lc := newLeaderChecks(1, time.Hour, net.send)
	first := confirmAsync(ctx, lc, replica(1), 5, 1, 2, 3)
	id := net.nth(t, 2, 1).GetId()

	var later []chan error
	for _, shard := range []uint64{2, 3, 2, 4} {
		later = append(later, confirmAsync(ctx, lc, replica(shard), 5, 1, 2, 3))
	}
	waitQueued(t, lc, 4) // behind the round in flight
	if net.count(2) != 1 {
		t.Fatal("a second round started while the first was in flight")
	}
	lc.answer(3, reply(id, 5))
	if err := outcome(t, first); err != nil {
		t.Fatal(err)
	}
	q := net.nth(t, 2, 2)
	if got := slices.Sorted(slices.Values(q.GetShards())); !slices.Equal(got, []uint64{2, 3, 4}) {
		t.Fatalf("second round asked peer 2 about shards %v, want [2 3 4]", q.GetShards())
	}
	lc.answer(2, reply(q.GetId(), 5, 5, 5))
	for _, ch := range later {
		if err := outcome(t, ch); err != nil {
			t.Fatal(err)
		}
	}
	if got := lc.started.Load(); got != 2 {
		t.Fatalf("%d rounds, want 2", got)
	}
}

// clock is a hand-moved clock for leaderChecks.now.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// clockedChecks returns node 1's leaderChecks with a one-second timeout on
// a hand-moved clock, and what it sends.
func clockedChecks() (*checkNet, *clock, *leaderChecks) {
	net := &checkNet{}
	clk := &clock{t: time.Unix(1000, 0)}
	lc := newLeaderChecks(1, time.Second, net.send)
	lc.now = clk.now
	return net, clk, lc
}

// A round unanswered for the timeout is asked again under the same id, so
// an answer to either question counts (a slow link, a lost message), and
// reads arriving meanwhile no longer wait for it.
func TestLeaderCheckRoundAskedAgainAfterTimeout(t *testing.T) {
	net, clk, lc := clockedChecks()
	slow := confirmAsync(context.Background(), lc, replica(1), 5, 1, 2, 3)
	q1 := net.nth(t, 2, 1)

	lc.expire() // within the timeout: nothing is sent again
	if net.count(2) != 1 {
		t.Fatal("a round was asked again before its timeout")
	}
	clk.advance(time.Second)
	lc.expire()
	if again := net.nth(t, 2, 2); again.GetId() != q1.GetId() || !slices.Equal(again.GetShards(), []uint64{1}) {
		t.Fatalf("question after the timeout = %v, want round %d again", again, q1.GetId())
	}
	net.nth(t, 3, 2)

	// The stale round does not hold back a new read.
	next := confirmAsync(context.Background(), lc, replica(2), 5, 1, 2, 3)
	q2 := net.nth(t, 2, 3)
	if q2.GetId() == q1.GetId() || !slices.Equal(q2.GetShards(), []uint64{2}) {
		t.Fatalf("question for a read after the timeout = %v, want a new round for shard 2", q2)
	}

	lc.answer(3, reply(q1.GetId(), 5)) // the late answer to the first question
	if err := outcome(t, slow); err != nil {
		t.Fatal(err)
	}
	lc.answer(2, reply(q1.GetId(), 5)) // and the second: ignored
	pending(t, lc)
	lc.answer(2, reply(q2.GetId(), 5))
	if err := outcome(t, next); err != nil {
		t.Fatal(err)
	}
	lc.mu.Lock()
	defer lc.mu.Unlock()
	if len(lc.rounds) != 0 {
		t.Fatalf("%d rounds still in flight after every read was answered", len(lc.rounds))
	}
}

// Reads whose callers gave up leave their round at the next tick; a round
// left with none ends.
func TestLeaderCheckDropsAbandonedReads(t *testing.T) {
	var net checkNet
	lc := newLeaderChecks(1, time.Hour, net.send)
	ctx, cancel := context.WithCancel(context.Background())
	abandoned := confirmAsync(ctx, lc, replica(1), 5, 1, 2, 3)
	q := net.nth(t, 2, 1)
	cancel()
	if err := outcome(t, abandoned); !errors.Is(err, context.Canceled) {
		t.Fatalf("confirm with a cancelled context = %v", err)
	}
	lc.expire()
	lc.mu.Lock()
	n := len(lc.rounds)
	lc.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d rounds in flight, want 0", n)
	}
	lc.answer(2, reply(q.GetId(), 5)) // for a round that ended: ignored

	// The next read starts a round at once.
	ch := confirmAsync(context.Background(), lc, replica(1), 5, 1, 2, 3)
	q2 := net.nth(t, 2, 2)
	lc.answer(3, reply(q2.GetId(), 5))
	if err := outcome(t, ch); err != nil {
		t.Fatal(err)
	}
}

// A read waiting for a check fails at the next tick once its replica no
// longer leads, not at the caller's deadline.
func TestLeaderCheckFailsReadsOfAReplicaThatStepsDown(t *testing.T) {
	var net checkNet
	lc := newLeaderChecks(1, time.Hour, net.send)
	n := replica(1)
	ch := confirmAsync(context.Background(), lc, n, 5, 1, 2, 3)
	net.nth(t, 2, 1)
	lc.expire()
	pending(t, lc)
	n.readyTerm.Store(0) // as handleReady does on a step-down
	n.leader.Store(2)
	lc.expire()
	var nl *NotLeaderError
	if err := outcome(t, ch); !errors.As(err, &nl) || nl.Leader != 2 {
		t.Fatalf("confirm after a step-down = %v, want NotLeaderError naming node 2", err)
	}
}

// Reads of one shard that saw different configurations share a round, and
// every voter of each is asked, once.
func TestLeaderCheckAsksEveryVoterOfEveryRead(t *testing.T) {
	var net checkNet
	lc := newLeaderChecks(1, time.Hour, net.send)
	first := confirmAsync(context.Background(), lc, replica(9), 5, 1, 2)
	id := net.nth(t, 2, 1).GetId()
	a := confirmAsync(context.Background(), lc, replica(1), 5, 1, 2, 3)
	waitQueued(t, lc, 1)
	b := confirmAsync(context.Background(), lc, replica(1), 5, 1, 2, 3, 4, 5)
	waitQueued(t, lc, 2)
	lc.answer(2, reply(id, 5))
	if err := outcome(t, first); err != nil {
		t.Fatal(err)
	}
	for _, peer := range []uint64{2, 3, 4, 5} {
		n := 1
		if peer == 2 {
			n = 2
		}
		if q := net.nth(t, peer, n); !slices.Equal(q.GetShards(), []uint64{1}) {
			t.Fatalf("peer %d asked about %v, want shard 1 once", peer, q.GetShards())
		}
	}
	id = net.nth(t, 2, 2).GetId()
	lc.answer(4, reply(id, 5)) // not a voter of a: counts for b only
	pending(t, lc)
	lc.answer(2, reply(id, 5))
	if err := outcome(t, a); err != nil {
		t.Fatal(err)
	}
	if err := outcome(t, b); err != nil {
		t.Fatal(err)
	}
}

// A read no quorum confirms within two timeouts (peers whose kvd predates
// leader checks never answer) is handed to raft's own round.
func TestLeaderCheckGivesUpAfterTwoTimeouts(t *testing.T) {
	net, clk, lc := clockedChecks()
	ch := confirmAsync(context.Background(), lc, replica(1), 5, 1, 2, 3)
	net.nth(t, 2, 1)
	clk.advance(time.Second)
	lc.expire() // asks again
	net.nth(t, 2, 2)
	pending(t, lc)
	clk.advance(time.Second)
	lc.expire()
	if err := outcome(t, ch); !errors.Is(err, errUnconfirmed) {
		t.Fatalf("confirm unanswered for two timeouts = %v, want errUnconfirmed", err)
	}
}

package raftnode

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kvd/kvd/proto/peerpb"
)

// Linearizable reads use ReadIndex (Raft thesis §6.4): the leader notes its
// commit index, confirms with a quorum that it still leads, waits until it
// has applied that index, and reads local state. etcd/raft implements the
// middle step per group, with a heartbeat round: on a node hosting many
// groups each round costs a message to and from every follower, and wakes
// the group's goroutine on both sides, per shard. kvd does that step for
// every shard a node leads at once: one LeaderCheck to each peer per round,
// answered on the peer's receive goroutine from each replica's published
// term, without waking any replica. The rules that make it as safe as
// raft's own round:
//
//  1. The leader reads, in this order, its published term T, that it has
//     committed an entry of term T (readyTerm), and its commit index C.
//     Every write acknowledged before the read arrived is at or below C: a
//     write committed by this leader was acknowledged after C was
//     published, and one committed under an earlier term lies below the
//     first entry this leader committed in T (Leader Completeness).
//  2. A peer answers with its published term. A replica publishes a term
//     before it sends any message in that term (takeReady stores it
//     before anything leaves), and terms only grow.
//  3. The read is confirmed when a majority of the shard's voters, the
//     leader included, had a published term ≤ T after the read arrived.
//     A leader of a newer term needs a majority that sent messages in that
//     term; it overlaps this one, and none of those had, when they
//     answered. So no newer leader had committed anything before the read:
//     C covers every acknowledged write.
//
// Shards in a joint configuration, or whose leader has not yet committed
// an entry of its term, take raft's own ReadIndex round instead.

// leaderChecks runs the rounds of one Host. One fresh round is in flight
// at a time, and reads that arrive meanwhile share the next one. A round
// unanswered after the timeout stops being fresh, so new reads start a
// round of their own, but it stays answerable: its question is sent again
// under the same id to the peers that have not answered, and whichever
// answer arrives first counts. A late answer on a slow link thus still
// confirms its reads, and a lost one is made good.
type leaderChecks struct {
	self    uint64
	send    func(to uint64, c *peerpb.LeaderCheck)
	timeout time.Duration
	now     func() time.Time // time.Now; tests move it by hand

	started atomic.Uint64 // rounds started

	mu     sync.Mutex
	queued []*checkWaiter
	rounds []*checkRound // in flight, oldest first
	nextID uint64
}

// checkWaiter is one read waiting for its leader's confirmation.
type checkWaiter struct {
	ctx    context.Context
	node   *Node
	term   uint64
	voters []uint64
	acks   int // voters that confirmed, this node included; 0 once answered
	done   chan error
}

type checkRound struct {
	id      uint64
	started time.Time
	sent    time.Time                 // when the question last went out
	open    int                       // waiters not answered yet
	byShard map[uint64][]*checkWaiter // the round's waiters
	asked   map[uint64][]uint64       // peer → the shards asked, in order; gone once it answered
}

func newLeaderChecks(self uint64, timeout time.Duration, send func(uint64, *peerpb.LeaderCheck)) *leaderChecks {
	return &leaderChecks{self: self, send: send, timeout: timeout, now: time.Now}
}

// confirm waits until a quorum of voters is known to have had no term newer
// than term after the call began (rule 3), or until ctx ends.
func (lc *leaderChecks) confirm(ctx context.Context, n *Node, term uint64, voters []uint64) error {
	if quorum(len(voters)) <= 1 {
		return nil
	}
	w := &checkWaiter{ctx: ctx, node: n, term: term, voters: voters, acks: 1, done: make(chan error, 1)}
	lc.mu.Lock()
	lc.queued = append(lc.queued, w)
	if now := lc.now(); !lc.freshLocked(now) {
		lc.startRoundLocked(now)
	}
	lc.mu.Unlock()
	select {
	case err := <-w.done:
		return err
	case <-ctx.Done():
		// The waiter stays in its round, which drops it at the next
		// expire; an answer meanwhile goes to its buffered channel.
		return ctx.Err()
	}
}

func quorum(voters int) int { return voters/2 + 1 }

// freshLocked reports whether the newest round is in flight and within
// its timeout, so new reads wait for the next round instead of starting
// one.
func (lc *leaderChecks) freshLocked(now time.Time) bool {
	k := len(lc.rounds)
	return k > 0 && now.Sub(lc.rounds[k-1].started) < lc.timeout
}

// startRoundLocked asks every peer about the shards of the queued waiters.
func (lc *leaderChecks) startRoundLocked(now time.Time) {
	waiters := slices.DeleteFunc(lc.queued, func(w *checkWaiter) bool { return w.ctx.Err() != nil })
	lc.queued = nil
	if len(waiters) == 0 {
		return
	}
	lc.nextID++
	r := &checkRound{
		id:      lc.nextID,
		started: now,
		open:    len(waiters),
		byShard: make(map[uint64][]*checkWaiter),
		asked:   make(map[uint64][]uint64),
	}
	for _, w := range waiters {
		// Waiters of one shard usually share their voters; one that saw
		// a configuration change may not.
		shard := w.node.cfg.Shard
		for _, v := range w.voters {
			if v != lc.self && !slices.Contains(r.asked[v], shard) {
				r.asked[v] = append(r.asked[v], shard)
			}
		}
		r.byShard[shard] = append(r.byShard[shard], w)
	}
	lc.rounds = append(lc.rounds, r)
	lc.started.Add(1)
	lc.askLocked(r, now)
}

// askLocked sends r's question to every peer that has not answered it.
func (lc *leaderChecks) askLocked(r *checkRound, now time.Time) {
	r.sent = now
	for peer, shards := range r.asked {
		lc.send(peer, &peerpb.LeaderCheck{Id: r.id, Shards: shards})
	}
}

// answer handles a peer's reply to a round.
func (lc *leaderChecks) answer(from uint64, c *peerpb.LeaderCheck) {
	lc.mu.Lock()
	defer lc.mu.Unlock()
	i := slices.IndexFunc(lc.rounds, func(r *checkRound) bool { return r.id == c.GetId() })
	if i < 0 {
		return // a round that has ended
	}
	r := lc.rounds[i]
	shards, ok := r.asked[from]
	if !ok {
		return // not asked, or answered already
	}
	delete(r.asked, from)
	terms := c.GetTerms()
	for j, shard := range shards {
		var term uint64
		if j < len(terms) {
			term = terms[j]
		}
		for _, w := range r.byShard[shard] {
			if w.acks == 0 || !slices.Contains(w.voters, from) {
				continue // answered already, or not a voter
			}
			switch {
			case term > w.term:
				// A newer term exists: this replica may no longer lead.
				r.finish(w, &NotLeaderError{Shard: shard})
			case term > 0: // 0: the peer does not host the shard (yet)
				w.acks++
				if w.acks >= quorum(len(w.voters)) {
					r.finish(w, nil)
				}
			}
		}
	}
	if r.open == 0 {
		lc.rounds = slices.Delete(lc.rounds, i, i+1)
		if now := lc.now(); len(lc.queued) > 0 && !lc.freshLocked(now) {
			lc.startRoundLocked(now)
		}
	}
}

// finish answers w.
func (r *checkRound) finish(w *checkWaiter, err error) {
	w.done <- err
	w.acks = 0
	r.open--
}

// errUnconfirmed: no quorum answered a read's leadership check, asked
// twice, within two timeouts. The read then takes raft's own ReadIndex
// round, which needs no answer from the peers' hosts: peers running a kvd
// that predates leader checks (a rolling upgrade) never answer, and a
// very slow link answers too late.
var errUnconfirmed = errors.New("raftnode: leadership check unanswered")

// expire runs on every Host tick. It drops the reads whose callers gave
// up, fails those whose replica stopped leading (as raft fails its pending
// reads on a step-down, so the client goes to the new leader now rather
// than at its deadline), hands reads unconfirmed for two timeouts to
// raft's own round (errUnconfirmed), asks again about rounds unanswered
// for the timeout (a lost message, a slow link), and starts a round for
// reads queued behind a stale one.
func (lc *leaderChecks) expire() {
	lc.mu.Lock()
	defer lc.mu.Unlock()
	now := lc.now()
	lc.rounds = slices.DeleteFunc(lc.rounds, func(r *checkRound) bool {
		for _, ws := range r.byShard {
			for _, w := range ws {
				switch {
				case w.acks == 0:
				case w.ctx.Err() != nil:
					r.finish(w, w.ctx.Err())
				case w.node.readyTerm.Load() != w.term:
					r.finish(w, &NotLeaderError{Shard: w.node.cfg.Shard, Leader: w.node.Leader()})
				case now.Sub(r.started) >= 2*lc.timeout:
					r.finish(w, errUnconfirmed)
				}
			}
		}
		if r.open == 0 {
			return true
		}
		if now.Sub(r.sent) >= lc.timeout {
			lc.askLocked(r, now)
		}
		return false
	})
	if len(lc.queued) > 0 && !lc.freshLocked(now) {
		lc.startRoundLocked(now)
	}
}

// readIndexTarget returns what rule 1 needs for a read on this replica:
// its term, the index to wait for and the voters to ask. ok is false when
// the read must take raft's own round.
func (n *Node) readIndexTarget() (term, index uint64, voters []uint64, ok bool) {
	term = n.term.Load()
	if n.readyTerm.Load() != term { // 0 unless this replica leads
		return 0, 0, nil, false
	}
	index = n.commit.Load()
	cs := n.conf.Load()
	if cs == nil || len(cs.GetVotersOutgoing()) > 0 || !slices.Contains(cs.GetVoters(), n.cfg.NodeID) {
		return 0, 0, nil, false
	}
	return term, index, cs.GetVoters(), true
}

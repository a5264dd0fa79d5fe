package raftnode

import (
	"fmt"
	"runtime/debug"
	"strings"
	"sync"
	"time"
)

// lane is one of the host's loops and the replicas it owns: those whose
// shards live in one storage partition (storage.Store). Each lane saves to
// its own partition, so a lane waits only for its own partition's writes.
type lane struct {
	index int
	// woken lists the replicas the lane visits next (Node.wake); spare
	// is the list it took last time, reused.
	woken struct {
		sync.Mutex
		nodes, spare []*Node
	}
	wakec chan struct{} // buffered 1: the lane has replicas to visit
	ticks <-chan time.Time
}

// run is a lane's loop: the one goroutine that owns the RawNode of each
// of the lane's replicas. Each iteration visits the replicas that
// something woke (a message, a proposal, a read, a call, Stop), or all of
// them on a tick or a commit; steps their input into raft; takes every
// Ready they have and saves them as one storage request; then sends,
// answers and advances each. So a round costs one wake-up of this
// goroutine and one of the partition's storage writer, however many of
// its groups took part, where a goroutine per group paid both for each
// group (the design etcd's raft leaves to its user, and the one
// dragonboat and TiKV chose for many groups). A lane per partition keeps
// one group's slow saves (large transactions) from holding back the
// groups of other partitions, as dragonboat's step workers do.
func (h *Host) run(l *lane) {
	defer h.wg.Done()
	ticks := l.ticks
	if ticks == nil {
		t := time.NewTicker(h.cfg.TickInterval)
		defer t.Stop()
		ticks = t.C
	}
	appliedc := h.eng.AppliedC(l.index)
	var visit []*Node
	for {
		var tick, all bool
		select {
		case <-h.stopc:
			h.stopAll(l)
			return
		case <-ticks:
			tick, all = true, true
		case <-appliedc:
			// A commit moved what readers see: every replica publishes
			// it and releases the reads it satisfies.
			all = true
		case <-l.wakec:
		}
		visit = h.iterate(l, visit[:0], tick, all)
	}
}

// iterate is one pass of lane l's loop over the replicas woken since the
// last one, or over all of them when all; tick ticks them first. It
// returns visit, emptied, for the next pass to reuse. Tests call it
// directly to step a host without its goroutine.
func (h *Host) iterate(l *lane, visit []*Node, tick, all bool) []*Node {
	visit = h.toVisit(l, visit, all)
	if tick {
		for _, n := range visit {
			n.guard("tick", func() error { n.st.rn.Tick(); return nil })
		}
		if l.index == 0 {
			h.checks.expire()
		}
	}
	for _, n := range visit {
		if !n.st.done {
			n.guard("step", func() error { n.takeInput(); return nil })
		}
	}
	h.handleReadies(l, visit)
	for _, n := range visit {
		if n.st.done {
			continue
		}
		n.guard("apply", func() error {
			if err := n.afterApply(); err != nil {
				return err
			}
			// A replica with another Ready (its own append
			// acknowledged by Advance, say) is visited again at once,
			// after the input that arrived during the save: proposals
			// that join its next Ready send their entries with the
			// commit index it moved, which then needs no append of its
			// own (dropCoveredCommits).
			if n.st.rn.HasReady() {
				n.wake()
			}
			return nil
		})
	}
	for _, n := range visit {
		n.st.visiting = false
	}
	clear(visit)
	return visit[:0]
}

// toVisit appends to visit the replicas of l woken since the last
// iteration, or every replica of l when all, each once.
func (h *Host) toVisit(l *lane, visit []*Node, all bool) []*Node {
	l.woken.Lock()
	woken := l.woken.nodes
	l.woken.nodes = l.woken.spare[:0]
	l.woken.spare = woken
	l.woken.Unlock()
	add := func(n *Node) {
		if !n.st.visiting && !n.st.done {
			n.st.visiting = true
			visit = append(visit, n)
		}
	}
	for i, n := range woken {
		// Cleared before the node's channels are drained, so a send
		// after the drain wakes the loop again.
		n.woken.Store(false)
		add(n)
		woken[i] = nil
	}
	if all {
		h.mu.RLock()
		for _, n := range h.mu.nodes {
			if n.lane == l {
				add(n)
			}
		}
		h.mu.RUnlock()
	}
	return visit
}

// wake puts n on the list of replicas its lane visits next.
func (h *Host) wake(n *Node) {
	l := n.lane
	l.woken.Lock()
	l.woken.nodes = append(l.woken.nodes, n)
	l.woken.Unlock()
	select {
	case l.wakec <- struct{}{}:
	default:
	}
}

// handleReadies takes the Ready of every replica in nodes that has one,
// saves them in one storage request, and finishes each.
func (h *Host) handleReadies(l *lane, nodes []*Node) {
	var readies []*pendingReady
	var updates []shardUpdate
	for _, n := range nodes {
		if n.st.done {
			continue
		}
		var pr *pendingReady
		n.guard("ready", func() (err error) {
			if n.st.rn.HasReady() {
				pr, err = n.takeReady()
			}
			return err
		})
		if pr == nil || n.st.done {
			continue
		}
		readies = append(readies, pr)
		if pr.u != nil {
			updates = append(updates, shardUpdate{shard: n.cfg.Storage, update: pr.u})
		}
	}
	var errs []error
	if len(updates) > 0 {
		errs = h.eng.SaveAll(l.index, updates)
	}
	i := 0
	for _, pr := range readies {
		var err error
		if pr.u != nil {
			err = errs[i]
			i++
		}
		pr.n.guard("ready", func() error { return pr.n.finishReady(pr, err) })
	}
}

// guard runs f, one step of n's part of an iteration, and stops n alone
// with the error f returns or the panic it raises. The raft library
// panics on a broken invariant, such as a leader committing beyond this
// replica's log when the log lost entries it had acknowledged; that must
// stop this group, with an error its owner sees (Err, Done), not the
// node's other groups or the process.
func (n *Node) guard(what string, f func() error) {
	defer func() {
		p := recover()
		if p == nil {
			return
		}
		err := panicError(n.cfg.Shard, p)
		n.log.Error("raft group failed; stopping this replica", "during", what, "panic", fmt.Sprint(p), "err", err, "stack", string(debug.Stack()))
		if !n.st.done {
			n.stop(err)
		}
	}()
	if err := f(); err != nil && !n.st.done {
		n.halt(err)
	}
}

// panicError is the error a replica stops with after raft panicked with p.
func panicError(shard uint64, p any) error {
	msg := fmt.Sprint(p)
	// raft's raftLog.commitTo: a leader commits beyond this log.
	if strings.Contains(msg, "out of range [lastIndex(") {
		return fmt.Errorf("%w: %w: shard %d: %s; %s", ErrRaftPanic, ErrLogBehind, shard, msg, rejoinAdvice)
	}
	return fmt.Errorf("%w: shard %d: %s", ErrRaftPanic, shard, msg)
}

// stopAll lets every replica of l go, as its loop stops.
func (h *Host) stopAll(l *lane) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.mu.stopped = true
	for _, n := range h.mu.nodes {
		if n.lane == l && !n.st.done {
			n.halt(nil)
		}
	}
}

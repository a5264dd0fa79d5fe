package raftnode

import (
	"time"

	"github.com/kvd/kvd/storage"
)

// run is the host's loop: the one goroutine that owns every replica's
// RawNode. Each iteration visits the replicas that something woke (a
// message, a proposal, a read, a call, Stop), or all of them on a tick or
// a commit; steps their input into raft; takes every Ready they have and
// saves them as one storage request; then sends, answers and advances
// each. So a node round costs one wake-up of this goroutine and one of the
// storage writer, however many of its groups took part, where a goroutine
// per group paid both for each group (the design etcd's raft leaves to
// its user, and the one dragonboat and TiKV chose for many groups).
func (h *Host) run() {
	defer h.wg.Done()
	t := time.NewTicker(h.cfg.TickInterval)
	defer t.Stop()
	appliedc := h.cfg.Engine.AppliedC()
	var visit []*Node
	for {
		var tick, all bool
		select {
		case <-h.stopc:
			h.stopAll()
			return
		case <-t.C:
			tick, all = true, true
		case <-appliedc:
			// A commit moved what readers see: every replica publishes
			// it and releases the reads it satisfies.
			all = true
		case <-h.wakec:
		}
		visit = h.toVisit(visit[:0], all)
		if tick {
			for _, n := range visit {
				n.st.rn.Tick()
			}
			h.checks.expire()
		}
		for _, n := range visit {
			n.takeInput()
		}
		h.handleReadies(visit)
		for _, n := range visit {
			if n.st.done {
				continue
			}
			if err := n.afterApply(); err != nil {
				n.halt(err)
				continue
			}
			// A replica with another Ready (its own append acknowledged
			// by Advance, say) is visited again at once, after the input
			// that arrived during the save: proposals that join its next
			// Ready send their entries with the commit index it moved,
			// which then needs no append of its own (dropCoveredCommits).
			if n.st.rn.HasReady() {
				n.wake()
			}
		}
		for _, n := range visit {
			n.st.visiting = false
		}
		clear(visit)
	}
}

// toVisit appends to visit the replicas woken since the last iteration,
// or every replica when all, each once.
func (h *Host) toVisit(visit []*Node, all bool) []*Node {
	h.woken.Lock()
	woken := h.woken.nodes
	h.woken.nodes = h.woken.spare[:0]
	h.woken.spare = woken
	h.woken.Unlock()
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
			add(n)
		}
		h.mu.RUnlock()
	}
	return visit
}

// wake puts n on the list of replicas the loop visits next.
func (h *Host) wake(n *Node) {
	h.woken.Lock()
	h.woken.nodes = append(h.woken.nodes, n)
	h.woken.Unlock()
	select {
	case h.wakec <- struct{}{}:
	default:
	}
}

// handleReadies takes the Ready of every replica in nodes that has one,
// saves them in one storage request, and finishes each.
func (h *Host) handleReadies(nodes []*Node) {
	var readies []*pendingReady
	var updates []storage.ShardUpdate
	for _, n := range nodes {
		if n.st.done || !n.st.rn.HasReady() {
			continue
		}
		pr, err := n.takeReady()
		if err != nil {
			n.halt(err)
			continue
		}
		readies = append(readies, pr)
		if pr.u != nil {
			updates = append(updates, storage.ShardUpdate{Shard: n.cfg.Storage, Update: pr.u})
		}
	}
	var errs []error
	if len(updates) > 0 {
		errs = h.cfg.Engine.SaveAll(updates)
	}
	i := 0
	for _, pr := range readies {
		var err error
		if pr.u != nil {
			err = errs[i]
			i++
		}
		if err = pr.n.finishReady(pr, err); err != nil {
			pr.n.halt(err)
		}
	}
}

// stopAll lets every replica go, as the loop stops.
func (h *Host) stopAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.mu.stopped = true
	for _, n := range h.mu.nodes {
		if !n.st.done {
			n.halt(nil)
		}
	}
}

package jepsenlite

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/client/concurrency"
	"github.com/kvd/kvd/proto/kvpb"
)

// The lock workload: workers take one concurrency.Mutex in turn and, while
// they hold it, write a register of the lock's shard with a Txn fenced by
// the mutex (compare: the holder's key still has the create revision that
// is its token), then unlock. Now and then a holder "crashes": it stops
// renewing its session without unlocking, and the lock must pass on once
// the session's lease expires.
const (
	lockName = "jl-lock"
	// lockRegister shares the lock's hash tag, so the fenced Txn (compare
	// on the lock key, put of the register) is single-shard.
	lockRegister = "{" + lockName + "}.reg"
	// lockTTL is the sessions' lease TTL.
	lockTTL = 2 * time.Second
	// lockElection is the longest election timeout of the nodes under test
	// (10 ticks of 50 ms, randomised up to twice that): what a new meta
	// shard leader adds to every lease.
	lockElection = time.Second
	// lockTakeoverBound is how soon an abandoned lock must be taken over
	// when no fault is active, or after the last fault that overlapped the
	// wait has healed and every node is ready again: the TTL, an election
	// timeout, and a second for the revocation to apply and the next
	// waiter to see it.
	lockTakeoverBound = lockTTL + lockElection + time.Second
	// lockWait bounds one Lock call.
	lockWait = 10 * time.Second
	// lockAbandonOneIn: one hold in this many ends in a crash.
	lockAbandonOneIn = 5
)

// Lock workload op kinds (Op.Lock is set on all of them).
const (
	kindLock    = "lock"    // Mutex.Lock; Token is the token it returned
	kindFenced  = "fenced"  // Txn: IsOwner() then put the register; Swapped says it applied
	kindUnlock  = "unlock"  // Mutex.Unlock
	kindAbandon = "abandon" // the holder stops renewing its session without unlocking
)

func holderName(worker int) string { return "w" + strconv.Itoa(worker) }

// fencedValue is what a fenced write puts: holder, token and a sequence
// number unique to the holder.
func fencedValue(holder string, token int64, seq int) string {
	return fmt.Sprintf("%s:%d:%d", holder, token, seq)
}

// parseFenced returns the token of a fenced write's value.
func parseFenced(v string) (holder string, token int64, ok bool) {
	parts := strings.Split(v, ":")
	if len(parts) != 3 {
		return "", 0, false
	}
	t, err := strconv.ParseInt(parts[1], 10, 64)
	if err != nil {
		return "", 0, false
	}
	return parts[0], t, true
}

func (r *recorder) lock(ctx context.Context, m *concurrency.Mutex, holder string) Op {
	ctx, cancel := context.WithTimeout(ctx, lockWait)
	defer cancel()
	op := Op{Key: lockName, Kind: kindLock, Lock: true, Holder: holder, Call: r.h.now()}
	err := m.Lock(ctx)
	op.Token = m.Token()
	return r.finish(op, err)
}

func (r *recorder) fenced(m *concurrency.Mutex, holder string, seq int) Op {
	ctx, cancel := context.WithTimeout(context.Background(), r.timeout)
	defer cancel()
	v := fencedValue(holder, m.Token(), seq)
	op := Op{Key: lockRegister, Kind: kindFenced, Lock: true, Holder: holder, Token: m.Token(), Value: v, Call: r.h.now()}
	resp, err := r.cl.Txn(ctx, &kvpb.TxnRequest{
		Compare: []*kvpb.Compare{m.IsOwner()},
		Success: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: []byte(lockRegister), Value: []byte(v)}}}},
	})
	if err == nil {
		op.Swapped = resp.GetSucceeded()
		op.Rev = resp.GetHeader().GetRevision()
	}
	return r.finish(op, err)
}

func (r *recorder) unlock(m *concurrency.Mutex, holder string) Op {
	ctx, cancel := context.WithTimeout(context.Background(), r.timeout)
	defer cancel()
	op := Op{Key: lockName, Kind: kindUnlock, Lock: true, Holder: holder, Token: m.Token(), Call: r.h.now()}
	return r.finish(op, m.Unlock(ctx))
}

// abandon records a holder's crash: it orphans its session (no more
// renewals, no unlock), so the lock stays until the lease's TTL runs out.
func (r *recorder) abandon(s *concurrency.Session, m *concurrency.Mutex, holder string) {
	op := Op{Key: lockName, Kind: kindAbandon, Lock: true, Holder: holder, Token: m.Token(), Call: r.h.now()}
	s.Orphan()
	r.finish(op, nil)
}

// lockWorker locks, writes the register twice fenced by the lock, and
// unlocks (or, one hold in lockAbandonOneIn, abandons its session), until
// stop. A session that ends (its lease lost under a fault) is replaced.
func lockWorker(r *recorder, id int, rng *rand.Rand, stop <-chan struct{}, pace time.Duration) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-stop:
			cancel() // ends a Lock that waits
		case <-ctx.Done():
		}
	}()
	holder := holderName(id)
	var s *concurrency.Session
	defer func() {
		if s != nil {
			cctx, ccancel := context.WithTimeout(context.Background(), r.timeout)
			defer ccancel()
			_ = s.Close(cctx)
		}
	}()
	seq := 0
	for {
		if !paceWait(rng, stop, pace) {
			return
		}
		abandon := rng.IntN(lockAbandonOneIn) == 0 // drawn every round
		if s != nil {
			select {
			case <-s.Done():
				s = nil // lease lost: whatever it held is gone
			default:
			}
		}
		if s == nil {
			sctx, scancel := context.WithTimeout(ctx, r.timeout)
			ns, err := concurrency.NewSession(sctx, r.cl, concurrency.WithTTL(lockTTL))
			scancel()
			if err != nil {
				continue
			}
			s = ns
		}
		m, err := concurrency.NewMutex(s, lockName)
		if err != nil {
			panic(err) // a constant, valid name
		}
		if op := r.lock(ctx, m, holder); op.Status != statusOK {
			continue
		}
		for range 2 {
			seq++
			r.fenced(m, holder, seq)
		}
		if abandon {
			r.abandon(s, m, holder)
			s = nil
			continue
		}
		r.unlock(m, holder)
	}
}

// lockResult is the outcome of the lock check.
type lockResult struct {
	locks, fenced, fencedRefused, fencedInfo int
	abandons, takeovers, quiet               int
	// takeoverMax is the longest time from an abandon to the next
	// acquisition, quietMax the longest of those no fault overlapped.
	takeoverMax, quietMax time.Duration
	anomalies             int
	examples              []string
}

// faultWindows are the nemesis's faults in history time, from the start
// to the moment every node is ready after the heal.
func faultWindows(events []Event) [][2]int64 {
	var out [][2]int64
	open := int64(-1)
	for _, e := range events {
		switch {
		case strings.HasPrefix(e.Event, "start "):
			open = e.Time
		case e.Event == "ready" && open >= 0:
			out = append(out, [2]int64{open, e.Time})
			open = -1
		}
	}
	if open >= 0 {
		out = append(out, [2]int64{open, 1<<63 - 1})
	}
	return out
}

// checkLocks checks the lock workload's ops (Op.Lock) of a history.
// Safety: committed fenced writes, ordered by revision, have
// non-decreasing tokens, each token belongs to one holder, and each write
// carries the token its holder's last Lock returned; a token is handed to
// one holder only; the register's final value is a fenced write's with a
// token no smaller than any committed one (an indeterminate stale write
// applied late would break that). Progress: each abandoned lock is taken
// over (the next successful Lock completes) within bound of the abandon,
// or, when faults overlap the wait, within bound of the last such fault's
// end (every node ready again): the deadline moves past each fault that
// starts before it. stopAt (history
// time the workers were told to stop) ends the measurement: an abandon
// whose deadline is later is not judged.
func checkLocks(ops []Op, events []Event, bound time.Duration, stopAt int64) lockResult {
	var res lockResult
	flag := func(format string, args ...any) {
		res.anomalies++
		if len(res.examples) < 10 {
			res.examples = append(res.examples, fmt.Sprintf(format, args...))
		}
	}
	var lockOps []Op
	for _, op := range ops {
		if op.Lock {
			lockOps = append(lockOps, op)
		}
	}
	sort.SliceStable(lockOps, func(i, j int) bool { return lockOps[i].Call < lockOps[j].Call })

	// Tokens: one holder each; a fenced write carries its holder's token.
	tokenHolder := map[int64]string{}
	current := map[string]int64{} // holder -> token of its last Lock that succeeded
	var committed []Op
	written := map[string]bool{} // values that fenced writes may have applied
	var acquired []Op
	var abandons []Op
	for _, op := range lockOps {
		switch op.Kind {
		case kindLock:
			if op.Status != statusOK {
				continue
			}
			res.locks++
			acquired = append(acquired, op)
			if h, ok := tokenHolder[op.Token]; ok && h != op.Holder {
				flag("token %d handed to %s and to %s", op.Token, h, op.Holder)
			}
			tokenHolder[op.Token] = op.Holder
			current[op.Holder] = op.Token
		case kindFenced:
			h, tok, ok := parseFenced(op.Value)
			if !ok || h != op.Holder || tok != op.Token {
				flag("fenced write %q by %s with token %d: malformed", op.Value, op.Holder, op.Token)
			}
			if op.Token != current[op.Holder] {
				flag("fenced write %q by %s carries token %d, but its lock's token is %d", op.Value, op.Holder, op.Token, current[op.Holder])
			}
			switch {
			case op.Status == statusInfo:
				res.fencedInfo++
				written[op.Value] = true
			case op.Status == statusOK && op.Swapped:
				res.fenced++
				written[op.Value] = true
				committed = append(committed, op)
			case op.Status == statusOK:
				res.fencedRefused++
			}
		case kindAbandon:
			abandons = append(abandons, op)
		}
	}

	// Mutual exclusion of the committed writes, in revision order.
	sort.SliceStable(committed, func(i, j int) bool { return committed[i].Rev < committed[j].Rev })
	var maxTok int64
	for i, w := range committed {
		if h, ok := tokenHolder[w.Token]; ok && h != w.Holder {
			flag("fenced write %q at revision %d by %s, but token %d is %s's", w.Value, w.Rev, w.Holder, w.Token, h)
		}
		if i > 0 {
			p := committed[i-1]
			if w.Rev == p.Rev {
				flag("fenced writes %q and %q both committed at revision %d", p.Value, w.Value, w.Rev)
			}
			if w.Token < maxTok {
				flag("fenced write %q (token %d) at revision %d follows a write with token %d: a stale holder wrote after a newer one", w.Value, w.Token, w.Rev, maxTok)
			}
		}
		maxTok = max(maxTok, w.Token)
	}

	// The register's final value.
	for _, op := range lockOps {
		if !op.Final || op.Kind != kindGet || op.Status != statusOK {
			continue
		}
		if op.Read == "" {
			if len(committed) > 0 {
				flag("final read of %s: absent, after %d committed fenced writes", op.Key, len(committed))
			}
			continue
		}
		_, tok, ok := parseFenced(op.Read)
		switch {
		case !ok || !written[op.Read]:
			flag("final read of %s: %q, which no fenced write wrote", op.Key, op.Read)
		case tok < maxTok:
			flag("final read of %s: %q (token %d) although token %d wrote: a stale write applied last", op.Key, op.Read, tok, maxTok)
		}
	}

	// Progress: abandon -> next acquisition.
	sort.SliceStable(acquired, func(i, j int) bool { return acquired[i].Return < acquired[j].Return })
	windows := faultWindows(events)
	for _, a := range abandons {
		res.abandons++
		deadline := a.Call + int64(bound)
		for moved := true; moved; {
			moved = false
			for _, w := range windows {
				if w[0] <= deadline && w[1]+int64(bound) > deadline {
					deadline, moved = w[1]+int64(bound), true
				}
			}
		}
		i := sort.Search(len(acquired), func(i int) bool { return acquired[i].Return > a.Call })
		if i == len(acquired) || acquired[i].Return > stopAt {
			if deadline < stopAt {
				flag("lock abandoned by %s (token %d) at %v: not taken over by %v, nor before the workers stopped at %v",
					a.Holder, a.Token, time.Duration(a.Call), time.Duration(deadline), time.Duration(stopAt))
			}
			continue
		}
		res.takeovers++
		next := acquired[i]
		gap := time.Duration(next.Return - a.Call)
		res.takeoverMax = max(res.takeoverMax, gap)
		if !slices.ContainsFunc(windows, func(w [2]int64) bool { return w[0] <= next.Return && w[1] >= a.Call }) {
			res.quiet++
			res.quietMax = max(res.quietMax, gap)
		}
		if next.Return > deadline {
			flag("lock abandoned by %s (token %d) at %v taken over by %s after %v: later than %v (%v after the abandon or after the last fault in the way ended)",
				a.Holder, a.Token, time.Duration(a.Call), next.Holder, gap.Round(time.Millisecond), time.Duration(deadline), bound)
		}
	}
	return res
}

// lockRead reads the register (linearizably) as a lock workload op; the
// final read after the restart.
func (r *recorder) lockRead() Op {
	ctx, cancel := context.WithTimeout(context.Background(), r.timeout)
	defer cancel()
	op := Op{Key: lockRegister, Kind: kindGet, Lock: true, Call: r.h.now()}
	kv, err := r.cl.Get(ctx, []byte(lockRegister))
	switch {
	case err == nil:
		op.Read = string(kv.GetValue())
	case errors.Is(err, client.ErrNotFound):
		err = nil
	}
	return r.finish(op, err)
}

package jepsenlite

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/proto/kvpb"
)

// recorder issues operations through one kvd client (one session) and
// records each in the history with its invoke and completion times.
type recorder struct {
	h       *History
	cl      *client.Client
	timeout time.Duration
	// unsafeNode, when set, makes get ask that one node (a client
	// address) for its local, serializable value while the history still
	// presents the answer as a linearizable read: a deliberately broken
	// harness, for showing that the checker catches stale reads. It goes
	// to the node directly, not through the client library, whose
	// breaker rightly avoids a node that has lost its quorum. Only tests
	// in this package set it.
	unsafeNode string
	// procs hands out porcupine client ids: a client whose operation is
	// indeterminate continues as a new process, as in Jepsen, so that one
	// process's operations never overlap in the visualization.
	procs *atomic.Int64
	proc  int
	// final marks the ops as the final reads.
	final bool
}

func newRecorder(h *History, cl *client.Client, timeout time.Duration, procs *atomic.Int64) *recorder {
	return &recorder{h: h, cl: cl, timeout: timeout, procs: procs, proc: int(procs.Add(1) - 1)}
}

// finish completes op from err (nil = ok) and records it.
func (r *recorder) finish(op Op, err error) Op {
	op.Client = r.proc
	op.Final = r.final
	switch {
	case err == nil:
		op.Status = statusOK
		op.Return = r.h.now()
	case errors.Is(err, client.ErrInvalidArgument):
		// Rejected as malformed by the server (or the client, before
		// sending): never applied.
		op.Status = statusFail
		op.Return = r.h.now()
		op.Err = err.Error()
	default:
		// Timed out or unavailable: a write may have committed, or may
		// still commit later. (A read's outcome is unknown too, but it
		// has no effect: the checker leaves such reads out.)
		op.Status = statusInfo
		op.Return = -1
		op.Err = err.Error()
		r.proc = int(r.procs.Add(1) - 1)
	}
	r.h.add(op)
	return op
}

func (r *recorder) get(key string, counter bool) Op {
	ctx, cancel := context.WithTimeout(context.Background(), r.timeout)
	defer cancel()
	op := Op{Key: key, Kind: kindGet, Counter: counter, Call: r.h.now()}
	var (
		kv  *kvpb.KeyValue
		err error
	)
	if r.unsafeNode != "" {
		if kv, err = proccluster.LocalGet(ctx, r.unsafeNode, key); err == nil && kv == nil {
			err = client.ErrNotFound
		}
	} else {
		kv, err = r.cl.Get(ctx, []byte(key))
	}
	switch {
	case err == nil:
		op.Read = string(kv.GetValue())
	case errors.Is(err, client.ErrNotFound):
		err = nil
	}
	return r.finish(op, err)
}

func (r *recorder) put(key, value string) Op {
	ctx, cancel := context.WithTimeout(context.Background(), r.timeout)
	defer cancel()
	op := Op{Key: key, Kind: kindPut, Value: value, Call: r.h.now()}
	resp, err := r.cl.Put(ctx, []byte(key), []byte(value))
	op.Rev = resp.GetHeader().GetRevision()
	return r.finish(op, err)
}

func (r *recorder) del(key string) Op {
	ctx, cancel := context.WithTimeout(context.Background(), r.timeout)
	defer cancel()
	op := Op{Key: key, Kind: kindDel, Call: r.h.now()}
	resp, err := r.cl.Delete(ctx, []byte(key))
	op.Rev, op.Deleted = resp.GetHeader().GetRevision(), resp.GetDeleted() > 0
	return r.finish(op, err)
}

// cas sets key to value if its value is expect ("" = the key is absent),
// as one Txn: compare, then put on success.
func (r *recorder) cas(key, expect, value string, counter bool) Op {
	ctx, cancel := context.WithTimeout(context.Background(), r.timeout)
	defer cancel()
	cmp := &kvpb.Compare{Key: []byte(key), Target: kvpb.Compare_VALUE, Result: kvpb.Compare_EQUAL, Value: []byte(expect)}
	if expect == "" {
		cmp = &kvpb.Compare{Key: []byte(key), Target: kvpb.Compare_EXISTS, Result: kvpb.Compare_EQUAL, Exists: false}
	}
	req := &kvpb.TxnRequest{
		Compare: []*kvpb.Compare{cmp},
		Success: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: []byte(key), Value: []byte(value)}}}},
	}
	op := Op{Key: key, Kind: kindCas, Value: value, Expect: expect, Counter: counter, Call: r.h.now()}
	resp, err := r.cl.Txn(ctx, req)
	if err == nil {
		op.Swapped = resp.GetSucceeded()
		op.Rev = resp.GetHeader().GetRevision()
	}
	return r.finish(op, err)
}

// keySpace hands out register keys. Each of a few slots holds one key at
// a time and moves to a fresh key after opsPerKey operations, so every
// key's history stays short enough for porcupine to check quickly even
// with indeterminate writes, which stay open to the end.
type keySpace struct {
	opsPerKey int
	mu        struct {
		sync.Mutex
		gen   []int
		count []int
		used  []string
	}
}

func newKeySpace(slots, opsPerKey int) *keySpace {
	ks := &keySpace{opsPerKey: opsPerKey}
	ks.mu.gen = make([]int, slots)
	ks.mu.count = make([]int, slots)
	for s := range slots {
		ks.mu.used = append(ks.mu.used, keyName(s, 0))
	}
	return ks
}

func keyName(slot, gen int) string { return fmt.Sprintf("jl/r%d.%d", slot, gen) }

func (ks *keySpace) pick(rng *rand.Rand) string {
	ks.mu.Lock()
	defer ks.mu.Unlock()
	s := rng.IntN(len(ks.mu.gen))
	if ks.mu.count[s] >= ks.opsPerKey {
		ks.mu.count[s] = 0
		ks.mu.gen[s]++
		ks.mu.used = append(ks.mu.used, keyName(s, ks.mu.gen[s]))
	}
	ks.mu.count[s]++
	return keyName(s, ks.mu.gen[s])
}

func (ks *keySpace) keys() []string {
	ks.mu.Lock()
	defer ks.mu.Unlock()
	return append([]string(nil), ks.mu.used...)
}

func counterKey(i int) string { return "jl/ctr" + strconv.Itoa(i) }

// registerWorker runs gets, puts (of values unique in the run), deletes
// and cases (expecting the value it last saw, so that some succeed) until
// stop.
func registerWorker(r *recorder, id int, rng *rand.Rand, ks *keySpace, stop <-chan struct{}, pace time.Duration) {
	last := map[string]string{}
	for n := 0; ; n++ {
		if !paceWait(rng, stop, pace) {
			return
		}
		key := ks.pick(rng)
		value := fmt.Sprintf("%d.%d", id, n)
		switch x := rng.IntN(10); {
		case x < 4:
			if op := r.get(key, false); op.Status == statusOK {
				last[key] = op.Read
			}
		case x < 6:
			r.put(key, value)
		case x < 7:
			r.del(key)
		default:
			r.cas(key, last[key], value, false)
		}
	}
}

// counterWorker increments counters with a read followed by a cas from
// the value read to its successor; the client retries each cas (same
// session and sequence number) across timeouts and failovers.
func counterWorker(r *recorder, rng *rand.Rand, counters int, stop <-chan struct{}, pace time.Duration) {
	for {
		if !paceWait(rng, stop, pace) {
			return
		}
		key := counterKey(rng.IntN(counters))
		op := r.get(key, true)
		if op.Status != statusOK {
			continue
		}
		cur := 0
		if op.Read != "" {
			n, err := strconv.Atoi(op.Read)
			if err != nil {
				continue // reported by the counter check
			}
			cur = n
		}
		r.cas(key, op.Read, strconv.Itoa(cur+1), true)
	}
}

// paceWait waits a random think time up to pace (workload pacing on this
// small machine, not synchronisation); false once stop is closed.
func paceWait(rng *rand.Rand, stop <-chan struct{}, pace time.Duration) bool {
	select {
	case <-stop:
		return false
	default:
	}
	if pace <= 0 {
		return true
	}
	t := time.NewTimer(time.Duration(rng.Int64N(int64(pace))))
	defer t.Stop()
	select {
	case <-stop:
		return false
	case <-t.C:
		return true
	}
}

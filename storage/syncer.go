package storage

import (
	"fmt"
	"os"
	"runtime"
	"sync"
	"time"
)

// The syncer makes WAL records durable on its own goroutine, so the
// writer need not wait for fdatasync: it hands each round over with its
// record written and goes on to the next round while the disk syncs. The
// next round's applies, which answer proposals and need no sync, then no
// longer wait behind the previous round's fdatasync, and its record is
// written by the time that fdatasync returns. Rounds that pile up
// meanwhile share the next fdatasync. Before this the writer spent most
// of its time under load waiting for fdatasync (e8d5c59).
//
// The syncer publishes rounds' states and answers their waiters in the
// order the writer handed them over, each only after an fdatasync that
// began after its record was written. The writer reads the newest state
// of a shard from Engine.latest, not from the published one, which may
// lag by the rounds in the syncer. Anything that commits bbolt first
// waits until the syncer has caught up (drainSyncs): a commit restarts the
// WAL, and publishes states that must not be overtaken.

// syncBatch is a round handed to the syncer, or a barrier.
type syncBatch struct {
	rs       *round
	waiting  []waiter
	needSync bool      // rs wrote a WAL record
	written  time.Time // when the writer started the record
	// barrier, when non-nil, is closed once every earlier batch is done.
	barrier chan struct{}
}

// handOff gives rs to the syncer; its record, if any, is written.
func (e *Engine) handOff(rs *round, waiting []waiter, needSync bool, written time.Time) {
	e.syncPending.Add(1)
	e.syncc <- &syncBatch{rs: rs, waiting: waiting, needSync: needSync, written: written}
}

// drainSyncs waits until the syncer has done every round handed to it, and
// returns the error that failed one, if any.
func (e *Engine) drainSyncs() error {
	if e.syncPending.Load() > 0 {
		b := &syncBatch{barrier: make(chan struct{})}
		e.syncc <- b
		<-b.barrier
	}
	return e.syncFailure()
}

// syncFailure returns why an fdatasync failed, or nil.
func (e *Engine) syncFailure() error {
	if p := e.syncErr.Load(); p != nil {
		return *p
	}
	return nil
}

// syncer runs until syncc is closed (by the writer, as it returns).
func (e *Engine) syncer() {
	defer close(e.syncerDone)
	var failed error // why an fdatasync failed; answerFailed is what waiters get
	var answerFailed response
	var batch []*syncBatch
	for first := range e.syncc {
		batch = takeQueued(e.syncc, append(batch[:0], first))
		needSync, oldest := false, time.Time{}
		for _, b := range batch {
			if b.needSync && !needSync {
				needSync, oldest = true, b.written
			}
		}
		// Every record written before the fdatasync begins is durable once
		// it returns; later records say so (wal.go).
		written := e.wal.written.Load()
		if needSync && failed == nil && e.wal.sync {
			if err := e.wal.syncs.sync(e.wal.f); err != nil {
				failed = fmt.Errorf("storage: sync wal: %w", err)
				answerFailed = response{err: fmt.Errorf("%w: %w", ErrFailed, failed)}
				e.syncErr.Store(&failed)
				e.markFailed(answerFailed.err)
				e.log.Error("storage WAL sync failed; refusing further writes", "err", failed)
			}
		}
		if needSync && failed == nil {
			e.wal.synced.Store(written)
			e.stats.Lock()
			e.stats.s.Syncs++
			e.stats.s.walSyncs++
			e.stats.s.SyncNanos.Observe(time.Since(oldest))
			e.stats.Unlock()
		}
		for i, b := range batch {
			if b.barrier != nil {
				close(b.barrier)
				continue
			}
			if failed == nil {
				b.rs.publish()
			}
			for _, w := range b.waiting {
				if failed != nil {
					w.resp = answerFailed
				}
				w.r.done <- w.resp
			}
			e.syncPending.Add(-1)
			batch[i] = nil
		}
	}
}

// fileSync runs the fdatasyncs of one file for every WAL in it: the
// partitions of a store share one WAL file, and each partition's syncer
// asks for a sync of it. A syncer that asks while an fdatasync runs waits
// for the next one, which makes durable whatever every partition wrote
// before it began. So one fdatasync at a time runs on the file, each for
// all partitions, where separate files took one per partition per round
// (at 4 partitions, 15,313 fdatasyncs for 24,645 partition syncs).
type fileSync struct {
	mu   sync.Mutex
	cond sync.Cond
	// shared: several WALs use the file (a store's partitions).
	shared          bool
	running         bool
	started, synced uint64 // fdatasyncs begun; the last one completed
	err             error  // the first failure: every later call gets it
}

// sync returns once an fdatasync of f that began after sync was called
// has completed, or the error of one that failed (then or before).
func (s *fileSync) sync(f *os.File) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cond.L == nil {
		s.cond.L = &s.mu
	}
	// One running now began before this call: wait for the next.
	want := s.started + 1
	yielded := false
	for s.synced < want && s.err == nil {
		if s.running {
			s.cond.Wait()
			continue
		}
		if s.shared && !yielded {
			// Before starting one, let the other partitions' writers
			// that are runnable write the records of their rounds, so
			// that the fdatasync covers them too (the one-file syncer
			// yields the same way before it takes its rounds).
			yielded = true
			s.mu.Unlock()
			runtime.Gosched()
			s.mu.Lock()
			continue
		}
		s.running = true
		s.started++
		n := s.started
		s.mu.Unlock()
		err := fdatasync(f)
		s.mu.Lock()
		s.running = false
		s.synced = n
		if err != nil {
			s.err = err
		}
		s.cond.Broadcast()
	}
	return s.err
}

// count returns how many fdatasyncs have completed.
func (s *fileSync) count() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.synced
}

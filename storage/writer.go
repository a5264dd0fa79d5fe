package storage

import (
	"errors"
	"fmt"
	"runtime"
	"runtime/debug"
	"time"

	bolt "go.etcd.io/bbolt"
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// request is one write waiting for the writer goroutine.
type request struct {
	// exec performs the write inside the round's transaction. It returns
	// the caller's answer, whose err rejects this request alone (checked
	// before exec writes anything), and a fatal error that fails the
	// whole round (bbolt refused a write).
	exec func(rs *round) (response, error)
	// save marks saves (SaveAll), which count their updates themselves
	// and, unlike every other request, need no bbolt commit.
	save bool
	// noWait: answer as soon as exec returns, before the round commits
	// (a Save with Update.NoWait).
	noWait bool
	done   chan response // buffered 1: the writer never blocks on a waiter
}

type response struct {
	shard *Shard
	seq   uint64
	err   error
}

// do hands r to the writer and waits for its answer.
func (e *Engine) do(r *request) response {
	r.done = make(chan response, 1)
	e.queued.Add(1)
	select {
	case e.reqc <- r:
		e.queued.Add(-1)
	case <-e.stopc:
		e.queued.Add(-1)
		return response{err: ErrClosed}
	}
	select {
	case resp := <-r.done:
		return resp
	case <-e.writerDone:
		// The writer answers every request it took before it returns.
		select {
		case resp := <-r.done:
			return resp
		default:
			return response{err: ErrClosed}
		}
	}
}

// writer is the one goroutine that writes to bbolt. It takes a request,
// then every request already waiting, from all shards, and performs them
// as one round: in the open bbolt transaction, made durable by one WAL
// record, which the syncer (syncer.go) fdatasyncs while the writer goes
// on to the next round, or by committing the transaction. Rounds written
// while an fdatasync runs share the next one, so the number of syncs
// follows the disk's speed, not the number of shards.
//
// The transaction stays open across rounds and commits when a request
// needs it (anything but a plain Save), Options.CommitInterval after it
// began, when the WAL nears its size, on Flush, and on Close.
func (e *Engine) writer() {
	defer close(e.writerDone)
	defer func() {
		// Every round handed over is answered before Close returns.
		close(e.syncc)
		<-e.syncerDone
	}()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		var tick <-chan time.Time
		if e.open.tx != nil {
			timer.Reset(time.Until(e.open.start.Add(e.opts.CommitInterval)))
			tick = timer.C
		}
		select {
		case <-e.stopc:
			if e.open.tx != nil {
				e.commitIdle()
			}
			return
		case r := <-e.reqc:
			e.runRound(r)
		case <-e.flushc:
			e.commitIdle()
		case <-tick:
			e.commitIdle()
		}
		timer.Stop()
	}
}

// takeQueued yields once, then appends to batch every value already
// waiting on c, stopping at an empty or closed channel. The writer takes
// its round this way (the shards the last round answered are runnable but
// may not have re-queued yet; yielding lets them, so a round carries every
// shard that writes, not just the first to wake), and the syncer its
// rounds (so one fdatasync covers the round the writer is building too).
func takeQueued[T any](c <-chan T, batch []T) []T {
	runtime.Gosched()
	for {
		select {
		case v, ok := <-c:
			if !ok {
				return batch
			}
			batch = append(batch, v)
		default:
			return batch
		}
	}
}

// openTx is the bbolt transaction that spans rounds until it commits.
// Owned by the writer.
type openTx struct {
	tx    *bolt.Tx
	start time.Time
}

// round is the state of one round of requests. Owned by the writer.
type round struct {
	e  *Engine
	tx *bolt.Tx
	// states are the working copies of the shards this round touches;
	// they replace the published states once the round is durable.
	states map[*Shard]*shardState
	// lockForCommit lists shards whose mu the writer holds across the
	// commit, because the round rewrites log entries older than their
	// cache, which readers fetch from bbolt (see Shard.mu).
	lockForCommit map[*Shard]bool
	created       []*Shard

	// commit: the round must end with a bbolt commit, not a WAL record.
	commit bool
	// walOps are the durable parts of the round's saves.
	walOps []walOp

	updates, entries, applied uint64
}

// waiter is a request performed in the round and waiting for it to be
// durable.
type waiter struct {
	r    *request
	resp response
}

// runRound performs first and every request that joins it. NoWait saves
// are answered as soon as they are performed; the others once the round
// is durable: by the syncer when the round writes a WAL record, here when
// it commits.
func (e *Engine) runRound(first *request) {
	batch := takeQueued(e.reqc, []*request{first})
	if e.failed == nil {
		if err := e.syncFailure(); err != nil {
			e.fail(err)
		}
	}
	if e.failed == nil && e.open.tx == nil {
		tx, err := e.db.Begin(true)
		if err != nil {
			e.fail(err)
		} else {
			e.open.tx, e.open.start = tx, time.Now()
		}
	}
	if e.failed != nil {
		for _, r := range batch {
			r.done <- response{err: e.failed}
		}
		return
	}
	rs := &round{
		e:             e,
		tx:            e.open.tx,
		states:        make(map[*Shard]*shardState),
		lockForCommit: make(map[*Shard]bool),
	}
	var waiting []waiter
	var fatal error
	done := 0 // batch[:done] are performed
	for ; done < len(batch); done++ {
		r := batch[done]
		var resp response
		if resp, fatal = rs.exec(r); fatal != nil {
			break
		}
		if !r.save {
			rs.commit = true
		}
		if r.noWait {
			r.done <- resp
		} else {
			waiting = append(waiting, waiter{r, resp})
		}
	}
	if fatal == nil {
		// Counted before anyone is answered: the syncer may answer the
		// round's waiters before this goroutine goes on, and a caller
		// reading Stats after its write must find it counted. (A round
		// whose WAL write or commit then fails is counted too; the engine
		// refuses everything after it.)
		e.stats.Lock()
		e.stats.s.Updates += rs.updates
		e.stats.s.Entries += rs.entries
		e.stats.s.Applied += rs.applied
		e.stats.Unlock()
	}
	handedOff := false
	if fatal == nil {
		commit := rs.commit || len(rs.lockForCommit) > 0
		switch {
		case commit:
		case len(rs.walOps) > 0 || e.syncPending.Load() > 0:
			// The syncer makes the record durable, then publishes and
			// answers; a round without one still waits its turn there, so
			// no shard's states are published out of order. A record too
			// large for what is left of the WAL is committed instead.
			written := time.Now()
			if len(rs.walOps) > 0 {
				fatal = e.wal.write(rs.walOps)
			}
			if errors.Is(fatal, errWALFull) {
				commit, fatal = true, nil
			} else if fatal == nil {
				e.remember(rs)
				e.handOff(rs, waiting, len(rs.walOps) > 0, written)
				handedOff = true
			}
		default:
			e.remember(rs)
			rs.publish()
		}
		if commit {
			fatal = e.commit(rs)
		}
	}
	if fatal != nil {
		e.fail(fatal)
		e.log.Error("storage write failed; refusing further writes", "err", fatal, "requests", len(batch))
		// NoWait requests already answered keep their answer: the engine
		// refuses their shard's next write, which stops its raft group.
		for _, w := range waiting {
			w.r.done <- response{err: e.failed}
		}
		for _, r := range batch[done:] {
			r.done <- response{err: e.failed}
		}
		return
	}
	if !handedOff {
		for _, w := range waiting {
			w.r.done <- w.resp
		}
	}
	// Commit once the round's waiters have their answer: they need not
	// wait for it.
	if e.open.tx != nil && (e.flushRequested() || time.Since(e.open.start) >= e.opts.CommitInterval || e.wal.off >= e.wal.softLimit) {
		e.commitIdle()
	}
}

// flushRequested reports (and consumes) a pending Flush.
func (e *Engine) flushRequested() bool {
	select {
	case <-e.flushc:
		return true
	default:
		return false
	}
}

// commit commits the open transaction with rs's requests, publishes rs's
// states, restarts the WAL and makes every shard's applied state visible.
// It counts as a sync (Stats.Syncs), from the wait for the syncer on.
func (e *Engine) commit(rs *round) error {
	begin := time.Now()
	if err := e.drainSyncs(); err != nil {
		return err
	}
	gen := e.wal.gen + 1
	if err := rs.tx.Bucket(bucketWAL).Put(keyWALGen, u64(gen)); err != nil {
		return err
	}
	for s := range rs.lockForCommit {
		s.mu.Lock()
	}
	start := time.Now()
	if err := rs.tx.Commit(); err != nil { // rolls back by itself
		e.open.tx = nil
		for s := range rs.lockForCommit {
			s.mu.Unlock()
		}
		return err
	}
	elapsed := time.Since(start)
	rs.publish()
	clear(e.latest) // everything is published
	e.wal.restart(gen)
	e.open.tx = nil
	// Every shard's published state is now committed. Asking each (a few
	// dozen, a few dozen times a second) is simpler than tracking which
	// ones the transaction touched; showApplied signals only those whose
	// applied index moved.
	e.mu.Lock()
	shards := make([]*Shard, 0, len(e.mu.shards))
	for _, s := range e.mu.shards {
		shards = append(shards, s)
	}
	e.mu.Unlock()
	moved := false
	for _, s := range shards {
		moved = s.showApplied() || moved
	}
	if moved {
		select {
		case e.appliedc <- struct{}{}:
		default:
		}
	}
	txs := rs.tx.Stats()
	e.stats.Lock()
	e.stats.s.Commits++
	e.stats.s.CommitNanos.Observe(elapsed)
	e.stats.s.CommitBytes += uint64(max(txs.GetPageAlloc(), 0))
	e.stats.s.Syncs++
	e.stats.s.SyncNanos.Observe(time.Since(begin))
	e.stats.Unlock()
	return nil
}

// commitIdle commits the open transaction between rounds.
func (e *Engine) commitIdle() {
	if e.open.tx == nil || e.failed != nil {
		return
	}
	rs := &round{e: e, tx: e.open.tx, lockForCommit: map[*Shard]bool{}}
	if err := e.commit(rs); err != nil {
		e.fail(err)
		e.log.Error("storage commit failed; refusing further writes", "err", err)
	}
}

// fail makes the engine refuse every later write with err, dropping the
// open transaction: what it held since its last commit is in the WAL
// (what was acknowledged) or may be lost (the rest).
func (e *Engine) fail(err error) {
	if e.open.tx != nil {
		_ = e.open.tx.Rollback()
		e.open.tx = nil
	}
	clear(e.latest)
	e.failed = fmt.Errorf("%w: %w", ErrFailed, err)
	e.markFailed(e.failed)
}

// exec runs one request, turning a panic (from an ApplyFunc, or a broken
// invariant) into a fatal error so the transaction is rolled back, never
// half committed.
func (rs *round) exec(r *request) (resp response, fatal error) {
	defer func() {
		if p := recover(); p != nil {
			if a, ok := p.(abortApply); ok {
				fatal = fmt.Errorf("storage: apply: %w", a.err)
				return
			}
			fatal = fmt.Errorf("storage: panic in write round: %v\n%s", p, debug.Stack())
		}
	}()
	return r.exec(rs)
}

// publish makes the round's working states, now durable, the shards'
// states.
func (rs *round) publish() {
	for s, st := range rs.states {
		if !rs.lockForCommit[s] {
			s.mu.Lock()
		}
		s.st = st
		s.mu.Unlock()
	}
	if len(rs.created) == 0 {
		return
	}
	e := rs.e
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, s := range rs.created {
		e.mu.shards[s.id] = s
	}
}

// remember records rs's states as the newest of their shards.
func (e *Engine) remember(rs *round) {
	for s, st := range rs.states {
		e.latest[s] = st
	}
}

// newest returns the newest state of s a round has built: the published
// one, or one still in the syncer. Called by the writer.
func (e *Engine) newest(s *Shard) *shardState {
	if st, ok := e.latest[s]; ok {
		return st
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st
}

// state returns the round's working copy of s's state, making it from the
// published one on first use.
func (rs *round) state(s *Shard) (*shardState, error) {
	if st, ok := rs.states[s]; ok {
		return st, nil
	}
	pub := rs.e.newest(s)
	// A shard deleted and created again under the same id is another
	// shard: check that the bucket is still this Shard's incarnation.
	if _, err := s.bucket(rs.tx); err != nil {
		return nil, err
	}
	st := *pub
	rs.states[s] = &st
	return &st, nil
}

func (rs *round) createShard(id uint64, cs *pb.ConfState) (response, error) {
	shards := rs.tx.Bucket(bucketShards)
	if shards.Bucket(u64(id)) != nil {
		return response{err: ErrShardExists}, nil
	}
	seq, err := shards.NextSequence()
	if err != nil {
		return response{}, err
	}
	b, err := shards.CreateBucket(u64(id))
	if err != nil {
		return response{}, err
	}
	for _, name := range append([][]byte{bucketRaft, bucketLog}, stateBuckets...) {
		if _, err := b.CreateBucket(name); err != nil {
			return response{}, err
		}
	}
	st := &shardState{
		snap: &pb.SnapshotMetadata{ConfState: cs, Index: proto.Uint64(0), Term: proto.Uint64(0)},
		conf: cs,
	}
	if len(cs.GetVoters()) > 0 {
		st.snap.Index, st.snap.Term = proto.Uint64(1), proto.Uint64(1)
		st.hard = &pb.HardState{Term: proto.Uint64(1), Vote: proto.Uint64(0), Commit: proto.Uint64(1)}
		st.last, st.appliedIndex, st.appliedTerm = 1, 1, 1
	}
	raftb := b.Bucket(bucketRaft)
	inc := u64(seq)
	if err := raftb.Put(keyIncarnation, inc); err != nil {
		return response{}, err
	}
	if err := putProto(raftb, keySnapMeta, st.snap); err != nil {
		return response{}, err
	}
	if err := putProto(raftb, keyConfState, st.conf); err != nil {
		return response{}, err
	}
	if err := raftb.Put(keyApplied, encodeApplied(st.appliedIndex, st.appliedTerm)); err != nil {
		return response{}, err
	}
	if st.hard != nil {
		if err := putProto(raftb, keyHardState, st.hard); err != nil {
			return response{}, err
		}
	}
	s := newShard(rs.e, id, inc, st)
	// The working state is the one published after the commit; a later
	// request of this round on s continues from it.
	rs.states[s] = st
	rs.created = append(rs.created, s)
	return response{shard: s}, nil
}

// putProto marshals m under key in b.
func putProto(b *bolt.Bucket, key []byte, m proto.Message) error {
	v, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	return b.Put(key, v)
}

// getProto unmarshals the value under key into m; false if absent.
func getProto(b *bolt.Bucket, key []byte, m proto.Message) (bool, error) {
	v := b.Get(key)
	if v == nil {
		return false, nil
	}
	if err := proto.Unmarshal(v, m); err != nil {
		return false, fmt.Errorf("storage: corrupt %s: %w", key, err)
	}
	return true, nil
}

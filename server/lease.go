package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/fsm"
	"github.com/kvd/kvd/hashring"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/raftnode"
	"github.com/kvd/kvd/storage"
)

// Leases (docs/architecture.md, Leases). The records are replicated in
// the meta shard (fsm/lease.go); when each lease expires is decided by the
// meta shard's leader alone, from its monotonic clock, and kept in its
// memory: renewals are not replicated. What a new leader knows is the
// remaining TTL of the last checkpoint (a replicated command every
// leaseCheckpointInterval), to which it adds an election timeout, as etcd
// does: a lease never outlives its holder's last renewal by more than its
// TTL plus that extension, and a leader change never hands a lease a fresh
// full TTL.
const (
	// MaxLeaseTTL bounds a granted TTL.
	MaxLeaseTTL = 365 * 24 * time.Hour
	// MaxLeases bounds the leases that exist at once (each is a record in
	// the meta shard and an entry in its leader's memory).
	MaxLeases = 100000
	// leaseCheckpointInterval is how often the leader looks for remaining
	// TTLs to record: those that moved by more than a quarter of their TTL
	// (at least the interval) from the recorded one. A lease nobody renews
	// is so recorded every quarter TTL as it runs down; a lease renewed
	// on time about once per renewal period, in batched commands.
	leaseCheckpointInterval = time.Second
	// leaseCheckpointBatch bounds the leases of one checkpoint command.
	leaseCheckpointBatch = 1000
	leaseTick            = 100 * time.Millisecond
)

// errLeaseLoading: this node leads the meta shard but has not yet read the
// lease records of its term; the client retries.
var errLeaseLoading = errors.New("lease state is loading on the new meta shard leader")

// lessor is the meta shard leader's view of the live leases. Only the
// leader's lessor holds leases; the others are empty.
type lessor struct {
	s *Server
	// mu guards the leases of the term they were loaded for.
	mu struct {
		sync.Mutex
		term   uint64 // the meta shard term leases belong to; 0: none loaded
		leases map[int64]*liveLease
	}
	lastCheckpoint time.Time // tick goroutine only
	revokeq        chan int64
	revocations    revocations

	alive                                 prometheus.GaugeFunc
	granted, expired, revoked, keepAlives prometheus.Counter
}

type liveLease struct {
	ttl      time.Duration
	deadline time.Time
	// recorded is the remaining TTL the meta shard holds for the lease.
	recorded time.Duration
	// dead: expired or revoked; no longer renewable, and revoked until
	// that is done. revoking: its revocation is queued or under way.
	dead, revoking bool
}

func newLessor(s *Server) *lessor {
	l := &lessor{s: s, revokeq: make(chan int64, 1024)}
	l.mu.leases = map[int64]*liveLease{}
	l.alive = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "kvd_leases_alive",
		Help: "Leases alive, on the meta shard's leader (0 elsewhere).",
	}, func() float64 {
		l.mu.Lock()
		defer l.mu.Unlock()
		return float64(len(l.mu.leases))
	})
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	}
	l.granted = counter("kvd_leases_granted_total", "Leases this node granted as the meta shard's leader.")
	l.expired = counter("kvd_leases_expired_total", "Leases this node revoked for expiry as the meta shard's leader.")
	l.revoked = counter("kvd_leases_revoked_total", "Leases revoked on request through this node.")
	l.keepAlives = counter("kvd_lease_keepalives_total", "Lease renewals this node served as the meta shard's leader.")
	s.metrics.reg.MustRegister(l.alive, l.granted, l.expired, l.revoked, l.keepAlives)
	return l
}

// electionTimeout is what a new leader adds to every lease.
func (l *lessor) electionTimeout() time.Duration {
	return time.Duration(l.s.cfg.ElectionTicks) * l.s.cfg.TickInterval
}

// run is the lessor's loop: it loads leases when this node becomes the
// meta shard's leader, expires them, and checkpoints them.
func (l *lessor) run() {
	defer l.s.wg.Done()
	t := time.NewTicker(leaseTick)
	defer t.Stop()
	for {
		select {
		case <-l.s.stopc:
			return
		case <-t.C:
		}
		l.tick()
	}
}

// revoker revokes expired leases one at a time, apart from the tick, so a
// slow revocation delays neither renewals nor checkpoints.
func (l *lessor) revoker() {
	defer l.s.wg.Done()
	for {
		select {
		case <-l.s.stopc:
			return
		case id := <-l.revokeq:
			ctx, cancel := context.WithTimeout(l.s.ctx, 4*l.s.cfg.RequestTimeout)
			if _, err := l.s.revokeLease(ctx, id); err != nil && !errors.Is(err, fsm.ErrLeaseNotFound) {
				l.s.log.Warn("lease revocation unfinished; the meta shard's leader retries it", "lease", id, "err", err)
			}
			cancel()
		}
	}
}

// retry lets the next tick pick an unfinished revocation up again; the
// lease stays dead.
func (l *lessor) retry(id int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if ll := l.mu.leases[id]; ll != nil {
		ll.dead, ll.revoking = true, false
	}
}

func (l *lessor) tick() {
	n := l.s.host.Node(MetaShard)
	if n == nil || !n.IsLeader() {
		l.mu.Lock()
		if l.mu.term != 0 {
			l.mu.term, l.mu.leases = 0, map[int64]*liveLease{}
		}
		l.mu.Unlock()
		return
	}
	term := n.Term()
	l.mu.Lock()
	loaded := l.mu.term == term
	l.mu.Unlock()
	if !loaded {
		if err := l.load(n, term); err != nil {
			l.s.log.Debug("load leases", "err", err)
			return
		}
	}
	now := time.Now()
	var due []int64
	l.mu.Lock()
	for id, ll := range l.mu.leases {
		if ll.revoking || !ll.dead && !now.After(ll.deadline) {
			continue
		}
		if !ll.dead {
			ll.dead = true
			l.expired.Inc()
		}
		ll.revoking = true
		due = append(due, id)
	}
	l.mu.Unlock()
	slices.Sort(due)
	for _, id := range due {
		select {
		case l.revokeq <- id:
		default:
			l.retry(id) // the queue is full: next tick
		}
	}
	if now.Sub(l.lastCheckpoint) >= leaseCheckpointInterval {
		l.lastCheckpoint = now
		l.checkpoint(n, term)
	}
}

// load reads the lease records once this node's replica has applied
// everything committed before its term (a barrier command proves it),
// and starts each lease's clock from its checkpointed remaining TTL plus
// an election timeout. A revoked lease whose revocation did not finish is
// revoked again.
func (l *lessor) load(n *raftnode.Node, term uint64) error {
	ctx, cancel := context.WithTimeout(l.s.ctx, l.s.cfg.RequestTimeout)
	defer cancel()
	barrier, err := leaseCommand(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_Checkpoint{Checkpoint: &peerpb.LeaseCheckpoint{}}})
	if err != nil {
		return err
	}
	if _, err := n.Propose(ctx, barrier); err != nil {
		return fmt.Errorf("barrier: %w", err)
	}
	// A linearizable read sees every command applied before it, the
	// barrier and what came before it included.
	var recs []*peerpb.LeaseRecord
	if err := l.s.read(ctx, MetaShard, kvpb.Consistency_LINEARIZABLE, func(r *storage.Reader) error {
		var err error
		recs, err = fsm.Leases(r)
		return err
	}); err != nil {
		return err
	}
	now := time.Now()
	leases := make(map[int64]*liveLease, len(recs))
	var unfinished []int64
	for _, rec := range recs {
		remaining := time.Duration(rec.GetRemainingMs()) * time.Millisecond
		ll := &liveLease{
			ttl:      time.Duration(rec.GetTtlMs()) * time.Millisecond,
			deadline: now.Add(remaining + l.electionTimeout()),
			recorded: remaining,
			// The first tick revokes it again.
			dead: rec.GetRevoked(),
		}
		leases[rec.GetId()] = ll
		if ll.dead {
			unfinished = append(unfinished, rec.GetId())
		}
	}
	l.mu.Lock()
	if n.Term() != term || !n.IsLeader() {
		l.mu.Unlock()
		return fmt.Errorf("lost the meta shard's leadership while loading leases")
	}
	l.mu.term, l.mu.leases = term, leases
	l.mu.Unlock()
	l.s.log.Info("leases loaded", "term", term, "leases", len(recs), "unfinished_revocations", len(unfinished))
	return nil
}

// checkpoint records the remaining TTL of the leases whose remaining TTL
// moved away from the recorded one (leaseCheckpointInterval).
func (l *lessor) checkpoint(n *raftnode.Node, term uint64) {
	now := time.Now()
	var rem []*peerpb.LeaseRemaining
	l.mu.Lock()
	if l.mu.term != term {
		l.mu.Unlock()
		return
	}
	for id, ll := range l.mu.leases {
		remaining := max(ll.deadline.Sub(now), 0)
		if d := remaining - ll.recorded; !ll.dead && (d > max(ll.ttl/4, leaseCheckpointInterval) || -d > max(ll.ttl/4, leaseCheckpointInterval)) {
			rem = append(rem, &peerpb.LeaseRemaining{Id: id, RemainingMs: remaining.Milliseconds()})
			// Set before the command commits: if it fails, the next
			// leader starts from the older figure plus an election
			// timeout, and this one tries again when it moves on.
			ll.recorded = remaining
		}
	}
	l.mu.Unlock()
	slices.SortFunc(rem, func(a, b *peerpb.LeaseRemaining) int { return int(a.GetId() - b.GetId()) })
	for len(rem) > 0 {
		part := rem[:min(len(rem), leaseCheckpointBatch)]
		rem = rem[len(part):]
		cmd, err := leaseCommand(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_Checkpoint{Checkpoint: &peerpb.LeaseCheckpoint{Leases: part}}})
		if err != nil {
			l.s.log.Error("encode lease checkpoint", "err", err)
			return
		}
		ctx, cancel := context.WithTimeout(l.s.ctx, l.s.cfg.RequestTimeout)
		_, err = n.Propose(ctx, cmd)
		cancel()
		if err != nil {
			l.s.log.Debug("lease checkpoint", "err", err)
			return
		}
	}
}

// local returns the meta shard's node when this node leads it with its
// leases loaded; otherwise the leader to ask (0: unknown), or
// errLeaseLoading.
func (l *lessor) local() (n *raftnode.Node, term uint64, leader uint64, err error) {
	n = l.s.host.Node(MetaShard)
	if n == nil {
		return nil, 0, 0, nil
	}
	if !n.IsLeader() {
		return nil, 0, n.Leader(), nil
	}
	term = n.Term()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.mu.term != term {
		return nil, 0, 0, errLeaseLoading
	}
	return n, term, 0, nil
}

// grant proposes a grant with the client's session and seq, so that a
// retry is answered with the first attempt's lease. An answer recorded
// for a lease since revoked must not bring it back to life here: a lease
// this leader does not hold yet is checked against its record.
func (l *lessor) grant(ctx context.Context, n *raftnode.Node, term uint64, ttl time.Duration, h *kvpb.RequestHeader) (int64, error) {
	cmd, err := proto.Marshal(&peerpb.Command{
		Session: h.GetSession(), Seq: h.GetSeq(), AckBelow: h.GetAckBelow(), TimeUnixMs: time.Now().UnixMilli(),
		Op: &peerpb.Command_Lease{Lease: &peerpb.LeaseOp{Op: &peerpb.LeaseOp_Grant{Grant: &peerpb.LeaseGrant{TtlMs: ttl.Milliseconds(), MaxLeases: MaxLeases}}}},
	})
	if err != nil {
		return 0, err
	}
	ctx, cancel := l.s.withTimeout(ctx)
	defer cancel()
	res, err := n.Propose(ctx, cmd)
	if err != nil {
		return 0, err
	}
	r, err := fsm.Outcome(res)
	if err != nil {
		return 0, err
	}
	id := r.GetLease().GetId()
	l.mu.Lock()
	_, held := l.mu.leases[id]
	l.mu.Unlock()
	if !held {
		var rec *peerpb.LeaseRecord
		if err := l.s.read(ctx, MetaShard, kvpb.Consistency_LINEARIZABLE, func(r *storage.Reader) error {
			rec, err = fsm.Lease(r, id)
			return err
		}); err != nil {
			return 0, err
		}
		if rec == nil || rec.GetRevoked() {
			return 0, fmt.Errorf("%w: lease %d, granted by an earlier attempt of this request, is gone", fsm.ErrLeaseNotFound, id)
		}
		l.mu.Lock()
		if _, held = l.mu.leases[id]; !held && l.mu.term == term {
			l.mu.leases[id] = &liveLease{ttl: ttl, deadline: time.Now().Add(ttl), recorded: ttl}
		}
		l.mu.Unlock()
	}
	l.granted.Inc()
	return id, nil
}

// renew restarts a lease's clock; a lease unknown or being revoked is
// ErrLeaseNotFound.
func (l *lessor) renew(term uint64, id int64) (time.Duration, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.mu.term != term {
		return 0, errLeaseLoading
	}
	ll := l.mu.leases[id]
	if ll == nil || ll.dead {
		return 0, fmt.Errorf("%w: lease %d", fsm.ErrLeaseNotFound, id)
	}
	ll.deadline = time.Now().Add(ll.ttl)
	l.keepAlives.Inc()
	return ll.ttl, nil
}

// status returns a live lease's TTL and what remains of it.
func (l *lessor) status(term uint64, id int64) (ttl, remaining time.Duration, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.mu.term != term {
		return 0, 0, errLeaseLoading
	}
	ll := l.mu.leases[id]
	if ll == nil || ll.dead {
		return 0, 0, fmt.Errorf("%w: lease %d", fsm.ErrLeaseNotFound, id)
	}
	return ll.ttl, max(time.Until(ll.deadline), 0), nil
}

func (l *lessor) list(term uint64) ([]*kvpb.LeaseStatus, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.mu.term != term {
		return nil, errLeaseLoading
	}
	out := make([]*kvpb.LeaseStatus, 0, len(l.mu.leases))
	for id, ll := range l.mu.leases {
		if !ll.dead {
			out = append(out, &kvpb.LeaseStatus{Id: id, GrantedTtlSeconds: seconds(ll.ttl), TtlSeconds: seconds(max(time.Until(ll.deadline), 0))})
		}
	}
	slices.SortFunc(out, func(a, b *kvpb.LeaseStatus) int { return int(a.GetId() - b.GetId()) })
	return out, nil
}

func (l *lessor) forget(id int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.mu.leases, id)
}

func (l *lessor) markRevoking(id int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if ll := l.mu.leases[id]; ll != nil {
		ll.dead, ll.revoking = true, true
	}
}

// seconds rounds up, so a lease with 300 ms left says 1, not 0 (gone).
func seconds(d time.Duration) int64 { return int64((d + time.Second - 1) / time.Second) }

func leaseCommand(op *peerpb.LeaseOp) ([]byte, error) {
	return proto.Marshal(&peerpb.Command{TimeUnixMs: time.Now().UnixMilli(), Op: &peerpb.Command_Lease{Lease: op}})
}

// revocations lets the calls that revoke one lease at once share one
// revocation: a large lease takes longer to revoke than a client's attempt
// lasts, and the retry would otherwise start a second revocation beside
// the first, find the lease gone and answer "lease not found" to the
// caller that revoked it.
type revocations struct {
	mu   sync.Mutex
	byID map[int64]*revocation
}

type revocation struct {
	done    chan struct{} // closed when deleted and err are set
	deleted int64
	err     error
}

// join returns lease id's revocation under way, or a new one that the
// caller (first) must run and end.
func (r *revocations) join(id int64) (rv *revocation, first bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if rv := r.byID[id]; rv != nil {
		return rv, false
	}
	if r.byID == nil {
		r.byID = map[int64]*revocation{}
	}
	rv = &revocation{done: make(chan struct{})}
	r.byID[id] = rv
	return rv, true
}

// end answers rv's waiters; a later call starts anew (and finds a revoked
// lease gone, as it should).
func (r *revocations) end(id int64, rv *revocation, deleted int64, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rv.deleted, rv.err = deleted, err
	close(rv.done)
	delete(r.byID, id)
}

// revokeLease revokes lease id, or waits for the revocation of it under
// way and answers as it does. The call that starts a revocation
// runs it to its end even when its own caller gives up (bounded by
// 4 × RequestTimeout and the node's life), so that the caller's retry
// finds it.
func (s *Server) revokeLease(ctx context.Context, id int64) (int64, error) {
	rv, first := s.lessor.revocations.join(id)
	if !first {
		select {
		case <-rv.done:
			return rv.deleted, rv.err
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 4*s.cfg.RequestTimeout)
	defer cancel()
	defer context.AfterFunc(s.ctx, cancel)()
	deleted, err := s.revokeLeaseNow(rctx, id)
	s.lessor.revocations.end(id, rv, deleted, err)
	return deleted, err
}

// revokeLeaseNow revokes lease id: the meta shard marks it revoked (from then
// on it cannot be renewed), every data shard deletes its keys (one apply
// per shard), then the meta shard forgets it. It runs on the meta shard's
// leader. A failure part way leaves the record marked revoked, and the
// leader (this one or the next) finishes the job.
func (s *Server) revokeLeaseNow(ctx context.Context, id int64) (_ int64, err error) {
	n, _, _, err := s.lessor.local()
	if err != nil {
		return 0, err
	}
	if n == nil {
		return 0, &raftnode.NotLeaderError{Shard: MetaShard}
	}
	s.lessor.markRevoking(id)
	defer func() {
		if err != nil && !errors.Is(err, fsm.ErrLeaseNotFound) {
			// Dead from now on: the leader's tick finishes the job.
			s.lessor.retry(id)
		}
	}()
	mark, err := leaseCommand(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_Revoke{Revoke: id}})
	if err != nil {
		return 0, err
	}
	if _, err := proposeOutcome(ctx, n, mark); err != nil {
		if errors.Is(err, fsm.ErrLeaseNotFound) {
			s.lessor.forget(id)
		}
		return 0, err
	}
	keys, err := leaseCommand(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_RevokeKeys{RevokeKeys: id}})
	if err != nil {
		return 0, err
	}
	var deleted int64
	for _, shard := range hashring.DataShards(s.clusterMap()) {
		n, err := s.deleteLeaseKeys(ctx, shard, id)
		deleted += n
		if err != nil {
			return deleted, fmt.Errorf("revoke lease %d on shard %d: %w", id, shard, err)
		}
		res, err := s.proposeOn(ctx, shard, keys)
		if err != nil {
			return deleted, fmt.Errorf("revoke lease %d on shard %d: %w", id, shard, err)
		}
		deleted += res.GetLease().GetDeleted()
	}
	forget, err := leaseCommand(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_Forget{Forget: id}})
	if err != nil {
		return deleted, err
	}
	if _, err := proposeOutcome(ctx, n, forget); err != nil {
		return deleted, err
	}
	s.lessor.forget(id)
	return deleted, nil
}

// A lease may hold MaxKeysPerLease keys of up to --max-value-bytes in
// each shard. revoke_keys deletes them in one apply, and a delete copies
// the value into the history: every replica would write all of them in
// one bbolt transaction at once, holding twice their size in memory while
// every shard of the node waits for it. So before revoke_keys the keys go
// in transactions of at most revokeChunkBytes of values and
// revokeChunkKeys keys (each an ordinary Txn: the state machine applies
// nothing new), and revoke_keys finds the rest, at most that much.
const (
	revokeChunkBytes = 4 << 20
	revokeChunkKeys  = 64
	// revokeRounds bounds how often the keys are listed again: each
	// round deletes every key not written since it was listed, and a
	// revoked lease takes no new keys, so one is enough but for races.
	revokeRounds = 3
)

// deleteLeaseKeys deletes shard's keys of lease id ahead of revoke_keys,
// when they are more than one apply should carry, and returns how many it
// deleted. Each goes only at the mod revision it was listed with: a key
// written since is listed again in the next round, or left to
// revoke_keys.
func (s *Server) deleteLeaseKeys(ctx context.Context, shard uint64, id int64) (int64, error) {
	var deleted int64
	for range revokeRounds {
		lk, err := s.leaseKeys(ctx, shard, id)
		if err != nil {
			return deleted, err
		}
		keys, mods, sizes := lk.GetKeys(), lk.GetModRevisions(), lk.GetValueSizes()
		if len(mods) != len(keys) || len(sizes) != len(keys) {
			return deleted, nil // a leader of an older build: revoke_keys does it all
		}
		var total int64
		for _, n := range sizes {
			total += n
		}
		if total <= revokeChunkBytes && len(keys) <= revokeChunkKeys {
			return deleted, nil
		}
		before := deleted
		for start := 0; start < len(keys); {
			txn := &kvpb.TxnRequest{}
			var size int64
			end := start
			for ; end < len(keys) && end-start < revokeChunkKeys && (end == start || size+sizes[end] <= revokeChunkBytes); end++ {
				if mods[end] == 0 {
					continue // listed but gone
				}
				size += sizes[end]
				txn.Compare = append(txn.Compare, &kvpb.Compare{Key: keys[end], Target: kvpb.Compare_MOD, ModRevision: mods[end]})
				txn.Success = append(txn.Success, &kvpb.RequestOp{Op: &kvpb.RequestOp_Delete{Delete: &kvpb.DeleteRequest{Key: keys[end]}}})
			}
			start = end
			if len(txn.Success) == 0 {
				continue
			}
			cmd, err := proto.Marshal(&peerpb.Command{TimeUnixMs: time.Now().UnixMilli(), Op: &peerpb.Command_Txn{Txn: txn}})
			if err != nil {
				return deleted, err
			}
			res, err := s.proposeOn(ctx, shard, cmd)
			if err == nil {
				_, err = fsm.Outcome(res)
			}
			if err != nil {
				return deleted, err
			}
			if res.GetTxn().GetSucceeded() {
				deleted += int64(len(txn.Success))
			}
		}
		if deleted == before {
			return deleted, nil // every chunk raced a write: revoke_keys
		}
	}
	return deleted, nil
}

func proposeOutcome(ctx context.Context, n *raftnode.Node, cmd []byte) (*peerpb.Result, error) {
	res, err := n.Propose(ctx, cmd)
	if err != nil {
		return nil, err
	}
	return fsm.Outcome(res)
}

// proposeOn replicates cmd on shard through its leader (this node, or
// another one's Internal.Propose), retrying while the shard elects one.
func (s *Server) proposeOn(ctx context.Context, shard uint64, cmd []byte) (*peerpb.Result, error) {
	for {
		res, err := s.proposeOnce(ctx, shard, cmd)
		if err == nil || !retryable(err) {
			return res, err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func retryable(err error) bool {
	if errors.Is(err, fsm.ErrLeaseNotFound) || errors.Is(err, fsm.ErrMalformed) || errors.Is(err, fsm.ErrNotMeta) || errors.Is(err, fsm.ErrCorrupt) {
		return false
	}
	return true
}

func (s *Server) proposeOnce(ctx context.Context, shard uint64, cmd []byte) (*peerpb.Result, error) {
	try := replicasOf(s.clusterMap(), shard)
	if n := s.host.Node(shard); n != nil {
		if n.IsLeader() {
			pctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
			defer cancel()
			return proposeOutcome(pctx, n, cmd)
		}
		if l := n.Leader(); l != 0 {
			try = []uint64{l}
		}
	}
	err := fmt.Errorf("shard %d has no known leader", shard)
	for _, id := range try {
		if id == s.cfg.NodeID {
			continue
		}
		var resp *peerpb.ProposeResponse
		resp, err = internal(s, id, func(c peerpb.InternalClient) (*peerpb.ProposeResponse, error) {
			pctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
			defer cancel()
			return c.Propose(pctx, &peerpb.ProposeRequest{Shard: shard, Command: cmd})
		})
		if err == nil {
			return fsm.DecodeResult(resp.GetResult())
		}
	}
	return nil, err
}

// leaseKeys lists the keys of shard attached to lease id, read on the
// shard's leader, with each one's mod revision and value size when that
// leader's build gives them.
func (s *Server) leaseKeys(ctx context.Context, shard uint64, id int64) (*peerpb.LeaseKeysResponse, error) {
	resp, err := s.localLeaseKeys(ctx, shard, id)
	var nl *raftnode.NotLeaderError
	if err == nil || !(errors.As(err, &nl) || errors.Is(err, ErrNoReplica)) {
		return resp, err
	}
	try := replicasOf(s.clusterMap(), shard)
	if nl != nil && nl.Leader != 0 {
		try = []uint64{nl.Leader}
	}
	for _, node := range try {
		if node == s.cfg.NodeID {
			continue
		}
		resp, err = internal(s, node, func(c peerpb.InternalClient) (*peerpb.LeaseKeysResponse, error) {
			return c.LeaseKeys(ctx, &peerpb.LeaseKeysRequest{Shard: shard, Id: id})
		})
		if err == nil {
			return resp, nil
		}
	}
	return nil, err
}

func (s *Server) localLeaseKeys(ctx context.Context, shard uint64, id int64) (*peerpb.LeaseKeysResponse, error) {
	resp := &peerpb.LeaseKeysResponse{}
	err := s.read(ctx, shard, kvpb.Consistency_LINEARIZABLE, func(r *storage.Reader) error {
		lks, err := fsm.LeaseKeys(r, id)
		for _, lk := range lks {
			resp.Keys = append(resp.Keys, lk.Key)
			resp.ModRevisions = append(resp.ModRevisions, lk.ModRevision)
			resp.ValueSizes = append(resp.ValueSizes, lk.ValueSize)
		}
		return err
	})
	return resp, err
}

// LeaseKeys implements peerpb.Internal.
func (s *Server) LeaseKeys(ctx context.Context, req *peerpb.LeaseKeysRequest) (*peerpb.LeaseKeysResponse, error) {
	resp, err := s.localLeaseKeys(ctx, req.GetShard(), req.GetId())
	if err != nil {
		return nil, s.toStatus(err, req.GetShard())
	}
	return resp, nil
}

// LeaseRenew implements peerpb.Internal: a renewal forwarded by the node
// that serves the client's KeepAlive stream.
func (s *Server) LeaseRenew(ctx context.Context, req *kvpb.LeaseKeepAliveRequest) (*kvpb.LeaseKeepAliveResponse, error) {
	n, term, _, err := s.lessor.local()
	if err == nil && n == nil {
		err = &raftnode.NotLeaderError{Shard: MetaShard}
	}
	if err != nil {
		return nil, s.leaseStatus(err)
	}
	ttl, err := s.lessor.renew(term, req.GetId())
	if err != nil {
		return nil, s.leaseStatus(err)
	}
	return &kvpb.LeaseKeepAliveResponse{Id: req.GetId(), TtlSeconds: seconds(ttl)}, nil
}

// leaseStatus maps lease errors; the rest as toStatus does.
func (s *Server) leaseStatus(err error) error {
	switch {
	case errors.Is(err, fsm.ErrLeaseNotFound):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, fsm.ErrLeaseLimit):
		return status.Error(codes.ResourceExhausted, err.Error())
	case errors.Is(err, errLeaseLoading):
		return status.Errorf(codes.Unavailable, "%v; retry", err)
	}
	return s.toStatus(err, MetaShard)
}

// leaseService implements kvpb.LeaseServer on the client port; with
// forwarded set, the same calls forwarded by other members on the peer
// port, which are never forwarded again.
type leaseService struct {
	kvpb.UnimplementedLeaseServer
	s         *Server
	forwarded bool
}

// onLeader runs local when this node leads the meta shard (with its
// leases loaded), and otherwise sends the request to the leader's peer
// port with remote.
func onLeader[Resp any](ctx context.Context, l leaseService, local func(n *raftnode.Node, term uint64) (Resp, error),
	remote func(context.Context, kvpb.LeaseClient) (Resp, error)) (Resp, error) {
	var zero Resp
	s := l.s
	n, term, leader, err := s.lessor.local()
	if err != nil {
		return zero, s.leaseStatus(err)
	}
	if n != nil {
		resp, err := local(n, term)
		if err != nil {
			return zero, s.leaseStatus(err)
		}
		return resp, nil
	}
	if l.forwarded || s.cfg.NoForwarding {
		return zero, s.notLeader(MetaShard, leader)
	}
	try := []uint64{leader}
	if leader == 0 {
		try = slices.DeleteFunc(slices.Clone(replicasOf(s.clusterMap(), MetaShard)), func(id uint64) bool { return id == s.cfg.NodeID })
	}
	err = s.notLeader(MetaShard, leader)
	for _, id := range try {
		m := member(s.clusterMap(), id)
		if m.GetPeerAddr() == "" {
			continue
		}
		conn, cerr := s.peerConn(m.GetPeerAddr())
		if cerr != nil {
			continue
		}
		var resp Resp
		resp, err = remote(ctx, kvpb.NewLeaseClient(conn))
		if err == nil || status.Code(err) != codes.Unavailable {
			return resp, err
		}
	}
	return zero, err
}

func (l leaseService) Grant(ctx context.Context, req *kvpb.LeaseGrantRequest) (*kvpb.LeaseGrantResponse, error) {
	if t := req.GetTtlSeconds(); t <= 0 || t > int64(MaxLeaseTTL/time.Second) {
		return nil, status.Errorf(codes.InvalidArgument, "lease TTL %d s: must be 1 to %d seconds", t, int64(MaxLeaseTTL/time.Second))
	}
	return onLeader(ctx, l, func(n *raftnode.Node, term uint64) (*kvpb.LeaseGrantResponse, error) {
		ttl := time.Duration(req.GetTtlSeconds()) * time.Second
		id, err := l.s.lessor.grant(ctx, n, term, ttl, req.GetHeader())
		if err != nil {
			return nil, err
		}
		return &kvpb.LeaseGrantResponse{Id: id, TtlSeconds: req.GetTtlSeconds()}, nil
	}, func(ctx context.Context, c kvpb.LeaseClient) (*kvpb.LeaseGrantResponse, error) {
		return c.Grant(ctx, req)
	})
}

func (l leaseService) Revoke(ctx context.Context, req *kvpb.LeaseRevokeRequest) (*kvpb.LeaseRevokeResponse, error) {
	if req.GetId() <= 0 {
		return nil, status.Errorf(codes.InvalidArgument, "lease id %d: ids are positive", req.GetId())
	}
	return onLeader(ctx, l, func(*raftnode.Node, uint64) (*kvpb.LeaseRevokeResponse, error) {
		ctx, cancel := context.WithTimeout(ctx, 4*l.s.cfg.RequestTimeout)
		defer cancel()
		deleted, err := l.s.revokeLease(ctx, req.GetId())
		if err != nil {
			return nil, err
		}
		l.s.lessor.revoked.Inc()
		return &kvpb.LeaseRevokeResponse{Deleted: deleted}, nil
	}, func(ctx context.Context, c kvpb.LeaseClient) (*kvpb.LeaseRevokeResponse, error) {
		return c.Revoke(ctx, req)
	})
}

func (l leaseService) TimeToLive(ctx context.Context, req *kvpb.LeaseTimeToLiveRequest) (*kvpb.LeaseTimeToLiveResponse, error) {
	if req.GetId() <= 0 {
		return nil, status.Errorf(codes.InvalidArgument, "lease id %d: ids are positive", req.GetId())
	}
	resp, err := onLeader(ctx, l, func(_ *raftnode.Node, term uint64) (*kvpb.LeaseTimeToLiveResponse, error) {
		ttl, remaining, err := l.s.lessor.status(term, req.GetId())
		if err != nil {
			return nil, err
		}
		resp := &kvpb.LeaseTimeToLiveResponse{Id: req.GetId(), TtlSeconds: seconds(remaining), GrantedTtlSeconds: seconds(ttl)}
		if req.GetKeys() {
			// Up to 10,000 keys of 4 KiB per shard: the answer holds what
			// fits a client's receive limit, and says whether there is more.
			room := l.s.payloadBytes()
		shards:
			for _, shard := range hashring.DataShards(l.s.clusterMap()) {
				keys, err := l.s.leaseKeys(ctx, shard, req.GetId())
				if err != nil {
					return nil, fmt.Errorf("keys of lease %d in shard %d: %w", req.GetId(), shard, err)
				}
				for _, k := range keys.GetKeys() {
					if room -= protowire.SizeTag(4) + protowire.SizeBytes(len(k)); room < 0 {
						resp.MoreKeys = true
						break shards
					}
					resp.Keys = append(resp.Keys, k)
				}
			}
		}
		return resp, nil
	}, func(ctx context.Context, c kvpb.LeaseClient) (*kvpb.LeaseTimeToLiveResponse, error) {
		return c.TimeToLive(ctx, req)
	})
	if err != nil {
		return nil, err
	}
	// Checked where the client called, whichever node listed them.
	if err := l.s.mayReadKeys(ctx, resp.GetKeys()); err != nil {
		return nil, err
	}
	return resp, nil
}

func (l leaseService) Leases(ctx context.Context, req *kvpb.LeaseLeasesRequest) (*kvpb.LeaseLeasesResponse, error) {
	return onLeader(ctx, l, func(_ *raftnode.Node, term uint64) (*kvpb.LeaseLeasesResponse, error) {
		ls, err := l.s.lessor.list(term)
		if err != nil {
			return nil, err
		}
		return &kvpb.LeaseLeasesResponse{Leases: ls}, nil
	}, func(ctx context.Context, c kvpb.LeaseClient) (*kvpb.LeaseLeasesResponse, error) {
		return c.Leases(ctx, req)
	})
}

// KeepAlive renews the lease of each request and answers its TTL; a lease
// that is gone gets TTL 0. An error (the meta shard has no leader) ends
// the stream with Unavailable: the client opens another.
func (l leaseService) KeepAlive(stream kvpb.Lease_KeepAliveServer) error {
	s := l.s
	ctx := stream.Context()
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		resp, err := s.renewLease(ctx, req.GetId())
		if status.Code(err) == codes.NotFound {
			resp, err = &kvpb.LeaseKeepAliveResponse{Id: req.GetId()}, nil
		}
		if err != nil {
			return err
		}
		if err := stream.Send(resp); err != nil {
			return err
		}
	}
}

// renewLease renews on the meta shard's leader: here, or through the
// leader's Internal.LeaseRenew (a node that does not know the leader, or
// hosts no meta replica, asks each replica in turn).
func (s *Server) renewLease(ctx context.Context, id int64) (*kvpb.LeaseKeepAliveResponse, error) {
	if id <= 0 {
		return nil, status.Errorf(codes.NotFound, "lease %d: ids are positive", id)
	}
	n, _, leader, err := s.lessor.local()
	if err != nil {
		return nil, s.leaseStatus(err)
	}
	if n != nil {
		return s.LeaseRenew(ctx, &kvpb.LeaseKeepAliveRequest{Id: id})
	}
	try := []uint64{leader}
	if leader == 0 {
		try = slices.DeleteFunc(slices.Clone(replicasOf(s.clusterMap(), MetaShard)), func(n uint64) bool { return n == s.cfg.NodeID })
	}
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	err = s.notLeader(MetaShard, leader)
	for _, node := range try {
		var resp *kvpb.LeaseKeepAliveResponse
		resp, err = internal(s, node, func(c peerpb.InternalClient) (*kvpb.LeaseKeepAliveResponse, error) {
			return c.LeaseRenew(ctx, &kvpb.LeaseKeepAliveRequest{Id: id})
		})
		if err == nil || status.Code(err) == codes.NotFound {
			return resp, err
		}
	}
	if _, ok := status.FromError(err); !ok {
		err = status.Errorf(codes.Unavailable, "renew lease %d: %v", id, err)
	}
	return nil, err
}

// checkLeases refuses a write that attaches keys to a lease that is not
// alive. A lease revoked after this check is still safe: its shard
// either deletes the key with the lease's other keys or, later, refuses
// the put at apply (fsm/lease.go's tombstone); the check is what refuses
// ids that were never granted. A request a member forwarded was checked
// by that member.
func (s *Server) checkLeases(ctx context.Context, ids ...int64) error {
	if ctx.Value(forwardedKey{}) != nil {
		return nil
	}
	for _, id := range ids {
		if id == 0 {
			continue
		}
		if id < 0 {
			return status.Errorf(codes.NotFound, "lease %d: ids are positive", id)
		}
		_, err := leaseService{s: s}.TimeToLive(ctx, &kvpb.LeaseTimeToLiveRequest{Id: id})
		if err != nil {
			return err
		}
	}
	return nil
}

// txnLeases lists the leases a transaction's puts name.
func txnLeases(req *kvpb.TxnRequest) []int64 {
	var ids []int64
	for _, op := range slices.Concat(req.GetSuccess(), req.GetFailure()) {
		if id := op.GetPut().GetLease(); id != 0 && !slices.Contains(ids, id) {
			ids = append(ids, id)
		}
	}
	return ids
}

// forwardedLease serves, on the peer port, the lease calls other members
// forward to the meta shard's leader.
type forwardedLease struct {
	kvpb.UnimplementedLeaseServer
	l leaseService
}

func newForwardedLease(s *Server) forwardedLease {
	return forwardedLease{l: leaseService{s: s, forwarded: true}}
}

func (f forwardedLease) Grant(ctx context.Context, req *kvpb.LeaseGrantRequest) (*kvpb.LeaseGrantResponse, error) {
	return serveForwarded(ctx, f.l.s, "Grant", req, f.l.Grant)
}

func (f forwardedLease) Revoke(ctx context.Context, req *kvpb.LeaseRevokeRequest) (*kvpb.LeaseRevokeResponse, error) {
	return serveForwarded(ctx, f.l.s, "Revoke", req, f.l.Revoke)
}

func (f forwardedLease) TimeToLive(ctx context.Context, req *kvpb.LeaseTimeToLiveRequest) (*kvpb.LeaseTimeToLiveResponse, error) {
	return serveForwarded(ctx, f.l.s, "TimeToLive", req, f.l.TimeToLive)
}

func (f forwardedLease) Leases(ctx context.Context, req *kvpb.LeaseLeasesRequest) (*kvpb.LeaseLeasesResponse, error) {
	return serveForwarded(ctx, f.l.s, "Leases", req, f.l.Leases)
}

// KeepAlive is not served forwarded: renewals travel as
// Internal.LeaseRenew.
func (forwardedLease) KeepAlive(grpc.BidiStreamingServer[kvpb.LeaseKeepAliveRequest, kvpb.LeaseKeepAliveResponse]) error {
	return status.Error(codes.Unimplemented, "renewals are forwarded as Internal.LeaseRenew")
}

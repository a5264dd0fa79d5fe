// Package fsm is kvd's replicated state machine: what a committed command
// does to a shard's state. Apply runs on every replica at the same log
// index, so it is deterministic: everything that decides an outcome is in
// the command or in state written by earlier commands. No clocks, no
// randomness, no map iteration order, no local configuration.
//
// State lives in the shard's three storage buckets:
//
//	kv:   user key            → peerpb.StoredValue
//	meta: "rev"               → the shard revision and history size (BE8 each)
//	      "s/" session        → peerpb.SessionState
//	      "r/" session seq    → the recorded peerpb.Result of that write
//	      "cluster-map"       → kvpb.ClusterMap (meta shard only)
//	hist: rev | index         → peerpb.HistoryEvent (history.go)
//
// Exactly-once writes follow RIFL (Lee et al., SOSP 2015): a shard records
// the result of every write per (session, seq) and answers a retry with it;
// the client's ack_below watermark says which results it will never ask for
// again, so they are dropped. Unlike "last seq per session", this lets one
// session keep many writes in flight. A record carries a fingerprint of its
// request, so a different request reusing a (session, seq) is rejected
// rather than answered with another write's result; and it keeps what a
// retry needs, not large read results (MaxRecordedReadBytes).
package fsm

import (
	"bytes"
	"cmp"
	"container/heap"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/internal/keys"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/storage"
)

var (
	metaRevision   = []byte("rev")
	metaClusterMap = []byte("cluster-map")
	prefixSession  = []byte("s/")
	prefixResult   = []byte("r/")
)

// Errors recorded in Result.error, with their Result.code. They are
// deterministic rejections: every replica reaches the same one. Outcome and
// DecodeResult return errors that errors.Is matches with them.
var (
	ErrMalformed  = errors.New("fsm: malformed command")
	ErrStaleSeq   = errors.New("fsm: write already acknowledged by the client (seq below ack_below)")
	ErrEpoch      = errors.New("fsm: cluster map epoch must advance by one")
	ErrNotMeta    = errors.New("fsm: cluster map can only be set on the meta shard")
	ErrEmptyKey   = errors.New("fsm: empty key")
	ErrUnknownCmd = errors.New("fsm: unknown command")
	// ErrSeqReused: the (session, seq) holds the result of a different
	// request. Answering the new one with it would drop the new write.
	ErrSeqReused = errors.New("fsm: the session's sequence number was reused for a different request; a new write needs a new seq")
	// ErrTxnTooLarge: the transaction's read payload exceeds
	// MaxTxnReadBytes; nothing was applied.
	ErrTxnTooLarge = errors.New("fsm: transaction result too large")
	// ErrResultNotKept: a retry of a write that was applied, whose read
	// results (a transaction's gets and prev_kvs, a put's or delete's
	// prev_kv) were too large to keep for it.
	ErrResultNotKept = errors.New("fsm: result not kept for a retry")
	// ErrMemberConflict: a member change conflicts with the cluster map.
	ErrMemberConflict = errors.New("fsm: member change conflicts with the cluster map")
	// ErrCorrupt: a stored record does not decode.
	ErrCorrupt = errors.New("fsm: stored record does not decode")
	// ErrRejected is what a rejection recorded without a code (or with
	// one this version does not know) matches.
	ErrRejected = errors.New("fsm: command rejected")
)

// Apply applies one encoded peerpb.Command and returns its
// *peerpb.Result. The result goes to the proposer as it is; only a write
// with a session encodes it, to record it for retries. Its signature
// matches raftnode.ApplyFunc.
func Apply(tx *storage.Txn, _ uint64, data []byte) any {
	return apply(tx, data)
}

func apply(tx State, data []byte) *peerpb.Result {
	var c peerpb.Command
	if err := decodeCommand(data, &c); err != nil {
		return reject(ErrMalformed)
	}
	session, seq := c.GetSession(), c.GetSeq()
	var st *peerpb.SessionState
	var fp []byte
	if session != 0 {
		st = loadSession(tx, session)
		if seq < st.GetAckBelow() {
			return reject(ErrStaleSeq)
		}
		fp = fingerprint(data)
		if r := tx.GetMeta(resultKey(session, seq)); r != nil {
			// A retry: answer what the first attempt got. Every replica
			// holds the same bytes, so even a decode failure is the same
			// answer everywhere.
			var res peerpb.Result
			if err := proto.Unmarshal(r, &res); err != nil {
				return reject(fmt.Errorf("%w: recorded result: %v", ErrCorrupt, err))
			}
			// Another request reusing the seq must not get this one's
			// result (and have its own write silently dropped). A record
			// without a fingerprint predates them: it matches, as it
			// always did, since nothing tells what request made it.
			if len(res.GetFingerprint()) > 0 && !bytes.Equal(res.GetFingerprint(), fp) {
				return reject(fmt.Errorf("%w (session %#x, seq %d)", ErrSeqReused, session, seq))
			}
			res.Fingerprint = nil
			return &res
		}
	}

	res := execute(tx, &c)
	if session != 0 {
		tx.PutMeta(resultKey(session, seq), recorded(res, fp))
		if ack := c.GetAckBelow(); ack > st.GetAckBelow() {
			dropResults(tx, session, st.GetAckBelow(), ack)
			st.AckBelow = ack
		}
		st.LastSeenUnixMs = max(st.GetLastSeenUnixMs(), c.GetTimeUnixMs())
		tx.PutMeta(sessionKey(session), encodeSession(st))
	}
	return res
}

// Outcome returns the *peerpb.Result that Apply returned (through
// raftnode.Node.Propose), or the deterministic rejection it records as an
// error.
func Outcome(v any) (*peerpb.Result, error) {
	r, ok := v.(*peerpb.Result)
	if !ok {
		return nil, fmt.Errorf("fsm: result is a %T, not a *peerpb.Result", v)
	}
	if err := rejectionOf(r); err != nil {
		return r, err
	}
	return r, nil
}

// DecodeResult decodes an encoded Result (Internal.Propose's answer) and
// returns its Outcome.
func DecodeResult(b []byte) (*peerpb.Result, error) {
	var r peerpb.Result
	if err := proto.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("fsm: decode result: %w", err)
	}
	return Outcome(&r)
}

func execute(tx State, c *peerpb.Command) *peerpb.Result {
	switch op := c.GetOp().(type) {
	case *peerpb.Command_Put:
		ch := newChanges(tx, c.GetTimeUnixMs())
		resp, err := put(tx, op.Put, ch)
		if err != nil {
			return reject(err)
		}
		ch.commit(tx)
		resp.Header = &kvpb.ResponseHeader{Revision: ch.rev}
		return &peerpb.Result{Op: &peerpb.Result_Put{Put: resp}}
	case *peerpb.Command_Delete:
		ch := newChanges(tx, c.GetTimeUnixMs())
		rev := ch.rev
		resp, err := del(tx, op.Delete, ch)
		if err != nil {
			return reject(err)
		}
		if resp.GetDeleted() > 0 {
			ch.commit(tx)
		} else {
			rev--
		}
		resp.Header = &kvpb.ResponseHeader{Revision: rev}
		return &peerpb.Result{Op: &peerpb.Result_Delete{Delete: resp}}
	case *peerpb.Command_Txn:
		resp, err := txn(tx, op.Txn, c.GetTimeUnixMs())
		if err != nil {
			return reject(err)
		}
		return &peerpb.Result{Op: &peerpb.Result_Txn{Txn: resp}}
	case *peerpb.Command_ExpireSessions:
		expireSessions(tx, op.ExpireSessions)
		return &peerpb.Result{}
	case *peerpb.Command_UpdateMember:
		if err := updateMember(tx, op.UpdateMember.GetMember(), op.UpdateMember.GetAdd()); err != nil {
			return reject(err)
		}
		return &peerpb.Result{}
	case *peerpb.Command_SetClusterMap:
		if err := setClusterMap(tx, op.SetClusterMap.GetMap()); err != nil {
			return reject(err)
		}
		return &peerpb.Result{}
	case *peerpb.Command_CompactHistory:
		return &peerpb.Result{Op: &peerpb.Result_CompactHistory{CompactHistory: compactHistory(tx, op.CompactHistory)}}
	case *peerpb.Command_Auth:
		return applyAuth(tx, op.Auth)
	case *peerpb.Command_Lease:
		return applyLease(tx, op.Lease, c.GetTimeUnixMs())
	case *peerpb.Command_HashCheck:
		index, hash, err := tx.CheckHash()
		if err != nil {
			return &peerpb.Result{Error: err.Error()}
		}
		return &peerpb.Result{Op: &peerpb.Result_HashCheck{HashCheck: &peerpb.HashCheckResult{Index: index, Hash: hash}}}
	default:
		return reject(ErrUnknownCmd)
	}
}

func put(tx State, r *kvpb.PutRequest, ch *changes) (*kvpb.PutResponse, error) {
	rev := ch.rev
	if len(r.GetKey()) == 0 {
		return nil, ErrEmptyKey
	}
	prev, err := load(tx, r.GetKey())
	if err != nil {
		return nil, err
	}
	sv := &peerpb.StoredValue{Value: r.GetValue(), CreateRevision: rev, ModRevision: rev, Version: 1, Lease: r.GetLease()}
	if prev != nil {
		sv.CreateRevision = prev.GetCreateRevision()
		sv.Version = prev.GetVersion() + 1
	}
	// Leases (lease.go): nothing to do, and nothing read, unless the put
	// or the key's record has one.
	if l := r.GetLease(); l != 0 && l != prev.GetLease() {
		if err := checkLease(tx, l, 0, ch.time); err != nil {
			return nil, err
		}
	}
	if err := moveLease(tx, r.GetKey(), prev.GetLease(), r.GetLease()); err != nil {
		return nil, err
	}
	if err := tx.Put(r.GetKey(), encodeStored(sv)); err != nil {
		return nil, err
	}
	// The event leaves out the value: it is the key's record while
	// mod_revision is rev, and the next event's prev after (history.go).
	ev := &peerpb.HistoryEvent{Key: r.GetKey(), CreateRevision: sv.CreateRevision, Version: sv.Version, ValueSize: int64(len(r.GetValue()))}
	if err := ch.record(tx, ev, prev); err != nil {
		return nil, err
	}
	resp := &kvpb.PutResponse{}
	if r.GetPrevKv() && prev != nil {
		resp.PrevKv = toKV(r.GetKey(), prev)
	}
	return resp, nil
}

func del(tx State, r *kvpb.DeleteRequest, ch *changes) (*kvpb.DeleteResponse, error) {
	if len(r.GetKey()) == 0 {
		return nil, ErrEmptyKey
	}
	prev, err := load(tx, r.GetKey())
	if err != nil {
		return nil, err
	}
	resp := &kvpb.DeleteResponse{}
	if prev == nil {
		return resp, nil
	}
	if err := tx.Delete(r.GetKey()); err != nil {
		return nil, err
	}
	if err := moveLease(tx, r.GetKey(), prev.GetLease(), 0); err != nil {
		return nil, err
	}
	if err := ch.record(tx, &peerpb.HistoryEvent{Delete: true, Key: r.GetKey()}, prev); err != nil {
		return nil, err
	}
	resp.Deleted = 1
	if r.GetPrevKv() {
		resp.PrevKv = toKV(r.GetKey(), prev)
	}
	return resp, nil
}

// txn evaluates the compares and applies one branch; all its changes share
// one new revision, as in etcd.
func txn(tx State, r *kvpb.TxnRequest, now int64) (*kvpb.TxnResponse, error) {
	ok := true
	for _, c := range r.GetCompare() {
		var cur *storedView
		if b := tx.Get(c.GetKey()); b != nil {
			v, err := viewStored(b)
			if err != nil {
				return nil, err
			}
			cur = &v
		}
		if !compare(c, cur) {
			ok = false
			break
		}
	}
	ops := r.GetSuccess()
	if !ok {
		ops = r.GetFailure()
	}
	size, stored, err := checkTxnOps(tx, ops)
	if err != nil {
		return nil, err
	}
	if err := checkTxnLeases(tx, ops, now); err != nil {
		return nil, err
	}
	if size > MaxTxnReadBytes {
		return nil, fmt.Errorf("%w: transaction would return %d bytes; the limit is %d; read fewer or smaller keys per transaction",
			ErrTxnTooLarge, size, MaxTxnReadBytes)
	}
	ch := newChanges(tx, now)
	rev := ch.rev
	changed := false
	resp := &kvpb.TxnResponse{Succeeded: ok}
	for i, op := range ops {
		switch o := op.GetOp().(type) {
		case *kvpb.RequestOp_Put:
			pr, err := put(tx, o.Put, ch)
			if err != nil {
				return nil, err
			}
			changed = true
			resp.Responses = append(resp.Responses, &kvpb.ResponseOp{Op: &kvpb.ResponseOp_Put{Put: pr}})
		case *kvpb.RequestOp_Delete:
			dr, err := del(tx, o.Delete, ch)
			if err != nil {
				return nil, err
			}
			changed = changed || dr.GetDeleted() > 0
			resp.Responses = append(resp.Responses, &kvpb.ResponseOp{Op: &kvpb.ResponseOp_Delete{Delete: dr}})
		case *kvpb.RequestOp_Get:
			var cur *peerpb.StoredValue
			if i < len(stored) && stored[i] != nil {
				cur, err = decodeStored(stored[i])
			} else {
				cur, err = load(tx, o.Get.GetKey())
			}
			if err != nil {
				return nil, err
			}
			gr := &kvpb.GetResponse{}
			if cur != nil {
				gr.Kv = toKV(o.Get.GetKey(), cur)
			}
			resp.Responses = append(resp.Responses, &kvpb.ResponseOp{Op: &kvpb.ResponseOp_Get{Get: gr}})
		default:
			return nil, ErrUnknownCmd
		}
	}
	if changed {
		ch.commit(tx)
	} else {
		rev--
	}
	resp.Header = &kvpb.ResponseHeader{Revision: rev}
	return resp, nil
}

// compare evaluates c against the key's stored value, nil when absent.
func compare(c *kvpb.Compare, cur *storedView) bool {
	var order int
	switch c.GetTarget() {
	case kvpb.Compare_EXISTS:
		if (cur != nil) == c.GetExists() {
			order = 0
		} else {
			order = 1
		}
	case kvpb.Compare_VALUE:
		if cur == nil {
			return false
		}
		order = bytes.Compare(cur.value, c.GetValue())
	case kvpb.Compare_VERSION:
		order = cmp.Compare(cur.version(), c.GetVersion())
	case kvpb.Compare_MOD:
		order = cmp.Compare(cur.modRev(), c.GetModRevision())
	case kvpb.Compare_CREATE:
		order = cmp.Compare(cur.createRev(), c.GetCreateRevision())
	default:
		return false
	}
	switch c.GetResult() {
	case kvpb.Compare_EQUAL:
		return order == 0
	case kvpb.Compare_NOT_EQUAL:
		return order != 0
	case kvpb.Compare_GREATER:
		return order > 0
	case kvpb.Compare_LESS:
		return order < 0
	}
	return false
}

func expireSessions(tx State, e *peerpb.ExpireSessions) {
	cutoff := e.GetNowUnixMs() - e.GetIdleMs()
	var expired []uint64
	tx.RangeMeta(prefixSession, func(k, v []byte) bool {
		var st peerpb.SessionState
		if proto.Unmarshal(v, &st) == nil && st.GetLastSeenUnixMs() < cutoff && len(k) == len(prefixSession)+8 {
			expired = append(expired, binary.BigEndian.Uint64(k[len(prefixSession):]))
		}
		return true
	})
	for _, s := range expired {
		dropResults(tx, s, 0, ^uint64(0))
		tx.DeleteMeta(sessionKey(s))
	}
}

// ExpiryCutoff bounds the work of one ExpireSessions: of the sessions
// last seen before cutoff (unix ms), it returns a cutoff at or below it
// that leaves at most about max of them before it (more share one
// millisecond only if one was seen more than max times in it), and
// whether it had to lower it. The proposer, not apply, bounds the
// command, so every release applies ExpireSessions alike: the oldest idle
// sessions go first, the rest with the next command.
func ExpiryCutoff(r View, cutoff int64, max int) (int64, bool) {
	oldest := &maxHeap{} // the max+1 oldest idle last-seen times
	r.ScanMeta(prefixSession, keys.PrefixEnd(prefixSession), func(k, v []byte) bool {
		var st peerpb.SessionState
		if proto.Unmarshal(v, &st) != nil || len(k) != len(prefixSession)+8 {
			return true
		}
		if t := st.GetLastSeenUnixMs(); t < cutoff {
			if oldest.Len() <= max {
				heap.Push(oldest, t)
			} else if t < (*oldest)[0] {
				(*oldest)[0] = t
				heap.Fix(oldest, 0)
			}
		}
		return true
	})
	if oldest.Len() <= max {
		return cutoff, false
	}
	// The newest of the max+1 oldest: strictly before it, at most max.
	// Unless they all share it: then take that millisecond whole.
	newest := (*oldest)[0]
	if slices.Min(*oldest) == newest {
		return newest + 1, true
	}
	return newest, true
}

// maxHeap is a max-heap of int64 (container/heap).
type maxHeap []int64

func (h maxHeap) Len() int           { return len(h) }
func (h maxHeap) Less(i, j int) bool { return h[i] > h[j] }
func (h maxHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *maxHeap) Push(x any)        { *h = append(*h, x.(int64)) }
func (h *maxHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

func setClusterMap(tx State, m *kvpb.ClusterMap) error {
	if m == nil {
		return ErrMalformed
	}
	cur, err := ClusterMapFrom(tx.GetMeta(metaClusterMap))
	if err != nil {
		return err
	}
	if cur != nil && m.GetEpoch() != cur.GetEpoch()+1 {
		return fmt.Errorf("%w: have %d, got %d", ErrEpoch, cur.GetEpoch(), m.GetEpoch())
	}
	return tx.PutMeta(metaClusterMap, encode(m))
}

// updateMember sets a member's addresses, or with add, adds a new member.
// Adding is idempotent (a joining node may retry) but never takes over an
// id or a peer address another node has.
func updateMember(tx State, m *kvpb.Member, add bool) error {
	cur, err := ClusterMapFrom(tx.GetMeta(metaClusterMap))
	if err != nil {
		return err
	}
	if cur == nil || m == nil {
		return fmt.Errorf("%w: no cluster map to update", ErrNotMeta)
	}
	if m.GetId() == 0 || m.GetPeerAddr() == "" {
		return fmt.Errorf("%w: a member needs an id and a peer address", ErrMalformed)
	}
	for _, have := range cur.GetMembers() {
		if have.GetId() != m.GetId() {
			if add && have.GetPeerAddr() == m.GetPeerAddr() {
				return fmt.Errorf("%w: peer address %s belongs to member %d", ErrMemberConflict, m.GetPeerAddr(), have.GetId())
			}
			continue
		}
		if add && have.GetPeerAddr() != m.GetPeerAddr() {
			return fmt.Errorf("%w: member %d already exists with peer address %s", ErrMemberConflict, m.GetId(), have.GetPeerAddr())
		}
		if have.GetClientAddr() == m.GetClientAddr() && have.GetPeerAddr() == m.GetPeerAddr() {
			return nil
		}
		have.ClientAddr, have.PeerAddr = m.GetClientAddr(), m.GetPeerAddr()
		cur.Epoch++
		return tx.PutMeta(metaClusterMap, encode(cur))
	}
	if !add {
		return fmt.Errorf("%w: member %d is not in the cluster map", ErrMemberConflict, m.GetId())
	}
	cur.Members = append(cur.Members, proto.CloneOf(m))
	slices.SortFunc(cur.Members, func(a, b *kvpb.Member) int { return cmp.Compare(a.GetId(), b.GetId()) })
	cur.Epoch++
	return tx.PutMeta(metaClusterMap, encode(cur))
}

// ClusterMapFrom decodes a stored cluster map; nil input gives nil.
func ClusterMapFrom(b []byte) (*kvpb.ClusterMap, error) {
	if b == nil {
		return nil, nil
	}
	var m kvpb.ClusterMap
	if err := proto.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%w: cluster map: %v", ErrCorrupt, err)
	}
	return &m, nil
}

// ClusterMap reads the meta shard's cluster map (nil if none yet).
func ClusterMap(r View) (*kvpb.ClusterMap, error) {
	return ClusterMapFrom(r.GetMeta(metaClusterMap))
}

// Revision reads a shard's current revision.
func Revision(r View) int64 {
	rev, _ := decodeRevision(r.GetMeta(metaRevision))
	return rev
}

// Get reads one key from a shard for a read request; nil when absent.
func Get(r View, key []byte) (*kvpb.KeyValue, error) {
	v := r.Get(key)
	if v == nil {
		return nil, nil
	}
	sv, err := decodeStored(v)
	if err != nil {
		return nil, err
	}
	return toKV(key, sv), nil
}

// Range calls fn for each key in [start, end) in key order with its decoded
// record, until fn returns false.
func Range(r View, start, end []byte, fn func(*kvpb.KeyValue) bool) error {
	var err error
	r.Range(start, end, func(k, v []byte) bool {
		var sv *peerpb.StoredValue
		sv, err = decodeStored(v)
		if err != nil {
			return false
		}
		return fn(toKV(k, sv))
	})
	return err
}

func load(tx State, key []byte) (*peerpb.StoredValue, error) {
	v := tx.Get(key)
	if v == nil {
		return nil, nil
	}
	return decodeStored(v)
}

func toKV(key []byte, sv *peerpb.StoredValue) *kvpb.KeyValue {
	return &kvpb.KeyValue{
		Key: bytes.Clone(key),
		// Already a copy: proto.Unmarshal never aliases its input.
		Value:          sv.GetValue(),
		CreateRevision: sv.GetCreateRevision(),
		ModRevision:    sv.GetModRevision(),
		Version:        sv.GetVersion(),
		Lease:          sv.GetLease(),
	}
}

// The "rev" meta record holds the shard's revision, then the bytes its
// history holds (history.go): both change with every change event, so one
// record costs a change one read and one write.

// loadRevision returns the shard's revision and history size.
func loadRevision(tx State) (rev, history int64) {
	return decodeRevision(tx.GetMeta(metaRevision))
}

func storeRevision(tx State, rev, history int64) {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], uint64(rev))
	binary.BigEndian.PutUint64(b[8:], uint64(history))
	tx.PutMeta(metaRevision, b[:])
}

func decodeRevision(b []byte) (rev, history int64) {
	if len(b) >= 8 {
		rev = int64(binary.BigEndian.Uint64(b))
	}
	if len(b) >= 16 {
		history = int64(binary.BigEndian.Uint64(b[8:]))
	}
	return rev, history
}

func loadSession(tx State, session uint64) *peerpb.SessionState {
	st := &peerpb.SessionState{}
	if b := tx.GetMeta(sessionKey(session)); b != nil {
		_ = decodeSession(b, st) // a corrupt record is treated as a new session
	}
	return st
}

// Keys are built in one allocation of their final size: a key given to
// State escapes (it is an interface), so growing one would cost a second.
func sessionKey(session uint64) []byte {
	k := append(make([]byte, 0, len(prefixSession)+8), prefixSession...)
	return binary.BigEndian.AppendUint64(k, session)
}

func resultKey(session, seq uint64) []byte {
	k := append(make([]byte, 0, len(prefixResult)+16), prefixResult...)
	k = binary.BigEndian.AppendUint64(k, session)
	return binary.BigEndian.AppendUint64(k, seq)
}

// dropResults deletes the recorded results of session with seq in [from, to).
func dropResults(tx State, session, from, to uint64) {
	tx.DeleteMetaRange(resultKey(session, from), resultKey(session, to))
}

func encode(m proto.Message) []byte {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		// Marshalling a well-formed message in memory cannot fail; if it
		// does, replicas would diverge, so this is a broken invariant.
		panic(fmt.Sprintf("fsm: marshal %T: %v", m, err))
	}
	return b
}

package fsm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/internal/keys"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
)

// Leases (docs/architecture.md, Leases) live in two places:
//
// The meta shard holds the lease records, in its meta bucket:
//
//	"lease/next"  → the next lease id (8-byte big endian)
//	"lease/count" → the number of records
//	"l/" id       → peerpb.LeaseRecord
//
// Every data shard holds, for the keys attached to leases:
//
//	"lk/" id | key → "" (the index lease → keys)
//	"ln/" id       → how many keys of the shard the lease holds
//	"lt/" id       → revoke time (a tombstone: the lease was revoked)
//	"la/" time | id → "" (the tombstones by age, for trimming)
//	"lease/trimmed" → puts with a lease proposed before this time are refused
//
// A key's own record (peerpb.StoredValue.lease) names its lease, so a put
// or delete finds the index entry to drop in the record it reads anyway:
// a key that has no lease and gets none costs no extra read.
//
// Apply never reads a clock: when a lease expires is the meta shard
// leader's decision, replicated as a revoke.
var (
	metaLeaseNext  = []byte("lease/next")
	metaLeaseCount = []byte("lease/count")
	prefixLease    = []byte("l/")
	prefixLeaseKey = []byte("lk/")
	prefixLeaseNum = []byte("ln/")
	prefixLeaseTmb = []byte("lt/")
	prefixLeaseAge = []byte("la/")
	metaLeaseTrim  = []byte("lease/trimmed")
)

// A tombstone guards against a put whose lease was alive when the node
// checked it, that reaches the shard after the revocation. Such a put was
// proposed just after its check, so a tombstone is needed only for a
// while: a revocation drops those older than TombstoneRetention (by the
// proposers' clocks, carried in the commands), at most maxTombstoneTrim
// at a time, and records in lease/trimmed the time below which a put with
// a lease is refused instead, so a put delayed past the trim is refused
// (its client retries), never let through. This bounds the tombstones to
// the revocations of the last TombstoneRetention.
const (
	TombstoneRetentionMs = 5 * 60 * 1000
	// tombstoneSkewMs covers the proposers' clocks disagreeing: a put is
	// refused up to this long after the revoke time of a trimmed tombstone.
	tombstoneSkewMs  = 60 * 1000
	maxTombstoneTrim = 1000
)

// MaxKeysPerLease bounds the keys one lease holds in one shard, so that
// its revocation is one bounded apply and a client cannot grow the index
// without bound through one lease. A constant: every replica decides alike.
const MaxKeysPerLease = 10000

var (
	// ErrLeaseNotFound: the lease does not exist (never granted, revoked
	// or expired).
	ErrLeaseNotFound = errors.New("fsm: lease not found")
	// ErrLeaseLimit: too many leases, or too many keys on one lease.
	ErrLeaseLimit = errors.New("fsm: lease limit reached")
)

func leaseKey(prefix []byte, id int64) []byte {
	k := append(make([]byte, 0, len(prefix)+8), prefix...)
	return binary.BigEndian.AppendUint64(k, uint64(id))
}

func leaseIndexKey(id int64, key []byte) []byte {
	k := append(make([]byte, 0, len(prefixLeaseKey)+8+len(key)), prefixLeaseKey...)
	k = binary.BigEndian.AppendUint64(k, uint64(id))
	return append(k, key...)
}

func getU64(b []byte) int64 {
	if len(b) != 8 {
		return 0
	}
	return int64(binary.BigEndian.Uint64(b))
}

func putU64(v int64) []byte { return binary.BigEndian.AppendUint64(nil, uint64(v)) }

// checkLease refuses a put with lease id proposed at now: revoked here
// (the tombstone), proposed before the shard's tombstones were trimmed, or
// holding MaxKeysPerLease keys of the shard already (extra: keys the same
// command attaches before this one).
func checkLease(tx State, id, extra, now int64) error {
	if id < 0 {
		return fmt.Errorf("%w: lease %d", ErrLeaseNotFound, id)
	}
	if tx.GetMeta(leaseKey(prefixLeaseTmb, id)) != nil {
		return fmt.Errorf("%w: lease %d was revoked", ErrLeaseNotFound, id)
	}
	if trimmed := getU64(tx.GetMeta(metaLeaseTrim)); now < trimmed {
		return fmt.Errorf("%w: lease %d: a put proposed at %d ms is older than this shard's revocation records (from %d ms); retry it",
			ErrLeaseNotFound, id, now, trimmed)
	}
	if n := getU64(tx.GetMeta(leaseKey(prefixLeaseNum, id))); n+extra >= MaxKeysPerLease {
		return fmt.Errorf("%w: lease %d holds %d keys in this shard; the limit is %d", ErrLeaseLimit, id, n, MaxKeysPerLease)
	}
	return nil
}

// moveLease updates the index for key, whose lease changes from old to
// new (either 0: none). It does nothing when they are equal, so a key
// without a lease that gets none costs nothing. The caller has checked
// new with checkLease.
func moveLease(tx State, key []byte, old, new int64) error {
	if old == new {
		return nil
	}
	if old != 0 {
		if err := tx.DeleteMeta(leaseIndexKey(old, key)); err != nil {
			return err
		}
		nk := leaseKey(prefixLeaseNum, old)
		if n := getU64(tx.GetMeta(nk)) - 1; n > 0 {
			if err := tx.PutMeta(nk, putU64(n)); err != nil {
				return err
			}
		} else if err := tx.DeleteMeta(nk); err != nil {
			return err
		}
	}
	if new != 0 {
		if err := tx.PutMeta(leaseIndexKey(new, key), []byte{}); err != nil {
			return err
		}
		nk := leaseKey(prefixLeaseNum, new)
		if err := tx.PutMeta(nk, putU64(getU64(tx.GetMeta(nk))+1)); err != nil {
			return err
		}
	}
	return nil
}

// checkTxnLeases checks the leases a transaction branch's puts attach
// before any of them applies, so that a refused lease changes nothing.
func checkTxnLeases(tx State, ops []*kvpb.RequestOp, now int64) error {
	var per map[int64]int64
	for _, op := range ops {
		id := op.GetPut().GetLease()
		if id == 0 {
			continue
		}
		if per == nil {
			per = map[int64]int64{}
		}
		if err := checkLease(tx, id, per[id], now); err != nil {
			return err
		}
		per[id]++
	}
	return nil
}

func applyLease(tx State, c *peerpb.LeaseOp, now int64) *peerpb.Result {
	var (
		r   *peerpb.LeaseResult
		err error
	)
	switch op := c.GetOp().(type) {
	case *peerpb.LeaseOp_Grant:
		r, err = grantLease(tx, op.Grant)
	case *peerpb.LeaseOp_Revoke:
		err = markRevoked(tx, op.Revoke)
	case *peerpb.LeaseOp_Checkpoint:
		err = checkpointLeases(tx, op.Checkpoint)
	case *peerpb.LeaseOp_Forget:
		err = forgetLease(tx, op.Forget)
	case *peerpb.LeaseOp_RevokeKeys:
		r, err = revokeKeys(tx, op.RevokeKeys, now)
	default:
		err = ErrUnknownCmd
	}
	if err != nil {
		return reject(err)
	}
	return &peerpb.Result{Op: &peerpb.Result_Lease{Lease: r}}
}

func onMeta(tx State) error {
	if tx.GetMeta(metaClusterMap) == nil {
		return fmt.Errorf("%w: lease records live on the meta shard", ErrNotMeta)
	}
	return nil
}

func grantLease(tx State, g *peerpb.LeaseGrant) (*peerpb.LeaseResult, error) {
	if err := onMeta(tx); err != nil {
		return nil, err
	}
	if g.GetTtlMs() <= 0 {
		return nil, fmt.Errorf("%w: lease TTL must be positive", ErrMalformed)
	}
	count := getU64(tx.GetMeta(metaLeaseCount))
	if count >= g.GetMaxLeases() {
		return nil, fmt.Errorf("%w: %d leases exist; the limit is %d; revoke some", ErrLeaseLimit, count, g.GetMaxLeases())
	}
	id := max(getU64(tx.GetMeta(metaLeaseNext)), 1)
	rec := &peerpb.LeaseRecord{Id: id, TtlMs: g.GetTtlMs(), RemainingMs: g.GetTtlMs()}
	if err := tx.PutMeta(leaseKey(prefixLease, id), encode(rec)); err != nil {
		return nil, err
	}
	if err := tx.PutMeta(metaLeaseNext, putU64(id+1)); err != nil {
		return nil, err
	}
	if err := tx.PutMeta(metaLeaseCount, putU64(count+1)); err != nil {
		return nil, err
	}
	return &peerpb.LeaseResult{Id: id}, nil
}

func loadLease(tx State, id int64) (*peerpb.LeaseRecord, error) {
	b := tx.GetMeta(leaseKey(prefixLease, id))
	if b == nil {
		return nil, fmt.Errorf("%w: lease %d", ErrLeaseNotFound, id)
	}
	var rec peerpb.LeaseRecord
	if err := proto.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("%w: lease %d: %v", ErrCorrupt, id, err)
	}
	return &rec, nil
}

// markRevoked is idempotent: the leader repeats it when it takes over a
// revocation it did not finish.
func markRevoked(tx State, id int64) error {
	if err := onMeta(tx); err != nil {
		return err
	}
	rec, err := loadLease(tx, id)
	if err != nil || rec.GetRevoked() {
		return err
	}
	rec.Revoked = true
	return tx.PutMeta(leaseKey(prefixLease, id), encode(rec))
}

func checkpointLeases(tx State, c *peerpb.LeaseCheckpoint) error {
	for _, l := range c.GetLeases() {
		rec, err := loadLease(tx, l.GetId())
		if err != nil || rec.GetRevoked() {
			continue // revoked or gone since the leader took the figure
		}
		rec.RemainingMs = min(max(l.GetRemainingMs(), 0), rec.GetTtlMs())
		if err := tx.PutMeta(leaseKey(prefixLease, l.GetId()), encode(rec)); err != nil {
			return err
		}
	}
	return nil
}

func forgetLease(tx State, id int64) error {
	if err := onMeta(tx); err != nil {
		return err
	}
	rec, err := loadLease(tx, id)
	if errors.Is(err, ErrLeaseNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if !rec.GetRevoked() {
		return fmt.Errorf("%w: lease %d is not revoked", ErrMalformed, id)
	}
	if err := tx.DeleteMeta(leaseKey(prefixLease, id)); err != nil {
		return err
	}
	return tx.PutMeta(metaLeaseCount, putU64(max(getU64(tx.GetMeta(metaLeaseCount))-1, 0)))
}

// revokeKeys deletes every key of this shard attached to lease id, all at
// one new revision (watchers see a DELETE for each), and leaves the
// tombstone that refuses later puts with the lease. Repeating it finds no
// keys and changes nothing else.
func revokeKeys(tx State, id int64, now int64) (*peerpb.LeaseResult, error) {
	prefix := leaseKey(prefixLeaseKey, id)
	var keys [][]byte
	tx.RangeMeta(prefix, func(k, _ []byte) bool {
		keys = append(keys, bytes.Clone(k[len(prefix):]))
		return true
	})
	ch := newChanges(tx, now)
	var deleted int64
	for _, key := range keys {
		if err := tx.DeleteMeta(leaseIndexKey(id, key)); err != nil {
			return nil, err
		}
		prev, err := load(tx, key)
		if err != nil {
			return nil, err
		}
		if prev == nil || prev.GetLease() != id {
			continue // the index outlived the key's lease: nothing to delete
		}
		if err := tx.Delete(key); err != nil {
			return nil, err
		}
		if err := ch.record(tx, &peerpb.HistoryEvent{Delete: true, Key: key}, prev); err != nil {
			return nil, err
		}
		deleted++
	}
	if deleted > 0 {
		ch.commit(tx)
	}
	if err := tx.DeleteMeta(leaseKey(prefixLeaseNum, id)); err != nil {
		return nil, err
	}
	if tx.GetMeta(leaseKey(prefixLeaseTmb, id)) == nil {
		if err := tx.PutMeta(leaseKey(prefixLeaseTmb, id), putU64(now)); err != nil {
			return nil, err
		}
		if err := tx.PutMeta(tombstoneAgeKey(now, id), []byte{}); err != nil {
			return nil, err
		}
	}
	if err := trimTombstones(tx, now-TombstoneRetentionMs); err != nil {
		return nil, err
	}
	return &peerpb.LeaseResult{Id: id, Deleted: deleted}, nil
}

func tombstoneAgeKey(time, id int64) []byte {
	k := append(make([]byte, 0, len(prefixLeaseAge)+16), prefixLeaseAge...)
	k = binary.BigEndian.AppendUint64(k, uint64(time))
	return binary.BigEndian.AppendUint64(k, uint64(id))
}

// trimTombstones drops up to maxTombstoneTrim tombstones revoked before
// cutoff, oldest first, and moves lease/trimmed past them.
func trimTombstones(tx State, cutoff int64) error {
	var drop [][]byte
	var newest int64
	tx.RangeMeta(prefixLeaseAge, func(k, _ []byte) bool {
		if len(k) != len(prefixLeaseAge)+16 {
			return true
		}
		t := int64(binary.BigEndian.Uint64(k[len(prefixLeaseAge):]))
		if t >= cutoff || len(drop) == maxTombstoneTrim {
			return false
		}
		drop = append(drop, bytes.Clone(k))
		newest = t
		return true
	})
	if len(drop) == 0 {
		return nil
	}
	for _, k := range drop {
		id := int64(binary.BigEndian.Uint64(k[len(prefixLeaseAge)+8:]))
		if err := tx.DeleteMeta(k); err != nil {
			return err
		}
		if err := tx.DeleteMeta(leaseKey(prefixLeaseTmb, id)); err != nil {
			return err
		}
	}
	if trimmed := newest + tombstoneSkewMs; trimmed > getU64(tx.GetMeta(metaLeaseTrim)) {
		return tx.PutMeta(metaLeaseTrim, putU64(trimmed))
	}
	return nil
}

// Leases reads the meta shard's lease records in id order.
func Leases(r View) ([]*peerpb.LeaseRecord, error) {
	var (
		out []*peerpb.LeaseRecord
		err error
	)
	r.ScanMeta(prefixLease, keys.PrefixEnd(prefixLease), func(_, v []byte) bool {
		var rec peerpb.LeaseRecord
		if err = proto.Unmarshal(v, &rec); err != nil {
			err = fmt.Errorf("%w: lease record: %v", ErrCorrupt, err)
			return false
		}
		out = append(out, &rec)
		return true
	})
	return out, err
}

// LeasedKey is a key attached to a lease, with what its record says.
type LeasedKey struct {
	Key         []byte
	ModRevision int64
	ValueSize   int64
}

// LeaseKeys reads the keys of a data shard attached to lease id, in key
// order, with each one's mod revision and value size (0 and 0 for a key
// the index lists but that no longer exists).
func LeaseKeys(r View, id int64) ([]LeasedKey, error) {
	prefix := leaseKey(prefixLeaseKey, id)
	var out []LeasedKey
	var err error
	r.ScanMeta(prefix, keys.PrefixEnd(prefix), func(k, _ []byte) bool {
		lk := LeasedKey{Key: bytes.Clone(k[len(prefix):])}
		if v := r.Get(lk.Key); v != nil {
			sv, verr := viewStored(v)
			if verr != nil {
				err = fmt.Errorf("key %s: %w", keys.Quote(lk.Key), verr)
				return false
			}
			lk.ModRevision, lk.ValueSize = sv.mod, int64(len(sv.value))
		}
		out = append(out, lk)
		return true
	})
	return out, err
}

// Lease reads one lease record of the meta shard; nil when there is none.
func Lease(r View, id int64) (*peerpb.LeaseRecord, error) {
	b := r.GetMeta(leaseKey(prefixLease, id))
	if b == nil {
		return nil, nil
	}
	var rec peerpb.LeaseRecord
	if err := proto.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("%w: lease %d: %v", ErrCorrupt, id, err)
	}
	return &rec, nil
}

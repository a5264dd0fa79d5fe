package fsm

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/kvd/kvd/fsm/memstate"
	"github.com/kvd/kvd/internal/keys"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
)

func cmdLease(op *peerpb.LeaseOp) *peerpb.Command {
	return &peerpb.Command{Op: &peerpb.Command_Lease{Lease: op}}
}

func cmdPutLease(k, v string, lease int64) *peerpb.Command {
	c := cmdPut(k, v)
	c.GetPut().Lease = lease
	return c
}

// metaShard is a shard holding a cluster map, as the meta shard does.
func metaShard(t *testing.T, sh *shard) {
	t.Helper()
	m := &kvpb.ClusterMap{Epoch: 1, Members: []*kvpb.Member{{Id: 1, PeerAddr: "127.0.0.1:1"}}}
	if _, err := sh.apply(&peerpb.Command{Op: &peerpb.Command_SetClusterMap{SetClusterMap: &peerpb.SetClusterMap{Map: m}}}); err != nil {
		t.Fatal(err)
	}
}

func TestLeaseRecordsOnMeta(t *testing.T) {
	for _, stored := range []bool{false, true} {
		t.Run(fmt.Sprint("stored=", stored), func(t *testing.T) {
			sh := newShard(t)
			if stored {
				sh = newStoredShard(t)
			}
			grant := func(ttl, limit int64) (int64, error) {
				r, err := sh.apply(cmdLease(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_Grant{Grant: &peerpb.LeaseGrant{TtlMs: ttl, MaxLeases: limit}}}))
				return r.GetLease().GetId(), err
			}
			if _, err := grant(1000, 10); !errors.Is(err, ErrNotMeta) {
				t.Fatalf("grant on a data shard: %v, want ErrNotMeta", err)
			}
			metaShard(t, sh)
			if _, err := grant(0, 10); !errors.Is(err, ErrMalformed) {
				t.Fatalf("grant with TTL 0: %v, want ErrMalformed", err)
			}
			a, err := grant(1000, 2)
			if err != nil || a != 1 {
				t.Fatalf("first grant: id %d, %v", a, err)
			}
			b, err := grant(2000, 2)
			if err != nil || b != 2 {
				t.Fatalf("second grant: id %d, %v", b, err)
			}
			if _, err := grant(1000, 2); !errors.Is(err, ErrLeaseLimit) {
				t.Fatalf("grant over the limit: %v, want ErrLeaseLimit", err)
			}
			if _, err := sh.apply(cmdLease(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_Checkpoint{Checkpoint: &peerpb.LeaseCheckpoint{
				Leases: []*peerpb.LeaseRemaining{{Id: a, RemainingMs: 400}, {Id: 99, RemainingMs: 1}}}}})); err != nil {
				t.Fatal(err)
			}
			if _, err := sh.apply(cmdLease(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_Revoke{Revoke: 99}})); !errors.Is(err, ErrLeaseNotFound) {
				t.Fatalf("revoke of an unknown lease: %v, want ErrLeaseNotFound", err)
			}
			if _, err := sh.apply(cmdLease(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_Forget{Forget: b}})); !errors.Is(err, ErrMalformed) {
				t.Fatalf("forget of a live lease: %v, want ErrMalformed", err)
			}
			for range 2 { // idempotent
				if _, err := sh.apply(cmdLease(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_Revoke{Revoke: b}})); err != nil {
					t.Fatal(err)
				}
			}
			var recs []*peerpb.LeaseRecord
			sh.view(func(r View) { recs, err = Leases(r) })
			if err != nil || len(recs) != 2 || recs[0].GetRemainingMs() != 400 || !recs[1].GetRevoked() || recs[1].GetTtlMs() != 2000 {
				t.Fatalf("records: %v, %v", recs, err)
			}
			if _, err := sh.apply(cmdLease(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_Forget{Forget: b}})); err != nil {
				t.Fatal(err)
			}
			// Forgetting frees a slot; ids are never reused.
			c, err := grant(1000, 2)
			if err != nil || c != 3 {
				t.Fatalf("grant after forget: id %d, %v", c, err)
			}
		})
	}
}

func TestLeaseIndexFollowsPutsAndDeletes(t *testing.T) {
	sh := newStoredShard(t)
	keys := func(id int64) []string {
		var out []string
		sh.view(func(r View) {
			lks, err := LeaseKeys(r, id)
			if err != nil {
				t.Fatal(err)
			}
			for _, lk := range lks {
				out = append(out, string(lk.Key))
				// Each listed key's record gives its revision and size.
				kv, err := Get(r, lk.Key)
				if err != nil {
					t.Fatal(err)
				}
				if kv.GetModRevision() != lk.ModRevision || int64(len(kv.GetValue())) != lk.ValueSize {
					t.Fatalf("%q listed at revision %d with %d bytes; its record says %d and %d",
						lk.Key, lk.ModRevision, lk.ValueSize, kv.GetModRevision(), len(kv.GetValue()))
				}
			}
		})
		return out
	}
	for _, c := range []*peerpb.Command{
		cmdPutLease("a", "1", 7), cmdPutLease("b", "1", 7), cmdPutLease("c", "1", 8),
		cmdPutLease("b", "2", 8), // moves b to lease 8
		cmdPut("c", "2"),         // detaches c
		cmdPutLease("d", "1", 7), cmdDel("d"),
	} {
		if _, err := sh.apply(c); err != nil {
			t.Fatal(err)
		}
	}
	if got := keys(7); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("lease 7 keys %q, want [a]", got)
	}
	if got := keys(8); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("lease 8 keys %q, want [b]", got)
	}
	if kv := sh.get("b"); kv.GetLease() != 8 {
		t.Fatalf("b's lease %d, want 8", kv.GetLease())
	}
	rev := sh.revision()
	r, err := sh.apply(cmdLease(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_RevokeKeys{RevokeKeys: 7}}))
	if err != nil || r.GetLease().GetDeleted() != 1 {
		t.Fatalf("revoke keys: %v, %v", r, err)
	}
	if sh.get("a") != nil || sh.get("b") == nil || sh.revision() != rev+1 {
		t.Fatalf("after revoke: a %v, b %v, revision %d (was %d)", sh.get("a"), sh.get("b"), sh.revision(), rev)
	}
	if _, err := sh.apply(cmdPutLease("a", "late", 7)); !errors.Is(err, ErrLeaseNotFound) {
		t.Fatalf("put with a revoked lease: %v, want ErrLeaseNotFound", err)
	}
	// A transaction whose second put names the revoked lease changes nothing.
	_, err = sh.apply(cmdTxn(nil, []*kvpb.RequestOp{opPut("x", "1"), {Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: []byte("y"), Lease: 7}}}}, nil))
	if !errors.Is(err, ErrLeaseNotFound) || sh.get("x") != nil {
		t.Fatalf("txn with a revoked lease: %v, x %v", err, sh.get("x"))
	}
	// Repeating the revocation deletes nothing and keeps the revision.
	rev = sh.revision()
	if r, err := sh.apply(cmdLease(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_RevokeKeys{RevokeKeys: 7}})); err != nil || r.GetLease().GetDeleted() != 0 || sh.revision() != rev {
		t.Fatalf("second revoke: %v, %v, revision %d", r, err, sh.revision())
	}
}

func TestLeaseKeysAreBounded(t *testing.T) {
	sh := newShard(t)
	for i := range MaxKeysPerLease {
		if _, err := sh.apply(cmdPutLease(fmt.Sprint("k", i), "", 5)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := sh.apply(cmdPutLease("one-more", "", 5)); !errors.Is(err, ErrLeaseLimit) {
		t.Fatalf("put past the limit: %v, want ErrLeaseLimit", err)
	}
	// Rewriting a key already on the lease is no new key.
	if _, err := sh.apply(cmdPutLease("k0", "again", 5)); err != nil {
		t.Fatal(err)
	}
	if _, err := sh.apply(cmdPutLease("neg", "", -1)); !errors.Is(err, ErrLeaseNotFound) {
		t.Fatalf("negative lease: %v", err)
	}
}

// FuzzLeaseCommands applies a random sequence of lease commands, puts
// and deletes to one shard (which holds a cluster map, so it is the meta
// shard too): nothing panics, every key's lease has the key in its index,
// and after revoke_keys no key holds the lease and no put can attach one.
func FuzzLeaseCommands(f *testing.F) {
	f.Add([]byte{0, 1, 5, 5, 1, 0, 4, 1, 0, 5, 1, 0})
	f.Add([]byte{5, 2, 1, 5, 3, 2, 6, 2, 0, 4, 2, 0, 2, 1, 9, 1, 1, 0, 3, 1, 0})
	f.Fuzz(func(t *testing.T, script []byte) {
		sh := newShard(t)
		metaShard(t, sh)
		revoked := map[int64]bool{}
		for len(script) >= 3 {
			op, a, b := script[0]%7, int64(int8(script[1]))%4, int64(script[2])
			script = script[3:]
			var c *peerpb.Command
			switch op {
			case 0:
				c = cmdLease(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_Grant{Grant: &peerpb.LeaseGrant{TtlMs: b - 10, MaxLeases: 3}}})
			case 1:
				c = cmdLease(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_Revoke{Revoke: a}})
			case 2:
				c = cmdLease(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_Checkpoint{Checkpoint: &peerpb.LeaseCheckpoint{Leases: []*peerpb.LeaseRemaining{{Id: a, RemainingMs: b - 10}}}}})
			case 3:
				c = cmdLease(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_Forget{Forget: a}})
			case 4:
				c = cmdLease(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_RevokeKeys{RevokeKeys: a}})
				revoked[a] = true
			case 5:
				c = cmdPutLease(fmt.Sprint("k", b%4), "v", a)
			case 6:
				c = cmdDel(fmt.Sprint("k", b%4))
			}
			_, err := sh.apply(c)
			if op == 5 && err == nil && revoked[a] && a != 0 {
				t.Fatalf("put attached a key to revoked lease %d", a)
			}
			sh.view(func(r View) {
				if err := Range(r, nil, nil, func(kv *kvpb.KeyValue) bool {
					lks, err := LeaseKeys(r, kv.GetLease())
					if err != nil {
						t.Fatal(err)
					}
					if l := kv.GetLease(); l != 0 && !slices.ContainsFunc(lks, func(lk LeasedKey) bool { return string(lk.Key) == string(kv.GetKey()) }) {
						t.Fatalf("key %q on lease %d is not in its index", kv.GetKey(), l)
					}
					if revoked[kv.GetLease()] && kv.GetLease() != 0 {
						t.Fatalf("key %q still on revoked lease %d", kv.GetKey(), kv.GetLease())
					}
					return true
				}); err != nil {
					t.Fatal(err)
				}
			})
		}
	})
}

// leaseReads records reads of lease state.
type leaseReads struct {
	State
	seen []string
}

func (r *leaseReads) GetMeta(key []byte) []byte {
	for _, p := range [][]byte{prefixLeaseKey, prefixLeaseNum, prefixLeaseTmb} {
		if bytes.HasPrefix(key, p) {
			r.seen = append(r.seen, string(key))
		}
	}
	return r.State.GetMeta(key)
}

// TestPutWithoutLeaseReadsNoLeaseState: a put or delete of a key without
// a lease, that gives it none, reads no lease state: the put path costs
// what it cost before leases.
func TestPutWithoutLeaseReadsNoLeaseState(t *testing.T) {
	st := &leaseReads{State: memstate.New()}
	for _, c := range []*peerpb.Command{cmdPut("a", "1"), cmdPut("a", "2"), cmdDel("a"),
		cmdTxn(nil, []*kvpb.RequestOp{opPut("b", "1"), opGet("b")}, nil)} {
		if r := apply(st, mustMarshal(c)); r.GetError() != "" {
			t.Fatal(r.GetError())
		}
	}
	if len(st.seen) != 0 {
		t.Fatalf("puts without leases read lease state: %q", st.seen)
	}
	if r := apply(st, mustMarshal(cmdPutLease("c", "1", 3))); r.GetError() != "" || len(st.seen) == 0 {
		t.Fatalf("a put with a lease: %v, read %q", r, st.seen)
	}
}

// TestLeaseTombstonesAreTrimmed: a revocation drops the tombstones older
// than TombstoneRetentionMs (by the commands' times), so a churn of
// revocations keeps only the recent ones; a put proposed before the
// trimmed ones' time is refused rather than let through, and one proposed
// after it is served.
func TestLeaseTombstonesAreTrimmed(t *testing.T) {
	sh := newStoredShard(t)
	at := func(c *peerpb.Command, ms int64) *peerpb.Command {
		c.TimeUnixMs = ms
		return c
	}
	revoke := func(id, ms int64) {
		t.Helper()
		if _, err := sh.apply(at(cmdLease(&peerpb.LeaseOp{Op: &peerpb.LeaseOp_RevokeKeys{RevokeKeys: id}}), ms)); err != nil {
			t.Fatal(err)
		}
	}
	tombstones := func() (n int) {
		sh.view(func(r View) {
			r.ScanMeta(prefixLeaseTmb, keys.PrefixEnd(prefixLeaseTmb), func(_, _ []byte) bool { n++; return true })
		})
		return n
	}
	const t0 = 1_000_000
	if _, err := sh.apply(at(cmdPutLease("a", "1", 7), t0)); err != nil {
		t.Fatal(err)
	}
	revoke(7, t0+1000)
	if _, err := sh.apply(at(cmdPutLease("a", "late", 7), t0+2000)); !errors.Is(err, ErrLeaseNotFound) {
		t.Fatalf("put with a revoked lease: %v, want ErrLeaseNotFound", err)
	}
	// Fifty more revocations, ten seconds apart: 7's tombstone and the
	// older of these are trimmed, the last retention's are kept.
	const step = 10_000
	for i := int64(1); i <= 50; i++ {
		revoke(100+i, t0+1000+i*step)
	}
	if n, most := tombstones(), TombstoneRetentionMs/step+1; n > most || n == 0 {
		t.Fatalf("%d tombstones after 50 revocations 10 s apart; want 1..%d", n, most)
	}
	// 7's tombstone is gone, but a put proposed before the trim is
	// refused all the same; one proposed after it is served.
	last := int64(t0 + 1000 + 50*step)
	if _, err := sh.apply(at(cmdPutLease("b", "late", 7), t0+2000)); !errors.Is(err, ErrLeaseNotFound) {
		t.Fatalf("put proposed before the trim: %v, want ErrLeaseNotFound", err)
	}
	if _, err := sh.apply(at(cmdPutLease("c", "new", 9), last)); err != nil {
		t.Fatalf("put with a live lease after the trim: %v", err)
	}
}

package storage

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/peerpb"
)

// flipStored changes the last byte of the stored value of key in shard's
// bucket (kv or meta) of a closed engine's file, as a bad disk would.
func flipStored(t *testing.T, path string, shard uint64, bucket, key string) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketShards).Bucket(u64(shard)).Bucket([]byte(bucket))
		v := append([]byte(nil), b.Get([]byte(key))...)
		if len(v) == 0 {
			return errors.New("no such value")
		}
		v[len(v)-1] ^= 0x01
		return b.Put([]byte(key), v)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// stateHashOf recomputes shard's state hash from its stored pairs and
// returns it with the running one.
func stateHashOf(t *testing.T, s *Shard) (stored, recomputed uint64) {
	t.Helper()
	err := s.View(func(r *Reader) error {
		for _, b := range []*bolt.Bucket{r.kv, r.meta, r.hist} {
			sum, err := sumBucket(b, nil)
			if err != nil {
				return err
			}
			recomputed += sum
		}
		stored = r.StateHash()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return stored, recomputed
}

func putAll(t *testing.T, s *Shard, first uint64, kvs ...string) uint64 {
	t.Helper()
	var es []*pb.Entry
	for i := 0; i+1 < len(kvs); i += 2 {
		es = append(es, putEntry(first+uint64(len(es)), 1, kvs[i], kvs[i+1]))
	}
	if err := s.Save(&Update{Entries: es, Committed: es, Apply: applyPut}); err != nil {
		t.Fatal(err)
	}
	return first + uint64(len(es))
}

// TestCorruptValueNotServed: a value changed in the file is never returned
// by a read, and a write round that reads it fails the engine before the
// ApplyFunc can act on it.
func TestCorruptValueNotServed(t *testing.T) {
	e, path := openTest(t, Options{NoSync: true})
	s, _ := e.CreateShard(1, voters)
	putAll(t, s, 2, "a", "1", "b", "secret", "c", "3")
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	flipStored(t, path, 1, "kv", "b")
	e, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close() })
	s, _ = e.OpenShard(1)

	var got []byte
	err = s.View(func(r *Reader) error {
		got = r.Get([]byte("b"))
		return nil
	})
	if !errors.Is(err, ErrCorrupt) || got != nil {
		t.Fatalf("Get of the changed value: %q, %v; want nil, ErrCorrupt", got, err)
	}
	if !strings.Contains(err.Error(), "shard 1") || !strings.Contains(err.Error(), `"b"`) {
		t.Fatalf("error %q does not name shard and key", err)
	}
	var seen []string
	err = s.View(func(r *Reader) error {
		r.Range(nil, nil, func(k, v []byte) bool {
			seen = append(seen, string(k)+"="+string(v))
			return true
		})
		return nil
	})
	if !errors.Is(err, ErrCorrupt) || len(seen) != 1 {
		t.Fatalf("Range: %q, %v; want only a=1 and ErrCorrupt", seen, err)
	}
	// Intact values still read.
	if err := s.View(func(r *Reader) error {
		if v := string(r.Get([]byte("c"))); v != "3" {
			t.Errorf("c = %q", v)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	// The state machine reads b while applying: the apply never sees a
	// value, the round fails, and so does every later write.
	reached := false
	en := putEntry(5, 1, "x", "y")
	err = s.Save(&Update{Entries: []*pb.Entry{en}, Committed: []*pb.Entry{en}, Apply: func(tx *Txn, e *pb.Entry) {
		v := tx.Get([]byte("b"))
		reached = true
		_ = tx.Put([]byte("b-copy"), v)
	}})
	if !errors.Is(err, ErrCorrupt) || reached {
		t.Fatalf("apply over a corrupt value: %v (apply went on: %v); want ErrCorrupt", err, reached)
	}
	if err := s.Save(&Update{HardState: &pb.HardState{Term: proto.Uint64(1), Commit: proto.Uint64(4)}}); !errors.Is(err, ErrFailed) {
		t.Fatalf("write after the failed round: %v, want ErrFailed", err)
	}
}

// TestCorruptMetaNotServed: metadata values are checked the same way.
func TestCorruptMetaNotServed(t *testing.T) {
	e, path := openTest(t, Options{NoSync: true})
	s, _ := e.CreateShard(1, voters)
	putAll(t, s, 2, "a", "1")
	_ = e.Close()
	flipStored(t, path, 1, "meta", "count")
	e, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close() })
	s, _ = e.OpenShard(1)
	err = s.View(func(r *Reader) error {
		r.GetMeta([]byte("count"))
		return nil
	})
	mustIs(t, err, ErrCorrupt)
}

// TestSnapshotCorruptPair: a corrupt pair is neither sent nor installed.
func TestSnapshotCorruptPair(t *testing.T) {
	ea, path := openTest(t, Options{NoSync: true})
	a, _ := ea.CreateShard(1, voters)
	putAll(t, a, 2, "a", "1", "b", "2")
	_ = ea.Close()
	flipStored(t, path, 1, "kv", "b")
	ea, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ea.Close() })
	a, _ = ea.OpenShard(1)

	// Sender.
	r, err := a.OpenSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	var sent []*peerpb.SnapshotPair
	for {
		ps, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			mustIs(t, err, ErrCorrupt)
			break
		}
		sent = append(sent, ps...)
	}
	_ = r.Close()
	for _, p := range sent {
		if string(p.GetKey()) == "b" {
			t.Fatal("the corrupt pair was sent")
		}
	}

	// Receiver, given a pair changed on the way (or by a sender without
	// the check).
	eb, _ := openTest(t, Options{NoSync: true})
	if _, err := eb.CreateShard(1, nil); err != nil {
		t.Fatal(err)
	}
	bad := &peerpb.SnapshotPair{Bucket: []byte(PairBucketKV), Key: []byte("b"), Value: seal([]byte("b"), []byte("2"))}
	bad.Value[len(bad.Value)-1] ^= 1
	done := false
	meta := &pb.SnapshotMetadata{Index: proto.Uint64(10), Term: proto.Uint64(1), ConfState: voters}
	_, err = eb.StageSnapshot(1, meta, func() ([]*peerpb.SnapshotPair, error) {
		if done {
			return nil, io.EOF
		}
		done = true
		return []*peerpb.SnapshotPair{bad}, nil
	})
	mustIs(t, err, ErrBadSnapshot)
	mustIs(t, err, ErrCorrupt)
	if n := stagedCount(t, eb); n != 0 {
		t.Fatalf("%d staged after a corrupt pair", n)
	}
}

// TestStateHash: the running state hash follows puts, overwrites and
// deletes, equals the sum recomputed from the pairs, survives a reopen and
// travels with a snapshot.
func TestStateHash(t *testing.T) {
	e, path := openTest(t, Options{NoSync: true})
	s, _ := e.CreateShard(1, voters)
	next := putAll(t, s, 2, "a", "1", "b", "2", "c", "3", "a", "4")
	del := &pb.Entry{Index: proto.Uint64(next), Term: proto.Uint64(1), Data: []byte("c")}
	if err := s.Save(&Update{Entries: []*pb.Entry{del}, Committed: []*pb.Entry{del}, Apply: func(tx *Txn, _ *pb.Entry) {
		if err := tx.Delete([]byte("c")); err != nil {
			panic(err)
		}
		if err := tx.Delete([]byte("never-there")); err != nil {
			panic(err)
		}
	}}); err != nil {
		t.Fatal(err)
	}
	stored, sum := stateHashOf(t, s)
	if stored == 0 || stored != sum {
		t.Fatalf("state hash %x, pairs add up to %x", stored, sum)
	}
	if want := pairSum([]byte("a"), []byte("4")) + pairSum([]byte("b"), []byte("2")) + pairSum([]byte("count"), u64(4)); stored != want {
		t.Fatalf("state hash %x, want %x", stored, want)
	}
	e = reopen(t, e, path, Options{NoSync: true})
	s, _ = e.OpenShard(1)
	if again, _ := stateHashOf(t, s); again != stored {
		t.Fatalf("after reopen %x, want %x", again, stored)
	}

	eb, _ := openTest(t, Options{NoSync: true})
	b, _ := eb.CreateShard(1, nil)
	transfer(t, s, eb, b)
	if got, sum := stateHashOf(t, b); got != stored || sum != stored {
		t.Fatalf("installed state hash %x (pairs %x), want %x", got, sum, stored)
	}
}

// TestLayoutRefused: a file of the layout before checksums is refused with
// both versions named, not misread.
func TestLayoutRefused(t *testing.T) {
	e, path := openTest(t, Options{NoSync: true})
	_ = e.Close()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketNode).Delete(keyLayout) }); err != nil {
		t.Fatal(err)
	}
	_ = db.Close()
	_, err = Open(path, Options{NoSync: true})
	mustIs(t, err, ErrLayout)
	if !strings.Contains(err.Error(), "layout 1") || !strings.Contains(err.Error(), fmt.Sprintf("layout %d", layoutVersion)) {
		t.Fatalf("error %q does not name both layouts", err)
	}
}

// TestLayout2HistoryMoved: a layout 2 file, which kept the history in
// meta/ under "h/", opens as layout 3 with every event in hist/ under the
// rest of its key, readable and verified, the metadata untouched, and the
// state hash adding up to the moved pairs. The layout 2 file is made from
// a layout 3 one by moving the events back as layout 2 kept them.
func TestLayout2HistoryMoved(t *testing.T) {
	e, path := openTest(t, Options{NoSync: true})
	s, _ := e.CreateShard(1, voters)
	next := putAll(t, s, 2, "a", "1")
	en := &pb.Entry{Index: proto.Uint64(next), Term: proto.Uint64(1), Data: []byte("x")}
	events := map[string]string{"\x00\x01": "put a", "\x00\x02": "put b", "\x00\x03": "delete a"}
	if err := s.Save(&Update{Entries: []*pb.Entry{en}, Committed: []*pb.Entry{en}, Apply: func(tx *Txn, _ *pb.Entry) {
		for k, v := range events {
			if err := tx.PutHistory([]byte(k), []byte(v)); err != nil {
				panic(err)
			}
		}
	}}); err != nil {
		t.Fatal(err)
	}
	// The events were written in map order: some above the greatest
	// key so far, some below it; the state hash counts both.
	want, sum := stateHashOf(t, s)
	if want != sum {
		t.Fatalf("state hash %x, pairs add up to %x", want, sum)
	}
	_ = e.Close()

	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(func(tx *bolt.Tx) error {
		b := shardBucket(tx, 1)
		hist, meta, raftb := b.Bucket(bucketHist), b.Bucket(bucketMeta), b.Bucket(bucketRaft)
		hash := getStateHash(raftb)
		for k, v := range events {
			old := hist.Get([]byte(k))
			lk := append(bytes.Clone(layout2History), k...)
			nv := seal(lk, []byte(v))
			if err := meta.Put(lk, nv); err != nil {
				return err
			}
			hash += storedSum(nv) - storedSum(old)
		}
		if err := b.DeleteBucket(bucketHist); err != nil {
			return err
		}
		if err := putStateHash(raftb, hash); err != nil {
			return err
		}
		return tx.Bucket(bucketNode).Put(keyLayout, u64(2))
	}); err != nil {
		t.Fatal(err)
	}
	_ = db.Close()

	e, err = Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close() })
	s, err = e.OpenShard(1)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Scrub(nil); err != nil {
		t.Fatal(err)
	}
	if got, sum := stateHashOf(t, s); got != want || sum != want {
		t.Fatalf("state hash %x (pairs %x) after the upgrade, want %x as before it", got, sum, want)
	}
	got := map[string]string{}
	err = s.View(func(r *Reader) error {
		r.ScanHistory(nil, nil, func(k, v []byte) bool {
			got[string(k)] = string(v)
			return true
		})
		if v := r.GetMeta([]byte("count")); v == nil {
			t.Error("the metadata lost its count")
		}
		rangeBucket(r.meta, layout2History, nil, func(k, _ []byte) bool {
			if bytes.HasPrefix(k, layout2History) {
				t.Errorf("meta/ still holds %q", k)
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(got, events) {
		t.Fatalf("history after the upgrade %q, want %q", got, events)
	}
}

// TestDeleteMetaRangeKeepsStateHash: a range delete of metadata removes
// exactly [start, end), moves the state hash by what it removed, and a
// key this Txn read before the delete and writes after it is counted as
// new, not as replacing its deleted value.
func TestDeleteMetaRangeKeepsStateHash(t *testing.T) {
	e, _ := openTest(t, Options{NoSync: true})
	s, _ := e.CreateShard(1, voters)
	next := putAll(t, s, 2, "a", "1")
	en := &pb.Entry{Index: proto.Uint64(next), Term: proto.Uint64(1), Data: []byte("x")}
	if err := s.Save(&Update{Entries: []*pb.Entry{en}, Committed: []*pb.Entry{en}, Apply: func(tx *Txn, _ *pb.Entry) {
		for _, k := range []string{"r/1", "r/2", "r/3", "r/4", "s/1"} {
			if err := tx.PutMeta([]byte(k), []byte("v"+k)); err != nil {
				panic(err)
			}
		}
		_ = tx.GetMeta([]byte("r/2"))
		if err := tx.DeleteMetaRange([]byte("r/2"), []byte("r/4")); err != nil {
			panic(err)
		}
		if err := tx.PutMeta([]byte("r/2"), []byte("again")); err != nil {
			panic(err)
		}
	}}); err != nil {
		t.Fatal(err)
	}
	if stored, sum := stateHashOf(t, s); stored != sum {
		t.Fatalf("state hash %x, pairs add up to %x", stored, sum)
	}
	var left []string
	_ = s.View(func(r *Reader) error {
		rangeBucket(r.meta, []byte("r/"), []byte("s/~"), func(k, _ []byte) bool {
			left = append(left, string(k))
			return true
		})
		return nil
	})
	if want := []string{"r/1", "r/2", "r/4", "s/1"}; !slices.Equal(left, want) {
		t.Fatalf("metadata left %q, want %q", left, want)
	}
}

// TestStateHashKeyBufferReused: a caller may reuse the buffer of a key it
// only read, and a range callback may delete the key bbolt hands it; the
// state hash still adds up to the stored pairs.
func TestStateHashKeyBufferReused(t *testing.T) {
	e, _ := openTest(t, Options{NoSync: true})
	s, _ := e.CreateShard(1, voters)
	next := putAll(t, s, 2, "a", "1", "b", "2")
	en := &pb.Entry{Index: proto.Uint64(next), Term: proto.Uint64(1), Data: []byte("x")}
	if err := s.Save(&Update{Entries: []*pb.Entry{en}, Committed: []*pb.Entry{en}, Apply: func(tx *Txn, _ *pb.Entry) {
		k := []byte("a")
		_ = tx.Get(k)
		k[0] = 'c' // the buffer now names a key that is absent
		if err := tx.Put(k, []byte("3")); err != nil {
			panic(err)
		}
		if err := tx.PutMeta([]byte("m1"), []byte("x")); err != nil {
			panic(err)
		}
		tx.RangeMeta([]byte("m"), func(k, _ []byte) bool {
			if err := tx.DeleteMeta(k); err != nil {
				panic(err)
			}
			return true
		})
		if err := tx.PutMeta([]byte("m1"), []byte("y")); err != nil {
			panic(err)
		}
	}}); err != nil {
		t.Fatal(err)
	}
	stored, sum := stateHashOf(t, s)
	if stored != sum {
		t.Fatalf("state hash %x, pairs add up to %x", stored, sum)
	}
	if err := s.Scrub(nil); err != nil {
		t.Fatal(err)
	}
}

// Txn reads through one kept cursor per bucket: each read must see the
// puts and deletes made before it in the same round, in every bucket,
// including ones that split a page.
func TestTxnReadsSeeItsOwnWrites(t *testing.T) {
	e, _ := openTest(t, Options{NoSync: true})
	s, _ := e.CreateShard(1, voters)
	next := putAll(t, s, 2, "a", "1")
	en := &pb.Entry{Index: proto.Uint64(next), Term: proto.Uint64(1), Data: []byte("x")}
	var failures []string
	check := func(what string, got []byte, want string) {
		if string(got) != want || (want == "") != (got == nil) {
			failures = append(failures, fmt.Sprintf("%s: %q, want %q", what, got, want))
		}
	}
	if err := s.Save(&Update{Entries: []*pb.Entry{en}, Committed: []*pb.Entry{en}, Apply: func(tx *Txn, _ *pb.Entry) {
		check("a before", tx.Get([]byte("a")), "1")
		check("m before", tx.GetMeta([]byte("m")), "")
		big := strings.Repeat("v", 3000) // two per page: the puts below split leaves
		for i := range 50 {
			k := fmt.Appendf(nil, "k%03d", i)
			if err := tx.Put(k, []byte(big)); err != nil {
				panic(err)
			}
			if err := tx.PutMeta([]byte("m"), k); err != nil {
				panic(err)
			}
			check(string(k), tx.Get(k), big)
			check("m", tx.GetMeta([]byte("m")), string(k))
		}
		if err := tx.Delete([]byte("a")); err != nil {
			panic(err)
		}
		check("a deleted", tx.Get([]byte("a")), "")
		check("k000 still", tx.Get([]byte("k000")), big)
		if err := tx.DeleteMeta([]byte("m")); err != nil {
			panic(err)
		}
		check("m deleted", tx.GetMeta([]byte("m")), "")
	}}); err != nil {
		t.Fatal(err)
	}
	for _, f := range failures {
		t.Error(f)
	}
	if err := s.Scrub(nil); err != nil {
		t.Fatal(err)
	}
}

// TestSealSlab: values sealed from one slab, small and large, each unseal
// to what was sealed, stay so while later values are sealed, and are the
// bytes seal writes alone.
func TestSealSlab(t *testing.T) {
	var s sealSlab
	type sealed struct{ key, value, stored []byte }
	var all []sealed
	for i := range 2000 {
		key := []byte(fmt.Sprintf("k%05d", i))
		value := bytes.Repeat([]byte{byte(i)}, (i*7919)%(slabChunk/4)) // some over slabChunk/8
		stored := s.seal(key, value)
		if !bytes.Equal(stored, seal(key, value)) {
			t.Fatalf("value %d: slab seal differs from seal", i)
		}
		if cap(stored) != len(stored) {
			t.Fatalf("value %d: capacity %d beyond its length %d: an append would write into its neighbour", i, cap(stored), len(stored))
		}
		all = append(all, sealed{key, value, stored})
	}
	for i, v := range all {
		got, _, err := unseal(v.key, v.stored)
		if err != nil || !bytes.Equal(got, v.value) {
			t.Fatalf("value %d after later seals: %v (equal %v)", i, err, bytes.Equal(got, v.value))
		}
	}
}

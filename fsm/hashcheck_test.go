package fsm

import (
	"testing"

	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
)

// TestHashCheckRecordsStateHash: HashCheck answers and records the state
// hash at its own index; two shards given the same commands agree, and a
// write moves the hash. On storage and in memory alike.
func TestHashCheckRecordsStateHash(t *testing.T) {
	for name, newShard := range map[string]func(testing.TB) *shard{"memory": newShard, "storage": newStoredShard} {
		t.Run(name, func(t *testing.T) { testHashCheck(t, newShard) })
	}
}

func testHashCheck(t *testing.T, newShard func(testing.TB) *shard) {
	check := func(sh *shard) *peerpb.HashCheckResult {
		t.Helper()
		res, err := sh.apply(&peerpb.Command{Op: &peerpb.Command_HashCheck{HashCheck: &peerpb.HashCheck{}}})
		if err != nil {
			t.Fatal(err)
		}
		return res.GetHashCheck()
	}
	put := &peerpb.Command{Op: &peerpb.Command_Put{Put: &kvpb.PutRequest{Key: []byte("k"), Value: []byte("v")}}}
	a, b := newShard(t), newShard(t)
	for _, sh := range []*shard{a, b} {
		if _, err := sh.apply(put); err != nil {
			t.Fatal(err)
		}
	}
	ra, rb := check(a), check(b)
	if ra.GetIndex() != a.index || ra.GetHash() == 0 || ra.GetIndex() != rb.GetIndex() || ra.GetHash() != rb.GetHash() {
		t.Fatalf("replicas' checks %v and %v", ra, rb)
	}
	a.view(func(r View) {
		hc, ok := r.(interface {
			HashCheck() (index, hash uint64, ok bool)
		})
		if !ok {
			t.Fatalf("%T records no hash check", r)
		}
		if i, h, ok := hc.HashCheck(); !ok || i != ra.GetIndex() || h != ra.GetHash() {
			t.Errorf("recorded %d/%x/%v, want %v", i, h, ok, ra)
		}
	})
	if _, err := a.apply(&peerpb.Command{Op: &peerpb.Command_Delete{Delete: &kvpb.DeleteRequest{Key: []byte("k")}}}); err != nil {
		t.Fatal(err)
	}
	if r := check(a); r.GetHash() == ra.GetHash() {
		t.Fatalf("hash unchanged by a delete: %v", r)
	}
}

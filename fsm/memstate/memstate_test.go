package memstate

import (
	"slices"
	"testing"
)

func keys(s *State, meta bool, prefix string) (got []string) {
	fn := func(k, _ []byte) bool { got = append(got, string(k)); return true }
	if meta {
		s.RangeMeta([]byte(prefix), fn)
	} else {
		s.Range([]byte(prefix), nil, fn)
	}
	return got
}

// TestRangesInKeyOrder: Range honours [start, end), RangeMeta its prefix,
// both in key order, and fn may delete the key it is given.
func TestRangesInKeyOrder(t *testing.T) {
	s := New()
	for _, k := range []string{"c", "a", "b", "d"} {
		if err := s.Put([]byte(k), []byte("v"+k)); err != nil {
			t.Fatal(err)
		}
	}
	var got []string
	s.Range([]byte("b"), []byte("d"), func(k, v []byte) bool {
		got = append(got, string(k)+"="+string(v))
		return true
	})
	if want := []string{"b=vb", "c=vc"}; !slices.Equal(got, want) {
		t.Fatalf("Range [b, d) = %v, want %v", got, want)
	}
	for _, k := range []string{"r/2", "s/1", "r/1", "r/3"} {
		if err := s.PutMeta([]byte(k), nil); err != nil {
			t.Fatal(err)
		}
	}
	if s.GetMeta([]byte("r/1")) == nil {
		t.Fatal("a key put with an empty value reads as absent")
	}
	s.RangeMeta([]byte("r/"), func(k, _ []byte) bool {
		if err := s.DeleteMeta(k); err != nil {
			t.Fatal(err)
		}
		return string(k) != "r/2"
	})
	if got, want := keys(s, true, ""), []string{"r/3", "s/1"}; !slices.Equal(got, want) {
		t.Fatalf("meta after deleting r/1 and r/2 while ranging: %v, want %v", got, want)
	}
	if got, want := keys(s, false, ""), []string{"a", "b", "c", "d"}; !slices.Equal(got, want) {
		t.Fatalf("kv keys %v, want %v", got, want)
	}
	if err := s.Put(nil, []byte("v")); err == nil {
		t.Fatal("Put of an empty key succeeded")
	}
}

// TestStateHashIsTheSumOfPairs: the hash depends on the pairs held, not
// on the order or history of the writes that left them, and kv and meta
// pairs differ.
func TestStateHashIsTheSumOfPairs(t *testing.T) {
	a, b := New(), New()
	a.Put([]byte("x"), []byte("1"))
	a.Put([]byte("y"), []byte("2"))
	a.PutMeta([]byte("m"), []byte("3"))

	b.PutMeta([]byte("m"), []byte("old"))
	b.Put([]byte("y"), []byte("2"))
	b.Put([]byte("z"), []byte("gone"))
	b.Put([]byte("x"), []byte("1"))
	b.Delete([]byte("z"))
	b.PutMeta([]byte("m"), []byte("3"))
	if a.StateHash() != b.StateHash() || a.StateHash() == 0 {
		t.Fatalf("same pairs, hashes %x and %x", a.StateHash(), b.StateHash())
	}
	c := New()
	c.PutMeta([]byte("x"), []byte("1"))
	d := New()
	d.Put([]byte("x"), []byte("1"))
	if c.StateHash() == d.StateHash() {
		t.Fatal("a meta pair hashes as the same kv pair")
	}
	a.Index = 9
	if i, h, err := a.CheckHash(); err != nil || i != 9 || h != a.StateHash() {
		t.Fatalf("CheckHash = %d, %x, %v", i, h, err)
	}
	if i, h, ok := a.HashCheck(); !ok || i != 9 || h != a.StateHash() {
		t.Fatalf("HashCheck = %d, %x, %v", i, h, ok)
	}
}

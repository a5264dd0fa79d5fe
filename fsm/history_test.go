package fsm

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/storage"
)

// historyModel is the reference for a shard's history: every state by
// revision and every event, kept the dumb way.
type historyModel struct {
	rev    int64
	state  map[string]*kvpb.KeyValue
	states []map[string]*kvpb.KeyValue // by revision
	events []*kvpb.Event
}

func newHistoryModel() *historyModel {
	m := &historyModel{state: map[string]*kvpb.KeyValue{}}
	m.states = append(m.states, map[string]*kvpb.KeyValue{})
	return m
}

func (m *historyModel) put(k, v string, rev int64) {
	prev := m.state[k]
	kv := &kvpb.KeyValue{Key: []byte(k), Value: []byte(v), CreateRevision: rev, ModRevision: rev, Version: 1}
	if prev != nil {
		kv.CreateRevision, kv.Version = prev.GetCreateRevision(), prev.GetVersion()+1
	}
	m.state[k] = kv
	m.events = append(m.events, &kvpb.Event{Kv: kv, PrevKv: prev})
}

func (m *historyModel) del(k string, rev int64) bool {
	prev := m.state[k]
	if prev == nil {
		return false
	}
	delete(m.state, k)
	m.events = append(m.events, &kvpb.Event{Type: kvpb.Event_DELETE, Kv: &kvpb.KeyValue{Key: []byte(k), ModRevision: rev}, PrevKv: prev})
	return true
}

func (m *historyModel) commit(changed bool) {
	if !changed {
		return
	}
	m.rev++
	snap := make(map[string]*kvpb.KeyValue, len(m.state))
	for k, v := range m.state {
		snap[k] = v
	}
	m.states = append(m.states, snap)
}

// randomHistory applies n random puts, deletes and transactions to sh and
// to a model.
func randomHistory(t *testing.T, sh *shard, seed uint64, n int) *historyModel {
	t.Helper()
	rnd := rand.New(rand.NewPCG(seed, 1))
	m := newHistoryModel()
	key := func() string { return fmt.Sprintf("k%d", rnd.IntN(6)) }
	for i := range n {
		var c *peerpb.Command
		switch rnd.IntN(4) {
		case 0, 1:
			k, v := key(), fmt.Sprintf("v%d", i)
			m.put(k, v, m.rev+1)
			m.commit(true)
			c = cmdPut(k, v)
		case 2:
			k := key()
			m.commit(m.del(k, m.rev+1))
			c = cmdDel(k)
		case 3:
			// Two writes at one revision: a put and a delete, perhaps of
			// the same key.
			k1, k2, v := key(), key(), fmt.Sprintf("t%d", i)
			m.put(k1, v, m.rev+1)
			m.del(k2, m.rev+1)
			m.commit(true)
			c = &peerpb.Command{Op: &peerpb.Command_Txn{Txn: &kvpb.TxnRequest{Success: []*kvpb.RequestOp{
				{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: []byte(k1), Value: []byte(v)}}},
				{Op: &kvpb.RequestOp_Delete{Delete: &kvpb.DeleteRequest{Key: []byte(k2)}}},
			}}}}
		}
		c.TimeUnixMs = int64(1000 + i)
		if _, err := sh.apply(c); err != nil {
			t.Fatal(err)
		}
	}
	if got := sh.revision(); got != m.rev {
		t.Fatalf("shard at revision %d, model at %d", got, m.rev)
	}
	return m
}

// viewErr runs fn with a read-only view of the shard and fails on its
// error.
func (sh *shard) viewErr(fn func(r View) error) {
	sh.t.Helper()
	var err error
	sh.view(func(r View) { err = fn(r) })
	if err != nil {
		sh.t.Fatal(err)
	}
}

func all([]byte) bool { return true }

// readAllEvents reads the events from revision from to the shard's
// revision rev, in reads of at most limit events and maxBytes, checking
// that each read keeps to them, that it splits a revision only where the
// revision alone is past them, and that it goes on where the last ended.
func readAllEvents(t *testing.T, r View, from, rev int64, limit int, maxBytes int64) []*kvpb.Event {
	t.Helper()
	var got []*kvpb.Event
	pos := EventPos{Rev: from}
	for {
		evs, index, next, err := ReadEvents(r, pos, all, limit, maxBytes)
		if err != nil {
			t.Fatal(err)
		}
		if len(index) != len(evs) {
			t.Fatalf("from %v: %d events, %d indexes", pos, len(evs), len(index))
		}
		var size int64
		for i, ev := range evs {
			size += int64(2*len(ev.GetKv().GetKey())+len(ev.GetKv().GetValue())+len(ev.GetPrevKv().GetValue())) + EventOverhead
			at := EventPos{Rev: ev.GetKv().GetModRevision(), Index: index[i]}
			if at.Before(pos) || !at.Before(next) {
				t.Fatalf("from %v: event at %v, next %v", pos, at, next)
			}
		}
		if len(evs) > 1 && (limit > 0 && len(evs) > limit || maxBytes > 0 && size > maxBytes) {
			t.Fatalf("from %v limits %d, %d: read %d events of %d bytes", pos, limit, maxBytes, len(evs), size)
		}
		if next.Index > 0 && len(evs) > 0 && evs[0].GetKv().GetModRevision() != next.Rev {
			t.Fatalf("from %v: split revision %d after reading revision %d", pos, next.Rev, evs[0].GetKv().GetModRevision())
		}
		if limit == 0 && maxBytes == 0 && next != (EventPos{Rev: rev + 1}) {
			t.Fatalf("from %v without limits: next %v, want revision %d", pos, next, rev+1)
		}
		if !pos.Before(next) {
			t.Fatalf("from %v: next %v", pos, next)
		}
		got = append(got, evs...)
		if next.Rev > rev {
			return got
		}
		pos = next
	}
}

// TestHistoryMatchesModel: every event is recorded in order with its
// value and prev kv, and a read at every past revision gives the state
// the model had then.
func TestHistoryMatchesModel(t *testing.T) {
	sh := newShard(t)
	m := randomHistory(t, sh, 7, 300)
	sh.viewErr(func(r View) error {
		for _, lim := range []struct {
			events int
			bytes  int64
		}{{0, 0}, {1, 0}, {2, 0}, {7, 0}, {0, 1}, {0, 200}, {0, 400}, {7, 200}} {
			for from := int64(1); from <= m.rev+1; from += 13 {
				got := readAllEvents(t, r, from, m.rev, lim.events, lim.bytes)
				want := slices.DeleteFunc(slices.Clone(m.events), func(e *kvpb.Event) bool {
					return e.GetKv().GetModRevision() < from
				})
				if len(got) != len(want) {
					t.Fatalf("from %d limits %v: %d events, want %d", from, lim, len(got), len(want))
				}
				for i := range got {
					if !proto.Equal(got[i], want[i]) {
						t.Fatalf("from %d limits %v: event %d is %v, want %v", from, lim, i, got[i], want[i])
					}
				}
			}
		}
		for rev := int64(0); rev <= m.rev; rev++ {
			past := m.states[rev]
			var keys []string
			for k := range past {
				keys = append(keys, k)
			}
			slices.Sort(keys)
			var got []string
			err := RangeAt(r, []byte("k"), nil, rev, func(kv *kvpb.KeyValue) bool {
				got = append(got, string(kv.GetKey()))
				if !proto.Equal(kv, past[string(kv.GetKey())]) {
					t.Errorf("at %d: range gives %v, want %v", rev, kv, past[string(kv.GetKey())])
				}
				return true
			})
			if err != nil {
				return err
			}
			if !slices.Equal(got, keys) {
				t.Fatalf("at %d: range gives keys %q, want %q", rev, got, keys)
			}
			for i := range 6 {
				k := fmt.Sprintf("k%d", i)
				kv, err := GetAt(r, []byte(k), rev)
				if err != nil {
					return err
				}
				if want := past[k]; !proto.Equal(kv, want) && !(kv == nil && want == nil) {
					t.Fatalf("at %d: get %s = %v, want %v", rev, k, kv, want)
				}
			}
		}
		if _, err := GetAt(r, []byte("k1"), m.rev+1); !errors.Is(err, ErrFutureRevision) {
			t.Fatalf("read past the revision: %v", err)
		}
		return nil
	})
}

// TestCompactHistoryInChunks: compaction drops at most max_events per
// command, reports when it is done, and reads and watches below what is
// left fail with the oldest revision.
func TestCompactHistoryInChunks(t *testing.T) {
	sh := newShard(t)
	m := randomHistory(t, sh, 3, 100)
	below := m.rev - 10
	rounds := 0
	for {
		res, err := sh.apply(&peerpb.Command{Op: &peerpb.Command_CompactHistory{CompactHistory: &peerpb.CompactHistory{Below: below, MaxEvents: 16}}})
		if err != nil {
			t.Fatal(err)
		}
		rounds++
		if res.GetCompactHistory().GetDone() {
			if got := res.GetCompactHistory().GetOldest(); got != below {
				t.Fatalf("done with oldest %d, want %d", got, below)
			}
			break
		}
		if rounds > 20 {
			t.Fatal("compaction does not finish")
		}
	}
	if rounds < 5 {
		t.Fatalf("compacted %d revisions in %d rounds of at most 16 events", below-1, rounds)
	}
	sh.viewErr(func(r View) error {
		if oldest, rev := HistoryBounds(r); oldest != below || rev != m.rev {
			t.Fatalf("bounds %d, %d; want %d, %d", oldest, rev, below, m.rev)
		}
		var ce *CompactedError
		if _, _, _, err := ReadEvents(r, EventPos{Rev: below - 1}, all, 0, 0); !errors.As(err, &ce) || ce.Oldest != below {
			t.Fatalf("watch below the history: %v", err)
		}
		if _, err := GetAt(r, []byte("k1"), below-2); !errors.As(err, &ce) || ce.Oldest != below {
			t.Fatalf("read below the history: %v", err)
		}
		for rev := below - 1; rev <= m.rev; rev++ {
			for i := range 6 {
				k := fmt.Sprintf("k%d", i)
				kv, err := GetAt(r, []byte(k), rev)
				if err != nil {
					return err
				}
				if want := m.states[rev][k]; !proto.Equal(kv, want) && !(kv == nil && want == nil) {
					t.Fatalf("at %d: get %s = %v, want %v", rev, k, kv, want)
				}
			}
		}
		evs, _, _, err := ReadEvents(r, EventPos{Rev: below}, all, 0, 0)
		if err != nil {
			return err
		}
		if first := evs[0].GetKv().GetModRevision(); first != below {
			t.Fatalf("first event at %d, want %d", first, below)
		}
		return nil
	})
	// Compacting everything leaves the current state readable.
	res, err := sh.apply(&peerpb.Command{Op: &peerpb.Command_CompactHistory{CompactHistory: &peerpb.CompactHistory{Below: m.rev + 100}}})
	if err != nil || !res.GetCompactHistory().GetDone() || res.GetCompactHistory().GetOldest() != m.rev+1 {
		t.Fatalf("compact all: %v, %v", res, err)
	}
	sh.viewErr(func(r View) error {
		if _, err := GetAt(r, []byte("k1"), m.rev); err != nil {
			t.Fatalf("read at the current revision with no history: %v", err)
		}
		return nil
	})
}

// TestHistoryInStateHash: two replicas given the same commands hold the
// same history; a compaction moves the hash (every replica applies it).
func TestHistoryInStateHash(t *testing.T) {
	a, b := newStoredShard(t), newStoredShard(t)
	randomHistory(t, a, 5, 50)
	randomHistory(t, b, 5, 50)
	hash := func(sh *shard) (h uint64) {
		sh.viewErr(func(r View) error { h = r.(*storage.Reader).StateHash(); return nil })
		return h
	}
	if hash(a) != hash(b) {
		t.Fatal("replicas of the same log differ")
	}
	before := hash(a)
	if _, err := a.apply(&peerpb.Command{Op: &peerpb.Command_CompactHistory{CompactHistory: &peerpb.CompactHistory{Below: 10}}}); err != nil {
		t.Fatal(err)
	}
	if hash(a) == before {
		t.Fatal("compaction left the state hash as it was")
	}
	if err := a.s.Scrub(nil); err != nil {
		t.Fatal(err)
	}
}

// TestHistoryBytesAreCounted: the history size kept with the revision is
// the bytes of the stored events, after writes and after compactions, and
// HistoryByteCut names the first revision whose dropping frees enough.
func TestHistoryBytesAreCounted(t *testing.T) {
	sh := newShard(t)
	m := randomHistory(t, sh, 5, 200)
	stored := func() (total int64, byRev map[int64]int64) {
		byRev = map[int64]int64{}
		sh.viewErr(func(r View) error {
			r.ScanHistory(nil, nil, func(k, v []byte) bool {
				rev, _ := historyRev(k)
				total += int64(len(k) + len(v))
				byRev[rev] += int64(len(k) + len(v))
				return true
			})
			return nil
		})
		return total, byRev
	}
	check := func(when string) {
		t.Helper()
		want, _ := stored()
		var got int64
		sh.viewErr(func(r View) error { got = HistoryBytes(r); return nil })
		if got != want || want == 0 {
			t.Fatalf("%s: HistoryBytes %d, stored events %d", when, got, want)
		}
	}
	check("after writes")
	total, byRev := stored()
	excess := total / 3
	var cut int64
	sh.viewErr(func(r View) error { cut = HistoryByteCut(r, excess, 1<<20); return nil })
	var freed, freedBefore int64
	for rev := int64(1); rev < cut; rev++ {
		freedBefore = freed
		freed += byRev[rev]
	}
	if freed < excess || freedBefore >= excess {
		t.Fatalf("cut %d frees %d bytes (one revision less: %d); want the first to free %d", cut, freed, freedBefore, excess)
	}
	if _, err := sh.apply(&peerpb.Command{Op: &peerpb.Command_CompactHistory{CompactHistory: &peerpb.CompactHistory{Below: cut}}}); err != nil {
		t.Fatal(err)
	}
	check("after a compaction")
	if got, _ := stored(); got != total-freed {
		t.Fatalf("after dropping below %d: %d bytes stored, want %d", cut, got, total-freed)
	}
	_ = m
}

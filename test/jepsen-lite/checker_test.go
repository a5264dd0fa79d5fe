package jepsenlite

import (
	"testing"
	"time"
)

// The checkers on hand-made histories: each must accept what is legal and
// flag what is not.
func TestCheckersOnHandMadeHistories(t *testing.T) {
	put := func(key, v string, call, ret int64, status string) Op {
		return Op{Key: key, Kind: kindPut, Value: v, Call: call, Return: ret, Status: status}
	}
	get := func(key, read string, call, ret int64) Op {
		return Op{Key: key, Kind: kindGet, Read: read, Call: call, Return: ret, Status: statusOK}
	}
	cas := func(key, expect, v string, call, ret int64, status string, swapped bool) Op {
		return Op{Key: key, Kind: kindCas, Expect: expect, Value: v, Call: call, Return: ret, Status: status, Swapped: swapped}
	}
	final := func(op Op) Op { op.Final = true; return op }
	ctr := func(op Op) Op { op.Counter = true; return op }

	lin := []struct {
		name    string
		ops     []Op
		illegal int
	}{
		{"sequential", []Op{put("k", "a", 0, 1, statusOK), get("k", "a", 2, 3)}, 0},
		{"stale read", []Op{put("k", "a", 0, 1, statusOK), put("k", "b", 2, 3, statusOK), get("k", "a", 4, 5)}, 1},
		{"concurrent read may see either", []Op{put("k", "a", 0, 1, statusOK), put("k", "b", 2, 6, statusOK), get("k", "a", 3, 4)}, 0},
		{"indeterminate write may apply late", []Op{put("k", "a", 0, 1, statusOK), put("k", "b", 2, -1, statusInfo), get("k", "a", 4, 5), get("k", "b", 6, 7)}, 0},
		{"indeterminate write cannot apply early", []Op{put("k", "b", 2, -1, statusInfo), get("k", "b", 0, 1)}, 1},
		{"failed write never applies", []Op{put("k", "b", 0, 1, statusFail), get("k", "b", 2, 3)}, 1},
		{"cas from absent", []Op{cas("k", "", "a", 0, 1, statusOK, true), get("k", "a", 2, 3)}, 0},
		{"cas must not swap a mismatch", []Op{put("k", "a", 0, 1, statusOK), cas("k", "x", "b", 2, 3, statusOK, true)}, 1},
		{"cas must swap a match", []Op{put("k", "a", 0, 1, statusOK), cas("k", "a", "b", 2, 3, statusOK, false)}, 1},
		{"unanswered read left out", []Op{put("k", "a", 0, 1, statusOK), {Key: "k", Kind: kindGet, Call: 2, Return: -1, Status: statusInfo}}, 0},
		{"keys are independent", []Op{put("k", "a", 0, 1, statusOK), get("j", "", 2, 3)}, 0},
	}
	for _, tc := range lin {
		res := checkLinearizable(tc.ops, nil, 5*time.Second, 10*time.Second, "")
		if res.illegal != tc.illegal || res.unknown != 0 {
			t.Errorf("%s: illegal=%d unknown=%d, want illegal=%d", tc.name, res.illegal, res.unknown, tc.illegal)
		}
	}

	dur := []struct {
		name string
		ops  []Op
		lost int
	}{
		{"last write read", []Op{put("k", "a", 0, 1, statusOK), put("k", "b", 2, 3, statusOK), final(get("k", "b", 9, 10))}, 0},
		{"older write read", []Op{put("k", "a", 0, 1, statusOK), put("k", "b", 2, 3, statusOK), final(get("k", "a", 9, 10))}, 1},
		{"later indeterminate write read", []Op{put("k", "a", 0, 1, statusOK), put("k", "b", 2, -1, statusInfo), final(get("k", "b", 9, 10))}, 0},
		{"concurrent writes, either survives", []Op{put("k", "a", 0, 3, statusOK), put("k", "b", 1, 2, statusOK), final(get("k", "a", 9, 10))}, 0},
		{"key gone", []Op{put("k", "a", 0, 1, statusOK), final(get("k", "", 9, 10))}, 1},
	}
	for _, tc := range dur {
		if res := checkDurable(tc.ops); res.lost != tc.lost {
			t.Errorf("%s: lost=%d, want %d (%v)", tc.name, res.lost, tc.lost, res.examples)
		}
	}

	incr := func(from, to string, status string, swapped bool) Op {
		return ctr(cas("c", from, to, 0, 1, status, swapped))
	}
	ctrs := []struct {
		name         string
		ops          []Op
		below, above int
	}{
		{"exact", []Op{incr("", "1", statusOK, true), incr("1", "2", statusOK, true), final(ctr(get("c", "2", 9, 10)))}, 0, 0},
		{"indeterminate counted or not", []Op{incr("", "1", statusOK, true), incr("1", "2", statusInfo, false), final(ctr(get("c", "1", 9, 10)))}, 0, 0},
		{"applied twice", []Op{incr("", "1", statusOK, true), final(ctr(get("c", "2", 9, 10)))}, 0, 1},
		{"lost", []Op{incr("", "1", statusOK, true), incr("1", "2", statusOK, true), final(ctr(get("c", "1", 9, 10)))}, 1, 0},
	}
	for _, tc := range ctrs {
		if res := checkCounters(tc.ops); res.below != tc.below || res.above != tc.above {
			t.Errorf("%s: below=%d above=%d, want %d %d (%v)", tc.name, res.below, res.above, tc.below, tc.above, res.lines)
		}
	}
}

// The watch checker on a recorded history: the legal one passes, and each
// injected fault (a dropped, a duplicated, a phantom event, and the
// others it knows) is reported as what it is, once.
func TestWatchCheckerDetectsInjectedEvents(t *testing.T) {
	w := func(kind, key, v string, rev int64, status string) Op {
		op := Op{Key: key, Kind: kind, Value: v, Status: status, Call: 1, Return: 2}
		if status == statusOK {
			op.Rev = rev
		}
		return op
	}
	cas := func(key, v string, rev int64, swapped bool) Op {
		op := w(kindCas, key, v, rev, statusOK)
		op.Swapped = swapped
		return op
	}
	del := func(key string, rev int64, status string, deleted bool) Op {
		op := w(kindDel, key, "", rev, status)
		op.Deleted = deleted
		return op
	}
	final := func(key, read string) Op {
		return Op{Key: key, Kind: kindGet, Read: read, Status: statusOK, Final: true}
	}
	ops := []Op{
		w(kindPut, "jl/a", "a1", 1, statusOK),
		w(kindPut, "jl/a", "a-failed", 0, statusFail),
		w(kindPut, "jl/a", "a-maybe", 0, statusInfo),
		cas("jl/a", "a2", 3, true),
		cas("jl/a", "a-noswap", 3, false),
		del("jl/a", 4, statusOK, true),
		del("jl/a", 4, statusOK, false), // absent: no event
		w(kindPut, "jl/a", "a3", 5, statusOK),
		w(kindPut, "jl/b", "b1", 2, statusOK),
		del("jl/b", 0, statusInfo, false),
		final("jl/a", "a3"),
		final("jl/b", ""),
	}
	ev := func(typ, key, v string, rev int64, shard uint64) WatchEvent {
		return WatchEvent{Type: typ, Key: key, Value: v, Rev: rev, Shard: shard}
	}
	// jl/a on shard 1, jl/b on shard 2 (whose revision 3 went to another
	// key). The indeterminate put of a-maybe applied (revision 2); the
	// indeterminate delete of jl/b applied too.
	legal := []WatchEvent{
		ev(evPut, "jl/a", "a1", 1, 1),
		ev(evPut, "jl/a", "a-maybe", 2, 1),
		ev(evPut, "jl/b", "b1", 2, 2),
		ev(evPut, "jl/a", "a2", 3, 1),
		ev(evDel, "jl/a", "", 4, 1),
		ev(evDel, "jl/b", "", 4, 2),
		ev(evPut, "jl/a", "a3", 5, 1),
		ev(evPut, "jl/a", endValue, 6, 1),
		ev(evPut, "jl/b", endValue, 5, 2),
		ev(evPut, sentinelPrefix+"ready.0", "ready", 7, 1),
	}
	// Two watchers see each history: one of the prefix jl/, one of the
	// key jl/a.
	check := func(evs []WatchEvent, err string) watchResult {
		prefix := watchLog{Name: "prefix", Key: "jl/", Prefix: true, Events: evs, Err: err}
		var onA []WatchEvent
		for _, e := range evs {
			if e.Key == "jl/a" {
				onA = append(onA, e)
			}
		}
		key := watchLog{Name: "key", Key: "jl/a", Events: onA, Err: err}
		return checkWatches(ops, []watchLog{prefix, key})
	}
	if res := check(legal, ""); res.anomalies() != 0 || res.events != 7+5 {
		t.Fatalf("legal history: events=%d anomalies=%d: %v", res.events, res.anomalies(), res.examples)
	}

	edit := func(f func([]WatchEvent) []WatchEvent) []WatchEvent {
		return f(append([]WatchEvent(nil), legal...))
	}
	insert := func(evs []WatchEvent, i int, e WatchEvent) []WatchEvent {
		return append(evs[:i], append([]WatchEvent{e}, evs[i:]...)...)
	}
	cases := []struct {
		name string
		evs  []WatchEvent
		err  string
		// want picks the count the injection must raise to n (once
		// per watcher that sees it) with no other anomaly.
		want func(watchResult) int
		n    int
	}{
		{"dropped acked put", edit(func(e []WatchEvent) []WatchEvent { return append(e[:3], e[4:]...) }), "",
			func(r watchResult) int { return r.dropped }, 2},
		{"dropped acked delete", edit(func(e []WatchEvent) []WatchEvent { return append(e[:4], e[5:]...) }), "",
			func(r watchResult) int { return r.dropped }, 2},
		{"duplicated put", edit(func(e []WatchEvent) []WatchEvent { return insert(e, 1, e[0]) }), "",
			func(r watchResult) int { return r.duplicated + r.misordered }, 4},
		{"phantom put of a value never written", edit(func(e []WatchEvent) []WatchEvent {
			return insert(e, 5, ev(evPut, "jl/b", "b-never", 3, 2))
		}), "", func(r watchResult) int { return r.phantom }, 1},
		{"phantom put of a failed write on a watched key", edit(func(e []WatchEvent) []WatchEvent {
			e[1].Value = "a-failed"
			return e
		}), "", func(r watchResult) int { return r.phantom }, 2},
		{"phantom put of a cas that did not swap", edit(func(e []WatchEvent) []WatchEvent {
			e[1].Value = "a-noswap"
			return e
		}), "", func(r watchResult) int { return r.phantom }, 2},
		{"phantom delete", edit(func(e []WatchEvent) []WatchEvent {
			e[1] = ev(evDel, "jl/a", "", 2, 1)
			return e
		}), "", func(r watchResult) int { return r.phantom }, 2},
		{"acked write at another revision", edit(func(e []WatchEvent) []WatchEvent {
			e[0], e[1] = ev(evPut, "jl/a", "a-maybe", 1, 1), ev(evPut, "jl/a", "a1", 2, 1)
			return e
		}), "", func(r watchResult) int { return r.phantom + r.dropped }, 4},
		{"events for an untouched key", edit(func(e []WatchEvent) []WatchEvent {
			return insert(e, 2, ev(evPut, "jl/zzz", "z", 2, 3))
		}), "", func(r watchResult) int { return r.phantom }, 1},
		{"misordered", edit(func(e []WatchEvent) []WatchEvent {
			e[3], e[4] = e[4], e[3]
			return e
		}), "", func(r watchResult) int { return r.misordered }, 4},
		{"final disagrees", edit(func(e []WatchEvent) []WatchEvent { return append(e[:5], e[6:]...) }), "",
			func(r watchResult) int { return r.final }, 1},
		{"no end marker", edit(func(e []WatchEvent) []WatchEvent { return append(e[:8], e[9:]...) }), "",
			func(r watchResult) int { return r.dropped }, 1},
		{"watch ended", legal, "watch ended: client: revision compacted",
			func(r watchResult) int { return r.ended }, 2},
	}
	for _, tc := range cases {
		res := check(tc.evs, tc.err)
		if got := tc.want(res); got != tc.n || res.anomalies() != tc.n {
			t.Errorf("%s: counted %d (anomalies %d), want %d: %v", tc.name, got, res.anomalies(), tc.n, res.examples)
		}
	}
}

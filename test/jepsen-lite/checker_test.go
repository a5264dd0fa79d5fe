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

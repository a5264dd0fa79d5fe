package jepsenlite

import (
	"strings"
	"testing"
	"time"
)

// TestLockCheckerOnHandMadeHistories: the lock check accepts a history of
// holders taking turns and flags interleaved and stale fenced writes,
// shared and wrong tokens, a stale final value, and a lock not taken over.
func TestLockCheckerOnHandMadeHistories(t *testing.T) {
	const s = int64(time.Second)
	lock := func(holder string, token, call, ret int64) Op {
		return Op{Key: lockName, Kind: kindLock, Lock: true, Holder: holder, Token: token, Call: call, Return: ret, Status: statusOK}
	}
	fenced := func(holder string, token int64, seq int, rev, call, ret int64, swapped bool) Op {
		return Op{Key: lockRegister, Kind: kindFenced, Lock: true, Holder: holder, Token: token, Value: fencedValue(holder, token, seq),
			Rev: rev, Call: call, Return: ret, Status: statusOK, Swapped: swapped}
	}
	info := func(op Op) Op { op.Status, op.Return, op.Rev, op.Swapped = statusInfo, -1, 0, false; return op }
	unlock := func(holder string, token, call, ret int64) Op {
		return Op{Key: lockName, Kind: kindUnlock, Lock: true, Holder: holder, Token: token, Call: call, Return: ret, Status: statusOK}
	}
	abandon := func(holder string, token, at int64) Op {
		return Op{Key: lockName, Kind: kindAbandon, Lock: true, Holder: holder, Token: token, Call: at, Return: at, Status: statusOK}
	}
	final := func(read string, at int64) Op {
		return Op{Key: lockRegister, Kind: kindGet, Lock: true, Read: read, Call: at, Return: at + 1, Status: statusOK, Final: true}
	}
	// Two holders in turn: w1 (token 10) writes at revisions 11, 12 and
	// unlocks; w2 (token 14) writes at 15, 16.
	turns := []Op{
		lock("w1", 10, 0, 1), fenced("w1", 10, 1, 11, 2, 3, true), fenced("w1", 10, 2, 12, 4, 5, true), unlock("w1", 10, 6, 7),
		lock("w2", 14, 1, 8), fenced("w2", 14, 1, 15, 9, 10, true), fenced("w2", 14, 2, 16, 11, 12, true), unlock("w2", 14, 13, 14),
	}
	with := func(ops []Op, more ...Op) []Op { return append(append([]Op(nil), ops...), more...) }

	cases := []struct {
		name      string
		ops       []Op
		events    []Event
		stopAt    int64
		anomalies int
		want      string // in the first example
	}{
		{"holders in turn", with(turns, final(fencedValue("w2", 14, 2), 20)), nil, 30, 0, ""},
		{"old holder refused after the new one", with(turns, fenced("w1", 10, 3, 16, 9, 10, false), final(fencedValue("w2", 14, 2), 20)), nil, 30, 0, ""},
		{"indeterminate newest write read last", with(turns, info(fenced("w2", 14, 3, 0, 13, 0, false)), final(fencedValue("w2", 14, 3), 20)), nil, 30, 0, ""},
		{"interleaved writes", []Op{
			lock("w1", 10, 0, 1), lock("w2", 14, 1, 2),
			fenced("w1", 10, 1, 11, 3, 4, true), fenced("w2", 14, 1, 15, 5, 6, true), fenced("w1", 10, 2, 16, 7, 8, true),
		}, nil, 30, 1, "stale holder wrote after a newer one"},
		{"stale token after a newer one", with(turns, fenced("w1", 10, 3, 17, 15, 16, true)), nil, 30, 1, "stale holder wrote after a newer one"},
		{"token handed twice", []Op{lock("w1", 10, 0, 1), lock("w2", 10, 2, 3)}, nil, 30, 1, "handed to w1 and to w2"},
		{"write with another token than its lock's", []Op{lock("w1", 10, 0, 1), fenced("w1", 9, 1, 11, 2, 3, true)}, nil, 30, 1, "its lock's token is 10"},
		{"stale indeterminate write applied last", with(turns, info(fenced("w1", 10, 3, 0, 5, 0, false)), final(fencedValue("w1", 10, 3), 20)), nil, 30, 1, "a stale write applied last"},
		{"final value nobody wrote", with(turns, final("w9:99:1", 20)), nil, 30, 1, "which no fenced write wrote"},
		{"takeover in time", []Op{lock("w1", 10, 0, 1), abandon("w1", 10, 2*s), lock("w2", 14, 1, 5*s)}, nil, 20 * s, 0, ""},
		{"takeover too late", []Op{lock("w1", 10, 0, 1), abandon("w1", 10, 2*s), lock("w2", 14, 1, 8*s)}, nil, 20 * s, 1, "taken over by w2 after 6s: later than 6s"},
		{"a fault moves the deadline", []Op{lock("w1", 10, 0, 1), abandon("w1", 10, 2*s), lock("w2", 14, 1, 8*s)},
			[]Event{{Time: 3 * s, Event: "start kill -9 node 1"}, {Time: 5 * s, Event: "heal, restart nodes 1"}, {Time: 6 * s, Event: "ready"}}, 20 * s, 0, ""},
		{"a fault over before the abandon does not move it", []Op{lock("w1", 10, 0, 1), abandon("w1", 10, 2*s), lock("w2", 14, 1, 7*s)},
			[]Event{{Time: 0, Event: "start kill -9 node 1"}, {Time: s, Event: "heal, restart nodes 1"}, {Time: s + s/2, Event: "ready"}}, 20 * s, 1, "later than 6s"},
		{"too late even after the fault", []Op{lock("w1", 10, 0, 1), abandon("w1", 10, 2*s), lock("w2", 14, 1, 11*s)},
			[]Event{{Time: 3 * s, Event: "start kill -9 node 1"}, {Time: 5 * s, Event: "heal, restart nodes 1"}, {Time: 6 * s, Event: "ready"}}, 20 * s, 1, "later than 10s"},
		{"a fault after the deadline does not move it", []Op{lock("w1", 10, 0, 1), abandon("w1", 10, 2*s), lock("w2", 14, 1, 8*s)},
			[]Event{{Time: 7 * s, Event: "start kill -9 node 1"}, {Time: 9 * s, Event: "heal"}, {Time: 10 * s, Event: "ready"}}, 20 * s, 1, "later than 6s"},
		{"not judged past the stop", []Op{lock("w1", 10, 0, 1), abandon("w1", 10, 2*s)}, nil, 5 * s, 0, ""},
		{"never taken over", []Op{lock("w1", 10, 0, 1), abandon("w1", 10, 2*s)}, nil, 20 * s, 1, "not taken over"},
	}
	for _, tc := range cases {
		res := checkLocks(tc.ops, tc.events, lockTakeoverBound, tc.stopAt)
		if res.anomalies != tc.anomalies {
			t.Errorf("%s: %d anomalies, want %d: %v", tc.name, res.anomalies, tc.anomalies, res.examples)
			continue
		}
		if tc.want != "" && !strings.Contains(res.examples[0], tc.want) {
			t.Errorf("%s: reported %q, want it to say %q", tc.name, res.examples[0], tc.want)
		}
	}

	res := checkLocks(with(turns, abandon("w2", 14, 20), lock("w1", 18, 15, 20+3*s)), nil, lockTakeoverBound, 30*s)
	if res.locks != 3 || res.fenced != 4 || res.abandons != 1 || res.takeovers != 1 || res.quiet != 1 || res.takeoverMax != 3*time.Second {
		t.Errorf("figures: %+v", res)
	}
}

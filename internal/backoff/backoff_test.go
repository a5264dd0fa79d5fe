package backoff

import (
	"math"
	"testing"
	"time"
)

func TestBound(t *testing.T) {
	const ms = time.Millisecond
	client := Policy{Base: 20 * ms, Max: 250 * ms}
	for _, tc := range []struct {
		name string
		p    Policy
		n    int
		want time.Duration
	}{
		{"first", client, 0, 20 * ms},
		{"doubles", client, 1, 40 * ms},
		{"doubles again", client, 3, 160 * ms},
		{"capped", client, 4, 250 * ms},
		{"stays capped", client, 40, 250 * ms},
		{"negative n is the first", client, -5, 20 * ms},
		{"shift past 64 bits", client, 1000, 250 * ms},
		{"shift into the sign bit", Policy{Base: 1, Max: math.MaxInt64}, 63, math.MaxInt64},
		{"largest shift that fits", Policy{Base: 1, Max: math.MaxInt64}, 62, 1 << 62},
		{"overflow of a large base", Policy{Base: time.Hour, Max: math.MaxInt64}, 40, math.MaxInt64},
		{"base above max", Policy{Base: 2 * time.Second, Max: time.Second}, 0, time.Second},
		{"exactly max", Policy{Base: 125 * ms, Max: 250 * ms}, 1, 250 * ms},
		{"zero policy", Policy{}, 7, 0},
	} {
		if got := tc.p.Bound(tc.n); got != tc.want {
			t.Errorf("%s: %+v.Bound(%d) = %v, want %v", tc.name, tc.p, tc.n, got, tc.want)
		}
	}
}

// TestDelay draws many waits per row and checks each lies in the row's
// interval, and that the jittered ones spread over it.
func TestDelay(t *testing.T) {
	const ms = time.Millisecond
	for _, tc := range []struct {
		name   string
		p      Policy
		n      int
		lo, hi time.Duration // every wait in [lo, hi]
	}{
		{"none", Policy{Base: 50 * ms, Max: 2 * time.Second}, 2, 200 * ms, 200 * ms},
		{"none capped", Policy{Base: 50 * ms, Max: 2 * time.Second}, 9, 2 * time.Second, 2 * time.Second},
		{"full", Policy{Base: 20 * ms, Max: 250 * ms, Jitter: Full}, 1, 0, 40*ms - 1},
		{"full capped", Policy{Base: 20 * ms, Max: 250 * ms, Jitter: Full}, 30, 0, 250*ms - 1},
		{"equal", Policy{Base: 50 * ms, Max: 2 * time.Second, Jitter: Equal}, 0, 25 * ms, 50*ms - 1},
		{"equal capped", Policy{Base: 50 * ms, Max: 2 * time.Second, Jitter: Equal}, 12, time.Second, 2*time.Second - 1},
		{"equal of one nanosecond", Policy{Base: 1, Max: 1, Jitter: Equal}, 0, 1, 1},
		{"equal of an odd bound", Policy{Base: 3, Max: 3, Jitter: Equal}, 0, 1, 2},
		{"full of nothing", Policy{Jitter: Full}, 3, 0, 0},
		{"equal of nothing", Policy{Jitter: Equal}, 3, 0, 0},
	} {
		lowest, highest := time.Duration(math.MaxInt64), time.Duration(-1)
		for range 2000 {
			d := tc.p.Delay(tc.n)
			if d < tc.lo || d > tc.hi {
				t.Fatalf("%s: %+v.Delay(%d) = %v, want in [%v, %v]", tc.name, tc.p, tc.n, d, tc.lo, tc.hi)
			}
			lowest, highest = min(lowest, d), max(highest, d)
		}
		// 2000 uniform draws leave less than a tenth of the interval
		// uncovered at either end, except with negligible probability.
		if span := tc.hi - tc.lo; lowest > tc.lo+span/10 || highest < tc.hi-span/10 {
			t.Errorf("%s: draws span [%v, %v] of [%v, %v]: not spread", tc.name, lowest, highest, tc.lo, tc.hi)
		}
	}
}

func TestBackoffNextReset(t *testing.T) {
	const ms = time.Millisecond
	b := Backoff{Policy: Policy{Base: 250 * ms, Max: 5 * time.Second}}
	want := []time.Duration{250 * ms, 500 * ms, time.Second, 2 * time.Second, 4 * time.Second, 5 * time.Second, 5 * time.Second}
	for i, w := range want {
		if got := b.Next(); got != w {
			t.Fatalf("wait %d = %v, want %v", i, got, w)
		}
	}
	for range 1000 { // far past the shift width: still Max
		b.Next()
	}
	if got := b.Next(); got != 5*time.Second {
		t.Fatalf("after many retries: %v, want the cap", got)
	}
	b.Reset()
	if got := b.Next(); got != 250*ms {
		t.Fatalf("after Reset: %v, want the base", got)
	}
}

// Package backoff computes the waits of a retry loop: exponential from
// Base, doubling per attempt, capped at Max, with or without jitter.
//
// Jitter keeps many callers that failed at the same moment (clients of a
// leader that just died, peers that lost a link together) from retrying
// in lockstep. See "Exponential Backoff And Jitter" (AWS architecture
// blog, 2015).
package backoff

import (
	"math/rand/v2"
	"time"
)

// Jitter says how a wait is drawn from its exponential bound d.
type Jitter int

const (
	// None waits exactly d.
	None Jitter = iota
	// Full waits uniformly in [0, d): the widest spread, for many
	// clients retrying against the same server.
	Full
	// Equal waits uniformly in [d/2, d): spread, but never much
	// shorter than the bound, for reconnect loops.
	Equal
)

// Policy is an exponential backoff: the wait before retry n (from 0) is
// bounded by min(Max, Base·2^n) and drawn from that bound by Jitter. The
// zero Policy never waits.
type Policy struct {
	Base, Max time.Duration
	Jitter    Jitter
}

// Bound returns min(Max, Base·2^n), the wait before retry n without
// jitter. It does not overflow for any n; a negative n counts as 0.
func (p Policy) Bound(n int) time.Duration {
	n = max(n, 0)
	if n < 63 {
		if e := p.Base << n; e>>n == p.Base && e < p.Max {
			return e
		}
	}
	return p.Max
}

// Delay returns the wait before retry n: Bound(n), jittered.
func (p Policy) Delay(n int) time.Duration {
	d := p.Bound(n)
	if d <= 0 {
		return 0
	}
	switch p.Jitter {
	case Full:
		return rand.N(d)
	case Equal:
		if half := d / 2; half > 0 {
			return half + rand.N(d-half)
		}
	}
	return d
}

// Backoff is a Policy with its count of retries, for a loop that waits
// longer after each failure and starts over after a success. The zero
// Backoff of a Policy starts at retry 0. Not safe for concurrent use.
type Backoff struct {
	Policy
	n int
}

// Next returns the wait before the next retry and counts it.
func (b *Backoff) Next() time.Duration {
	d := b.Delay(b.n)
	if b.n < 63 { // past it every wait is Max: stop counting
		b.n++
	}
	return d
}

// Reset starts over: the next wait is the one before retry 0.
func (b *Backoff) Reset() { b.n = 0 }

// Package authtoken holds what kvd's clients that carry auth tokens (the
// Go client and an embedded node's own client) share.
package authtoken

import "time"

// renewBefore is how long before its expiry a token is replaced.
const renewBefore = 30 * time.Second

// RenewAt returns when a token fetched at now that expires at expires
// should be replaced: 30 s before it expires, or a quarter of its life
// before when it lives less than two minutes. A fixed margin longer than
// the token's life (a short --auth-token-ttl) would have every call
// authenticate again, a bcrypt on the node each time.
func RenewAt(now, expires time.Time) time.Time {
	return expires.Add(-min(renewBefore, expires.Sub(now)/4))
}

// Package authtoken holds what kvd's clients that carry auth tokens (the
// Go client and an embedded node's own client) share: the per-call
// credentials that keep a token and renew it before it expires.
package authtoken

import (
	"context"
	"sync"
	"time"
)

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

// Source is gRPC per-call credentials (credentials.PerRPCCredentials)
// that put a token on every call. It asks Fetch for one when it has none
// or the one it has is due for renewal, one fetch at a time, and keeps
// the answer until the time Fetch returned with it. An empty token puts
// none on the calls until then.
type Source struct {
	Fetch func(ctx context.Context) (token string, keepUntil time.Time, err error)

	mu    sync.Mutex // held while a token is fetched
	token string
	until time.Time
}

func (s *Source) RequireTransportSecurity() bool { return false }

func (s *Source) GetRequestMetadata(ctx context.Context, _ ...string) (map[string]string, error) {
	tok, err := s.get(ctx)
	if err != nil || tok == "" {
		return nil, err
	}
	return map[string]string{"token": tok}, nil
}

func (s *Source) get(ctx context.Context) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if time.Now().Before(s.until) {
		return s.token, nil
	}
	tok, until, err := s.Fetch(ctx)
	if err != nil {
		return "", err
	}
	s.token, s.until = tok, until
	return tok, nil
}

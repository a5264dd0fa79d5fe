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
//
// A fetch runs apart from the call that started it, under Base (the
// client's life; none when nil), and Fetch must bound its own time. The
// call that first finds the token due is often a health check, with a
// deadline shorter than a password check takes on a busy node: bound by
// it, every fetch would be given up half-way, the node's check running on
// regardless, and no call would get a token. Calls wait for the fetch
// under way or for their own context, whichever ends first.
type Source struct {
	Fetch func(ctx context.Context) (token string, keepUntil time.Time, err error)
	Base  context.Context

	mu      sync.Mutex
	token   string
	until   time.Time
	pending *fetch // the fetch under way, if any
}

// fetch is one call of Fetch; its fields are set before done is closed.
type fetch struct {
	done  chan struct{}
	token string
	err   error
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
	if time.Now().Before(s.until) {
		tok := s.token
		s.mu.Unlock()
		return tok, nil
	}
	f := s.pending
	if f == nil {
		f = &fetch{done: make(chan struct{})}
		s.pending = f
		base := s.Base
		if base == nil {
			base = context.Background()
		}
		go s.run(base, f)
	}
	s.mu.Unlock()
	select {
	case <-f.done:
		return f.token, f.err
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

func (s *Source) run(ctx context.Context, f *fetch) {
	tok, until, err := s.Fetch(ctx)
	s.mu.Lock()
	if err == nil {
		s.token, s.until = tok, until
	}
	s.pending = nil
	s.mu.Unlock()
	f.token, f.err = tok, err
	close(f.done)
}

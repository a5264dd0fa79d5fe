package concurrency

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/kvd/kvd/client"
)

// DefaultTTL is a Session's lease TTL unless WithTTL says otherwise.
const DefaultTTL = 60 * time.Second

// Session is a lease kept alive until Close or its loss.
type Session struct {
	c      *client.Client
	id     client.LeaseID
	cancel context.CancelFunc
	donec  chan struct{}

	mu  sync.Mutex // guards err
	err error
}

// SessionOption tunes NewSession.
type SessionOption func(*sessionOptions)

type sessionOptions struct {
	ttl   time.Duration
	lease client.LeaseID
}

// WithTTL sets the session's lease TTL (whole seconds, at least 1): how
// long after its holder dies its locks and campaigns are released.
func WithTTL(ttl time.Duration) SessionOption { return func(o *sessionOptions) { o.ttl = ttl } }

// WithLease uses an existing lease instead of granting one.
func WithLease(id client.LeaseID) SessionOption { return func(o *sessionOptions) { o.lease = id } }

// NewSession grants a lease (or takes WithLease's) and keeps it alive.
func NewSession(ctx context.Context, c *client.Client, opts ...SessionOption) (*Session, error) {
	o := sessionOptions{ttl: DefaultTTL}
	for _, f := range opts {
		f(&o)
	}
	id := o.lease
	if id == 0 {
		var err error
		if id, err = c.Grant(ctx, o.ttl); err != nil {
			return nil, fmt.Errorf("session: %w", err)
		}
	}
	kctx, cancel := context.WithCancel(context.Background())
	renewals, stopped, err := c.KeepAlive(kctx, id)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("session: %w", err)
	}
	s := &Session{c: c, id: id, cancel: cancel, donec: make(chan struct{})}
	go func() {
		for range renewals {
		}
		s.mu.Lock()
		s.err = stopped()
		s.mu.Unlock()
		close(s.donec)
	}()
	return s, nil
}

// Client is the session's client.
func (s *Session) Client() *client.Client { return s.c }

// Lease is the session's lease.
func (s *Session) Lease() client.LeaseID { return s.id }

// Done is closed when the session ends: Close, or the loss of its lease
// (Err then says why). Whatever the session held is lost with it.
func (s *Session) Done() <-chan struct{} { return s.donec }

// Err, once Done is closed, says why the session ended:
// client.ErrLeaseNotFound when its lease was lost, context.Canceled after
// Close or Orphan.
func (s *Session) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Orphan stops renewing the lease without revoking it: what the session
// holds stays until the lease's TTL runs out.
func (s *Session) Orphan() {
	s.cancel()
	<-s.donec
}

// Close stops renewing and revokes the lease, releasing at once every
// lock and campaign the session holds.
func (s *Session) Close(ctx context.Context) error {
	s.Orphan()
	if _, err := s.c.Revoke(ctx, s.id); err != nil && !errors.Is(err, client.ErrLeaseNotFound) {
		return fmt.Errorf("session: %w", err)
	}
	return nil
}

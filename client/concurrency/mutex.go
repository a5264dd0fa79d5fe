package concurrency

import (
	"context"
	"fmt"
	"time"

	"github.com/kvd/kvd/proto/kvpb"
)

// Mutex is a lock held by one session at a time, in the order sessions
// asked for it. It is not reentrant across sessions; a session that locks
// a Mutex it holds gets it again at once.
type Mutex struct {
	s      *Session
	prefix string
	key    string
	rev    int64
}

// NewMutex is the lock called name (no '{' or '}').
func NewMutex(s *Session, name string) (*Mutex, error) {
	p, err := prefixOf(name)
	if err != nil {
		return nil, err
	}
	return &Mutex{s: s, prefix: p, key: keyOf(p, s)}, nil
}

// Lock waits until the lock is the session's, or ctx ends, or the
// session ends (ErrSessionExpired). On failure the session's place in the
// queue is given up.
func (m *Mutex) Lock(ctx context.Context) error {
	rev, _, err := enqueue(ctx, m.s, m.key, "")
	if err != nil {
		return err
	}
	if err := waitTurn(ctx, m.s, m.prefix, rev); err != nil {
		m.giveUp(rev)
		return err
	}
	m.rev = rev
	return nil
}

// TryLock takes the lock if it is free, and fails with ErrLocked
// otherwise, without waiting.
func (m *Mutex) TryLock(ctx context.Context) error {
	rev, _, err := enqueue(ctx, m.s, m.key, "")
	if err != nil {
		return err
	}
	kvs, err := members(ctx, m.s.c, m.prefix)
	if err != nil {
		m.giveUp(rev)
		return err
	}
	if p := predecessor(kvs, rev); p != nil {
		m.giveUp(rev)
		return fmt.Errorf("%w: %s holds %s", ErrLocked, p.GetKey(), m.prefix)
	}
	m.rev = rev
	return nil
}

func (m *Mutex) giveUp(rev int64) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, _ = dequeue(ctx, m.s, m.key, rev)
}

// Unlock releases the lock.
func (m *Mutex) Unlock(ctx context.Context) error {
	if m.rev == 0 {
		return nil
	}
	if _, err := dequeue(ctx, m.s, m.key, m.rev); err != nil {
		return err
	}
	m.rev = 0
	return nil
}

// Key is the session's key of the lock.
func (m *Mutex) Key() string { return m.key }

// Token is the fencing token of the holder: its key's create revision,
// which grows with each holder (within the lock's shard). 0 when not held.
func (m *Mutex) Token() int64 { return m.rev }

// IsOwner is the compare that holds only while this holder has the
// lock: put it in a Txn (on a key of the lock's shard, e.g. one under the
// same hash tag) so its writes apply only while the lock is held.
func (m *Mutex) IsOwner() *kvpb.Compare {
	return &kvpb.Compare{Key: []byte(m.key), Target: kvpb.Compare_CREATE, Result: kvpb.Compare_EQUAL, CreateRevision: m.rev}
}

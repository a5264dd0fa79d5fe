package concurrency

import (
	"bytes"
	"context"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/proto/kvpb"
)

// Election elects one leader among campaigning sessions, in the order
// they campaigned; the leader's value is its proposal.
type Election struct {
	s      *Session
	name   string
	prefix string
	key    string
	rev    int64
}

// NewElection is the election called name (no '{' or '}').
func NewElection(s *Session, name string) (*Election, error) {
	p, err := prefixOf(name)
	if err != nil {
		return nil, err
	}
	return &Election{s: s, name: name, prefix: p, key: keyOf(p, s)}, nil
}

// Campaign waits until the session leads, with value as its proposal, or
// ctx or the session ends (its candidacy is then withdrawn).
func (e *Election) Campaign(ctx context.Context, value string) error {
	rev, existing, err := enqueue(ctx, e.s, e.key, value)
	if err != nil {
		return err
	}
	e.rev = rev
	// A candidacy the session already had gets the new value; a new
	// one has it already, and writing it again would show observers a
	// change that is none.
	if existing != nil && !bytes.Equal(existing.GetValue(), []byte(value)) {
		if err := e.Proclaim(ctx, value); err != nil {
			return err
		}
	}
	if err := waitTurn(ctx, e.s, e.prefix, rev); err != nil {
		dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, _ = dequeue(dctx, e.s, e.key, rev)
		e.rev = 0
		return err
	}
	return nil
}

// Proclaim changes the leader's value without a new election.
func (e *Election) Proclaim(ctx context.Context, value string) error {
	if e.rev == 0 {
		return ErrNotLeader
	}
	k := []byte(e.key)
	resp, err := e.s.c.Txn(ctx, &kvpb.TxnRequest{
		Compare: []*kvpb.Compare{{Key: k, Target: kvpb.Compare_CREATE, Result: kvpb.Compare_EQUAL, CreateRevision: e.rev}},
		Success: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: k, Value: []byte(value), Lease: int64(e.s.Lease())}}}},
	})
	if err != nil {
		return sessionErr(e.s, err)
	}
	if !resp.GetSucceeded() {
		e.rev = 0
		return ErrNotLeader
	}
	return nil
}

// Resign gives up leadership (or candidacy).
func (e *Election) Resign(ctx context.Context) error {
	if e.rev == 0 {
		return nil
	}
	if _, err := dequeue(ctx, e.s, e.key, e.rev); err != nil {
		return err
	}
	e.rev = 0
	return nil
}

// Key is the session's key in the election.
func (e *Election) Key() string { return e.key }

// Rev is the create revision of the session's candidacy (0: none).
func (e *Election) Rev() int64 { return e.rev }

// Leader returns the leader's key and value; ErrNoLeader when nobody
// campaigns.
func Leader(ctx context.Context, c *client.Client, name string) (*kvpb.KeyValue, error) {
	p, err := prefixOf(name)
	if err != nil {
		return nil, err
	}
	kvs, err := members(ctx, c, p)
	if err != nil {
		return nil, err
	}
	if l := first(kvs); l != nil {
		return l, nil
	}
	return nil, ErrNoLeader
}

// Leader is the election's leader.
func (e *Election) Leader(ctx context.Context) (*kvpb.KeyValue, error) {
	return Leader(ctx, e.s.c, e.name)
}

// Observe sends the leader (key and value) each time it changes, the
// current one first, until ctx ends; the channel is then closed. A change
// is another candidacy leading or another value; a leader that writes
// its value again unchanged is not sent again. While nobody leads,
// nothing is sent.
func Observe(ctx context.Context, c *client.Client, name string) (<-chan *kvpb.KeyValue, error) {
	p, err := prefixOf(name)
	if err != nil {
		return nil, err
	}
	ch := make(chan *kvpb.KeyValue)
	go func() {
		defer close(ch)
		var last *kvpb.KeyValue
		for ctx.Err() == nil {
			kvs, resume, err := membersAt(ctx, c, p)
			if err != nil {
				// The scan retries what can succeed; this failed for
				// good or ctx ended. Ask again after a pause.
				select {
				case <-time.After(time.Second):
				case <-ctx.Done():
				}
				continue
			}
			l := first(kvs)
			if l == nil {
				// Nobody leads: wait for a change under the prefix after
				// the read, so one made meanwhile is not missed.
				waitChange(ctx, c, p, resume)
				continue
			}
			if leaderChanged(last, l) {
				select {
				case ch <- l:
				case <-ctx.Done():
					return
				}
				last = l
			}
			waitKeyChange(ctx, c, l.GetKey(), l.GetModRevision()+1)
		}
	}()
	return ch, nil
}

// leaderChanged says whether l is news to an observer that last saw
// last (nil: nothing yet): another candidacy or another value.
func leaderChanged(last, l *kvpb.KeyValue) bool {
	return last == nil || !bytes.Equal(last.GetKey(), l.GetKey()) ||
		last.GetCreateRevision() != l.GetCreateRevision() || !bytes.Equal(last.GetValue(), l.GetValue())
}

// Observe is Observe of the election.
func (e *Election) Observe(ctx context.Context) (<-chan *kvpb.KeyValue, error) {
	return Observe(ctx, e.s.c, e.name)
}

// waitChange waits for a change under prefix after the read whose watch
// resume token is resume.
func waitChange(ctx context.Context, c *client.Client, prefix, resume string) {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for resp := range c.Watch(wctx, []byte(prefix), client.WithPrefix(), client.WithResume(resume)) {
		if len(resp.Events) > 0 || resp.Err != nil {
			return
		}
	}
}

func waitKeyChange(ctx context.Context, c *client.Client, key []byte, from int64) {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for resp := range c.Watch(wctx, key, client.WithRevision(from)) {
		if len(resp.Events) > 0 || resp.Err != nil {
			return
		}
	}
}

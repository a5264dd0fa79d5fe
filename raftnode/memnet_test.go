package raftnode

import (
	"fmt"
	"slices"
	"strings"
	"sync"

	"go.etcd.io/raft/v3"
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/peerpb"
)

// memNet is the interaction tests' network: each node's Sender records
// what it sends, in order, and nothing moves until the test delivers it.
// A partition drops, at delivery, what crosses it.
type memNet struct {
	rec *recorder
	// check, when set, judges each Raft message as it is sent (the rule
	// that it may leave before or after its node's save); a non-nil error
	// is recorded as a violation.
	check func(from uint64, m *pb.Message) error

	mu       sync.Mutex
	pending  []envelope
	isolated map[uint64]bool
}

// envelope is one message in flight: a Raft message or a leadership check.
type envelope struct {
	from, to, shard uint64
	msg             *pb.Message
	check           *peerpb.LeaderCheck
}

func newMemNet(rec *recorder) *memNet {
	return &memNet{rec: rec, isolated: make(map[uint64]bool)}
}

// sender is node from's Sender.
func (nt *memNet) sender(from uint64) Sender { return netSender{nt, from} }

type netSender struct {
	nt   *memNet
	from uint64
}

// Send keeps a copy of each message: the transport encodes it at once,
// so what raft does with it afterwards must not show.
func (s netSender) Send(shard uint64, msgs []*pb.Message) {
	for _, m := range msgs {
		env := envelope{from: s.from, to: m.GetTo(), shard: shard, msg: proto.CloneOf(m)}
		s.nt.rec.event(s.from, "send %s", env)
		if s.nt.check != nil {
			if err := s.nt.check(s.from, m); err != nil {
				s.nt.rec.violation(s.from, err)
			}
		}
		s.nt.mu.Lock()
		s.nt.pending = append(s.nt.pending, env)
		s.nt.mu.Unlock()
	}
}

// SendLeaderCheck puts the questions of one round in peer order:
// leaderChecks.askLocked walks a map, and the output must be the same
// every run.
func (s netSender) SendLeaderCheck(to uint64, c *peerpb.LeaderCheck) {
	env := envelope{from: s.from, to: to, check: proto.CloneOf(c)}
	if c.GetReply() {
		s.nt.rec.event(s.from, "send %s", env)
		s.nt.mu.Lock()
		s.nt.pending = append(s.nt.pending, env)
		s.nt.mu.Unlock()
		return
	}
	sameRound := func(e envelope) bool {
		return e.check != nil && !e.check.GetReply() && e.from == s.from && e.check.GetId() == c.GetId()
	}
	s.nt.rec.eventInRun(s.from, "send "+env.String(), func(line string) bool {
		return strings.HasPrefix(line, fmt.Sprintf("%d: send %d->", s.from, s.from)) &&
			strings.Contains(line, fmt.Sprintf(" LeaderCheck id=%d ", c.GetId()))
	})
	s.nt.mu.Lock()
	i := len(s.nt.pending)
	for i > 0 && sameRound(s.nt.pending[i-1]) && s.nt.pending[i-1].to > to {
		i--
	}
	s.nt.pending = slices.Insert(s.nt.pending, i, env)
	s.nt.mu.Unlock()
}

// take removes and returns, in send order, the pending envelopes that
// match.
func (nt *memNet) take(match func(envelope) bool) []envelope {
	nt.mu.Lock()
	defer nt.mu.Unlock()
	var out []envelope
	nt.pending = slices.DeleteFunc(nt.pending, func(e envelope) bool {
		if match(e) {
			out = append(out, e)
			return true
		}
		return false
	})
	return out
}

func (nt *memNet) len() int {
	nt.mu.Lock()
	defer nt.mu.Unlock()
	return len(nt.pending)
}

// cut reports whether a partition drops env.
func (nt *memNet) cut(env envelope) bool {
	nt.mu.Lock()
	defer nt.mu.Unlock()
	return nt.isolated[env.from] || nt.isolated[env.to]
}

func (env envelope) String() string {
	if c := env.check; c != nil {
		if c.GetReply() {
			return fmt.Sprintf("%d->%d LeaderCheck reply id=%d terms=%v", env.from, env.to, c.GetId(), c.GetTerms())
		}
		return fmt.Sprintf("%d->%d LeaderCheck id=%d shards=%v", env.from, env.to, c.GetId(), c.GetShards())
	}
	return raft.DescribeMessage(env.msg, formatEntry)
}

// formatEntry shows a normal entry's command without the proposal id
// before it, which is made from the clock (loopState.nextID).
func formatEntry(data []byte) string {
	_, cmd, ok := decodeEntry(data)
	if !ok {
		return ""
	}
	return strings.TrimSpace(string(cmd))
}

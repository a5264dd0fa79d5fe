package transport

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/internal/backoff"
	"github.com/kvd/kvd/proto/peerpb"
)

// outMsg is a message waiting in a peer's queue.
type outMsg struct {
	shard uint64
	m     *raftpb.Message
	data  []byte // m marshalled, once the sender has looked at it
	bytes int64  // m's entry bytes, charged to peer.queuedBytes
	// check, when set, is a leader check travelling instead of m.
	check *peerpb.LeaderCheck
}

// peer is a node SetPeer added. Its sender goroutine, and on the dialing
// side its dial goroutine, live until the transport stops.
type peer struct {
	id    uint64
	queue chan outMsg
	// urgent holds what must not wait behind queued appends: every raft
	// message but MsgApp (heartbeats, votes, acknowledgements) and leader
	// checks. The sender takes from it first, so a read's leader check or
	// a heartbeat waits for at most the batch on the wire, not for every
	// megabyte of appends queued before it; otherwise a flood of large
	// writes cost leaders their leadership (CheckQuorum) and reads their
	// deadline.
	urgent chan outMsg
	ctx    context.Context // the transport's
	// wake cuts the dial loop's backoff short after an address change.
	wake chan struct{}

	sendFailures, dropped atomic.Uint64
	// queuedBytes is the entry bytes of the messages in queue
	// (Config.MaxQueueBytes).
	queuedBytes atomic.Int64

	mu struct {
		sync.Mutex
		addr string
		// cancelStream ends the dial loop's current stream attempt, so
		// that an address change takes effect at once.
		cancelStream context.CancelFunc
	}
}

func newPeer(parent context.Context, id uint64, addr string, queueSize int) *peer {
	p := &peer{id: id, queue: make(chan outMsg, queueSize), urgent: make(chan outMsg, queueSize), wake: make(chan struct{}, 1)}
	p.ctx = parent
	p.mu.addr = addr
	return p
}

func (p *peer) address() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mu.addr
}

// setAddr changes the address and, if it changed, breaks the current
// stream attempt and wakes the dial loop.
func (p *peer) setAddr(addr string) {
	p.mu.Lock()
	if p.mu.addr == addr {
		p.mu.Unlock()
		return
	}
	p.mu.addr = addr
	cancel := p.mu.cancelStream
	p.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// setStreamCancel records the cancel of the stream the dial loop is about
// to run against addr. It reports false if the address changed since the
// loop read it; setAddr, which takes the same lock, then either saw this
// cancel or changed the address before it, so no change is missed.
func (p *peer) setStreamCancel(addr string, cancel context.CancelFunc) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.addr != addr {
		return false
	}
	p.mu.cancelStream = cancel
	return true
}

// poll takes the next queued message without waiting, urgent ones
// first; nil when both queues are empty.
func (p *peer) poll() *outMsg {
	select {
	case m := <-p.urgent:
		return &m
	default:
	}
	select {
	case m := <-p.queue:
		p.queuedBytes.Add(-m.bytes)
		return &m
	default:
		return nil
	}
}

// sendLoop is the peer's sender goroutine: it blocks on the queue, then
// drains what is queued into one batch, so messages of all shards that
// piled up while the previous batch was on the wire leave together.
func (t *Transport) sendLoop(p *peer) {
	ticker := time.NewTicker(idlePing)
	defer ticker.Stop()
	sent := false // a batch went out since the last tick
	var next *outMsg
	unreachable := make(map[uint64]struct{})
	for {
		if next == nil {
			next = p.poll()
		}
		if next == nil {
			select {
			case <-p.ctx.Done():
				return
			case <-ticker.C:
				if !sent {
					t.ping(p)
				}
				sent = false
				continue
			case m := <-p.urgent:
				next = &m
			case m := <-p.queue:
				p.queuedBytes.Add(-m.bytes)
				next = &m
			}
		}
		b := &peerpb.Batch{From: t.id, To: p.id}
		size := 0
		for next != nil && len(b.Msgs)+len(b.Checks) < t.cfg.MaxBatchMessages {
			if next.check != nil {
				b.Checks = append(b.Checks, next.check)
				next = nil
			} else if next.data == nil {
				data, err := proto.Marshal(next.m)
				if err != nil {
					// A message raft produced that does not marshal is a
					// bug; drop it rather than break the stream for all.
					t.log.Error("transport: marshal raft message", "shard", next.shard, "peer", p.id, "err", err)
					p.dropped.Add(1)
					t.cfg.Handler.ReportUnreachable(next.shard, p.id)
					next = nil
				} else {
					next.data = data
				}
			}
			if next != nil {
				if len(b.Msgs) > 0 && size+len(next.data) > t.cfg.MaxBatchBytes {
					break // next opens the following batch
				}
				b.Msgs = append(b.Msgs, &peerpb.ShardMessage{Shard: next.shard, Msg: next.data})
				size += len(next.data)
				next = nil
			}
			next = p.poll()
		}
		if len(b.Msgs) == 0 && len(b.Checks) == 0 {
			continue
		}
		sent = true
		t.sendBatch(p, b, size, unreachable)
	}
}

// sendBatch sends b on the peer's stream, or drops it when there is none
// or the send fails, reporting each shard in it unreachable once.
func (t *Transport) sendBatch(p *peer, b *peerpb.Batch, size int, unreachable map[uint64]struct{}) {
	l := t.link(p.id)
	if l != nil {
		err := l.Send(b)
		if err == nil {
			t.stats.batchesSent.Add(1)
			t.stats.messagesSent.Add(uint64(len(b.Msgs) + len(b.Checks)))
			t.stats.bytesSent.Add(uint64(size))
			return
		}
		// The stream is broken; its owner notices too, but shutting it
		// down now stops the next batch from failing the same way.
		p.sendFailures.Add(uint64(len(b.Msgs)))
		l.shutdown()
		t.removeLink(l)
		t.log.Debug("transport: batch send failed", "peer", p.id, "err", err)
	} else {
		p.dropped.Add(uint64(len(b.Msgs)))
	}
	clear(unreachable)
	for _, sm := range b.Msgs {
		if _, ok := unreachable[sm.Shard]; !ok {
			unreachable[sm.Shard] = struct{}{}
			t.cfg.Handler.ReportUnreachable(sm.Shard, p.id)
		}
	}
}

// ping sends an empty batch so that the peer's idle timeout sees a live
// link, and so that on a dead one our bytes go unacknowledged (see
// idlePing). Failure breaks the link like any send failure.
func (t *Transport) ping(p *peer) {
	l := t.link(p.id)
	if l == nil {
		return
	}
	if err := l.Send(&peerpb.Batch{From: t.id, To: p.id}); err != nil {
		l.shutdown()
		t.removeLink(l)
	}
}

// dialLoop is the dialing side's goroutine for a peer with a higher id: it
// keeps one stream open, reconnecting with jittered exponential backoff.
// It owns the client connection and every stream it opens.
func (t *Transport) dialLoop(p *peer) {
	var (
		cc     *grpc.ClientConn
		ccAddr string
		bo     = newBackoffTimer()
	)
	defer func() {
		if cc != nil {
			cc.Close()
		}
	}()
	for p.ctx.Err() == nil {
		addr := p.address()
		if cc == nil || ccAddr != addr {
			if cc != nil {
				cc.Close()
				cc = nil
			}
			c, err := grpc.NewClient(addr, t.dialOpts...)
			if err != nil {
				t.log.Warn("transport: bad peer address", "peer", p.id, "addr", addr, "err", err)
			} else {
				cc, ccAddr = c, addr
			}
		}
		if cc != nil {
			up, err := t.runStream(p, cc, addr)
			if p.ctx.Err() != nil {
				return
			}
			if up {
				// removeLink reported the peer unreachable, once.
				bo.reset()
				t.log.Debug("transport: stream to peer broke", "peer", p.id, "err", err)
			} else {
				t.log.Debug("transport: cannot open stream to peer", "peer", p.id, "err", err)
			}
		}
		if !bo.wait(p.ctx, p.wake) {
			return
		}
	}
}

// runStream opens a stream on cc, performs the hello exchange, installs the
// link and receives until the stream breaks. up reports whether the
// stream got as far as being installed.
func (t *Transport) runStream(p *peer, cc *grpc.ClientConn, addr string) (up bool, err error) {
	ctx, cancel := context.WithCancel(p.ctx)
	defer cancel()
	if !p.setStreamCancel(addr, cancel) {
		return false, nil // address changed; the loop reconnects at once
	}
	defer p.setStreamCancel(addr, nil)

	// WaitForReady: while the peer is down, gRPC reconnects under its own
	// backoff (set to ours in New) and the call waits instead of failing.
	sctx, err := t.outgoing(ctx, p.id)
	if err != nil {
		return false, err
	}
	stream, err := peerpb.NewRaftClient(cc).Stream(sctx, grpc.WaitForReady(true))
	if err != nil {
		return false, fmt.Errorf("transport: open stream to peer %d: %w", p.id, err)
	}
	// A refusing acceptor ends the stream at once, and Send then fails
	// with io.EOF: its reason comes from Recv.
	if err := stream.Send(&peerpb.Batch{From: t.id, To: p.id}); err != nil && !errors.Is(err, io.EOF) {
		return false, fmt.Errorf("transport: hello to peer %d: %w", p.id, err)
	}
	// The acceptor answers with its own hello once it has installed its
	// side; only then is the pair usable in both directions.
	timer := time.AfterFunc(handshakeTimeout, cancel)
	hello, err := stream.Recv()
	timer.Stop()
	if err != nil {
		t.refused(err, stream.Trailer(), p.id, addr, "stream")
		return false, fmt.Errorf("transport: hello from peer %d: %w", p.id, err)
	}
	md, _ := stream.Header()
	who, err := t.checkAnswer(md, p.id, addr)
	if err != nil {
		t.refused(err, nil, p.id, addr, "stream")
		return false, err
	}
	if hello.GetFrom() != p.id {
		return false, fmt.Errorf("%w: %s answered as node %d, want %d", ErrPeerMismatch, addr, hello.GetFrom(), p.id)
	}

	l := newLink(p.id, stream.Send, cancel)
	l.remoteNonce = who.nonce
	if err := t.installLink(l, false); err != nil {
		return false, err
	}
	defer func() {
		t.removeLink(l)
		l.shutdown() // cancels ctx: a Send blocked on flow control returns
		l.seal()
	}()
	idle := time.AfterFunc(linkIdleTimeout, l.shutdown)
	defer idle.Stop()
	for {
		b, err := stream.Recv()
		if err != nil {
			if !idle.Stop() {
				err = fmt.Errorf("nothing received for %v: %w", linkIdleTimeout, err)
			}
			return true, fmt.Errorf("transport: receive from peer %d: %w", p.id, err)
		}
		idle.Reset(linkIdleTimeout)
		t.deliver(p.id, b)
	}
}

// deliver hands a received batch's messages to the handler in order.
func (t *Transport) deliver(from uint64, b *peerpb.Batch) {
	msgs, checks := b.GetMsgs(), b.GetChecks()
	if len(msgs) == 0 && len(checks) == 0 {
		return // hello or idle ping
	}
	size := 0
	for _, sm := range msgs {
		if t.ctx.Err() != nil {
			return // stopping: nobody should see messages after Stop returns
		}
		size += len(sm.GetMsg())
		m := new(raftpb.Message)
		if err := proto.Unmarshal(sm.GetMsg(), m); err != nil {
			// A peer with a broken encoder; count it, do not log per
			// message on the receive path.
			t.stats.badMessages.Add(1)
			continue
		}
		if !fromPeer(m, from, t.id) {
			t.stats.badMessages.Add(1)
			continue
		}
		t.cfg.Handler.HandleMessage(sm.GetShard(), m)
	}
	for _, c := range checks {
		if t.ctx.Err() != nil {
			return
		}
		t.cfg.Handler.HandleLeaderCheck(from, c)
	}
	t.stats.batchesReceived.Add(1)
	t.stats.messagesReceived.Add(uint64(len(msgs) + len(checks)))
	t.stats.bytesReceived.Add(uint64(size))
}

// fromPeer reports whether m is a raft message that peer from may send to
// node self: it names them as sender and addressee, and it is not one of
// raft's local messages (its own storage and apply threads talk to it with
// those, and they would step past RawNode's check with a local sender).
// The stream's identity is what admit checked, against the peer's
// certificate under peer TLS; a message claiming another sender would let
// one member act in Raft as another.
func fromPeer(m *raftpb.Message, from, self uint64) bool {
	return m.GetFrom() == from && m.GetTo() == self && !raft.IsLocalMsg(m.GetType()) && !raft.IsLocalMsgTarget(from)
}

// backoffTimer waits between reconnect attempts: exponential from
// backoffMin to backoffMax, jittered in [d/2, d) so that peers that lost a
// link at the same moment do not come back in lockstep.
type backoffTimer struct{ backoff.Backoff }

func newBackoffTimer() backoffTimer {
	return backoffTimer{backoff.Backoff{Policy: backoff.Policy{Base: backoffMin, Max: backoffMax, Jitter: backoff.Equal}}}
}

func (b *backoffTimer) reset() { b.Reset() }

// wait sleeps for the next backoff, or until ctx ends (false) or wake
// fires (true, without growing the backoff further).
func (b *backoffTimer) wait(ctx context.Context, wake <-chan struct{}) bool {
	d := b.Next()
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-wake:
		b.reset()
		return true
	case <-timer.C:
		return true
	}
}

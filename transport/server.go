package transport

import (
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/proto/peerpb"
)

// service implements peerpb.RaftServer on behalf of a Transport.
type service struct {
	peerpb.UnimplementedRaftServer
	t *Transport
}

func (s *service) Stream(stream peerpb.Raft_StreamServer) error {
	return toStatus(s.t.acceptStream(stream))
}

func (s *service) Snapshot(stream peerpb.Raft_SnapshotServer) error {
	return toStatus(s.t.receiveSnapshot(stream))
}

// acceptStream serves a stream a lower-id peer dialed. The handler
// goroutine owns the stream: a receive goroutine reads it, the peer's sender
// goroutine writes it through the link, and the handler returns, ending
// the stream, when the receive side fails, a newer stream replaces this
// one, or the transport stops. Only returning can end a server stream, so
// the receive loop runs apart from the handler and the handler stays free
// to notice replacement and Stop.
func (t *Transport) acceptStream(stream peerpb.Raft_StreamServer) error {
	if t.ctx.Err() != nil {
		return ErrStopped
	}
	who, err := t.admit(stream, "stream")
	if err != nil {
		return err
	}
	hello, err := recvWithin(stream.Recv, handshakeTimeout)
	if err != nil {
		return fmt.Errorf("transport: receive hello: %w", err)
	}
	from := hello.GetFrom()
	if from == 0 || !t.accepts(from) {
		return fmt.Errorf("%w: node %d dialed node %d, but only the lower id dials", ErrPeerMismatch, from, t.id)
	}
	if to := hello.GetTo(); to != 0 && to != t.id {
		return fmt.Errorf("%w: node %d dialed node %d at this address, but this is node %d", ErrPeerMismatch, from, to, t.id)
	}
	if from != who.node {
		return fmt.Errorf("%w: node %d's stream says hello from node %d", ErrPeerMismatch, who.node, from)
	}
	// Answer before installing the link, so this Send cannot overlap with
	// the sender goroutine's.
	if err := stream.Send(&peerpb.Batch{From: t.id, To: from}); err != nil {
		return fmt.Errorf("transport: hello to peer %d: %w", from, err)
	}
	t.deliver(from, hello)

	l := newLink(from, stream.Send, nil)
	l.remoteNonce = who.nonce
	if err := t.installLink(l, true); err != nil {
		return err
	}
	defer func() {
		t.removeLink(l)
		l.seal() // no Send may touch the stream once we return
	}()
	recvErr := make(chan error, 1) // buffered: the receiver may outlive us
	recv := func() {
		// Nothing arriving for linkIdleTimeout (the peer pings when idle)
		// means a dead link: shutting the link down ends the handler.
		idle := time.AfterFunc(linkIdleTimeout, l.shutdown)
		defer idle.Stop()
		for {
			b, err := stream.Recv()
			if err != nil {
				recvErr <- fmt.Errorf("transport: receive from peer %d: %w", from, err)
				return
			}
			idle.Reset(linkIdleTimeout)
			t.deliver(from, b)
		}
	}
	if !t.goroutine(recv) {
		return ErrStopped
	}
	select {
	case err := <-recvErr:
		return err
	case <-l.done:
		// Replaced by a newer stream, removed, idle too long, or a send
		// failed: the dialer reconnects if it still wants to.
		return nil
	case <-t.ctx.Done():
		return ErrStopped
	}
}

// snapshotChunkTimeout bounds the wait for each next chunk of an inbound
// snapshot, as handshakeTimeout does for a stream's first message: a
// sender that stops sending would otherwise hold the stream's goroutine
// and its staged pairs for as long as its connection answers keepalive
// pings.
const snapshotChunkTimeout = 30 * time.Second

// recvWithin is recv, or ErrProtocol once d passes without a message.
// The handler that gives up returns, which ends the stream and so the
// Recv left running.
func recvWithin[T any](recv func() (T, error), d time.Duration) (T, error) {
	type received struct {
		v   T
		err error
	}
	c := make(chan received, 1)
	go func() {
		v, err := recv()
		c <- received{v, err}
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case r := <-c:
		return r.v, r.err
	case <-t.C:
		var zero T
		return zero, fmt.Errorf("%w: nothing received for %v", ErrProtocol, d)
	}
}

// accepts reports whether peer id is the one that dials us.
func (t *Transport) accepts(id uint64) bool { return id < t.id }

// receiveSnapshot serves one incoming snapshot: it reads the header chunk,
// then lets the handler pull the rest chunk by chunk, so a snapshot is never
// held in memory whole.
func (t *Transport) receiveSnapshot(stream peerpb.Raft_SnapshotServer) error {
	if t.ctx.Err() != nil {
		return ErrStopped
	}
	who, err := t.admit(stream, "snapshot")
	if err != nil {
		return err
	}
	first, err := recvWithin(stream.Recv, handshakeTimeout)
	if err != nil {
		return fmt.Errorf("transport: receive snapshot header: %w", err)
	}
	shard, from := first.GetShard(), first.GetFrom()
	if from != who.node {
		return fmt.Errorf("%w: node %d's snapshot says it is from node %d", ErrPeerMismatch, who.node, from)
	}
	if to := first.GetTo(); to != 0 && to != t.id {
		return fmt.Errorf("%w: snapshot for node %d arrived at node %d", ErrPeerMismatch, to, t.id)
	}
	m, err := decodeSnapshotHeader(first.GetHeader())
	if err != nil {
		return fmt.Errorf("transport: snapshot of shard %d from %d: %w", shard, from, err)
	}
	if !fromPeer(m, from, t.id) {
		return fmt.Errorf("%w: snapshot of shard %d from node %d is a message from %d to %d", ErrProtocol, shard, from, m.GetFrom(), m.GetTo())
	}
	r := &snapshotReceiver{t: t, stream: stream, pending: first.GetPairs(), last: first.GetLast()}
	if err := t.cfg.Handler.HandleSnapshot(shard, m, r.next); err != nil {
		return fmt.Errorf("transport: install snapshot of shard %d from %d: %w", shard, from, err)
	}
	if !r.last || len(r.pending) > 0 {
		return fmt.Errorf("transport: snapshot of shard %d from %d: %w", shard, from, ErrSnapshotUnconsumed)
	}
	t.stats.snapshotsRecv.Add(1)
	if err := stream.SendAndClose(&peerpb.SnapshotAck{}); err != nil {
		return fmt.Errorf("transport: ack snapshot of shard %d from %d: %w", shard, from, err)
	}
	return nil
}

// toStatus maps the transport's errors to gRPC status codes; it is the one
// place where that happens, at the edge of the peer API.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	switch {
	case errors.Is(err, ErrStopped):
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, ErrNoPeerCert):
		return status.Error(codes.Unauthenticated, err.Error())
	case errors.Is(err, ErrPeerMismatch), errors.Is(err, ErrDuplicateNode), errors.Is(err, ErrNewDataDir), errors.Is(err, ErrProtocolVersion):
		return status.Error(codeRefused, err.Error())
	case errors.Is(err, ErrProtocol), errors.Is(err, ErrSnapshotTruncated):
		return status.Error(codes.InvalidArgument, err.Error())
	}
	// A broken stream arrives as a wrapped status and keeps its code, with
	// our context in the message.
	if s, ok := status.FromError(err); ok {
		return s.Err()
	}
	return status.Error(codes.Internal, err.Error())
}

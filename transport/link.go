package transport

import (
	"fmt"
	"sync"

	"github.com/kvd/kvd/proto/peerpb"
)

// link is the send half of the one stream to a peer, whichever side dialed
// it. The peer's sender goroutine is its only user; the goroutine that owns
// the stream (the dial loop, or the inbound Stream handler) ends it.
type link struct {
	peer uint64
	send func(*peerpb.Batch) error
	// cancel ends a client stream; nil for an inbound stream, which only
	// its gRPC handler can end (by returning).
	cancel func()
	// remoteNonce is the nonce the peer's process sent in the handshake:
	// a stream from the same id with another one is a second process.
	remoteNonce uint64

	done     chan struct{} // closed by shutdown
	doneOnce sync.Once

	// mu serialises send and guards sealed. gRPC forbids concurrent
	// SendMsg on a stream and, on the server side, any SendMsg once the
	// handler has returned; the handler seals the link before returning.
	mu     sync.Mutex
	sealed bool
}

func newLink(peer uint64, send func(*peerpb.Batch) error, cancel func()) *link {
	return &link{peer: peer, send: send, cancel: cancel, done: make(chan struct{})}
}

// Send sends b on the stream. It fails once the link is sealed.
func (l *link) Send(b *peerpb.Batch) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.sealed {
		return fmt.Errorf("send to peer %d: %w", l.peer, errLinkClosed)
	}
	if err := l.send(b); err != nil {
		return fmt.Errorf("send to peer %d: %w", l.peer, err)
	}
	return nil
}

// live reports whether the link has not been shut down.
func (l *link) live() bool {
	select {
	case <-l.done:
		return false
	default:
		return true
	}
}

// shutdown asks the stream's owner to end it. It never blocks, so the
// sender goroutine can call it after a failed send and installLink can call
// it on a replaced link. Cancelling a client stream also unblocks a Send
// stuck on flow control.
func (l *link) shutdown() {
	l.doneOnce.Do(func() {
		close(l.done)
		if l.cancel != nil {
			l.cancel()
		}
	})
}

// seal waits for a Send in progress and makes later ones fail. The owner
// calls it before it lets go of the stream.
func (l *link) seal() {
	l.mu.Lock()
	l.sealed = true
	l.mu.Unlock()
}

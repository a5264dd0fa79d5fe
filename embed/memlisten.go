package embed

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/test/bufconn"
)

// memBuffer is the buffer of each in-memory connection: as large as the
// client's stream window, so a large value is not copied in many rounds.
const memBuffer = 1 << 20

// memAddr names an in-memory listener or one of its connections. Its
// network is "memory": nothing dials it over TCP, and the .invalid host
// cannot resolve should anything try.
type memAddr string

func (a memAddr) Network() string { return "memory" }
func (a memAddr) String() string  { return string(a) }

// memListener is a listener no socket backs: connections come from its
// dial, in the same process. Each accepted connection gets a remote
// address of its own, as TCP connections have (the server keys client
// connections by it).
type memListener struct {
	*bufconn.Listener
	addr memAddr
	n    atomic.Uint64
}

func newMemListener(name string) *memListener {
	return &memListener{Listener: bufconn.Listen(memBuffer), addr: memAddr(name)}
}

func (l *memListener) Addr() net.Addr { return l.addr }

func (l *memListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	remote := memAddr(fmt.Sprintf("%s#%d", l.addr, l.n.Add(1)))
	return &memConn{Conn: c, local: l.addr, remote: remote}, nil
}

// dial connects to the listener. The connection is a *memConn, which
// the embedded client's credentials tell from a TCP one.
func (l *memListener) dial(ctx context.Context) (net.Conn, error) {
	c, err := l.Listener.DialContext(ctx)
	if err != nil {
		return nil, err
	}
	return &memConn{Conn: c, local: memAddr(string(l.addr) + "#client"), remote: l.addr}, nil
}

type memConn struct {
	net.Conn
	local, remote memAddr
}

func (c *memConn) LocalAddr() net.Addr  { return c.local }
func (c *memConn) RemoteAddr() net.Addr { return c.remote }

// bothListener accepts from a TCP listener and an in-memory one at once:
// the node's client port serves its own in-process client without a
// socket and everyone else over TCP. Its address is the TCP one.
type bothListener struct {
	tcp   net.Listener
	mem   *memListener
	conns chan net.Conn
	errc  chan error
	done  chan struct{}
	once  sync.Once
	wg    sync.WaitGroup
}

func newBothListener(tcp net.Listener, mem *memListener) *bothListener {
	l := &bothListener{tcp: tcp, mem: mem, conns: make(chan net.Conn), errc: make(chan error, 2), done: make(chan struct{})}
	l.wg.Add(2)
	go l.pump(tcp)
	go l.pump(mem)
	return l
}

func (l *bothListener) pump(from net.Listener) {
	defer l.wg.Done()
	var delay time.Duration
	for {
		c, err := from.Accept()
		if isTemporary(err) {
			// Out of file descriptors (a flood of connections, say):
			// wait and accept again, as gRPC's and net/http's servers
			// do, rather than end serving on both listeners.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			select {
			case <-time.After(delay):
				continue
			case <-l.done:
				return
			}
		}
		delay = 0
		if err != nil {
			l.errc <- err
			return
		}
		select {
		case l.conns <- c:
		case <-l.done:
			_ = c.Close()
			return
		}
	}
}

// isTemporary reports whether an Accept error is one to wait out.
func isTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

func (l *bothListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case err := <-l.errc:
		// The first listener to fail ends serving on both.
		l.Close()
		return nil, err
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *bothListener) Close() error {
	var err error
	l.once.Do(func() {
		close(l.done)
		err = errors.Join(l.tcp.Close(), l.mem.Close())
		l.wg.Wait()
	})
	return err
}

func (l *bothListener) Addr() net.Addr { return l.tcp.Addr() }

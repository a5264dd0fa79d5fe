package jepsenlite

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// clientID names the test process (the clients) in the link table; kvd
// nodes are 1..n.
const clientID = 0

// pair is an unordered link between two parties (clientID or node ids).
type pair struct{ a, b uint64 }

func mkpair(a, b uint64) pair {
	if a > b {
		a, b = b, a
	}
	return pair{a, b}
}

// Net is the link table every proxy consults: which links are cut and how
// much delay each adds. Links are symmetric. A change wakes every stalled
// pump through the changed channel, which is closed and replaced on every
// change (a broadcast without a sync.Cond, so waiters can also select on
// their own done channels).
type Net struct {
	mu struct {
		sync.Mutex
		cut     map[pair]bool
		delay   map[pair]time.Duration
		changed chan struct{}
	}
	// unknownSources counts peer connections whose dialing process could
	// not be identified (it exited before the proxy looked).
	unknownSources atomic.Int64
}

func newNet() *Net {
	n := &Net{}
	n.mu.cut = map[pair]bool{}
	n.mu.delay = map[pair]time.Duration{}
	n.mu.changed = make(chan struct{})
	return n
}

// link reports whether a↔b is up, its delay, and a channel closed at the
// next change of the table.
func (n *Net) link(a, b uint64) (up bool, delay time.Duration, changed <-chan struct{}) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if a == unknownSource || b == unknownSource {
		// An unidentified dialer: up only while the other end has no
		// cut link at all, so a partition is never bypassed.
		other := a
		if a == unknownSource {
			other = b
		}
		for p := range n.mu.cut {
			if p.a == other || p.b == other {
				return false, 0, n.mu.changed
			}
		}
		return true, 0, n.mu.changed
	}
	p := mkpair(a, b)
	return !n.mu.cut[p], n.mu.delay[p], n.mu.changed
}

// update applies f to the table under the lock and wakes every waiter.
func (n *Net) update(f func(cut map[pair]bool, delay map[pair]time.Duration)) {
	n.mu.Lock()
	defer n.mu.Unlock()
	f(n.mu.cut, n.mu.delay)
	close(n.mu.changed)
	n.mu.changed = make(chan struct{})
}

// Cut cuts every link between a node of side1 and a node of side2.
func (n *Net) Cut(side1, side2 []uint64) {
	n.update(func(cut map[pair]bool, _ map[pair]time.Duration) {
		for _, a := range side1 {
			for _, b := range side2 {
				if a != b {
					cut[mkpair(a, b)] = true
				}
			}
		}
	})
}

// Slow adds d of one-way delay to the link a↔b.
func (n *Net) Slow(a, b uint64, d time.Duration) {
	n.update(func(_ map[pair]bool, delay map[pair]time.Duration) { delay[mkpair(a, b)] = d })
}

// Heal restores every link and removes every delay.
func (n *Net) Heal() {
	n.update(func(cut map[pair]bool, delay map[pair]time.Duration) {
		clear(cut)
		clear(delay)
	})
}

// String describes the current cuts and delays, for the history.
func (n *Net) String() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	var parts []string
	for p := range n.mu.cut {
		parts = append(parts, fmt.Sprintf("%s-x-%s", party(p.a), party(p.b)))
	}
	for p, d := range n.mu.delay {
		parts = append(parts, fmt.Sprintf("%s-%v-%s", party(p.a), d, party(p.b)))
	}
	sort.Strings(parts)
	return strings.Join(parts, " ")
}

func party(id uint64) string {
	if id == clientID {
		return "c"
	}
	return fmt.Sprint(id)
}

// proxy forwards TCP connections to one kvd port (upstream) and applies
// the Net's link state between the connection's source and dest:
//
//   - a cut link stalls: bytes already read wait in the proxy, nothing new
//     is delivered, a new connection is accepted but not forwarded, exactly
//     as a network that drops packets (TCP retransmits them after the
//     heal, so stale requests do arrive late — which is part of the test);
//   - a slow link delivers each chunk delay after the proxy read it, with
//     no limit on throughput (a queue, not a sleep per chunk).
//
// Both directions of a connection follow the same link.
type proxy struct {
	net      *Net
	dest     uint64
	upstream string
	lis      net.Listener
	// source names the party that dialed c; for a client proxy it is
	// always clientID.
	source func(c net.Conn) uint64

	mu struct {
		sync.Mutex
		conns  map[net.Conn]struct{}
		closed bool
	}
	done chan struct{}
	wg   sync.WaitGroup
}

func newProxy(n *Net, dest uint64, upstream string, source func(net.Conn) uint64) (*proxy, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &proxy{net: n, dest: dest, upstream: upstream, lis: lis, source: source, done: make(chan struct{})}
	p.mu.conns = map[net.Conn]struct{}{}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is the address to advertise instead of upstream.
func (p *proxy) Addr() string { return p.lis.Addr().String() }

func (p *proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.lis.Accept()
		if err != nil {
			return
		}
		if !p.track(c) {
			c.Close()
			return
		}
		p.wg.Add(1)
		go p.serve(c)
	}
}

// track registers c so Close can end it; false once the proxy is closed.
func (p *proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.closed {
		return false
	}
	p.mu.conns[c] = struct{}{}
	return true
}

func (p *proxy) untrack(c net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.mu.conns, c)
}

// waitUp blocks until the link src↔dest is up, returning its delay; false
// when the proxy closes first.
func (p *proxy) waitUp(src uint64) (time.Duration, bool) {
	for {
		up, d, changed := p.net.link(src, p.dest)
		if up {
			return d, true
		}
		select {
		case <-changed:
		case <-p.done:
			return 0, false
		}
	}
}

func (p *proxy) serve(down net.Conn) {
	defer p.wg.Done()
	defer p.untrack(down)
	defer down.Close()
	src := p.source(down)
	// A SYN does not cross a cut link: hold the connection unanswered
	// until the heal, then connect upstream.
	if _, ok := p.waitUp(src); !ok {
		return
	}
	up, err := net.DialTimeout("tcp", p.upstream, 2*time.Second)
	if err != nil {
		return // node down: the caller sees the connection close
	}
	if !p.track(up) {
		up.Close()
		return
	}
	defer p.untrack(up)
	defer up.Close()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.pump(src, down, up) }()
	go func() { defer wg.Done(); p.pump(src, up, down) }()
	wg.Wait()
}

type chunk struct {
	b  []byte
	at time.Time // when the proxy read it
}

// pump copies from → to through a queue so that a delay adds latency but
// not a throughput limit. When either end fails both connections close.
func (p *proxy) pump(src uint64, from, to net.Conn) {
	q := make(chan chunk, 256)
	go func() {
		defer close(q)
		for {
			buf := make([]byte, 32<<10)
			n, err := from.Read(buf)
			if n > 0 {
				select {
				case q <- chunk{buf[:n], time.Now()}:
				case <-p.done:
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	defer func() {
		from.Close()
		to.Close()
		for range q { // unblock and drain the reader
		}
	}()
	for c := range q {
		d, ok := p.waitUp(src)
		if !ok {
			return
		}
		if wait := time.Until(c.at.Add(d)); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-p.done:
				t.Stop()
				return
			}
		}
		if _, err := to.Write(c.b); err != nil {
			return
		}
	}
}

// Close stops accepting, closes every connection and waits for every
// goroutine of the proxy.
func (p *proxy) Close() error {
	p.mu.Lock()
	if p.mu.closed {
		p.mu.Unlock()
		return nil
	}
	p.mu.closed = true
	close(p.done)
	err := p.lis.Close()
	for c := range p.mu.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	if errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) {
		err = nil
	}
	return err
}

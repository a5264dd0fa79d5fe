package server

import (
	"context"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/stats"

	"github.com/kvd/kvd/proto/kvpb"
)

// connLimiter is the client listener. It caps the connections a node keeps
// open: each costs buffers and up to maxStreamsPerConn concurrent
// requests, so without a cap a client opening connections could grow the
// node without bound. A connection beyond the cap is closed as soon as it
// is accepted, which a client sees at once (and tries another node) rather
// than hanging in the listen backlog.
//
// It also keeps the answers of unary reads charged to the in-flight budget
// until they have left the node. gRPC queues a unary answer whole and ends
// the call at once, whether or not the client reads: without this, a
// client that sends Range after Range on one connection and reads nothing
// makes the node hold every page (200 pages of 4 MiB were 760 MiB of heap).
// Each connection counts the bytes gRPC was handed for it and the bytes it
// has written; an answer's charge is released once the connection has
// written as many bytes as had been handed to gRPC up to and including
// that answer. A connection owing answers that writes nothing for
// sendTimeout is closed, as a Batch stream that stops reading is cut off.
type connLimiter struct {
	net.Listener
	max         int64
	adm         *admission
	sendTimeout time.Duration
	log         *slog.Logger

	open     atomic.Int64
	accepted atomic.Int64 // connections accepted and kept, ever
	refused  prometheus.Counter
	cutOff   prometheus.Counter

	mu     sync.Mutex
	byAddr map[string]*limitedConn // by remote address, for TagConn
}

func newConnLimiter(l net.Listener, max int, adm *admission, sendTimeout time.Duration, log *slog.Logger) *connLimiter {
	return &connLimiter{
		Listener:    l,
		max:         int64(max),
		adm:         adm,
		sendTimeout: sendTimeout,
		log:         log,
		byAddr:      map[string]*limitedConn{},
		refused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvd_client_conns_refused_total",
			Help: "Client connections closed on accept because the node had --max-client-conns open.",
		}),
		cutOff: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvd_client_conns_cut_off_total",
			Help: "Client connections closed because unary answers waited on them for --batch-send-timeout with nothing written (their client was not reading).",
		}),
	}
}

func (l *connLimiter) collectors() []prometheus.Collector {
	return []prometheus.Collector{l.refused, l.cutOff, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "kvd_client_conns",
		Help: "Client connections open (at most --max-client-conns).",
	}, func() float64 { return float64(l.open.Load()) })}
}

func (l *connLimiter) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.open.Add(1) > l.max {
			l.open.Add(-1)
			l.refused.Inc()
			_ = c.Close()
			continue
		}
		l.accepted.Add(1)
		lc := &limitedConn{Conn: c, l: l}
		l.mu.Lock()
		l.byAddr[c.RemoteAddr().String()] = lc
		l.mu.Unlock()
		return lc, nil
	}
}

// cutOffStalled closes every connection that owes answers and has written
// nothing for sendTimeout, until stopc closes. Called on its own goroutine.
func (l *connLimiter) cutOffStalled(stopc <-chan struct{}) {
	t := time.NewTicker(max(l.sendTimeout/4, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-stopc:
			return
		case now := <-t.C:
			l.mu.Lock()
			var stalled []*limitedConn
			for _, c := range l.byAddr {
				if c.stalledSince(now) >= l.sendTimeout {
					stalled = append(stalled, c)
				}
			}
			l.mu.Unlock()
			for _, c := range stalled {
				l.cutOff.Inc()
				l.log.Warn("closing a client connection that reads no answers", "remote", c.RemoteAddr().String(), "after", l.sendTimeout)
				_ = c.Close()
			}
		}
	}
}

// limitedConn is an accepted client connection: it gives its slot back
// once, however often it is closed, and holds the charges of the answers
// gRPC has queued on it and not yet written.
type limitedConn struct {
	net.Conn
	l    *connLimiter
	once sync.Once

	written atomic.Int64 // bytes written to the connection
	handed  atomic.Int64 // message bytes gRPC was handed for it
	owing   atomic.Bool  // len(owed) > 0: Write settles

	mu sync.Mutex
	// owed are answers' charges in the order gRPC was handed them: each
	// is released once written reaches its mark.
	owed []owedAnswer
	// lastWritten and progress are what cutOffStalled last saw of written
	// and when it last moved.
	lastWritten int64
	progress    time.Time
	closed      bool
}

type owedAnswer struct{ mark, n int64 }

func (c *limitedConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if n > 0 {
		w := c.written.Add(int64(n))
		if c.owing.Load() {
			c.settle(w)
		}
	}
	return n, err
}

// owe hands an answer's charge of n bytes, queued up to mark, to the
// connection.
func (c *limitedConn) owe(mark, n int64) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		c.l.adm.release(n)
		return
	}
	if len(c.owed) == 0 {
		c.lastWritten, c.progress = c.written.Load(), time.Now()
	}
	c.owed = append(c.owed, owedAnswer{mark, n})
	// owing is set before written is read, and Write adds to written
	// before it reads owing, so one of the two settles a mark that Write
	// reaches meanwhile.
	c.owing.Store(true)
	c.mu.Unlock()
	c.settle(c.written.Load())
}

// settle releases the charges of the answers written by w.
func (c *limitedConn) settle(w int64) {
	c.mu.Lock()
	var n int64
	i := 0
	for ; i < len(c.owed) && c.owed[i].mark <= w; i++ {
		n += c.owed[i].n
	}
	c.owed = append(c.owed[:0], c.owed[i:]...)
	if len(c.owed) == 0 {
		c.owing.Store(false)
	}
	c.mu.Unlock()
	c.l.adm.release(n)
}

// stalledSince is how long the connection has owed answers without
// writing anything, as of now; 0 when it owes none or wrote since the
// last look.
func (c *limitedConn) stalledSince(now time.Time) time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.owed) == 0 {
		return 0
	}
	if w := c.written.Load(); w != c.lastWritten {
		c.lastWritten, c.progress = w, now
		return 0
	}
	return now.Sub(c.progress)
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		c.l.open.Add(-1)
		c.l.mu.Lock()
		if c.l.byAddr[c.RemoteAddr().String()] == c {
			delete(c.l.byAddr, c.RemoteAddr().String())
		}
		c.l.mu.Unlock()
		c.mu.Lock()
		var n int64
		for _, o := range c.owed {
			n += o.n
		}
		c.owed, c.closed = nil, true
		c.owing.Store(false)
		c.mu.Unlock()
		c.l.adm.release(n)
	})
	return err
}

// answerTracker is the client server's gRPC stats handler: it ties each
// call to its limitedConn, counts the bytes handed to gRPC per
// connection, and moves a read's answer charge (admission.unary) to the
// connection when the call ends.
type answerTracker struct{ l *connLimiter }

type (
	connKey       struct{}
	answerHoldKey struct{}
)

// answerHold is the charge of one read's answer (admission.grow), and how
// many bytes had been handed to gRPC on its connection once the answer
// was. growing is set by a handler that charges its answer as it builds
// it (Range), so that admission.unary does not charge it again.
type answerHold struct {
	n, mark int64
	growing bool
}

func holdOf(ctx context.Context) *answerHold {
	h, _ := ctx.Value(answerHoldKey{}).(*answerHold)
	return h
}

// readMethods are the unary methods whose answers are charged: those
// whose answers a small request can make large. A lease's TimeToLive with
// keys lists up to fsm.MaxKeysPerLease keys in each shard.
var readMethods = map[string]bool{
	"/" + kvpb.KV_ServiceDesc.ServiceName + "/Get":           true,
	"/" + kvpb.KV_ServiceDesc.ServiceName + "/Range":         true,
	"/" + kvpb.KV_ServiceDesc.ServiceName + "/Txn":           true,
	"/" + kvpb.Lease_ServiceDesc.ServiceName + "/TimeToLive": true,
}

func (t answerTracker) TagConn(ctx context.Context, info *stats.ConnTagInfo) context.Context {
	if info.RemoteAddr == nil {
		return ctx
	}
	t.l.mu.Lock()
	c := t.l.byAddr[info.RemoteAddr.String()]
	t.l.mu.Unlock()
	if c == nil {
		return ctx
	}
	return context.WithValue(ctx, connKey{}, c)
}

func (answerTracker) HandleConn(context.Context, stats.ConnStats) {}

func (answerTracker) TagRPC(ctx context.Context, info *stats.RPCTagInfo) context.Context {
	if !readMethods[info.FullMethodName] {
		return ctx
	}
	return context.WithValue(ctx, answerHoldKey{}, &answerHold{})
}

func (t answerTracker) HandleRPC(ctx context.Context, s stats.RPCStats) {
	switch s := s.(type) {
	case *stats.OutPayload:
		c, _ := ctx.Value(connKey{}).(*limitedConn)
		if c == nil {
			return
		}
		mark := c.handed.Add(int64(s.WireLength))
		if h := holdOf(ctx); h != nil {
			h.mark = mark
		}
	case *stats.End:
		h := holdOf(ctx)
		if h == nil || h.n == 0 {
			return
		}
		n := h.n
		h.n = 0
		if c, _ := ctx.Value(connKey{}).(*limitedConn); c != nil && h.mark > 0 {
			c.owe(h.mark, n)
			return
		}
		t.l.adm.release(n)
	}
}

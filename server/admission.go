package server

import (
	"net"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// admission is the node's in-flight byte budget: the bytes of requests
// admitted and not yet answered, plus the Batch answers not yet sent.
// Beyond it requests are refused with ResourceExhausted instead of
// queueing, so a node's memory stays bounded however clients behave.
//
// Part of the budget is kept for small requests: a large request (over
// smallRequestBytes) is admitted only while the total stays under
// largeLimit, so a flood of large writes fills at most that much and small
// requests, a linearizable get say, still find room in the rest.
type admission struct {
	inFlight   atomic.Int64
	limit      int64 // the whole budget, for small requests
	largeLimit int64 // what large requests may fill

	refused *prometheus.CounterVec // by class: small, large
}

// smallRequestBytes is the largest charge (request plus requestOverhead)
// that counts as small.
const smallRequestBytes = 64 << 10

// requestOverhead is charged per request on top of its encoded size: the
// goroutine, decoded message and bookkeeping a request costs.
const requestOverhead = 4 << 10

// errOverloaded is the status of a refused request.
var errOverloaded = status.Error(codes.ResourceExhausted, "node overloaded: too many request bytes in flight; back off and retry")

func newAdmission(limit int) *admission {
	return &admission{
		limit:      int64(limit),
		largeLimit: int64(limit) - int64(limit)/4,
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kvd_admission_refused_total",
			Help: "Requests refused with ResourceExhausted because the node's in-flight byte budget (--max-inflight-bytes) was spent, by class: large (over 64 KiB) requests may use three quarters of it, small ones all of it.",
		}, []string{"class"}),
	}
}

// requestCharge is what admitting req costs: its encoded size, as size
// gives it, plus requestOverhead; nothing for a req that is no message.
func requestCharge(req any, size func(proto.Message) int) int64 {
	msg, ok := req.(proto.Message)
	if !ok {
		return 0
	}
	return int64(size(msg)) + requestOverhead
}

// sizedBefore is the size of a message proto.Size has sized already and
// that has not changed since: a Batch item's request, sized with its item
// as the stream received it (serveBatch), is not walked again.
var sizedBefore = proto.MarshalOptions{UseCachedSize: true}.Size

// admit reserves n bytes, a request's charge, or refuses the request.
func (a *admission) admit(n int64) error {
	if !a.acquire(n) {
		class := "large"
		if n <= smallRequestBytes {
			class = "small"
		}
		a.refused.WithLabelValues(class).Inc()
		return errOverloaded
	}
	return nil
}

// acquire reserves n bytes if the budget of their class allows.
func (a *admission) acquire(n int64) bool {
	if n <= 0 {
		return true
	}
	limit := a.largeLimit
	if n <= smallRequestBytes {
		limit = a.limit
	}
	if a.inFlight.Add(n) > limit {
		a.inFlight.Add(-n)
		return false
	}
	return true
}

// hold charges (delta > 0) or releases (delta < 0) bytes the node already
// holds and cannot refuse, such as an answer computed and not yet sent:
// they count against what later requests may take.
func (a *admission) hold(delta int64) { a.inFlight.Add(delta) }

// release returns what admit charged.
func (a *admission) release(n int64) { a.inFlight.Add(-n) }

// connLimiter caps the client connections a node keeps open: each costs
// buffers and up to maxStreamsPerConn concurrent requests, so without a
// cap a client opening connections could grow the node without bound. A
// connection beyond the cap is closed as soon as it is accepted, which a
// client sees at once (and tries another node) rather than hanging in the
// listen backlog.
type connLimiter struct {
	net.Listener
	max      int64
	open     atomic.Int64
	accepted atomic.Int64 // connections accepted and kept, ever
	refused  prometheus.Counter
}

func (l *connLimiter) openGauge() prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "kvd_client_conns",
		Help: "Client connections open (at most --max-client-conns).",
	}, func() float64 { return float64(l.open.Load()) })
}

func newConnLimiter(l net.Listener, max int) *connLimiter {
	return &connLimiter{
		Listener: l,
		max:      int64(max),
		refused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvd_client_conns_refused_total",
			Help: "Client connections closed on accept because the node had --max-client-conns open.",
		}),
	}
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
		return &limitedConn{Conn: c, l: l}, nil
	}
}

// limitedConn gives its slot back once, however often it is closed.
type limitedConn struct {
	net.Conn
	l    *connLimiter
	once sync.Once
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.open.Add(-1) })
	return err
}

package server

import (
	"context"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// admission is the node's in-flight byte budget: the bytes of requests
// admitted and not yet answered, plus the answers of reads (unary Get,
// Range and Txn, and Batch items) not yet sent.
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

// errAnswerOverloaded is the status of a read whose answer, computed, did
// not fit the budget.
func errAnswerOverloaded(n int) error {
	return status.Errorf(codes.ResourceExhausted, "node overloaded: no room for an answer of %d bytes among the bytes in flight; back off and retry, or read fewer bytes at a time (a Range limit)", n)
}

func newAdmission(limit int) *admission {
	return &admission{
		limit:      int64(limit),
		largeLimit: int64(limit) - int64(limit)/4,
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kvd_admission_refused_total",
			Help: "Requests refused with ResourceExhausted because the node's in-flight byte budget (--max-inflight-bytes) was spent, by class: large (over 64 KiB) requests may use three quarters of it, small ones all of it; answer: a read's answer, computed, did not fit.",
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
func (a *admission) acquire(n int64) bool { return a.acquireAs(n, n) }

// acquireAs reserves n bytes if the budget allows them as part of a
// charge of total bytes: total decides the class.
func (a *admission) acquireAs(n, total int64) bool {
	if n <= 0 {
		return true
	}
	limit := a.largeLimit
	if total <= smallRequestBytes {
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

// serve admits a request of the given charge, runs it and releases the
// charge when it returns (or panics: a panic recovered further out must
// not keep the bytes charged for ever).
func (a *admission) serve(charge int64, run func() (any, error)) (any, error) {
	if err := a.admit(charge); err != nil {
		return nil, err
	}
	defer a.release(charge)
	return run()
}

// collectors are the admission metrics.
func (a *admission) collectors() []prometheus.Collector {
	return []prometheus.Collector{a.refused, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "kvd_inflight_bytes",
		Help: "Bytes charged to the in-flight budget: requests being served and read answers not yet sent.",
	}, func() float64 { return float64(a.inFlight.Load()) })}
}

// unary admits each unary request; the answer of a read is charged too,
// from when it is computed until gRPC has written it (answerHolds), and
// refused with ResourceExhausted when the budget has no room for it. A
// request is small, but a Range page or a Txn of gets can answer with
// megabytes: charged only for their requests, many at once could hold far
// more than the budget.
func (a *admission) unary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	resp, err := a.serve(requestCharge(req, proto.Size), func() (any, error) { return handler(ctx, req) })
	h := holdOf(ctx)
	if err != nil || h == nil || h.growing {
		return resp, err
	}
	msg, ok := resp.(proto.Message)
	if !ok {
		return resp, nil
	}
	if n := proto.Size(msg); !a.grow(h, n) {
		return nil, errAnswerOverloaded(n)
	}
	return resp, nil
}

// grow charges n more bytes of an answer to its hold, as one charge of
// the hold's total; false, counted as refused, when the budget has no
// room. A nil hold (a call that did not come through gRPC) always grows.
func (a *admission) grow(h *answerHold, n int) bool {
	if h == nil {
		return true
	}
	if !a.acquireAs(int64(n), h.n+int64(n)) {
		a.refused.WithLabelValues("answer").Inc()
		return false
	}
	h.n += int64(n)
	return true
}

package server

import (
	"context"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/storage"
)

// metrics is the node's Prometheus registry (never the global one, so
// several nodes can run in one process). Request metrics are recorded by a
// gRPC interceptor; everything else is read from the components' own
// counters at scrape time by collector, so no hot path pays for metrics it
// already counts.
type metrics struct {
	reg      *prometheus.Registry
	requests *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	// batches and batchItems count the messages and items of Batch
	// streams: items / batches is client requests per message.
	batches, batchItems prometheus.Counter
	// panics counts handler panics turned into Internal (recover.go).
	panics *prometheus.CounterVec
	// batchCutOff counts Batch streams ended for not reading answers.
	batchCutOff prometheus.Counter
	// forwards counts requests forwarded to their shard's leader
	// (forward.go), by whether the leader answered.
	forwards *prometheus.CounterVec

	// History and watches (history.go, watch.go).
	compactions prometheus.Counter
	historySize *prometheus.GaugeVec
	watchers    prometheus.Gauge
	watchEvents prometheus.Counter
	watchLag    prometheus.Histogram
	watchCutOff prometheus.Counter
}

func newMetrics(s *Server) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kvd_requests_total",
			Help: "Client API requests by method and gRPC status code.",
		}, []string{"method", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "kvd_request_duration_seconds",
			Help:    "Client API request latency by method.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16), // 100µs .. ~3.3s
		}, []string{"method"}),
		batches: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvd_request_batches_total",
			Help: "Messages received on client Batch streams; kvd_request_batch_items_total / this is requests per message.",
		}),
		batchItems: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvd_request_batch_items_total",
			Help: "Requests received on client Batch streams (also counted in kvd_requests_total under their own method).",
		}),
		panics: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kvd_handler_panics_total",
			Help: "Client requests whose handler panicked (a bug; the stack is logged); each failed with Internal. Batch items count as Batch/<method>.",
		}, []string{"method"}),
		batchCutOff: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvd_batch_streams_cut_off_total",
			Help: "Batch streams ended with ResourceExhausted because their client did not read its answers for --batch-send-timeout.",
		}),
		forwards: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kvd_forwarded_requests_total",
			Help: "Client requests this follower forwarded to their shard's leader, by result: answered (the leader's answer, success or error, went back) or failed (the leader was not reached; the client got a NotLeader hint).",
		}, []string{"result"}),
		compactions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvd_history_compactions_total",
			Help: "CompactHistory commands this node proposed as a shard leader (each drops at most 10,000 events).",
		}),
		historySize: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kvd_history_revisions",
			Help: "Revisions of changes the local replica of a shard keeps (updated every second).",
		}, []string{"shard"}),
		watchers: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kvd_watchers",
			Help: "Open watches served by this node.",
		}),
		watchEvents: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvd_watch_events_sent_total",
			Help: "Events sent to watchers.",
		}),
		watchLag: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kvd_watch_event_lag_seconds",
			Help:    "Time from a change becoming visible on the leader to its event being handed to the watch stream.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
		watchCutOff: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvd_watch_streams_cut_off_total",
			Help: "Watch streams ended with ResourceExhausted because their client did not read its events for --batch-send-timeout.",
		}),
	}
	m.reg.MustRegister(m.requests, m.latency, m.batches, m.batchItems, m.panics, m.batchCutOff, m.forwards, collector{s},
		m.compactions, m.historySize, m.watchers, m.watchEvents, m.watchLag, m.watchCutOff,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.reg.MustRegister(s.adm.collectors()...)
	return m
}

// interceptor records each unary request's code and latency, refusals
// by admission included.
func (m *metrics) interceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	method := info.FullMethod
	if i := lastSlash(method); i >= 0 {
		method = method[i+1:]
	}
	return m.observe(method, func() (any, error) { return handler(ctx, req) })
}

// observe runs serve and records its outcome under method: the unary
// interceptor comes through here, and each item of a Batch stream.
func (m *metrics) observe(method string, serve func() (any, error)) (any, error) {
	start := time.Now()
	resp, err := serve()
	m.requests.WithLabelValues(method, status.Code(err).String()).Inc()
	m.latency.WithLabelValues(method).Observe(time.Since(start).Seconds())
	return resp, err
}

func lastSlash(s string) int {
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '/' {
			return i
		}
	}
	return -1
}

var (
	descTerm          = desc("kvd_raft_term", "Raft term of the local replica.", "shard")
	descCommit        = desc("kvd_raft_commit_index", "Raft commit index of the local replica.", "shard")
	descApplied       = desc("kvd_raft_applied_index", "Last index applied to the state machine.", "shard")
	descIsLeader      = desc("kvd_raft_is_leader", "1 when the local replica leads its shard.", "shard")
	descHasLeader     = desc("kvd_raft_has_leader", "1 when the local replica knows a leader.", "shard")
	descLeaderChanges = desc("kvd_raft_leader_changes_total", "Leader changes seen by the local replica.", "shard")
	descPending       = desc("kvd_raft_pending_proposals", "Proposals waiting to apply.", "shard")
	descProposals     = desc("kvd_raft_proposals_total", "Proposals accepted by Raft.", "shard")
	descProposeRounds = desc("kvd_raft_proposal_batches_total", "Raft Ready rounds that carried new local entries; proposals_total / proposal_batches_total is proposals per Raft entry batch.", "shard")
	descReads         = desc("kvd_raft_linearizable_reads_total", "Linearizable reads served.", "shard")
	descReadRounds    = desc("kvd_raft_read_index_rounds_total", "Raft's own ReadIndex rounds, for reads the node-wide leadership check cannot serve (a new leader, a joint configuration).", "shard")
	descCheckRounds   = desc("kvd_raft_leader_check_rounds_total", "Leadership-check rounds: each confirms the waiting linearizable reads of every shard this node leads with one message pair per peer. Reads per round: reads_total / (leader_check_rounds_total + read_index_rounds_total).")
	descCompactions   = desc("kvd_raft_log_compactions_total", "Log compactions.", "shard")

	descCommitBytes  = desc("kvd_storage_commit_bytes_total", "Bytes of pages the bbolt commits wrote (a value is stored in its shard's log, state and history).")
	descCommits      = desc("kvd_storage_commits_total", "bbolt write transactions committed; each holds the rounds since the last (every --commit-interval, 200 ms by default, or sooner when a request or a reader needs it).")
	descFsyncs       = desc("kvd_storage_fsyncs_total", "Times write rounds were made durable: a WAL fdatasync (covering every round written since the last) or a bbolt commit.")
	descUpdates      = desc("kvd_storage_updates_total", "Shard updates merged into write rounds; updates / fsyncs is the group-commit factor.")
	descEntries      = desc("kvd_storage_entries_total", "Raft entries appended; entries / fsyncs is entries per fsync.")
	descAppliedTotal = desc("kvd_storage_applied_entries_total", "Committed entries applied.")
	descCommitTime   = desc("kvd_storage_commit_duration_seconds", "Duration of a bbolt commit: page writes and fsyncs.")
	descSyncTime     = desc("kvd_storage_sync_duration_seconds", "Time from a write round's WAL record to the fdatasync that made it durable (the oldest round's, when one covers several), or a bbolt commit.")

	descBatchesSent  = desc("kvd_transport_batches_sent_total", "Message batches sent; messages / batches is messages per batch.")
	descMsgsSent     = desc("kvd_transport_messages_sent_total", "Raft messages sent.")
	descBytesSent    = desc("kvd_transport_bytes_sent_total", "Bytes of Raft messages sent.")
	descBatchesRecv  = desc("kvd_transport_batches_received_total", "Message batches received.")
	descMsgsRecv     = desc("kvd_transport_messages_received_total", "Raft messages received.")
	descBytesRecv    = desc("kvd_transport_bytes_received_total", "Bytes of Raft messages received.")
	descBadMsgs      = desc("kvd_transport_bad_messages_total", "Raft messages received and dropped: undecodable, or not from the stream's peer to this node.")
	descSendFailures = desc("kvd_transport_send_failures_total", "Messages lost because their batch failed to send, by peer.", "peer")
	descDropped      = desc("kvd_transport_dropped_total", "Messages dropped before sending (queue full or no stream), by peer.", "peer")
	descConnected    = desc("kvd_transport_peer_connected", "1 when the stream to the peer is up.", "peer")
	descSnapSent     = desc("kvd_snapshots_sent_total", "Snapshots streamed to followers.")
	descSnapFailed   = desc("kvd_snapshots_send_failures_total", "Snapshot sends that failed.")
	descSnapRecv     = desc("kvd_snapshots_received_total", "Snapshots received and staged.")
	descEpoch        = desc("kvd_cluster_map_epoch", "Epoch of the cluster map this node routes with.")
)

// constHistogram converts a storage histogram (nanoseconds) to seconds.
func constHistogram(d *prometheus.Desc, h storage.Histogram) prometheus.Metric {
	buckets := make(map[float64]uint64, len(h.Bounds))
	var cum uint64
	for i, b := range h.Bounds {
		cum += h.Counts[i]
		buckets[float64(b)/1e9] = cum
	}
	return prometheus.MustNewConstHistogram(d, h.Count(), float64(h.Sum)/1e9, buckets)
}

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, labels, nil)
}

// collector reads the node's component counters at scrape time.
type collector struct{ s *Server }

func (c collector) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(c, ch) }

func (c collector) Collect(ch chan<- prometheus.Metric) {
	s := c.s
	gauge, counter := prometheus.GaugeValue, prometheus.CounterValue
	for _, n := range s.host.Nodes() {
		sh := strconv.FormatUint(n.Shard(), 10)
		st := n.Stats()
		ch <- prometheus.MustNewConstMetric(descTerm, gauge, float64(n.Term()), sh)
		ch <- prometheus.MustNewConstMetric(descCommit, gauge, float64(n.Commit()), sh)
		ch <- prometheus.MustNewConstMetric(descApplied, gauge, float64(n.Applied()), sh)
		ch <- prometheus.MustNewConstMetric(descIsLeader, gauge, b2f(n.IsLeader()), sh)
		ch <- prometheus.MustNewConstMetric(descHasLeader, gauge, b2f(n.Leader() != 0), sh)
		ch <- prometheus.MustNewConstMetric(descLeaderChanges, counter, float64(st.LeaderChanges.Load()), sh)
		ch <- prometheus.MustNewConstMetric(descPending, gauge, float64(n.PendingProposals()), sh)
		ch <- prometheus.MustNewConstMetric(descProposals, counter, float64(st.Proposals.Load()), sh)
		ch <- prometheus.MustNewConstMetric(descProposeRounds, counter, float64(st.ProposeBatch.Load()), sh)
		ch <- prometheus.MustNewConstMetric(descReads, counter, float64(st.Reads.Load()), sh)
		ch <- prometheus.MustNewConstMetric(descReadRounds, counter, float64(st.ReadRounds.Load()), sh)
		ch <- prometheus.MustNewConstMetric(descCompactions, counter, float64(st.Compactions.Load()), sh)
	}

	es := s.engine.Stats()
	ch <- prometheus.MustNewConstMetric(descCommits, counter, float64(es.Commits))
	ch <- prometheus.MustNewConstMetric(descCommitBytes, counter, float64(es.CommitBytes))
	ch <- prometheus.MustNewConstMetric(descFsyncs, counter, float64(es.Syncs))
	ch <- prometheus.MustNewConstMetric(descUpdates, counter, float64(es.Updates))
	ch <- prometheus.MustNewConstMetric(descEntries, counter, float64(es.Entries))
	ch <- prometheus.MustNewConstMetric(descAppliedTotal, counter, float64(es.Applied))
	ch <- constHistogram(descCommitTime, es.CommitNanos)
	ch <- constHistogram(descSyncTime, es.SyncNanos)

	ts := s.tr.Stats()
	ch <- prometheus.MustNewConstMetric(descBatchesSent, counter, float64(ts.BatchesSent))
	ch <- prometheus.MustNewConstMetric(descMsgsSent, counter, float64(ts.MessagesSent))
	ch <- prometheus.MustNewConstMetric(descBytesSent, counter, float64(ts.BytesSent))
	ch <- prometheus.MustNewConstMetric(descBatchesRecv, counter, float64(ts.BatchesReceived))
	ch <- prometheus.MustNewConstMetric(descMsgsRecv, counter, float64(ts.MessagesReceived))
	ch <- prometheus.MustNewConstMetric(descBytesRecv, counter, float64(ts.BytesReceived))
	ch <- prometheus.MustNewConstMetric(descBadMsgs, counter, float64(ts.BadMessages))
	for id, ps := range ts.Peers {
		p := strconv.FormatUint(id, 10)
		ch <- prometheus.MustNewConstMetric(descSendFailures, counter, float64(ps.SendFailures), p)
		ch <- prometheus.MustNewConstMetric(descDropped, counter, float64(ps.Dropped), p)
		ch <- prometheus.MustNewConstMetric(descConnected, gauge, b2f(ps.Connected), p)
	}
	ch <- prometheus.MustNewConstMetric(descSnapSent, counter, float64(ts.SnapshotsSent))
	ch <- prometheus.MustNewConstMetric(descSnapFailed, counter, float64(ts.SnapshotsFailed))
	ch <- prometheus.MustNewConstMetric(descSnapRecv, counter, float64(s.host.SnapshotsReceived()))
	ch <- prometheus.MustNewConstMetric(descCheckRounds, counter, float64(s.host.LeaderCheckRounds()))
	ch <- prometheus.MustNewConstMetric(descEpoch, gauge, float64(s.epoch()))
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// Metrics is the registry /metrics serves, for embedders to add their own
// (package embed counts its client's in-memory calls there).
func (s *Server) Metrics() *prometheus.Registry { return s.metrics.reg }

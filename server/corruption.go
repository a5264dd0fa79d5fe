package server

// Detecting corrupt replicas.
//
// Storage checksums every stored value, so a value changed on disk fails
// the read that meets it (storage.ErrCorrupt, DataLoss to the client). Two
// more checks find what a checksum cannot:
//
//   - The hash check (like etcd's corruption check): every
//     --corruption-check-interval, the leader of each shard proposes a
//     HashCheck command. Each replica, applying it, records its state hash
//     (the sum of its pairs' checksums, kept by storage with the data) at
//     that log index. The leader asks every other voter for its hash at
//     that index (Internal.ShardHash) and compares: a replica whose hash
//     differs from the majority's holds state its log does not explain (a
//     nondeterministic apply, a value rewritten with a valid checksum, a
//     lost write).
//   - The scrubber: every --scrub-interval each node recomputes each local
//     shard's state hash from its stored pairs, verifying every checksum,
//     and compares it with the stored one.
//
// Either raises an alarm: the kvd_corruption_alarm{shard,node} gauge, an
// ERROR log line, and an entry in `kvctl cluster status`. A replica found
// corrupt stops serving its shard: reads and writes get Unavailable saying
// it is corrupt and must be rebuilt, with the NotLeader hint that sends
// clients to another replica, and if it leads the shard it hands
// leadership to another voter. (The read that first meets a corrupt value
// gets DataLoss.) The leader tells
// the corrupt node with Internal.ReportCorruption (no replicated alarm: a
// node learns it directly, or finds it itself by scrub or by its own hash
// check as leader); the node stores the alarm in its own data dir, so it
// keeps refusing after a restart, until the replica is rebuilt from its
// peers (a manual step for now).

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/fsm"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/storage"
	"github.com/kvd/kvd/transport"
)

// ErrReplicaCorrupt is returned for a shard whose local replica was found
// corrupt; toStatus maps it to Unavailable with a NotLeader hint
// (corruptStatus).
var ErrReplicaCorrupt = errors.New("replica is corrupt and must be rebuilt")

// metaCorruptPrefix + shard id is the node metadata key under which a
// corrupt local replica's alarm is kept across restarts.
const metaCorruptPrefix = "corrupt-shard/"

const (
	// shardHashWait bounds how long ShardHash waits for the replica to
	// apply the check's index.
	shardHashWait = 5 * time.Second
	// scrubBytesPerSec paces the scrubber: it reads in a bbolt read
	// transaction, which never blocks the writer, but its I/O and CPU are
	// shared with it.
	scrubBytesPerSec = 32 << 20
)

type alarmKey struct{ shard, node uint64 }

// corruption is a node's knowledge of corrupt replicas.
type corruption struct {
	gauge  *prometheus.GaugeVec
	checks *prometheus.CounterVec // hash checks by result
	leave  chan uint64            // to leaveLoop
	// local is set once a replica of this node has an alarm: until then
	// corruptErr, on every read and write, costs one atomic load rather
	// than a lock.
	local atomic.Bool

	mu struct {
		sync.Mutex
		alarms map[alarmKey]string // reason
	}
}

// init prepares the alarm state before anything (a snapshot being sent)
// can raise an alarm.
func (c *corruption) init() {
	c.mu.alarms = map[alarmKey]string{}
	c.gauge = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "kvd_corruption_alarm",
		Help: "1 for a replica (shard, node) found corrupt by the hash check, the scrubber or a read; it must be rebuilt.",
	}, []string{"shard", "node"})
	c.checks = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "kvd_corruption_checks_total",
		Help: "Hash checks this node ran as a shard leader, by result: agree (every voter answered the same hash), partial (the voters that answered agree), mismatch (an alarm was raised), no_majority.",
	}, []string{"result"})
	c.leave = make(chan uint64, 1)
}

// startCorruptionChecks exports the alarms, restores those of local
// replicas from the data dir, and starts the hash check and the scrubber.
func (s *Server) startCorruptionChecks() {
	s.metrics.reg.MustRegister(s.corrupt.gauge, s.corrupt.checks)
	s.wg.Add(1)
	go s.leaveLoop()
	for _, n := range s.host.Nodes() {
		v, err := s.engine.GetMeta(metaCorruptPrefix + strconv.FormatUint(n.Shard(), 10))
		if err == nil && v != nil {
			s.setAlarm(n.Shard(), s.cfg.NodeID, string(v))
		}
	}
	if s.cfg.CorruptionCheckInterval > 0 {
		s.wg.Add(1)
		go s.every(s.cfg.CorruptionCheckInterval, s.checkHashes)
	}
	if s.cfg.ScrubInterval > 0 {
		s.wg.Add(1)
		go s.every(s.cfg.ScrubInterval, s.scrub)
	}
}

func (s *Server) setAlarm(shard, node uint64, reason string) (added bool) {
	s.corrupt.mu.Lock()
	_, had := s.corrupt.mu.alarms[alarmKey{shard, node}]
	s.corrupt.mu.alarms[alarmKey{shard, node}] = reason
	if node == s.cfg.NodeID {
		s.corrupt.local.Store(true)
	}
	s.corrupt.mu.Unlock()
	s.corrupt.gauge.WithLabelValues(strconv.FormatUint(shard, 10), strconv.FormatUint(node, 10)).Set(1)
	return !had
}

// raiseAlarm records that node's replica of shard is corrupt. For this
// node's own replica it also persists the alarm and gives up leadership.
func (s *Server) raiseAlarm(shard, node uint64, reason string) {
	if !s.setAlarm(shard, node, reason) {
		return
	}
	s.log.Error("corrupt replica: it must be rebuilt", "shard", shard, "corrupt_node", node, "reason", reason)
	if node != s.cfg.NodeID {
		return
	}
	if err := s.engine.PutMeta(metaCorruptPrefix+strconv.FormatUint(shard, 10), []byte(reason)); err != nil {
		s.log.Error("record corruption alarm", "shard", shard, "err", err)
	}
	select {
	case s.corrupt.leave <- shard:
	default: // the loop is busy handing off another shard; it checks all
	}
}

// leaveLoop hands off the leadership of the shards raiseAlarm names, until
// Stop. A channel rather than a goroutine per alarm, so that an alarm
// raised by an RPC during Stop starts nothing Stop would not wait for.
// It also looks every second, since a corrupt replica still votes and may
// be elected again.
func (s *Server) leaveLoop() {
	defer s.wg.Done()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-s.stopc:
			return
		case <-s.corrupt.leave:
		case <-t.C:
		}
		for _, n := range s.host.Nodes() {
			if n.IsLeader() && s.corruptErr(n.Shard()) != nil {
				s.leaveLeadership(n.Shard())
			}
		}
	}
}

// corruptErr returns ErrReplicaCorrupt if this node's replica of shard is
// known corrupt: it must not answer from it.
func (s *Server) corruptErr(shard uint64) error {
	if !s.corrupt.local.Load() {
		return nil
	}
	s.corrupt.mu.Lock()
	reason, bad := s.corrupt.mu.alarms[alarmKey{shard, s.cfg.NodeID}]
	s.corrupt.mu.Unlock()
	if !bad {
		return nil
	}
	return fmt.Errorf("%w: shard %d on node %d: %s", ErrReplicaCorrupt, shard, s.cfg.NodeID, reason)
}

// corruptStatus answers for a replica known corrupt: Unavailable, with the
// NotLeader hint the client follows to another replica (the leader when it
// is another node), and a message saying why.
func (s *Server) corruptStatus(shard uint64, err error) error {
	hint := &kvpb.NotLeader{Shard: shard}
	if n := s.host.Node(shard); n != nil && n.Leader() != s.cfg.NodeID {
		hint.LeaderId = n.Leader()
		if m := member(s.clusterMap(), hint.LeaderId); m != nil {
			hint.LeaderAddr = m.GetClientAddr()
		}
	}
	msg := fmt.Sprintf("%v; ask another replica (leader: node %d)", err, hint.LeaderId)
	st, serr := status.New(codes.Unavailable, msg).WithDetails(hint)
	if serr != nil {
		return status.Error(codes.Unavailable, msg)
	}
	return st.Err()
}

// noteCorrupt raises the alarm for this node's replica of shard when err
// says a read met a corrupt value, and returns err.
func (s *Server) noteCorrupt(shard uint64, err error) error {
	if errors.Is(err, storage.ErrCorrupt) {
		s.raiseAlarm(shard, s.cfg.NodeID, "read: "+strings.TrimPrefix(err.Error(), "storage: "))
	}
	return err
}

// alarms lists the known alarms, for Status.
func (s *Server) alarms() []*kvpb.CorruptionAlarm {
	s.corrupt.mu.Lock()
	defer s.corrupt.mu.Unlock()
	out := make([]*kvpb.CorruptionAlarm, 0, len(s.corrupt.mu.alarms))
	for k, reason := range s.corrupt.mu.alarms {
		out = append(out, &kvpb.CorruptionAlarm{Shard: k.shard, Node: k.node, Reason: reason})
	}
	return out
}

// leaveLeadership hands the shard's leadership to another voter while this
// node leads it, since a corrupt leader must not serve reads or writes.
func (s *Server) leaveLeadership(shard uint64) {
	n := s.host.Node(shard)
	if n == nil || !n.IsLeader() {
		return
	}
	ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
	defer cancel()
	st, err := n.Status(ctx)
	if err != nil {
		return
	}
	others := 0
	for _, id := range st.Config.Voters[0].Slice() {
		if id == s.cfg.NodeID {
			continue
		}
		others++
		tctx, tcancel := context.WithTimeout(ctx, 2*time.Second)
		err := n.TransferLeadership(tctx, id)
		tcancel()
		if err == nil {
			s.log.Warn("gave up leadership of a corrupt replica", "shard", shard, "to", id)
			return
		}
	}
	if others > 0 {
		s.log.Warn("could not hand leadership of a corrupt replica to another voter yet", "shard", shard)
	}
}

// checkHashes runs one hash check on every shard this node leads.
func (s *Server) checkHashes() {
	for _, n := range s.host.Nodes() {
		if !n.IsLeader() {
			continue
		}
		if s.corruptErr(n.Shard()) != nil {
			continue // leaveLoop hands it off
		}
		if err := s.checkShardHash(n.Shard()); err != nil {
			s.log.Debug("hash check", "shard", n.Shard(), "err", err)
		}
	}
}

// checkShardHash proposes a HashCheck on shard (led by this node) and
// compares the hash every voter recorded at its index.
func (s *Server) checkShardHash(shard uint64) error {
	n := s.host.Node(shard)
	if n == nil {
		return ErrNoReplica
	}
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.RequestTimeout+shardHashWait)
	defer cancel()
	data, err := proto.Marshal(&peerpb.Command{Op: &peerpb.Command_HashCheck{HashCheck: &peerpb.HashCheck{}}})
	if err != nil {
		return err
	}
	out, err := n.Propose(ctx, data)
	if err != nil {
		return err
	}
	res, err := fsm.Outcome(out)
	if err != nil {
		return err
	}
	index, own := res.GetHashCheck().GetIndex(), res.GetHashCheck().GetHash()
	st, err := n.Status(ctx)
	if err != nil {
		return err
	}
	voters := st.Config.Voters[0].Slice()
	hashes := map[uint64]uint64{s.cfg.NodeID: own}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, id := range voters {
		if id == s.cfg.NodeID {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := internal(s, id, func(c peerpb.InternalClient) (*peerpb.ShardHashResponse, error) {
				return c.ShardHash(ctx, &peerpb.ShardHashRequest{Shard: shard, Index: index})
			})
			if err != nil || !resp.GetFound() {
				return
			}
			mu.Lock()
			hashes[id] = resp.GetHash()
			mu.Unlock()
		}()
	}
	wg.Wait()
	count := map[uint64]int{}
	for _, h := range hashes {
		count[h]++
	}
	var majority uint64
	found := false
	for h, c := range count {
		if c > len(voters)/2 {
			majority, found = h, true
		}
	}
	switch {
	case !found:
		s.corrupt.checks.WithLabelValues("no_majority").Inc()
		if len(count) > 1 {
			s.log.Warn("hash check: no majority of the voters answered with the same hash", "shard", shard, "index", index, "hashes", fmt.Sprint(hashes))
		}
		return nil
	case len(count) > 1:
		s.corrupt.checks.WithLabelValues("mismatch").Inc()
	case len(hashes) == len(voters):
		s.corrupt.checks.WithLabelValues("agree").Inc()
	default:
		s.corrupt.checks.WithLabelValues("partial").Inc()
	}
	for id, h := range hashes {
		if h == majority {
			continue
		}
		reason := fmt.Sprintf("state hash %016x at index %d differs from the majority's %016x (hash check by node %d)", h, index, majority, s.cfg.NodeID)
		s.raiseAlarm(shard, id, reason)
		if id == s.cfg.NodeID {
			continue
		}
		_, err := internal(s, id, func(c peerpb.InternalClient) (*peerpb.ReportCorruptionResponse, error) {
			return c.ReportCorruption(ctx, &peerpb.ReportCorruptionRequest{Shard: shard, Reporter: s.cfg.NodeID, Reason: reason})
		})
		if err != nil {
			s.log.Error("tell a corrupt replica", "shard", shard, "node", id, "err", err)
		}
	}
	return nil
}

// ShardHash implements peerpb.Internal.
func (s *Server) ShardHash(ctx context.Context, req *peerpb.ShardHashRequest) (*peerpb.ShardHashResponse, error) {
	shard := req.GetShard()
	sh, err := s.engine.OpenShard(shard)
	if err != nil {
		return nil, s.toStatus(ErrNoReplica, shard)
	}
	ctx, cancel := context.WithTimeout(ctx, shardHashWait)
	defer cancel()
	if err := waitVisible(ctx, sh, req.GetIndex()); err != nil {
		return nil, s.toStatus(err, shard)
	}
	resp := &peerpb.ShardHashResponse{}
	err = sh.View(func(r *storage.Reader) error {
		if i, h, ok := r.HashCheck(); ok && i == req.GetIndex() {
			resp.Found, resp.Hash = true, h
		}
		return nil
	})
	if err != nil {
		return nil, s.toStatus(err, shard)
	}
	return resp, nil
}

// ReportCorruption implements peerpb.Internal.
func (s *Server) ReportCorruption(_ context.Context, req *peerpb.ReportCorruptionRequest) (*peerpb.ReportCorruptionResponse, error) {
	if s.host.Node(req.GetShard()) == nil {
		return nil, s.toStatus(ErrNoReplica, req.GetShard())
	}
	s.raiseAlarm(req.GetShard(), s.cfg.NodeID, req.GetReason())
	return &peerpb.ReportCorruptionResponse{}, nil
}

// scrub verifies every local shard against its stored state hash.
func (s *Server) scrub() {
	for _, n := range s.host.Nodes() {
		shard := n.Shard()
		if s.corruptErr(shard) != nil {
			continue
		}
		sh, err := s.engine.OpenShard(shard)
		if err != nil {
			continue
		}
		start := time.Now()
		var read int
		err = sh.Scrub(func(n int) bool {
			read += n
			// Sleep off whatever runs ahead of the pace.
			if ahead := time.Duration(float64(read)/scrubBytesPerSec*float64(time.Second)) - time.Since(start); ahead > 10*time.Millisecond {
				select {
				case <-s.stopc:
					return false
				case <-time.After(ahead):
				}
			}
			return true
		})
		switch {
		case errors.Is(err, storage.ErrCorrupt):
			s.raiseAlarm(shard, s.cfg.NodeID, "scrub: "+strings.TrimPrefix(err.Error(), "storage: "))
		case err != nil:
			s.log.Debug("scrub", "shard", shard, "err", err)
		}
	}
}

// checkedSnapshots is the transport's snapshot source: a snapshot that
// meets a corrupt pair (storage refuses to send it) raises the alarm for
// this node's replica too.
type checkedSnapshots struct{ s *Server }

func (c checkedSnapshots) OpenSnapshot(shard uint64) (transport.SnapshotReader, error) {
	r, err := snapshotSource{c.s.engine}.OpenSnapshot(shard)
	if err != nil {
		return nil, c.s.noteCorrupt(shard, err)
	}
	return checkedReader{r, c.s, shard}, nil
}

type checkedReader struct {
	transport.SnapshotReader
	s     *Server
	shard uint64
}

func (r checkedReader) Next() ([]*peerpb.SnapshotPair, error) {
	ps, err := r.SnapshotReader.Next()
	return ps, r.s.noteCorrupt(r.shard, err)
}

// waitVisible waits until readers of sh see the state applied at index.
// They see it once the writer commits it: ask for the commit rather than
// wait for the next interval.
func waitVisible(ctx context.Context, sh *storage.Shard, index uint64) error {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		if i, _ := sh.Applied(); i >= index {
			return nil
		}
		sh.Flush()
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

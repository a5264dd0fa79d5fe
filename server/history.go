package server

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/fsm"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/raftnode"
	"github.com/kvd/kvd/storage"
)

// maxTrimRounds bounds the CompactHistory commands one trimHistory tick
// proposes per shard: a shard whose writes outpace it catches up over the
// next ticks rather than hold the loop.
const maxTrimRounds = 8

// trimHistory has every data shard this node leads drop the history that
// --history-revisions, --history-bytes and --history-retention no longer
// keep. The cut is
// decided here, on the leader, and replicated as a revision, so every
// replica drops the same events.
func (s *Server) trimHistory() {
	now := time.Now().UnixMilli()
	for _, n := range s.host.Nodes() {
		if n.Shard() == MetaShard {
			continue
		}
		below, err := s.trimPoint(n.Shard(), now)
		if err != nil {
			s.log.Debug("history trim point", "shard", n.Shard(), "err", err)
			continue
		}
		if below == 0 || !n.IsLeader() {
			continue
		}
		ctx, cancel := context.WithTimeout(s.ctx, s.cfg.RequestTimeout)
		_, err = s.compactShard(ctx, n, below, maxTrimRounds)
		cancel()
		if err != nil {
			s.log.Debug("trim history", "shard", n.Shard(), "err", err)
		}
	}
}

// trimPoint returns the revision below which shard's history is no longer
// kept, or 0 when nothing is to be dropped.
func (s *Server) trimPoint(shard uint64, nowMs int64) (int64, error) {
	sh, err := s.engine.OpenShard(shard)
	if err != nil {
		return 0, err
	}
	var below int64
	err = sh.View(func(r *storage.Reader) error {
		oldest, rev := fsm.HistoryBounds(r)
		s.metrics.historySize.WithLabelValues(strconv.FormatUint(shard, 10)).Set(float64(rev - oldest + 1))
		if keep := s.cfg.HistoryRevisions; keep > 0 {
			below = rev - keep + 1
		}
		if limit := s.cfg.HistoryBytes; limit > 0 {
			if size := fsm.HistoryBytes(r); size > limit {
				below = max(below, fsm.HistoryByteCut(r, size-limit, fsm.MaxCompactEvents*maxTrimRounds))
			}
		}
		if ret := s.cfg.HistoryRetention; ret > 0 {
			cut, err := fsm.HistoryCut(r, nowMs-ret.Milliseconds(), fsm.MaxCompactEvents*maxTrimRounds)
			if err != nil {
				return err
			}
			below = max(below, cut)
		}
		if below <= oldest {
			below = 0
		}
		return nil
	})
	return below, err
}

// compactShard proposes CompactHistory on n (which this node leads) until
// the history starts at below or after rounds commands (0: no limit).
func (s *Server) compactShard(ctx context.Context, n *raftnode.Node, below int64, rounds int) (*peerpb.CompactHistoryResult, error) {
	cmd, err := proto.Marshal(&peerpb.Command{Op: &peerpb.Command_CompactHistory{CompactHistory: &peerpb.CompactHistory{Below: below, MaxEvents: fsm.MaxCompactEvents}}})
	if err != nil {
		return nil, err
	}
	for i := 0; rounds == 0 || i < rounds; i++ {
		if err := s.corruptErr(n.Shard()); err != nil {
			return nil, err
		}
		out, err := n.Propose(ctx, cmd)
		if err != nil {
			return nil, err
		}
		res, err := fsm.Outcome(out)
		if err != nil {
			return nil, err
		}
		r := res.GetCompactHistory()
		if r == nil {
			return nil, fmt.Errorf("%w: want a compact_history result, got %T", ErrWrongResult, res.GetOp())
		}
		s.metrics.compactions.Inc()
		if r.GetDone() {
			return r, nil
		}
	}
	return nil, fmt.Errorf("shard %d: history compaction below %d not finished in %d rounds", n.Shard(), below, rounds)
}

// Compact implements kvpb.Cluster: it drops one shard's history below a
// revision. Served by the shard's leader; kvctl compacts every shard by
// asking each one's leader.
func (s *Server) Compact(ctx context.Context, req *kvpb.CompactRequest) (*kvpb.CompactResponse, error) {
	shard := req.GetShard()
	if shard == MetaShard || replicasOf(s.clusterMap(), shard) == nil {
		return nil, s.toStatus(invalid("unknown data shard %d; shards are listed by `kvctl cluster status`", shard), shard)
	}
	if req.GetRevision() <= 0 {
		return nil, s.toStatus(invalid("compact needs a positive revision"), shard)
	}
	n := s.host.Node(shard)
	if n == nil {
		return nil, s.toStatus(ErrNoReplica, shard)
	}
	if !n.IsLeader() {
		return nil, s.toStatus(&raftnode.NotLeaderError{Shard: shard, Leader: n.Leader()}, shard)
	}
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	r, err := s.compactShard(ctx, n, req.GetRevision(), 0)
	if err != nil {
		return nil, s.toStatus(err, shard)
	}
	return &kvpb.CompactResponse{Shards: []*kvpb.CompactedShard{{
		Header:         s.header(shard, r.GetOldest()-1),
		OldestRevision: r.GetOldest(),
	}}}, nil
}

// compactedStatus is the OutOfRange status of a read or watch below the
// shard's history, with the oldest revision kept as a CompactedShard
// detail.
func compactedStatus(shard uint64, err error) error {
	st := status.New(codes.OutOfRange, fmt.Sprintf("shard %d: %v", shard, err))
	var ce *fsm.CompactedError
	if errors.As(err, &ce) {
		if d, derr := st.WithDetails(&kvpb.CompactedShard{Header: &kvpb.ResponseHeader{Shard: shard}, OldestRevision: ce.Oldest}); derr == nil {
			st = d
		}
	}
	return st.Err()
}

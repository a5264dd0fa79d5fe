package server

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/fsm"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/raftnode"
	"github.com/kvd/kvd/storage"
	"github.com/kvd/kvd/transport"
)

// Errors of request validation and routing; toStatus maps them.
var (
	ErrInvalid    = errors.New("invalid request")
	ErrStaleEpoch = errors.New("stale cluster map epoch")
	ErrNoReplica  = errors.New("shard not hosted on this node")
	// ErrWrongResult: the state machine answered a write with the result
	// of another kind of operation. fsm rejects a (session, seq) reused for
	// another request, so this is a broken invariant, answered as Internal
	// for the one request rather than a crash of the node.
	ErrWrongResult = errors.New("state machine answered with the result of another operation")
)

// invalid builds an InvalidArgument error with a message for the user.
func invalid(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, a...))
}

// toStatus maps an internal error to the gRPC status clients see. It is the
// one place where kvd errors become status codes (docs/design.md, Errors).
func (s *Server) toStatus(err error, shard uint64) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
		return err
	}
	var nl *raftnode.NotLeaderError
	switch {
	case errors.Is(err, ErrNodeFailed), errors.Is(err, errMapNotApplied):
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, transport.ErrPeerMismatch), errors.Is(err, transport.ErrProtocolVersion):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.As(err, &nl):
		return s.notLeader(shard, nl.Leader)
	case errors.Is(err, ErrNoReplica):
		return s.notLeader(shard, 0)
	case errors.Is(err, ErrReplicaCorrupt):
		return s.corruptStatus(shard, err)
	case errors.Is(err, storage.ErrCorrupt):
		return status.Errorf(codes.DataLoss, "shard %d: %v; this replica must be rebuilt from its peers", shard, err)
	case errors.Is(err, fsm.ErrCompacted):
		return compactedStatus(shard, err)
	case errors.Is(err, fsm.ErrFutureRevision):
		return status.Errorf(codes.OutOfRange, "shard %d: %v", shard, err)
	case errors.Is(err, fsm.ErrLeaseNotFound):
		return status.Errorf(codes.NotFound, "shard %d: %v", shard, err)
	case errors.Is(err, fsm.ErrLeaseLimit):
		return status.Errorf(codes.ResourceExhausted, "shard %d: %v", shard, err)
	case errors.Is(err, ErrInvalid):
		return status.Error(codes.InvalidArgument, err.Error())
	// Deterministic rejections of the state machine.
	case errors.Is(err, fsm.ErrSeqReused), errors.Is(err, fsm.ErrTxnTooLarge),
		errors.Is(err, fsm.ErrEmptyKey), errors.Is(err, fsm.ErrMalformed),
		errors.Is(err, fsm.ErrUnknownCmd), errors.Is(err, fsm.ErrRejected):
		return status.Errorf(codes.InvalidArgument, "shard %d: %v", shard, err)
	case errors.Is(err, fsm.ErrStaleSeq), errors.Is(err, fsm.ErrEpoch),
		errors.Is(err, fsm.ErrNotMeta), errors.Is(err, fsm.ErrMemberConflict):
		return status.Errorf(codes.FailedPrecondition, "shard %d: %v", shard, err)
	case errors.Is(err, fsm.ErrResultNotKept):
		// Applied, but its answer is gone: retrying cannot bring it back.
		return status.Errorf(codes.Aborted, "shard %d: %v", shard, err)
	case errors.Is(err, fsm.ErrCorrupt), errors.Is(err, ErrWrongResult):
		return status.Errorf(codes.Internal, "shard %d: %v", shard, err)
	case errors.Is(err, ErrStaleEpoch):
		st, _ := status.New(codes.FailedPrecondition, err.Error()).WithDetails(&kvpb.StaleEpoch{Epoch: s.epoch()})
		return st.Err()
	case errors.Is(err, raftnode.ErrBusy):
		return status.Errorf(codes.ResourceExhausted, "shard %d is overloaded (too many pending writes); back off and retry", shard)
	case errors.Is(err, raftnode.ErrLeadershipLost), errors.Is(err, raftnode.ErrStopped):
		return status.Errorf(codes.Unavailable, "shard %d: %v; retry", shard, err)
	case errors.Is(err, context.DeadlineExceeded):
		return status.Errorf(codes.Unavailable, "shard %d: timed out waiting for a quorum", shard)
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	}
	return status.Errorf(codes.Internal, "shard %d: %v", shard, err)
}

// notLeader answers Unavailable with a hint naming the shard's leader when
// it is known.
func (s *Server) notLeader(shard, leader uint64) error {
	hint := &kvpb.NotLeader{Shard: shard, LeaderId: leader}
	msg := fmt.Sprintf("node %d is not the leader of shard %d", s.cfg.NodeID, shard)
	if leader != 0 {
		if m := member(s.clusterMap(), leader); m != nil {
			hint.LeaderAddr = m.GetClientAddr()
		}
		msg += fmt.Sprintf("; leader is node %d at %s", leader, hint.LeaderAddr)
	} else {
		msg += "; leader unknown"
	}
	st, err := status.New(codes.Unavailable, msg).WithDetails(hint)
	if err != nil {
		return status.Error(codes.Unavailable, msg)
	}
	return st.Err()
}

package server

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/raftnode"
	"github.com/kvd/kvd/transport"
)

// Errors of request validation and routing; toStatus maps them.
var (
	ErrInvalid    = errors.New("invalid request")
	ErrStaleEpoch = errors.New("stale cluster map epoch")
	ErrNoReplica  = errors.New("shard not hosted on this node")
)

// invalid builds an InvalidArgument error with a message for the user.
func invalid(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, a...))
}

// toStatus maps an internal error to the gRPC status clients see. It is the
// one place where kvd errors become status codes (DESIGN.md §3).
func (s *Server) toStatus(err error, shard uint64) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
		return err
	}
	var nl *raftnode.NotLeaderError
	switch {
	case errors.Is(err, ErrNodeFailed):
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, transport.ErrPeerMismatch):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.As(err, &nl):
		return s.notLeader(shard, nl.Leader)
	case errors.Is(err, ErrNoReplica):
		return s.notLeader(shard, 0)
	case errors.Is(err, ErrInvalid):
		return status.Error(codes.InvalidArgument, err.Error())
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

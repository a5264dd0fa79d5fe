package server

import (
	"context"
	"time"

	"go.etcd.io/raft/v3"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/kvpb"
)

// Map implements kvpb.Cluster: the cluster map this node routes with.
func (s *Server) Map(context.Context, *kvpb.MapRequest) (*kvpb.ClusterMap, error) {
	return proto.CloneOf(s.clusterMap()), nil
}

// MemberList implements kvpb.Cluster.
func (s *Server) MemberList(context.Context, *kvpb.MemberListRequest) (*kvpb.MemberListResponse, error) {
	m := s.clusterMap()
	resp := &kvpb.MemberListResponse{Epoch: m.GetEpoch()}
	for _, mb := range m.GetMembers() {
		resp.Members = append(resp.Members, proto.CloneOf(mb))
	}
	return resp, nil
}

// Status implements kvpb.Cluster: the state of every local replica.
func (s *Server) Status(ctx context.Context, _ *kvpb.StatusRequest) (*kvpb.StatusResponse, error) {
	resp := &kvpb.StatusResponse{Node: s.cfg.NodeID, Epoch: s.epoch()}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	for _, n := range s.host.Nodes() {
		ss := &kvpb.ShardStatus{
			Shard:   n.Shard(),
			Leader:  n.Leader(),
			Term:    n.Term(),
			Commit:  n.Commit(),
			Applied: n.Applied(),
		}
		if st, err := n.Status(ctx); err == nil {
			ss.Role = roleName(st.RaftState)
			ss.Term, ss.Commit = st.GetTerm(), st.GetCommit()
			ss.Voters = st.Config.Voters[0].Slice()
		}
		resp.Shards = append(resp.Shards, ss)
	}
	resp.Alarms = s.alarms()
	return resp, nil
}

func roleName(s raft.StateType) string {
	switch s {
	case raft.StateLeader:
		return "leader"
	case raft.StateFollower:
		return "follower"
	case raft.StateCandidate:
		return "candidate"
	case raft.StatePreCandidate:
		return "pre-candidate"
	}
	return s.String()
}

package server

// Growing a cluster: a node started with --join adds itself to the cluster
// map, and the meta shard's leader then gives it replicas of the shards
// that have fewer than the cluster's replica count. A replica is added the
// way etcd adds a member: as a Raft learner that catches up from a
// snapshot, then promoted to voter, so a new, empty replica never counts
// toward a quorum it cannot yet serve.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.etcd.io/raft/v3"
	pb "go.etcd.io/raft/v3/raftpb"
	"go.etcd.io/raft/v3/tracker"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/internal/backoff"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/raftnode"
	"github.com/kvd/kvd/transport"
)

const (
	// joinTimeout bounds how long a joining node tries its --join
	// endpoints before it gives up and exits.
	joinTimeout = time.Minute
	// placeInterval is how often the meta leader looks for missing
	// replicas; placeMaxBackoff bounds the wait after failed rounds.
	placeInterval   = 250 * time.Millisecond
	placeMaxBackoff = 10 * time.Second
	// placeWarnAfter and joinWarnAfter are how long placing replicas or
	// joining may keep failing, as they do while a cluster forms, before
	// it is worth a WARN.
	placeWarnAfter = 10 * time.Second
	joinWarnAfter  = 10 * time.Second
	// catchUpTimeout bounds one attempt to bring a learner up to date; the
	// next round tries again.
	catchUpTimeout = 30 * time.Second
	// promoteLag is how far behind the commit index a learner in steady
	// replication may be and still be promoted: under write load it is
	// always a few entries behind.
	promoteLag = 64
)

// maxMemberAddrBytes bounds a member's address: a host name is at most
// 253 bytes, and every node keeps, logs and dials what the map says.
const maxMemberAddrBytes = 300

// checkMemberAddr accepts HOST:PORT of at most maxMemberAddrBytes, or
// nothing (a client address not known yet).
func checkMemberAddr(addr string) error {
	if addr == "" {
		return nil
	}
	if len(addr) > maxMemberAddrBytes {
		return fmt.Errorf("%d bytes; the limit is %d", len(addr), maxMemberAddrBytes)
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil || host == "" {
		return fmt.Errorf("%q is not HOST:PORT", addr)
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return fmt.Errorf("%q: port %q is not 1 to 65535", addr, port)
	}
	return nil
}

// MemberAdd implements kvpb.Cluster: add a node to the cluster map.
func (s *Server) MemberAdd(ctx context.Context, req *kvpb.MemberAddRequest) (*kvpb.MemberAddResponse, error) {
	m := req.GetMember()
	if m.GetId() == 0 || m.GetPeerAddr() == "" {
		return nil, status.Error(codes.InvalidArgument, "member add needs a positive id and a peer address")
	}
	for _, a := range []struct{ what, addr string }{{"peer", m.GetPeerAddr()}, {"client", m.GetClientAddr()}} {
		if err := checkMemberAddr(a.addr); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "member add: %s address: %v", a.what, err)
		}
	}
	if err := s.mayAddMember(ctx, m.GetId()); err != nil {
		s.log.Warn("refused a member add", "id", m.GetId(), "peer", m.GetPeerAddr(), "err", err)
		return nil, err
	}
	// kvd --join announces the joining node's peer protocol versions: a
	// member its peers would refuse to talk to is not added, where it
	// would count in the quorum of every shard placed on it. A call
	// without them (a client tool, or a build from before versions) is
	// taken for version 1.
	md, _ := metadata.FromIncomingContext(ctx)
	if _, err := transport.CheckProtocols(md, transport.Spoken(), s.cfg.NodeID, fmt.Sprintf("node %d at %s", m.GetId(), m.GetPeerAddr())); err != nil {
		s.log.Error("refused a member add", "id", m.GetId(), "peer", m.GetPeerAddr(), "err", err)
		return nil, s.toStatus(err, 0)
	}
	cmd, err := proto.Marshal(&peerpb.Command{Op: &peerpb.Command_UpdateMember{UpdateMember: &peerpb.UpdateMember{Member: m, Add: true}}})
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "member add: %v", err)
	}
	if err := s.proposeMeta(ctx, cmd); err != nil {
		if rej := (rejectedError{}); errors.As(err, &rej) {
			return nil, status.Errorf(codes.FailedPrecondition, "member add: %v", rej.error)
		}
		return nil, s.toStatus(err, MetaShard)
	}
	s.log.Info("member added", "id", m.GetId(), "peer", m.GetPeerAddr(), "client", m.GetClientAddr())
	return &kvpb.MemberAddResponse{}, nil
}

// join adds this fresh node to the cluster of one of cfg.Join's endpoints
// and returns that cluster's map once it lists this node.
func (s *Server) join() (*kvpb.ClusterMap, error) {
	cfg := &s.cfg
	self := &kvpb.Member{Id: cfg.NodeID, ClientAddr: cfg.AdvertiseClient, PeerAddr: cfg.AdvertisePeer}
	ctx, cancel := context.WithTimeout(s.ctx, joinTimeout)
	defer cancel()
	var (
		err    error
		start  = time.Now()
		warned bool
	)
	// Members started together (compose, make cluster) are often not up
	// when a joining node first calls: that is retried quietly, with one
	// INFO line, and worth a WARN only when it lasts joinWarnAfter.
	s.log.Info("joining the cluster", "via", cfg.Join)
	for {
		for _, ep := range strings.Split(cfg.Join, ",") {
			var m *kvpb.ClusterMap
			if m, err = joinVia(ctx, strings.TrimSpace(ep), self, s.tls.joinCreds()); err == nil {
				return m, nil
			}
			if errors.Is(err, ErrConfig) {
				return nil, err
			}
			if d := time.Since(start); d >= joinWarnAfter && !warned {
				warned = true
				s.log.Warn("still not joined; retrying", "for", d.Round(time.Second), "endpoint", ep, "err", err)
			} else {
				s.log.Debug("join attempt failed", "endpoint", ep, "err", err)
			}
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: could not join the cluster at --join %s within %v: %v; check that a member answers there",
				ErrConfig, cfg.Join, joinTimeout, err)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func joinVia(ctx context.Context, endpoint string, self *kvpb.Member, creds grpc.DialOption) (*kvpb.ClusterMap, error) {
	conn, err := grpc.NewClient(endpoint, creds)
	if err != nil {
		return nil, fmt.Errorf("%w: --join %q: %v", ErrConfig, endpoint, err)
	}
	defer conn.Close()
	c := kvpb.NewClusterClient(conn)
	// The member refuses to add a node whose peer protocol it does not
	// speak (MemberAdd).
	ctx = metadata.AppendToOutgoingContext(ctx, transport.Spoken().Pairs()...)
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	m, err := c.Map(actx, &kvpb.MapRequest{})
	if err != nil {
		return nil, err
	}
	if have := member(m, self.GetId()); have != nil && have.GetPeerAddr() != self.GetPeerAddr() {
		return nil, fmt.Errorf("%w: node id %d is already a member (peer %s); pick an --id that `kvctl member list` does not show",
			ErrConfig, self.GetId(), have.GetPeerAddr())
	}
	if _, err := c.MemberAdd(actx, &kvpb.MemberAddRequest{Member: self}); err != nil {
		if status.Code(err) == codes.FailedPrecondition || status.Code(err) == codes.InvalidArgument {
			return nil, fmt.Errorf("%w: %s", ErrConfig, status.Convert(err).Message())
		}
		return nil, err
	}
	// The add is committed; wait until the member's view shows it, so the
	// node starts with a map that names it.
	for {
		if m, err = c.Map(actx, &kvpb.MapRequest{}); err == nil && member(m, self.GetId()) != nil {
			return m, nil
		}
		select {
		case <-actx.Done():
			return nil, fmt.Errorf("added, but the map at %s does not list this node yet: %w", endpoint, actx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// fetchMap asks other members for their cluster map; a node that does not
// replicate the meta shard learns of changes this way. It takes the newest
// of the answers that come within a short deadline.
func (s *Server) fetchMap() *kvpb.ClusterMap {
	ctx, cancel := context.WithTimeout(s.ctx, 500*time.Millisecond)
	defer cancel()
	var best *kvpb.ClusterMap
	for _, mb := range s.clusterMap().GetMembers() {
		if mb.GetId() == s.cfg.NodeID || mb.GetPeerAddr() == "" {
			continue
		}
		conn, err := s.peerConn(mb.GetPeerAddr())
		if err != nil {
			continue
		}
		m, err := kvpb.NewClusterClient(conn).Map(ctx, &kvpb.MapRequest{})
		if err == nil && m.GetEpoch() > best.GetEpoch() {
			best = m
		}
	}
	return best
}

// startNewReplicas starts, empty, the replicas m assigns to this node that
// it does not run yet; each waits for its shard leader's snapshot.
func (s *Server) startNewReplicas(m *kvpb.ClusterMap) {
	for shard := range localShards(m, s.cfg.NodeID) {
		if s.host.Node(shard) != nil {
			continue
		}
		if _, err := s.host.AddShard(shard, nil); err != nil {
			s.log.Error("start new replica", "shard", shard, "err", err)
			continue
		}
		s.log.Info("started new replica; waiting for the leader's snapshot", "shard", shard)
	}
}

// placeReplicas runs on every node; only the meta shard's leader acts. It
// makes every replica the map names a voter of its shard, then, one shard
// per round, assigns a missing replica to the member holding the fewest.
func (s *Server) placeReplicas() {
	defer s.wg.Done()
	t := time.NewTicker(placeInterval)
	defer t.Stop()
	// voters holds the (shard, node) pairs confirmed as voters while this
	// node leads the meta shard, so steady state costs no RPCs.
	voters := map[[2]uint64]bool{}
	// A failed round (a shard without a leader, a node down) is retried
	// after a backoff that doubles up to placeMaxBackoff, so an outage
	// does not turn into a warning every 250 ms.
	bo := backoff.Backoff{Policy: backoff.Policy{Base: placeInterval, Max: placeMaxBackoff}}
	var (
		retryAt time.Time
		// assigned is the epoch of the last map this node committed.
		// The stored map shows it only once the storage engine's group
		// commit ran (up to --commit-interval later): a round planned
		// from the older map before then proposed the same epoch again,
		// and the state machine refused it, a WARN per replica placed.
		assigned uint64
		// failingSince is when the current run of failed rounds began.
		// Rounds fail while a cluster forms (a shard still electing, a
		// learner catching up): that is retried quietly, and only a run
		// longer than placeWarnAfter is worth a WARN, once.
		failingSince time.Time
		warned       bool
	)
	for {
		select {
		case <-s.stopc:
			return
		case <-t.C:
		}
		meta := s.host.Node(MetaShard)
		if meta == nil || !meta.IsLeader() {
			clear(voters)
			bo.Reset()
			retryAt, assigned, failingSince, warned = time.Time{}, 0, time.Time{}, false
			continue
		}
		m := s.readReplicatedMap()
		if m == nil || m.GetEpoch() < assigned || time.Now().Before(retryAt) {
			continue
		}
		epoch, err := s.placeRound(m, voters)
		if err != nil {
			wait := bo.Next()
			retryAt = time.Now().Add(wait)
			if failingSince.IsZero() {
				failingSince = time.Now()
			}
			if d := time.Since(failingSince); d >= placeWarnAfter && !warned {
				warned = true
				s.log.Warn("placing replicas keeps failing; will retry", "for", d.Round(time.Second), "err", err, "retry_in", wait)
			} else {
				s.log.Debug("placing replicas; will retry", "err", err, "retry_in", wait)
			}
			continue
		}
		if warned {
			s.log.Info("placing replicas works again", "after", time.Since(failingSince).Round(time.Second))
		}
		assigned = max(assigned, epoch)
		failingSince, warned = time.Time{}, false
		bo.Reset()
	}
}

// placeRound makes the replicas of m voters and assigns one missing
// replica; it returns the epoch of the map it committed, or 0.
func (s *Server) placeRound(m *kvpb.ClusterMap, voters map[[2]uint64]bool) (uint64, error) {
	for _, sh := range m.GetShards() {
		for _, id := range sh.GetReplicas() {
			key := [2]uint64{sh.GetId(), id}
			if voters[key] {
				continue
			}
			ctx, cancel := context.WithTimeout(s.ctx, catchUpTimeout)
			err := s.addReplica(ctx, sh.GetId(), id)
			cancel()
			if err != nil {
				return 0, fmt.Errorf("shard %d, replica on node %d: %w", sh.GetId(), id, err)
			}
			voters[key] = true
		}
	}
	next := planReplica(m)
	if next == nil {
		return 0, nil
	}
	cmd, err := proto.Marshal(&peerpb.Command{Op: &peerpb.Command_SetClusterMap{SetClusterMap: &peerpb.SetClusterMap{Map: next}}})
	if err != nil {
		return 0, fmt.Errorf("encode cluster map (epoch %d): %w", next.GetEpoch(), err)
	}
	ctx, cancel := context.WithTimeout(s.ctx, 5*time.Second)
	defer cancel()
	if err := s.proposeMeta(ctx, cmd); err != nil {
		return 0, fmt.Errorf("assign replica (epoch %d): %w", next.GetEpoch(), err)
	}
	s.log.Info("assigned replica", "epoch", next.GetEpoch())
	return next.GetEpoch(), nil
}

// planReplica returns the successor of m with one more replica for the
// first shard that has fewer than the cluster's replica count, placed on
// the member holding the fewest replicas (lowest id on a tie), or nil
// when every shard has enough.
func planReplica(m *kvpb.ClusterMap) *kvpb.ClusterMap {
	want := min(int(m.GetReplicas()), len(m.GetMembers()))
	load := map[uint64]int{}
	for _, sh := range m.GetShards() {
		for _, id := range sh.GetReplicas() {
			load[id]++
		}
	}
	for i, sh := range m.GetShards() {
		if len(sh.GetReplicas()) >= want {
			continue
		}
		var best *kvpb.Member
		for _, mb := range m.GetMembers() {
			if slices.Contains(sh.GetReplicas(), mb.GetId()) {
				continue
			}
			if best == nil || load[mb.GetId()] < load[best.GetId()] ||
				(load[mb.GetId()] == load[best.GetId()] && mb.GetId() < best.GetId()) {
				best = mb
			}
		}
		if best == nil {
			continue
		}
		next := proto.CloneOf(m)
		next.Epoch++
		r := append(next.Shards[i].Replicas, best.GetId())
		slices.SortFunc(r, cmp.Compare[uint64])
		next.Shards[i].Replicas = r
		return next
	}
	return nil
}

// addReplica has the leader of shard make node a voter: locally when this
// node leads the shard, else through the leader's Internal.AddReplica
// (asking each replica in turn when the leader is unknown here).
func (s *Server) addReplica(ctx context.Context, shard, node uint64) error {
	if n := s.host.Node(shard); n != nil && n.IsLeader() {
		return s.promote(ctx, n, node)
	}
	var try []uint64
	if n := s.host.Node(shard); n != nil && n.Leader() != 0 {
		try = append(try, n.Leader())
	}
	for _, id := range replicasOf(s.clusterMap(), shard) {
		if id != node && id != s.cfg.NodeID && !slices.Contains(try, id) {
			try = append(try, id)
		}
	}
	err := fmt.Errorf("no replica of shard %d to ask", shard)
	for _, id := range try {
		_, err = internal(s, id, func(c peerpb.InternalClient) (*peerpb.AddReplicaResponse, error) {
			return c.AddReplica(ctx, &peerpb.AddReplicaRequest{Shard: shard, Node: node})
		})
		if err == nil {
			return nil
		}
	}
	return err
}

// AddReplica implements peerpb.Internal.
func (s *Server) AddReplica(ctx context.Context, req *peerpb.AddReplicaRequest) (*peerpb.AddReplicaResponse, error) {
	n := s.host.Node(req.GetShard())
	if n == nil {
		return nil, s.toStatus(ErrNoReplica, req.GetShard())
	}
	if !n.IsLeader() {
		return nil, s.toStatus(&raftnode.NotLeaderError{Shard: req.GetShard(), Leader: n.Leader()}, req.GetShard())
	}
	if err := s.promote(ctx, n, req.GetNode()); err != nil {
		return nil, s.toStatus(err, req.GetShard())
	}
	return &peerpb.AddReplicaResponse{}, nil
}

// promote makes node a voter of n's shard (n leads it): learner first,
// then voter once it has caught up. Each step is skipped when done.
func (s *Server) promote(ctx context.Context, n *raftnode.Node, node uint64) error {
	st, err := n.Status(ctx)
	if err != nil {
		return err
	}
	if _, ok := st.Config.Voters.IDs()[node]; ok {
		return nil
	}
	if _, ok := st.Config.Learners[node]; !ok {
		if err := n.Compact(ctx); err != nil {
			return err
		}
		if err := n.ProposeConfChange(ctx, confChange(pb.ConfChangeAddLearnerNode, node)); err != nil {
			return fmt.Errorf("add learner %d: %w", node, err)
		}
		s.log.Info("added learner", "shard", n.Shard(), "node", node)
	}
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		st, err := n.Status(ctx)
		if err != nil {
			return err
		}
		if st.RaftState != raft.StateLeader {
			return &raftnode.NotLeaderError{Shard: n.Shard(), Leader: st.Lead}
		}
		if pr, ok := st.Progress[node]; ok && pr.State == tracker.StateReplicate && pr.Match+promoteLag >= st.GetCommit() {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("learner %d still catching up: %w", node, ctx.Err())
		case <-t.C:
		}
	}
	if err := n.ProposeConfChange(ctx, confChange(pb.ConfChangeAddNode, node)); err != nil {
		return fmt.Errorf("promote learner %d: %w", node, err)
	}
	s.log.Info("promoted learner to voter", "shard", n.Shard(), "node", node)
	return nil
}

func confChange(t pb.ConfChangeType, node uint64) *pb.ConfChangeV2 {
	return &pb.ConfChangeV2{Changes: []*pb.ConfChangeSingle{{Type: t.Enum(), NodeId: proto.Uint64(node)}}}
}

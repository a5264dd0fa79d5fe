// Package clienttest provides FakeCluster, an in-process fake of a kvd
// cluster for tests of code that uses package client (and kvctl).
//
// It is a test double, not a kvd: every node is a real gRPC server on
// 127.0.0.1:0 serving the public KV and Cluster services and the gRPC health
// service, but the data lives in one shared in-memory map and nothing is
// replicated. What it does model faithfully is the client-facing contract
// that docs/design.md describes (Errors, Client behaviour): routing by the
// ring, NotLeader answers with or without a leader hint, StaleEpoch,
// InvalidArgument, exactly-once (session, seq) deduplication, and faults a
// test switches on per node (down, hung, failing the next calls).
package clienttest

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/protoadapt"

	"github.com/kvd/kvd/hashring"
	"github.com/kvd/kvd/proto/kvpb"
)

// MaxKeySize mirrors the server's default key limit (docs/design.md,
// Limits).
const MaxKeySize = 4096

// Mode is a FakeNode's behaviour.
type Mode int

const (
	// Up answers normally.
	Up Mode = iota
	// Down answers every RPC, health checks included, with Unavailable.
	Down
	// Hang blocks every RPC, health checks included, until the mode
	// changes or the caller gives up.
	Hang
)

// FakeCluster is a set of FakeNodes sharing one cluster map and one store.
// Its methods are safe for concurrent use.
type FakeCluster struct {
	Nodes []*FakeNode

	mu      sync.Mutex
	cmap    *kvpb.ClusterMap
	ring    *hashring.Ring
	leaders map[uint64]uint64                    // shard → leader node id; 0 = none
	data    map[uint64]map[string]*kvpb.KeyValue // shard → key → kv
	rev     map[uint64]int64
	dedup   map[[2]uint64]proto.Message // (session, seq) → recorded answer
}

// NewFakeCluster starts nodes nodes (ids 1..nodes) holding data shards
// 1..shards with replicas copies each; shard s's replicas are nodes s, s+1,
// ... (wrapping), the first of them its leader. Close it when done.
func NewFakeCluster(nodes, shards, replicas int) (*FakeCluster, error) {
	if nodes < 1 || shards < 1 || replicas < 1 || replicas > nodes {
		return nil, errors.New("clienttest: need nodes ≥ 1, shards ≥ 1, 1 ≤ replicas ≤ nodes")
	}
	f := &FakeCluster{
		leaders: map[uint64]uint64{},
		data:    map[uint64]map[string]*kvpb.KeyValue{},
		rev:     map[uint64]int64{},
		dedup:   map[[2]uint64]proto.Message{},
	}
	m := &kvpb.ClusterMap{Epoch: 1, Vnodes: 64, ClusterId: 0xfa4e}
	for i := 1; i <= nodes; i++ {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			f.Close()
			return nil, err
		}
		n := &FakeNode{ID: uint64(i), Addr: lis.Addr().String(), f: f, lis: lis, release: make(chan struct{})}
		n.mu.calls = map[string]int{}
		f.Nodes = append(f.Nodes, n)
		m.Members = append(m.Members, &kvpb.Member{Id: n.ID, ClientAddr: n.Addr, PeerAddr: "127.0.0.1:1"})
	}
	for s := 1; s <= shards; s++ {
		sr := &kvpb.ShardReplicas{Id: uint64(s)}
		for r := 0; r < replicas; r++ {
			sr.Replicas = append(sr.Replicas, uint64((s-1+r)%nodes+1))
		}
		m.Shards = append(m.Shards, sr)
		f.leaders[sr.Id] = sr.Replicas[0]
		f.data[sr.Id] = map[string]*kvpb.KeyValue{}
	}
	ring, err := hashring.FromMap(m)
	if err != nil {
		f.Close()
		return nil, err
	}
	f.cmap, f.ring = m, ring
	for _, n := range f.Nodes {
		n.srv = grpc.NewServer()
		kvpb.RegisterKVServer(n.srv, kvServer{n: n})
		kvpb.RegisterClusterServer(n.srv, clusterServer{n: n})
		healthpb.RegisterHealthServer(n.srv, healthServer{n: n})
		n.wg.Go(func() { _ = n.srv.Serve(n.lis) })
	}
	return f, nil
}

// Close stops every node; hung calls are released.
func (f *FakeCluster) Close() {
	for _, n := range f.Nodes {
		n.SetMode(Up)
		if n.srv != nil {
			n.srv.Stop()
		} else {
			n.lis.Close()
		}
		n.wg.Wait()
	}
}

// Endpoints lists the nodes' client addresses.
func (f *FakeCluster) Endpoints() []string {
	var eps []string
	for _, n := range f.Nodes {
		eps = append(eps, n.Addr)
	}
	return eps
}

// Node returns the node with id, or nil.
func (f *FakeCluster) Node(id uint64) *FakeNode {
	for _, n := range f.Nodes {
		if n.ID == id {
			return n
		}
	}
	return nil
}

// ShardOf is the shard key belongs to, by the cluster's ring.
func (f *FakeCluster) ShardOf(key []byte) uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ring.Shard(key)
}

// Replicas lists shard's replica ids.
func (f *FakeCluster) Replicas(shard uint64) []uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.replicas(shard))
}

// replicas is Replicas without the copy; f.mu is held.
func (f *FakeCluster) replicas(shard uint64) []uint64 {
	for _, s := range f.cmap.Shards {
		if s.Id == shard {
			return s.Replicas
		}
	}
	return nil
}

// Leader is shard's leader id (0: none).
func (f *FakeCluster) Leader(shard uint64) uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.leaders[shard]
}

// SetLeader makes node the leader of shard (0: no leader).
func (f *FakeCluster) SetLeader(shard, node uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.leaders[shard] = node
}

// Epoch is the cluster-map epoch.
func (f *FakeCluster) Epoch() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.cmap.Epoch
}

// SetClientAddr sets the client address member id advertises in the map
// ("" = not published yet) and increments the epoch, as a member
// publishing its address does.
func (f *FakeCluster) SetClientAddr(id uint64, addr string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, m := range f.cmap.GetMembers() {
		if m.GetId() == id {
			m.ClientAddr = addr
		}
	}
	f.cmap.Epoch++
}

// BumpEpoch increments the map epoch: requests routed with an older
// (nonzero) epoch then fail with StaleEpoch until the client refreshes.
func (f *FakeCluster) BumpEpoch() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cmap.Epoch++
}

// FakeNode is one node of a FakeCluster.
type FakeNode struct {
	ID   uint64
	Addr string

	f   *FakeCluster
	lis net.Listener
	srv *grpc.Server
	wg  sync.WaitGroup

	mu struct {
		sync.Mutex
		mode        Mode
		hideHint    bool
		failNext    int // KV calls left to fail with Unavailable (no detail)
		failAfter   int // writes left to apply and then fail with Unavailable
		exhaustNext int // KV calls left to fail with ResourceExhausted
		answerNext  int // KV calls left to fail with answer
		answer      error
		calls       map[string]int
		headers     []*kvpb.RequestHeader
		inFlight    int
		maxInFlight int
	}
	release chan struct{} // closed when the node leaves Hang; guarded by mu
}

// SetMode switches the node's behaviour.
func (n *FakeNode) SetMode(m Mode) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.mu.mode == Hang && m != Hang {
		close(n.release)
		n.release = make(chan struct{})
	}
	n.mu.mode = m
}

// HideLeaderHint makes NotLeader answers carry leader id 0.
func (n *FakeNode) HideLeaderHint(hide bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.mu.hideHint = hide
}

// FailNext makes the next k KV calls answer Unavailable without a detail,
// before doing anything.
func (n *FakeNode) FailNext(k int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.mu.failNext = k
}

// FailAfterApply makes the next k writes apply and then answer Unavailable,
// like a leader that commits but times out before replying.
func (n *FakeNode) FailAfterApply(k int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.mu.failAfter = k
}

// ExhaustNext makes the next k KV calls answer ResourceExhausted.
func (n *FakeNode) ExhaustNext(k int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.mu.exhaustNext = k
}

// AnswerNext makes the next k KV calls fail with err (a gRPC status error).
func (n *FakeNode) AnswerNext(k int, err error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.mu.answerNext, n.mu.answer = k, err
}

// Calls counts the RPCs that reached the node, by method name ("Put",
// "Get", "Delete", "Range", "Txn", "Map", "Status", "MemberList", "Check").
func (n *FakeNode) Calls(method string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.mu.calls[method]
}

// WriteHeaders returns the request headers of every write that reached the
// node, in arrival order.
func (n *FakeNode) WriteHeaders() []*kvpb.RequestHeader {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.mu.headers)
}

// MaxInFlight is the most KV calls the node ever served at once.
func (n *FakeNode) MaxInFlight() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.mu.maxInFlight
}

// enter applies the node's mode to an incoming call; a non-nil error is the
// answer. done must be called when the call ends.
func (n *FakeNode) enter(ctx context.Context, method string, kv bool) (done func(), err error) {
	n.mu.Lock()
	n.mu.calls[method]++
	mode, release := n.mu.mode, n.release
	if kv {
		n.mu.inFlight++
		n.mu.maxInFlight = max(n.mu.maxInFlight, n.mu.inFlight)
	}
	n.mu.Unlock()
	done = func() {
		if kv {
			n.mu.Lock()
			n.mu.inFlight--
			n.mu.Unlock()
		}
	}
	switch mode {
	case Down:
		return done, status.Error(codes.Unavailable, "fake: node down")
	case Hang:
		select {
		case <-release:
		case <-ctx.Done():
			return done, status.FromContextError(ctx.Err()).Err()
		}
	}
	if !kv {
		return done, nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.mu.failNext > 0 {
		n.mu.failNext--
		return done, status.Error(codes.Unavailable, "fake: injected failure")
	}
	if n.mu.exhaustNext > 0 {
		n.mu.exhaustNext--
		return done, status.Error(codes.ResourceExhausted, "fake: too many pending proposals")
	}
	if n.mu.answerNext > 0 {
		n.mu.answerNext--
		return done, n.mu.answer
	}
	return done, nil
}

// recordWrite records a write's header and applies FailAfterApply.
func (n *FakeNode) recordWrite(h *kvpb.RequestHeader) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.mu.headers = append(n.mu.headers, proto.Clone(h).(*kvpb.RequestHeader))
}

func (n *FakeNode) failAfterApply() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.mu.failAfter > 0 {
		n.mu.failAfter--
		return status.Error(codes.Unavailable, "fake: applied, then timed out")
	}
	return nil
}

// check is the leader and epoch check every KV call passes; f.mu is held.
func (n *FakeNode) check(shard uint64, h *kvpb.RequestHeader, anyReplica bool) error {
	f := n.f
	if e := h.GetEpoch(); e != 0 && e < f.cmap.Epoch {
		st, _ := status.New(codes.FailedPrecondition, fmt.Sprintf("fake: stale epoch %d, now %d", e, f.cmap.Epoch)).
			WithDetails(protoadapt.MessageV1Of(&kvpb.StaleEpoch{Epoch: f.cmap.Epoch}))
		return st.Err()
	}
	reps := f.replicas(shard)
	if reps == nil {
		return status.Errorf(codes.InvalidArgument, "fake: no shard %d", shard)
	}
	if anyReplica && slices.Contains(reps, n.ID) {
		return nil
	}
	leader := f.leaders[shard]
	if leader == n.ID {
		return nil
	}
	n.mu.Lock()
	hide := n.mu.hideHint
	n.mu.Unlock()
	nl := &kvpb.NotLeader{Shard: shard}
	if !hide && leader != 0 {
		nl.LeaderId = leader
		nl.LeaderAddr = f.Node(leader).Addr
	}
	st, _ := status.New(codes.Unavailable, fmt.Sprintf("fake: node %d is not the leader of shard %d", n.ID, shard)).
		WithDetails(protoadapt.MessageV1Of(nl))
	return st.Err()
}

func checkKey(k []byte) error {
	if len(k) == 0 {
		return status.Error(codes.InvalidArgument, "key is empty")
	}
	if len(k) > MaxKeySize {
		return status.Errorf(codes.InvalidArgument, "key is %d bytes, over the %d-byte limit", len(k), MaxKeySize)
	}
	return nil
}

func (f *FakeCluster) respHeader(shard, node uint64) *kvpb.ResponseHeader {
	return &kvpb.ResponseHeader{Shard: shard, Revision: f.rev[shard], Epoch: f.cmap.Epoch, Node: node, RaftTerm: 1}
}

// put applies a put on shard; f.mu is held.
func (f *FakeCluster) put(shard uint64, key, value []byte) (prev *kvpb.KeyValue) {
	f.rev[shard]++
	r := f.rev[shard]
	old := f.data[shard][string(key)]
	kv := &kvpb.KeyValue{Key: bytes.Clone(key), Value: bytes.Clone(value), CreateRevision: r, ModRevision: r, Version: 1}
	if old != nil {
		kv.CreateRevision, kv.Version = old.CreateRevision, old.Version+1
	}
	f.data[shard][string(key)] = kv
	return old
}

func (f *FakeCluster) del(shard uint64, key []byte) (prev *kvpb.KeyValue) {
	old := f.data[shard][string(key)]
	if old != nil {
		f.rev[shard]++
		delete(f.data[shard], string(key))
	}
	return old
}

type kvServer struct {
	kvpb.UnimplementedKVServer
	n *FakeNode
}

// write runs a deduplicated write: a retried (session, seq) gets the
// recorded answer.
func (s kvServer) write(ctx context.Context, method string, h *kvpb.RequestHeader, key []byte,
	apply func(shard uint64) (proto.Message, error)) (proto.Message, error) {
	done, err := s.n.enter(ctx, method, true)
	defer done()
	if err != nil {
		return nil, err
	}
	if err := checkKey(key); err != nil {
		return nil, err
	}
	f := s.n.f
	f.mu.Lock()
	shard := f.ring.Shard(key)
	if err := s.n.check(shard, h, false); err != nil {
		f.mu.Unlock()
		return nil, err
	}
	s.n.recordWrite(h)
	id := [2]uint64{h.GetSession(), h.GetSeq()}
	resp, seen := f.dedup[id]
	if !seen {
		resp, err = apply(shard)
		if err != nil {
			f.mu.Unlock()
			return nil, err
		}
		if h.GetSession() != 0 {
			f.dedup[id] = resp
		}
	}
	f.mu.Unlock()
	if err := s.n.failAfterApply(); err != nil {
		return nil, err
	}
	return proto.Clone(resp), nil
}

func (s kvServer) Put(ctx context.Context, r *kvpb.PutRequest) (*kvpb.PutResponse, error) {
	resp, err := s.write(ctx, "Put", r.Header, r.Key, func(shard uint64) (proto.Message, error) {
		prev := s.n.f.put(shard, r.Key, r.Value)
		out := &kvpb.PutResponse{Header: s.n.f.respHeader(shard, s.n.ID)}
		if r.PrevKv {
			out.PrevKv = prev
		}
		return out, nil
	})
	if err != nil {
		return nil, err
	}
	return resp.(*kvpb.PutResponse), nil
}

func (s kvServer) Delete(ctx context.Context, r *kvpb.DeleteRequest) (*kvpb.DeleteResponse, error) {
	resp, err := s.write(ctx, "Delete", r.Header, r.Key, func(shard uint64) (proto.Message, error) {
		prev := s.n.f.del(shard, r.Key)
		out := &kvpb.DeleteResponse{Header: s.n.f.respHeader(shard, s.n.ID)}
		if prev != nil {
			out.Deleted = 1
			if r.PrevKv {
				out.PrevKv = prev
			}
		}
		return out, nil
	})
	if err != nil {
		return nil, err
	}
	return resp.(*kvpb.DeleteResponse), nil
}

func (s kvServer) Get(ctx context.Context, r *kvpb.GetRequest) (*kvpb.GetResponse, error) {
	done, err := s.n.enter(ctx, "Get", true)
	defer done()
	if err != nil {
		return nil, err
	}
	if err := checkKey(r.Key); err != nil {
		return nil, err
	}
	f := s.n.f
	f.mu.Lock()
	defer f.mu.Unlock()
	shard := f.ring.Shard(r.Key)
	if err := s.n.check(shard, r.Header, r.Consistency == kvpb.Consistency_SERIALIZABLE); err != nil {
		return nil, err
	}
	out := &kvpb.GetResponse{Header: f.respHeader(shard, s.n.ID)}
	if kv := f.data[shard][string(r.Key)]; kv != nil {
		out.Kv = proto.Clone(kv).(*kvpb.KeyValue)
	}
	return out, nil
}

// Batch serves each item with the unary method above; Calls("Batch")
// counts the streams.
func (s kvServer) Batch(stream kvpb.KV_BatchServer) error {
	s.n.mu.Lock()
	s.n.mu.calls["Batch"]++
	s.n.mu.Unlock()
	// Each item is served in a goroutine of its own, as the server does,
	// and answered in a message of its own.
	var wg sync.WaitGroup
	defer wg.Wait()
	var sendMu sync.Mutex
	for {
		req, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		for _, it := range req.GetItems() {
			wg.Go(func() {
				ctx := stream.Context()
				if t := it.GetTimeoutUs(); t > 0 {
					var cancel context.CancelFunc
					ctx, cancel = context.WithTimeout(ctx, time.Duration(t)*time.Microsecond)
					defer cancel()
				}
				res, err := it.Call(ctx, s)
				if err != nil {
					res = &kvpb.BatchResponseItem{Id: it.GetId(), Error: kvpb.StatusOf(err)}
				}
				sendMu.Lock()
				defer sendMu.Unlock()
				_ = stream.Send(&kvpb.BatchResponse{Items: []*kvpb.BatchResponseItem{res}})
			})
		}
	}
}

func (s kvServer) Range(ctx context.Context, r *kvpb.RangeRequest) (*kvpb.RangeResponse, error) {
	done, err := s.n.enter(ctx, "Range", true)
	defer done()
	if err != nil {
		return nil, err
	}
	f := s.n.f
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := s.n.check(r.Shard, r.Header, r.Consistency == kvpb.Consistency_SERIALIZABLE); err != nil {
		return nil, err
	}
	var keys []string
	for k := range f.data[r.Shard] {
		if k >= string(r.Start) && (len(r.End) == 0 || k < string(r.End)) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	out := &kvpb.RangeResponse{Header: f.respHeader(r.Shard, s.n.ID), Count: int64(len(keys))}
	if r.CountOnly {
		return out, nil
	}
	if r.Limit > 0 && int64(len(keys)) > r.Limit {
		keys, out.More = keys[:r.Limit], true
	}
	for _, k := range keys {
		kv := proto.Clone(f.data[r.Shard][k]).(*kvpb.KeyValue)
		if r.KeysOnly {
			kv.Value = nil
		}
		out.Kvs = append(out.Kvs, kv)
	}
	return out, nil
}

func (s kvServer) Txn(ctx context.Context, r *kvpb.TxnRequest) (*kvpb.TxnResponse, error) {
	var keys [][]byte
	for _, c := range r.Compare {
		keys = append(keys, c.Key)
	}
	for _, op := range append(slices.Clone(r.Success), r.Failure...) {
		keys = append(keys, opKey(op))
	}
	if len(keys) == 0 {
		return nil, status.Error(codes.InvalidArgument, "txn has no keys")
	}
	f := s.n.f
	f.mu.Lock()
	shard := f.ring.Shard(keys[0])
	for _, k := range keys {
		if err := checkKey(k); err != nil {
			f.mu.Unlock()
			return nil, err
		}
		if f.ring.Shard(k) != shard {
			f.mu.Unlock()
			return nil, status.Errorf(codes.InvalidArgument, "txn keys %q and %q are in different shards; use a hash tag", keys[0], k)
		}
	}
	f.mu.Unlock()
	resp, err := s.write(ctx, "Txn", r.Header, keys[0], func(shard uint64) (proto.Message, error) {
		ok := true
		for _, c := range r.Compare {
			ok = ok && f.compare(shard, c)
		}
		ops := r.Success
		if !ok {
			ops = r.Failure
		}
		out := &kvpb.TxnResponse{Succeeded: ok}
		for _, op := range ops {
			switch {
			case op.GetPut() != nil:
				f.put(shard, op.GetPut().Key, op.GetPut().Value)
				out.Responses = append(out.Responses, &kvpb.ResponseOp{Op: &kvpb.ResponseOp_Put{Put: &kvpb.PutResponse{}}})
			case op.GetDelete() != nil:
				d := &kvpb.DeleteResponse{}
				if f.del(shard, op.GetDelete().Key) != nil {
					d.Deleted = 1
				}
				out.Responses = append(out.Responses, &kvpb.ResponseOp{Op: &kvpb.ResponseOp_Delete{Delete: d}})
			case op.GetGet() != nil:
				g := &kvpb.GetResponse{}
				if kv := f.data[shard][string(op.GetGet().Key)]; kv != nil {
					g.Kv = proto.Clone(kv).(*kvpb.KeyValue)
				}
				out.Responses = append(out.Responses, &kvpb.ResponseOp{Op: &kvpb.ResponseOp_Get{Get: g}})
			}
		}
		out.Header = f.respHeader(shard, s.n.ID)
		return out, nil
	})
	if err != nil {
		return nil, err
	}
	return resp.(*kvpb.TxnResponse), nil
}

func opKey(op *kvpb.RequestOp) []byte {
	switch {
	case op.GetPut() != nil:
		return op.GetPut().Key
	case op.GetGet() != nil:
		return op.GetGet().Key
	case op.GetDelete() != nil:
		return op.GetDelete().Key
	}
	return nil
}

// compare evaluates c on shard; f.mu is held.
func (f *FakeCluster) compare(shard uint64, c *kvpb.Compare) bool {
	kv := f.data[shard][string(c.Key)]
	var order int
	switch c.Target {
	case kvpb.Compare_VALUE:
		if kv == nil {
			return false
		}
		order = bytes.Compare(kv.Value, c.Value)
	case kvpb.Compare_VERSION:
		order = cmp.Compare(kv.GetVersion(), c.Version)
	case kvpb.Compare_MOD:
		order = cmp.Compare(kv.GetModRevision(), c.ModRevision)
	case kvpb.Compare_CREATE:
		order = cmp.Compare(kv.GetCreateRevision(), c.CreateRevision)
	case kvpb.Compare_EXISTS:
		if (kv != nil) == c.Exists {
			order = 0
		} else {
			order = 1
		}
	}
	switch c.Result {
	case kvpb.Compare_EQUAL:
		return order == 0
	case kvpb.Compare_NOT_EQUAL:
		return order != 0
	case kvpb.Compare_GREATER:
		return order > 0
	case kvpb.Compare_LESS:
		return order < 0
	}
	return false
}

type clusterServer struct {
	kvpb.UnimplementedClusterServer
	n *FakeNode
}

func (s clusterServer) Map(ctx context.Context, _ *kvpb.MapRequest) (*kvpb.ClusterMap, error) {
	done, err := s.n.enter(ctx, "Map", false)
	defer done()
	if err != nil {
		return nil, err
	}
	s.n.f.mu.Lock()
	defer s.n.f.mu.Unlock()
	return proto.Clone(s.n.f.cmap).(*kvpb.ClusterMap), nil
}

func (s clusterServer) Status(ctx context.Context, _ *kvpb.StatusRequest) (*kvpb.StatusResponse, error) {
	done, err := s.n.enter(ctx, "Status", false)
	defer done()
	if err != nil {
		return nil, err
	}
	f := s.n.f
	f.mu.Lock()
	defer f.mu.Unlock()
	out := &kvpb.StatusResponse{Node: s.n.ID, Epoch: f.cmap.Epoch}
	for _, sh := range f.cmap.Shards {
		if !slices.Contains(sh.Replicas, s.n.ID) {
			continue
		}
		role := "follower"
		if f.leaders[sh.Id] == s.n.ID {
			role = "leader"
		}
		r := uint64(f.rev[sh.Id])
		out.Shards = append(out.Shards, &kvpb.ShardStatus{
			Shard: sh.Id, Leader: f.leaders[sh.Id], Term: 1, Commit: r, Applied: r,
			Role: role, Voters: slices.Clone(sh.Replicas),
		})
	}
	return out, nil
}

func (s clusterServer) MemberList(ctx context.Context, _ *kvpb.MemberListRequest) (*kvpb.MemberListResponse, error) {
	done, err := s.n.enter(ctx, "MemberList", false)
	defer done()
	if err != nil {
		return nil, err
	}
	f := s.n.f
	f.mu.Lock()
	defer f.mu.Unlock()
	out := &kvpb.MemberListResponse{Epoch: f.cmap.Epoch}
	for _, m := range f.cmap.Members {
		out.Members = append(out.Members, proto.Clone(m).(*kvpb.Member))
	}
	return out, nil
}

type healthServer struct {
	healthpb.UnimplementedHealthServer
	n *FakeNode
}

func (s healthServer) Check(ctx context.Context, _ *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	done, err := s.n.enter(ctx, "Check", false)
	defer done()
	if err != nil {
		return nil, err
	}
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}

package transport_test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/transport"
)

// waitTimeout bounds every wait for a condition; generous for -race on a
// loaded machine, while a passing run takes milliseconds per wait.
const waitTimeout = 15 * time.Second

// waitFor polls cond until it holds or the deadline passes. Polling a
// condition with a deadline is the synchronisation; there is no sleep that a
// test relies on for ordering.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	waitForOr(t, what, cond, func() string { return "" })
}

// waitForOr is waitFor with a diagnosis added to the failure.
func waitForOr(t *testing.T, what string, cond func() bool, diag func() string) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s%s", waitTimeout, what, diag())
		}
		<-tick.C
	}
}

type key struct{ shard, peer uint64 }

type snapReport struct {
	shard, peer uint64
	failed      bool
}

// recorder is a Handler that records what it is given.
type recorder struct {
	mu          sync.Mutex
	msgs        map[key][]uint64 // (shard, from) → indexes, in arrival order
	types       map[key][]raftpb.MessageType
	unreachable map[key]int // (shard, to) → reports
	snaps       []snapReport
	checks      map[uint64][]*peerpb.LeaderCheck // from → checks, in arrival order
	// onSnapshot serves HandleSnapshot; nil drains and accepts.
	onSnapshot func(shard uint64, m *raftpb.Message, next func() ([]*peerpb.SnapshotPair, error)) error
}

func newRecorder() *recorder {
	return &recorder{
		msgs:        make(map[key][]uint64),
		types:       make(map[key][]raftpb.MessageType),
		unreachable: make(map[key]int),
		checks:      make(map[uint64][]*peerpb.LeaderCheck),
	}
}

func (r *recorder) HandleLeaderCheck(from uint64, c *peerpb.LeaderCheck) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.checks[from] = append(r.checks[from], c)
}

func (r *recorder) leaderChecks(from uint64) []*peerpb.LeaderCheck {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*peerpb.LeaderCheck(nil), r.checks[from]...)
}

func (r *recorder) HandleMessage(shard uint64, m *raftpb.Message) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k := key{shard, m.GetFrom()}
	r.msgs[k] = append(r.msgs[k], m.GetIndex())
	r.types[k] = append(r.types[k], m.GetType())
}

func (r *recorder) HandleSnapshot(shard uint64, m *raftpb.Message, next func() ([]*peerpb.SnapshotPair, error)) error {
	r.mu.Lock()
	f := r.onSnapshot
	r.mu.Unlock()
	if f != nil {
		return f(shard, m, next)
	}
	for {
		if _, err := next(); errors.Is(err, io.EOF) {
			return nil
		} else if err != nil {
			return err
		}
	}
}

func (r *recorder) ReportUnreachable(shard, peer uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.unreachable[key{shard, peer}]++
}

func (r *recorder) ReportSnapshot(shard, peer uint64, failed bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.snaps = append(r.snaps, snapReport{shard, peer, failed})
}

func (r *recorder) received(shard, from uint64) []uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]uint64(nil), r.msgs[key{shard, from}]...)
}

func (r *recorder) unreachableCount(shard, to uint64) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.unreachable[key{shard, to}]
}

func (r *recorder) snapshotReports() []snapReport {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]snapReport(nil), r.snaps...)
}

func (r *recorder) setOnSnapshot(f func(uint64, *raftpb.Message, func() ([]*peerpb.SnapshotPair, error)) error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.onSnapshot = f
}

// node is one transport with its own gRPC server on 127.0.0.1.
type node struct {
	id      uint64
	addr    string
	tr      *transport.Transport
	h       *recorder
	streams atomic.Int64 // inbound Stream RPCs seen by this node's servers

	mu  sync.Mutex
	srv *grpc.Server
}

// serve starts a gRPC server for the node on lis.
func (n *node) serve(lis net.Listener) {
	opts := append(transport.ServerOptions(), grpc.StreamInterceptor(
		func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
			if info.FullMethod == peerpb.Raft_Stream_FullMethodName {
				n.streams.Add(1)
			}
			return handler(srv, ss)
		}))
	srv := grpc.NewServer(opts...)
	n.tr.Register(srv)
	n.mu.Lock()
	n.srv = srv
	n.mu.Unlock()
	go srv.Serve(lis) //nolint:errcheck // returns when the server stops
}

// stopServer stops the node's gRPC server, as a crashed listener would.
func (n *node) stopServer() {
	n.mu.Lock()
	srv := n.srv
	n.mu.Unlock()
	srv.Stop()
}

// restartServer listens again on the node's address.
func (n *node) restartServer(t *testing.T) {
	t.Helper()
	var lis net.Listener
	waitFor(t, "listen again on "+n.addr, func() bool {
		var err error
		lis, err = net.Listen("tcp", n.addr)
		return err == nil
	})
	n.serve(lis)
}

// cluster starts one node per id, all knowing each other.
func cluster(t *testing.T, src transport.SnapshotSource, ids ...uint64) map[uint64]*node {
	t.Helper()
	return clusterWith(t, src, func(*transport.Config) {}, ids...)
}

func clusterWith(t *testing.T, src transport.SnapshotSource, tweak func(*transport.Config), ids ...uint64) map[uint64]*node {
	t.Helper()
	nodes := make(map[uint64]*node)
	for _, id := range ids {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		n := &node{id: id, addr: lis.Addr().String(), h: newRecorder()}
		cfg := transport.Config{NodeID: id, Handler: n.h, Snapshots: src}
		tweak(&cfg)
		n.tr = transport.New(cfg)
		n.serve(lis)
		nodes[id] = n
		t.Cleanup(func() {
			n.tr.Stop()
			n.stopServer()
		})
	}
	for _, a := range nodes {
		for _, b := range nodes {
			if a.id != b.id {
				a.tr.SetPeer(b.id, b.addr)
			}
		}
	}
	return nodes
}

// waitConnected waits until both sides of every pair have a stream up.
func waitConnected(t *testing.T, nodes map[uint64]*node) {
	t.Helper()
	waitFor(t, "all streams up", func() bool {
		for _, a := range nodes {
			st := a.tr.Stats()
			for _, b := range nodes {
				if a.id != b.id && !st.Peers[b.id].Connected {
					return false
				}
			}
		}
		return true
	})
}

func msg(typ raftpb.MessageType, from, to, index uint64) *raftpb.Message {
	return &raftpb.Message{
		Type:  typ.Enum(),
		From:  proto.Uint64(from),
		To:    proto.Uint64(to),
		Term:  proto.Uint64(1),
		Index: proto.Uint64(index),
	}
}

// fakeSource is an in-memory SnapshotSource: the storage package is built
// in parallel, and the transport only needs something that yields chunks.
type fakeSource struct {
	md      *raftpb.SnapshotMetadata
	chunks  [][]*peerpb.SnapshotPair
	openErr error // OpenSnapshot fails
	failAt  int   // Next fails at this chunk when > 0
	closed  atomic.Int64
}

func (s *fakeSource) OpenSnapshot(shard uint64) (transport.SnapshotReader, error) {
	if s.openErr != nil {
		return nil, fmt.Errorf("open shard %d: %w", shard, s.openErr)
	}
	return &fakeReader{s: s}, nil
}

type fakeReader struct {
	s *fakeSource
	i int
}

func (r *fakeReader) Metadata() *raftpb.SnapshotMetadata { return r.s.md }

func (r *fakeReader) Next() ([]*peerpb.SnapshotPair, error) {
	if r.s.failAt > 0 && r.i == r.s.failAt {
		return nil, errors.New("disk on fire")
	}
	if r.i == len(r.s.chunks) {
		return nil, io.EOF
	}
	r.i++
	return r.s.chunks[r.i-1], nil
}

func (r *fakeReader) Close() error { r.s.closed.Add(1); return nil }

// makeChunks builds n chunks of pairs with values of valueSize bytes,
// perChunk pairs each.
func makeChunks(n, perChunk, valueSize int) [][]*peerpb.SnapshotPair {
	chunks := make([][]*peerpb.SnapshotPair, n)
	for i := range chunks {
		for j := range perChunk {
			v := make([]byte, valueSize)
			v[0] = byte(i)
			chunks[i] = append(chunks[i], &peerpb.SnapshotPair{
				Bucket: []byte("kv"),
				Key:    fmt.Appendf(nil, "key-%04d-%04d", i, j),
				Value:  v,
			})
		}
	}
	return chunks
}

func chunkBytes(pairs []*peerpb.SnapshotPair) int {
	n := 0
	for _, p := range pairs {
		n += len(p.GetKey()) + len(p.GetValue()) + len(p.GetBucket())
	}
	return n
}

// proxy forwards TCP connections to a target and can go silent without
// closing anything, as a disconnected container network does: bytes are
// read and discarded, so neither side sees an error, only silence.
type proxy struct {
	lis    net.Listener
	target string
	silent atomic.Bool
	wg     sync.WaitGroup

	mu    sync.Mutex
	conns []net.Conn
}

func newProxy(t *testing.T, target string) *proxy {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{lis: lis, target: target}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *proxy) addr() string { return p.lis.Addr().String() }

func (p *proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.lis.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, u)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(c, u)
		go p.pipe(u, c)
	}
}

func (p *proxy) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if err != nil {
			if !p.silent.Load() { // a dead network carries no FIN either
				dst.Close()
			}
			return
		}
		if p.silent.Load() {
			continue
		}
		if _, err := dst.Write(buf[:n]); err != nil {
			src.Close()
			return
		}
	}
}

// resume forwards again. Connections opened while silent lost their
// handshakes and would wait out gRPC's connect timeout; closing them stands
// for the peer's kernel resetting them, and keeps the test short.
func (p *proxy) resume() {
	p.mu.Lock()
	conns := p.conns
	p.conns = nil
	p.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
	p.silent.Store(false)
}

func (p *proxy) connCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns)
}

func (p *proxy) close() {
	p.lis.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

package server

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/proto/kvpb"
)

// clientConn dials s's client port for the test's life.
func clientConn(t *testing.T, s *Server) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(s.ClientAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func kvClient(t *testing.T, s *Server) kvpb.KVClient { return kvpb.NewKVClient(clientConn(t, s)) }

func clusterClient(t *testing.T, s *Server) kvpb.ClusterClient {
	return kvpb.NewClusterClient(clientConn(t, s))
}

func put(k string) *kvpb.RequestOp {
	return &kvpb.RequestOp{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: []byte(k), Value: []byte("v")}}}
}

func TestBadInputGetsDocumentedCodes(t *testing.T) {
	c := newTestCluster(t, 3, 4, nil)
	var leader *Server
	waitFor(t, 10*time.Second, "a leader of shard 1", func() bool { leader = c.leaderOf(1); return leader != nil })
	kv := kvClient(t, leader)
	cl := clusterClient(t, leader)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	key1 := string(keysIn(leader, 1, 1)[0])
	key2 := string(keysIn(leader, 2, 1)[0])
	many := make([]*kvpb.RequestOp, 129)
	for i := range many {
		many[i] = put(fmt.Sprintf("{t}%d", i))
	}
	for _, tc := range []struct {
		name string
		call func() error
		code codes.Code
		msg  string
	}{
		{"empty key", func() error { _, err := kv.Put(ctx, &kvpb.PutRequest{Value: []byte("v")}); return err }, codes.InvalidArgument, "empty key"},
		{"oversized key", func() error {
			_, err := kv.Put(ctx, &kvpb.PutRequest{Key: bytes.Repeat([]byte("k"), 4097), Value: []byte("v")})
			return err
		}, codes.InvalidArgument, "limit is 4096"},
		{"oversized value", func() error {
			_, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte(key1), Value: bytes.Repeat([]byte("v"), 1<<20+1)})
			return err
		}, codes.InvalidArgument, "limit is 1048576"},
		{"empty key get", func() error { _, err := kv.Get(ctx, &kvpb.GetRequest{}); return err }, codes.InvalidArgument, "empty key"},
		{"txn over 128 ops", func() error { _, err := kv.Txn(ctx, &kvpb.TxnRequest{Success: many}); return err }, codes.InvalidArgument, "limit is 128"},
		{"empty txn", func() error { _, err := kv.Txn(ctx, &kvpb.TxnRequest{}); return err }, codes.InvalidArgument, "empty transaction"},
		{"cross-shard txn", func() error {
			_, err := kv.Txn(ctx, &kvpb.TxnRequest{Success: []*kvpb.RequestOp{put(key1), put(key2)}})
			return err
		}, codes.InvalidArgument, "hash tag"},
		{"unknown shard", func() error { _, err := kv.Range(ctx, &kvpb.RangeRequest{Shard: 99}); return err }, codes.InvalidArgument, "unknown data shard 99"},
		{"meta shard range", func() error { _, err := kv.Range(ctx, &kvpb.RangeRequest{Shard: 0}); return err }, codes.InvalidArgument, "unknown data shard 0"},
		{"negative limit", func() error { _, err := kv.Range(ctx, &kvpb.RangeRequest{Shard: 1, Limit: -1}); return err }, codes.InvalidArgument, "negative"},
		{"member address of 1 MiB", func() error {
			_, err := cl.MemberAdd(ctx, &kvpb.MemberAddRequest{Member: &kvpb.Member{Id: 9, PeerAddr: strings.Repeat("h", 1<<20) + ":1"}})
			return err
		}, codes.InvalidArgument, "limit is 300"},
		{"member address without a port", func() error {
			_, err := cl.MemberAdd(ctx, &kvpb.MemberAddRequest{Member: &kvpb.Member{Id: 9, PeerAddr: "127.0.0.1"}})
			return err
		}, codes.InvalidArgument, "not HOST:PORT"},
		{"member client address with port 0", func() error {
			_, err := cl.MemberAdd(ctx, &kvpb.MemberAddRequest{Member: &kvpb.Member{Id: 9, PeerAddr: "127.0.0.1:1", ClientAddr: "127.0.0.1:0"}})
			return err
		}, codes.InvalidArgument, "1 to 65535"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if status.Code(err) != tc.code || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("got %v, want %v mentioning %q", err, tc.code, tc.msg)
			}
		})
	}
	// An error names the keys it is about, but never echoes what a
	// request carried: 100 keys of 4 KiB over several shards.
	long := make([]*kvpb.RequestOp, 100)
	for i := range long {
		long[i] = put(fmt.Sprintf("%d/%s", i, bytes.Repeat([]byte("k"), 4000)))
	}
	_, err := kv.Txn(ctx, &kvpb.TxnRequest{Success: long})
	if msg := status.Convert(err).Message(); status.Code(err) != codes.InvalidArgument || !strings.Contains(msg, "more") || len(msg) > 4<<10 {
		t.Fatalf("a cross-shard txn of long keys got %v (a message of %d bytes), want InvalidArgument naming a few keys in under 4 KiB", status.Code(err), len(msg))
	}
	// A cross-shard txn changed nothing.
	for _, k := range []string{key1, key2} {
		r, err := kv.Get(ctx, &kvpb.GetRequest{Key: []byte(k), Consistency: kvpb.Consistency_SERIALIZABLE})
		if err != nil {
			t.Fatal(err)
		}
		if r.GetKv() != nil {
			t.Fatalf("rejected cross-shard txn wrote %q", k)
		}
	}
}

// leaderAndFollower waits for a leader of shard 1 and returns it and
// another member.
func leaderAndFollower(t *testing.T, c *testCluster) (leader, follower *Server) {
	t.Helper()
	waitFor(t, 10*time.Second, "a leader of shard 1", func() bool { leader = c.leaderOf(1); return leader != nil })
	for _, s := range c.servers {
		if s != leader {
			return leader, s
		}
	}
	t.Fatal("a one-node cluster has no follower")
	return nil, nil
}

func TestStaleEpochAndNotLeaderDetails(t *testing.T) {
	leader, follower := leaderAndFollower(t, newTestCluster(t, 3, 2, nil))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	key := keysIn(leader, 1, 1)[0]

	_, err := kvClient(t, leader).Put(ctx, &kvpb.PutRequest{Header: &kvpb.RequestHeader{Epoch: 1}, Key: key, Value: []byte("v")})
	st := status.Convert(err)
	if st.Code() != codes.FailedPrecondition {
		t.Fatalf("stale epoch: got %v, want FailedPrecondition", err)
	}
	var se *kvpb.StaleEpoch
	for _, d := range st.Details() {
		if v, ok := d.(*kvpb.StaleEpoch); ok {
			se = v
		}
	}
	if se == nil || se.GetEpoch() != leader.epoch() {
		t.Fatalf("stale epoch detail %v, want epoch %d", st.Details(), leader.epoch())
	}

	waitFor(t, 5*time.Second, "follower to know the leader", func() bool { return follower.host.Node(1).Leader() != 0 })
	// A follower forwards a write to the leader, whose header answers.
	resp, err := kvClient(t, follower).Put(ctx, &kvpb.PutRequest{Key: key, Value: []byte("v")})
	if err != nil || resp.GetHeader().GetNode() != leader.cfg.NodeID {
		t.Fatalf("put on follower: %v, header %v; want the leader's (node %d) answer", err, resp.GetHeader(), leader.cfg.NodeID)
	}
	// A serializable read is served by the follower from local state.
	g, err := kvClient(t, follower).Get(ctx, &kvpb.GetRequest{Key: key, Consistency: kvpb.Consistency_SERIALIZABLE})
	if err != nil || g.GetHeader().GetNode() != follower.cfg.NodeID {
		t.Fatalf("serializable get on follower: %v, header %v", err, g.GetHeader())
	}
	// A linearizable one is forwarded.
	g, err = kvClient(t, follower).Get(ctx, &kvpb.GetRequest{Key: key})
	if err != nil || g.GetHeader().GetNode() != leader.cfg.NodeID || string(g.GetKv().GetValue()) != "v" {
		t.Fatalf("linearizable get on follower: %v, %v; want the leader's answer", err, g)
	}
	// A forwarded request is not forwarded again: a follower answers it
	// with the leader hint.
	_, err = forwardedKVClient(t, follower, leader).Put(ctx, &kvpb.PutRequest{Key: key, Value: []byte("v")})
	checkNotLeader(t, "forwarded put on follower", err, leader)
	// The peer port serves forwarded requests only.
	if _, err := peerKVClient(t, follower, nil).Get(ctx, &kvpb.GetRequest{Key: key}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("client call on the peer port: %v, want PermissionDenied", err)
	}
}

// forwardedKVClient calls s's peer port as member from would forward.
func forwardedKVClient(t *testing.T, s, from *Server) kvpb.KVClient {
	return peerKVClient(t, s, grpc.WithChainUnaryInterceptor(from.tagPeerCall))
}

func peerKVClient(t *testing.T, s *Server, opt grpc.DialOption) kvpb.KVClient {
	t.Helper()
	opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if opt != nil {
		opts = append(opts, opt)
	}
	conn, err := grpc.NewClient(s.PeerAddr(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return kvpb.NewKVClient(conn)
}

func TestRangePagesInKeyOrder(t *testing.T) {
	c := newTestCluster(t, 3, 1, nil)
	var leader *Server
	waitFor(t, 10*time.Second, "a leader of shard 1", func() bool { leader = c.leaderOf(1); return leader != nil })
	kv := kvClient(t, leader)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i := 0; i < 25; i++ {
		if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte(fmt.Sprintf("r/%02d", i)), Value: []byte("v")}); err != nil {
			t.Fatal(err)
		}
	}
	var got []string
	start := []byte("r/")
	for {
		r, err := kv.Range(ctx, &kvpb.RangeRequest{Shard: 1, Start: start, End: []byte("r0"), Limit: 10})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range r.GetKvs() {
			got = append(got, string(p.GetKey()))
		}
		if !r.GetMore() {
			break
		}
		start = append(bytes.Clone(r.GetKvs()[len(r.GetKvs())-1].GetKey()), 0)
	}
	if len(got) != 25 || got[0] != "r/00" || got[24] != "r/24" {
		t.Fatalf("paged range returned %v", got)
	}
	r, err := kv.Range(ctx, &kvpb.RangeRequest{Shard: 1, Start: []byte("r/"), End: []byte("r0"), CountOnly: true})
	if err != nil || r.GetCount() != 25 || len(r.GetKvs()) != 0 {
		t.Fatalf("count only: %v %v", r, err)
	}
}

// TestClientReachesMembersThroughGivenEndpoints: nodes advertise client
// addresses the client cannot resolve (as containers advertise their
// service names to a client on the host); a client given working
// endpoints still reaches every member.
func TestClientReachesMembersThroughGivenEndpoints(t *testing.T) {
	c := newTestCluster(t, 3, 4, func(cfg *Config) {
		cfg.AdvertiseClient = fmt.Sprintf("kvd%d.invalid:2379", cfg.NodeID)
	})
	cl := c.client()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i := 0; i < 20; i++ {
		k := []byte(fmt.Sprintf("adv/%d", i))
		if _, err := cl.Put(ctx, k, []byte("v")); err != nil {
			t.Fatalf("put through overridden endpoints: %v", err)
		}
		if _, err := cl.Get(ctx, k); err != nil {
			t.Fatalf("get through overridden endpoints: %v", err)
		}
	}
	st, err := cl.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range st {
		if ns.Err != nil {
			t.Errorf("node %d unreachable: %v", ns.ID, ns.Err)
		}
	}
}

// A Batch stream answers each item on its own, with the status its unary
// method would have given (details included), and counts it under that
// method's name.
func TestBatchAnswersEachItemOnItsOwn(t *testing.T) {
	leader, follower := leaderAndFollower(t, newTestCluster(t, 3, 2, nil))
	waitFor(t, 5*time.Second, "follower to know the leader", func() bool { return follower.host.Node(1).Leader() != 0 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	keys := keysIn(leader, 1, 2)
	key2 := keysIn(leader, 2, 1)[0]

	answers := func(s *Server, items ...*kvpb.BatchRequestItem) map[uint64]*kvpb.BatchResponseItem {
		t.Helper()
		stream, err := kvClient(t, s).Batch(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := stream.Send(&kvpb.BatchRequest{Items: items}); err != nil {
			t.Fatal(err)
		}
		if err := stream.CloseSend(); err != nil {
			t.Fatal(err)
		}
		got := map[uint64]*kvpb.BatchResponseItem{}
		for {
			resp, err := stream.Recv()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("recv: %v", err)
			}
			for _, it := range resp.GetItems() {
				got[it.GetId()] = it
			}
		}
		if len(got) != len(items) {
			t.Fatalf("%d answers to %d items: %v", len(got), len(items), got)
		}
		return got
	}
	putItem := func(id uint64, key []byte) *kvpb.BatchRequestItem {
		return &kvpb.BatchRequestItem{Id: id, Request: &kvpb.BatchRequestItem_Put{Put: &kvpb.PutRequest{Key: key, Value: []byte("v")}}}
	}

	got := answers(leader,
		putItem(1, keys[0]),
		putItem(2, nil),
		&kvpb.BatchRequestItem{Id: 3, Request: &kvpb.BatchRequestItem_Get{Get: &kvpb.GetRequest{Key: keys[1]}}},
		&kvpb.BatchRequestItem{Id: 4, Request: &kvpb.BatchRequestItem_Txn{Txn: &kvpb.TxnRequest{
			Success: []*kvpb.RequestOp{put(string(keys[0])), put(string(key2))}}}},
		&kvpb.BatchRequestItem{Id: 5},
	)
	if g := got[1]; g.GetError() != nil || g.GetPut().GetHeader().GetRevision() == 0 {
		t.Errorf("put: %v, want success with a revision", g)
	}
	if g := got[2]; codes.Code(g.GetError().GetCode()) != codes.InvalidArgument || !strings.Contains(g.GetError().GetMessage(), "empty key") {
		t.Errorf("put of an empty key: %v, want InvalidArgument", g)
	}
	if g := got[3]; g.GetError() != nil || g.GetGet() == nil || g.GetGet().GetKv() != nil {
		t.Errorf("get of a missing key: %v, want an empty answer", g)
	}
	if g := got[4]; codes.Code(g.GetError().GetCode()) != codes.InvalidArgument || !strings.Contains(g.GetError().GetMessage(), "hash tag") {
		t.Errorf("cross-shard txn: %v, want InvalidArgument", g)
	}
	if g := got[5]; codes.Code(g.GetError().GetCode()) != codes.InvalidArgument {
		t.Errorf("item without a request: %v, want InvalidArgument", g)
	}
	m := scrape(t, leader)
	for _, series := range []string{`kvd_requests_total{code="OK",method="Put"}`, `kvd_requests_total{code="InvalidArgument",method="Put"}`,
		`kvd_requests_total{code="OK",method="Get"}`, `kvd_requests_total{code="InvalidArgument",method="Txn"}`} {
		if !strings.Contains(m, series+" ") {
			t.Errorf("no %s after a batch", series)
		}
	}

	// A follower forwards a batched write to the leader, as a unary one.
	if g := answers(follower, putItem(7, keys[0]))[7]; g.GetError() != nil || g.GetPut().GetHeader().GetNode() != leader.cfg.NodeID {
		t.Errorf("batched put on follower: %v, want the leader's (node %d) answer", g, leader.cfg.NodeID)
	}
}

// checkNotLeader fails t unless err is Unavailable with a NotLeader detail
// naming leader's client address.
func checkNotLeader(t *testing.T, what string, err error, leader *Server) {
	t.Helper()
	st := status.Convert(err)
	var nl *kvpb.NotLeader
	for _, d := range st.Details() {
		if v, ok := d.(*kvpb.NotLeader); ok {
			nl = v
		}
	}
	if st.Code() != codes.Unavailable || nl == nil || nl.GetLeaderAddr() != leader.ClientAddr() {
		t.Fatalf("%s: %v (detail %v), want Unavailable naming %s", what, err, nl, leader.ClientAddr())
	}
}

// A call's metadata is bounded (maxHeaderBytes): a call carrying more is
// refused, and the node serves the next one.
func TestOversizedMetadataRefused(t *testing.T) {
	c := newTestCluster(t, 1, 1, nil)
	kv := kvClient(t, c.servers[0])
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	big := metadata.AppendToOutgoingContext(ctx, "x-pad", strings.Repeat("p", 2*maxHeaderBytes))
	if _, err := kv.Put(big, &kvpb.PutRequest{Key: []byte("k"), Value: []byte("v")}); err == nil {
		t.Fatalf("a call with %d bytes of metadata was served", 2*maxHeaderBytes)
	}
	if _, err := kv.Put(ctx, &kvpb.PutRequest{Key: []byte("k"), Value: []byte("v")}); err != nil {
		t.Fatalf("the call after: %v", err)
	}
}

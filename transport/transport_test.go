package transport_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/internal/testkit"
	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/transport"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func seq(from, to uint64) []uint64 {
	var s []uint64
	for i := from; i <= to; i++ {
		s = append(s, i)
	}
	return s
}

// Messages of several shards flow both ways between three nodes, in order
// per (shard, peer), over exactly one stream per pair dialed by the lower id.
func TestDeliveryAndOneStreamPerPair(t *testing.T) {
	nodes := cluster(t, nil, 1, 2, 3)
	waitConnected(t, nodes)

	const n = 200
	shards := []uint64{0, 1, 2, 3}
	for i := uint64(1); i <= n; i++ {
		for _, s := range shards {
			for _, a := range nodes {
				// One Send per shard with a message to each other peer,
				// as raftnode does with a Ready's messages.
				var msgs []*raftpb.Message
				for _, b := range nodes {
					if a.id != b.id {
						msgs = append(msgs, msg(raftpb.MsgApp, a.id, b.id, i))
					}
				}
				a.tr.Send(s, msgs)
			}
		}
	}
	want := seq(1, n)
	for _, b := range nodes {
		for _, a := range nodes {
			if a.id == b.id {
				continue
			}
			for _, s := range shards {
				waitFor(t, "delivery", func() bool { return len(b.h.received(s, a.id)) >= n })
				if got := b.h.received(s, a.id); !slices.Equal(got, want) {
					t.Fatalf("node %d shard %d from %d: got %v, want 1..%d in order", b.id, s, a.id, got, n)
				}
			}
		}
	}
	for id, want := range map[uint64]int64{1: 0, 2: 1, 3: 2} {
		if got := nodes[id].streams.Load(); got != want {
			t.Errorf("node %d accepted %d Stream RPCs, want %d (only lower ids dial, once)", id, got, want)
		}
	}
	for _, a := range nodes {
		for _, b := range nodes {
			for _, s := range shards {
				if c := a.h.unreachableCount(s, b.id); c != 0 {
					t.Errorf("node %d: %d unexpected unreachable reports for shard %d peer %d", a.id, c, s, b.id)
				}
			}
		}
	}
}

// Leader checks travel both ways on the pair's stream, in order with each
// other, and arrive intact.
func TestLeaderChecks(t *testing.T) {
	nodes := cluster(t, nil, 1, 2)
	waitConnected(t, nodes)
	const n = 50
	for _, pair := range [][2]uint64{{1, 2}, {2, 1}} { // dialer and acceptor side
		a, b := nodes[pair[0]], nodes[pair[1]]
		for i := uint64(1); i <= n; i++ {
			a.tr.SendLeaderCheck(b.id, &peerpb.LeaderCheck{Id: i, Reply: i%2 == 0, Shards: []uint64{i, i + 1}, Terms: []uint64{7}})
		}
		waitFor(t, "checks delivered", func() bool { return len(b.h.leaderChecks(a.id)) >= n })
		got := b.h.leaderChecks(a.id)
		if len(got) != n {
			t.Fatalf("node %d got %d checks from %d, want %d", b.id, len(got), a.id, n)
		}
		for i, c := range got {
			id := uint64(i + 1)
			if c.GetId() != id || c.GetReply() != (id%2 == 0) || !slices.Equal(c.GetShards(), []uint64{id, id + 1}) || !slices.Equal(c.GetTerms(), []uint64{7}) {
				t.Fatalf("node %d: check %d from %d arrived as %v", b.id, id, a.id, c)
			}
		}
	}
	// A check for a peer the transport does not know is dropped, and
	// counted like any message to an unknown peer.
	before := nodes[1].tr.Stats().DroppedUnknownPeer
	nodes[1].tr.SendLeaderCheck(9, &peerpb.LeaderCheck{Id: 1})
	if got := nodes[1].tr.Stats().DroppedUnknownPeer - before; got != 1 {
		t.Fatalf("a check to an unknown peer counted %d drops, want 1", got)
	}
}

// Messages enqueued faster than one round trip leave in shared batches.
func TestBatching(t *testing.T) {
	nodes := clusterWith(t, nil, func(c *transport.Config) { c.QueueSize = 1 << 16 }, 1, 2)
	waitConnected(t, nodes)

	const total = 20000
	const shards = 8
	for _, pair := range [][2]uint64{{1, 2}, {2, 1}} { // dialer and acceptor side
		a, b := nodes[pair[0]], nodes[pair[1]]
		for i := uint64(1); i <= total; i++ {
			a.tr.Send(i%shards, []*raftpb.Message{msg(raftpb.MsgHeartbeat, a.id, b.id, i)})
		}
		waitForOr(t, "all messages delivered", func() bool {
			got := 0
			for s := range uint64(shards) {
				got += len(b.h.received(s, a.id))
			}
			if got > total {
				t.Fatalf("%d messages delivered, want %d", got, total)
			}
			return got == total
		}, func() string {
			return fmt.Sprintf("\nsender %+v\nreceiver %+v\nunreachable reports for shard 0: %v", a.tr.Stats(), b.tr.Stats(), a.h.unreachableCount(0, b.id))
		})
		st := a.tr.Stats()
		if st.MessagesSent != total {
			t.Fatalf("node %d: MessagesSent = %d, want %d", a.id, st.MessagesSent, total)
		}
		t.Logf("node %d → %d: %d messages in %d batches: %.1f messages per batch",
			a.id, b.id, st.MessagesSent, st.BatchesSent, st.MessagesPerBatch())
		if st.MessagesPerBatch() <= 1 {
			t.Errorf("node %d: %.2f messages per batch, want > 1", a.id, st.MessagesPerBatch())
		}
		if got := b.tr.Stats().MessagesReceived; got != total {
			t.Errorf("node %d: MessagesReceived = %d, want %d", b.id, got, total)
		}
	}
}

// When a peer's server goes away, messages to it are reported unreachable;
// when it listens again on the same address the stream comes back.
func TestReconnect(t *testing.T) {
	nodes := cluster(t, nil, 1, 2, 3)
	waitConnected(t, nodes)
	n1, n2, n3 := nodes[1], nodes[2], nodes[3]

	n2.stopServer() // kills the 1–2 stream; 2–3 is on node 3's server
	waitFor(t, "1→2 reported unreachable", func() bool {
		n1.tr.Send(7, []*raftpb.Message{msg(raftpb.MsgHeartbeat, 1, 2, 1)})
		return n1.h.unreachableCount(7, 2) > 0
	})
	waitFor(t, "2→1 reported unreachable", func() bool {
		n2.tr.Send(7, []*raftpb.Message{msg(raftpb.MsgHeartbeat, 2, 1, 1)})
		return n2.h.unreachableCount(7, 1) > 0
	})
	if st := n1.tr.Stats().Peers[2]; st.Dropped+st.SendFailures == 0 {
		t.Errorf("node 1 peer 2 stats %+v: want drops or send failures", st)
	}
	// The other pair is untouched.
	n2.tr.Send(8, []*raftpb.Message{msg(raftpb.MsgApp, 2, 3, 42)})
	waitFor(t, "2→3 during the outage", func() bool { return slices.Contains(n3.h.received(8, 2), 42) })

	n2.restartServer(t)
	waitConnected(t, nodes)
	n1.tr.Send(9, []*raftpb.Message{msg(raftpb.MsgApp, 1, 2, 100), msg(raftpb.MsgApp, 1, 2, 101)})
	n2.tr.Send(9, []*raftpb.Message{msg(raftpb.MsgApp, 2, 1, 200)})
	waitFor(t, "1→2 after reconnect", func() bool { return slices.Equal(n2.h.received(9, 1), []uint64{100, 101}) })
	waitFor(t, "2→1 after reconnect", func() bool { return slices.Equal(n1.h.received(9, 2), []uint64{200}) })
	if got := n2.streams.Load(); got != 2 {
		t.Errorf("node 2 accepted %d Stream RPCs over both servers, want 2", got)
	}
}

// A wrong address is refused by the node there; correcting it with SetPeer
// connects at once.
func TestAddressChange(t *testing.T) {
	nodes := cluster(t, nil, 1, 2, 3)
	n1, n2, n3 := nodes[1], nodes[2], nodes[3]
	waitConnected(t, nodes)

	n1.tr.SetPeer(2, n3.addr) // node 3 must refuse a stream meant for 2
	waitFor(t, "node 3 refusing node 1's stream for node 2", func() bool { return n3.streams.Load() >= 3 })
	if n1.tr.Stats().Peers[2].Connected {
		t.Fatal("node 1 connected to node 2 through node 3's address")
	}
	n1.tr.SetPeer(2, n2.addr)
	n1.tr.SetPeer(2, n2.addr) // idempotent
	waitConnected(t, nodes)
	n1.tr.Send(4, []*raftpb.Message{msg(raftpb.MsgApp, 1, 2, 5)})
	waitFor(t, "1→2 at the corrected address", func() bool { return slices.Equal(n2.h.received(4, 1), []uint64{5}) })
}

// A 10 MiB snapshot streams in 1 MiB chunks to a receiver that pulls them one
// at a time, with the reader's metadata in the header, while heartbeats keep
// flowing on the stream.
func TestSnapshot(t *testing.T) {
	src := &fakeSource{
		md: &raftpb.SnapshotMetadata{
			Index:     proto.Uint64(1000),
			Term:      proto.Uint64(5),
			ConfState: &raftpb.ConfState{Voters: []uint64{1, 2}},
		},
		chunks: makeChunks(10, 16, 64<<10), // 10 × 1 MiB
	}
	nodes := cluster(t, src, 1, 2)
	waitConnected(t, nodes)
	n1, n2 := nodes[1], nodes[2]

	var (
		header  *raftpb.Message
		sizes   []int // per next() call
		started = make(chan struct{})
		release = make(chan struct{})
	)
	n2.h.setOnSnapshot(func(shard uint64, m *raftpb.Message, next func() ([]*peerpb.SnapshotPair, error)) error {
		header = m
		for {
			pairs, err := next()
			if errors.Is(err, io.EOF) {
				return nil
			}
			if err != nil {
				return err
			}
			sizes = append(sizes, chunkBytes(pairs))
			if len(sizes) == 1 {
				close(started)
				<-release // a slow installer: the sender stalls on flow control
			}
		}
	})

	snap := msg(raftpb.MsgSnap, 1, 2, 0)
	snap.Snapshot = &raftpb.Snapshot{Metadata: &raftpb.SnapshotMetadata{Index: proto.Uint64(10), Term: proto.Uint64(1)}}
	n1.tr.Send(5, []*raftpb.Message{snap})
	waitFor(t, "snapshot started", func() bool {
		select {
		case <-started:
			return true
		default:
			return false
		}
	})

	// The snapshot is stuck mid-stream; heartbeats both ways still arrive.
	n1.tr.Send(5, []*raftpb.Message{msg(raftpb.MsgHeartbeat, 1, 2, 1)})
	n2.tr.Send(5, []*raftpb.Message{msg(raftpb.MsgHeartbeatResp, 2, 1, 1)})
	waitFor(t, "heartbeat during snapshot", func() bool { return len(n2.h.received(5, 1)) == 1 })
	waitFor(t, "heartbeat response during snapshot", func() bool { return len(n1.h.received(5, 2)) == 1 })
	if got := n1.h.snapshotReports(); len(got) != 0 {
		t.Fatalf("snapshot reported before the receiver finished: %v", got)
	}

	close(release)
	waitFor(t, "snapshot report", func() bool { return len(n1.h.snapshotReports()) == 1 })
	if got, want := n1.h.snapshotReports()[0], (snapReport{5, 2, false}); got != want {
		t.Fatalf("ReportSnapshot = %+v, want %+v", got, want)
	}
	md := header.GetSnapshot().GetMetadata()
	if header.GetType() != raftpb.MsgSnap || md.GetIndex() != 1000 || md.GetTerm() != 5 ||
		!slices.Equal(md.GetConfState().GetVoters(), []uint64{1, 2}) {
		t.Errorf("received header %v: want MsgSnap with the reader's metadata (index 1000, term 5, voters 1,2)", header)
	}
	if len(sizes) != len(src.chunks) {
		t.Fatalf("receiver pulled %d chunks, want %d (one per next call)", len(sizes), len(src.chunks))
	}
	total := 0
	for i, s := range sizes {
		if want := chunkBytes(src.chunks[i]); s != want {
			t.Errorf("chunk %d: %d bytes, want %d", i, s, want)
		}
		total += s
	}
	if total < 10<<20 {
		t.Errorf("received %d bytes, want ≥ 10 MiB", total)
	}
	if src.closed.Load() != 1 {
		t.Errorf("reader closed %d times, want 1", src.closed.Load())
	}
	if st := n2.tr.Stats(); st.SnapshotsReceived != 1 {
		t.Errorf("SnapshotsReceived = %d, want 1", st.SnapshotsReceived)
	}

	// The acceptor side sends snapshots too: they dial the address
	// directly, not over the stream the other side owns.
	n2.h.setOnSnapshot(nil)
	n1.h.setOnSnapshot(nil)
	back := msg(raftpb.MsgSnap, 2, 1, 0)
	back.Snapshot = &raftpb.Snapshot{Metadata: &raftpb.SnapshotMetadata{Index: proto.Uint64(10)}}
	n2.tr.Send(6, []*raftpb.Message{back})
	waitFor(t, "snapshot 2→1 report", func() bool { return len(n2.h.snapshotReports()) == 1 })
	if got, want := n2.h.snapshotReports()[0], (snapReport{6, 1, false}); got != want {
		t.Fatalf("ReportSnapshot = %+v, want %+v", got, want)
	}
}

// shardSource picks a fakeSource per shard.
type shardSource map[uint64]*fakeSource

func (s shardSource) OpenSnapshot(shard uint64) (transport.SnapshotReader, error) {
	return s[shard].OpenSnapshot(shard)
}

// Every way a snapshot can fail ends in ReportSnapshot(failed=true).
func TestSnapshotFailures(t *testing.T) {
	md := &raftpb.SnapshotMetadata{Index: proto.Uint64(50), Term: proto.Uint64(2)}
	src := shardSource{
		1: {md: md, openErr: errors.New("no such shard")},
		2: {md: md, chunks: makeChunks(5, 4, 1024), failAt: 2},
		3: {md: md, chunks: makeChunks(5, 4, 1024)},
	}
	nodes := cluster(t, src, 1, 2)
	waitConnected(t, nodes)
	n1, n2 := nodes[1], nodes[2]

	var mu sync.Mutex
	installed := map[uint64]bool{} // shards whose snapshot the receiver read to the end
	n2.h.setOnSnapshot(func(shard uint64, m *raftpb.Message, next func() ([]*peerpb.SnapshotPair, error)) error {
		if shard == 3 {
			return errors.New("installer refuses")
		}
		for {
			_, err := next()
			if errors.Is(err, io.EOF) {
				mu.Lock()
				installed[shard] = true
				mu.Unlock()
				return nil
			}
			if err != nil {
				return err
			}
		}
	})

	for shard := uint64(1); shard <= 3; shard++ {
		n1.tr.Send(shard, []*raftpb.Message{msg(raftpb.MsgSnap, 1, 2, 0)})
	}
	n1.tr.Send(4, []*raftpb.Message{msg(raftpb.MsgSnap, 1, 9, 0)}) // unknown peer
	waitFor(t, "four snapshot reports", func() bool { return len(n1.h.snapshotReports()) == 4 })
	got := n1.h.snapshotReports()
	slices.SortFunc(got, func(a, b snapReport) int { return int(a.shard) - int(b.shard) })
	want := []snapReport{{1, 2, true}, {2, 2, true}, {3, 2, true}, {4, 9, true}}
	if !slices.Equal(got, want) {
		t.Fatalf("reports %v, want %v", got, want)
	}
	mu.Lock()
	defer mu.Unlock()
	// The reader failed mid-stream: the receiver sees the stream break (or
	// never gets to its handler), never an io.EOF that would let it
	// install a partial state.
	if installed[2] {
		t.Error("receiver installed a snapshot whose reader failed midway")
	}
	for shard, s := range src {
		if shard != 1 && s.closed.Load() != 1 {
			t.Errorf("shard %d: reader closed %d times, want 1", shard, s.closed.Load())
		}
	}
	if st := n1.tr.Stats(); st.SnapshotsFailed != 4 || st.SnapshotsSent != 0 {
		t.Errorf("stats: %d failed, %d sent; want 4, 0", st.SnapshotsFailed, st.SnapshotsSent)
	}
}

// Messages to unknown peers, and beyond a full queue, are dropped and
// reported, without blocking Send.
func TestDropsAreReported(t *testing.T) {
	h := newRecorder()
	tr := transport.New(transport.Config{NodeID: 1, Handler: h, QueueSize: 1})
	defer tr.Stop()
	tr.Send(3, []*raftpb.Message{msg(raftpb.MsgApp, 1, 9, 1)})
	if h.unreachableCount(3, 9) != 1 {
		t.Errorf("unknown peer: want one unreachable report")
	}
	// A peer whose address answers nothing: the sender cannot send, so
	// everything is dropped one way or the other, never queued unboundedly.
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	tr.SetPeer(2, addr)
	for i := range uint64(100) {
		tr.Send(3, []*raftpb.Message{msg(raftpb.MsgApp, 1, 2, i)})
	}
	waitFor(t, "all 100 reported", func() bool { return h.unreachableCount(3, 2) >= 1 })
	waitFor(t, "all 100 dropped", func() bool { return tr.Stats().Peers[2].Dropped == 100 })
	if st := tr.Stats(); st.DroppedUnknownPeer != 1 {
		t.Errorf("DroppedUnknownPeer = %d, want 1", st.DroppedUnknownPeer)
	}
}

// Stop is idempotent, safe concurrently, and leaves no goroutine behind
// (goleak checks after all tests).
func TestStop(t *testing.T) {
	nodes := cluster(t, nil, 1, 2)
	waitConnected(t, nodes)
	n1 := nodes[1]

	var wg sync.WaitGroup
	for range 3 {
		wg.Go(n1.tr.Stop)
	}
	wg.Wait()
	n1.tr.Stop()
	// After Stop: no panic, no block, nothing delivered.
	n1.tr.Send(1, []*raftpb.Message{msg(raftpb.MsgApp, 1, 2, 1), msg(raftpb.MsgSnap, 1, 2, 0)})
	n1.tr.SetPeer(3, "127.0.0.1:1")
	if st := n1.tr.Stats(); st.Peers[2].Connected {
		t.Error("node 1 still connected after Stop")
	}
	// The other side notices the stream is gone.
	waitFor(t, "node 2 sees node 1 gone", func() bool { return !nodes[2].tr.Stats().Peers[1].Connected })

	// A transport that never had a peer stops too.
	idle := transport.New(transport.Config{NodeID: 7, Handler: newRecorder()})
	idle.Stop()
	idle.Stop()
}

// A link that goes silent (packets lost, connections still open) is noticed
// by both sides in seconds, and the stream comes back when the link does.
func TestDeadLinkDetected(t *testing.T) {
	nodes := cluster(t, nil, 1, 2)
	n1, n2 := nodes[1], nodes[2]
	px := newProxy(t, n2.addr)
	n1.tr.SetPeer(2, px.addr())
	// Once the proxy carries a connection, node 1's old direct one is
	// closed (the dial loop closes it before dialing the new address).
	waitFor(t, "stream through the proxy", func() bool {
		return px.connCount() > 0 && n1.tr.Stats().Peers[2].Connected
	})
	waitConnected(t, nodes)

	before := n2.streams.Load()
	px.silent.Store(true)
	start := time.Now()
	waitFor(t, "both sides to notice the dead link", func() bool {
		return !n1.tr.Stats().Peers[2].Connected && !n2.tr.Stats().Peers[1].Connected
	})
	t.Logf("dead link noticed by both sides after %v", time.Since(start).Round(time.Millisecond))
	if d := time.Since(start); d > 8*time.Second {
		t.Errorf("dead link noticed after %v, want seconds", d)
	}
	px.resume()
	waitConnected(t, nodes)
	if n2.streams.Load() <= before {
		t.Error("no new stream after the link came back")
	}
	n1.tr.Send(1, []*raftpb.Message{msg(raftpb.MsgApp, 1, 2, 3)})
	waitFor(t, "1→2 after the link came back", func() bool { return slices.Contains(n2.h.received(1, 1), 3) })
}

// A quiet link stays up: idle pings keep the idle timeout from firing.
func TestQuietLinkStaysUp(t *testing.T) {
	nodes := cluster(t, nil, 1, 2)
	waitConnected(t, nodes)
	deadline := time.Now().Add(5 * time.Second) // longer than the idle timeout
	waitFor(t, "a quiet interval", func() bool {
		for _, n := range nodes {
			if !n.tr.Stats().Peers[3-n.id].Connected {
				t.Fatalf("node %d dropped a healthy idle link", n.id)
			}
		}
		return time.Now().After(deadline)
	})
	if got := nodes[2].streams.Load(); got != 1 {
		t.Errorf("node 2 accepted %d streams on a quiet healthy link, want 1", got)
	}
}

// A stream from a node that should not dial is refused, and so is one
// claiming the id of a node whose stream is live, from another process:
// the live stream keeps working.
func TestStreamFromAnotherProcessRefused(t *testing.T) {
	nodes := cluster(t, nil, 1, 2)
	waitConnected(t, nodes)
	n1, n2 := nodes[1], nodes[2]

	cc, err := grpc.NewClient(n2.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	client := peerpb.NewRaftClient(cc)
	open := func(from uint64, nonce string) error {
		sctx := metadata.AppendToOutgoingContext(ctx, "kvd-cluster-id", "0", "kvd-from", fmt.Sprintf("%x", from),
			"kvd-to", "2", "kvd-nonce", nonce)
		s, err := client.Stream(sctx)
		if err != nil {
			return err
		}
		_ = s.Send(&peerpb.Batch{From: from, To: 2})
		_, err = s.Recv()
		return err
	}
	if err := open(3, "abc"); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("stream from a higher id: got %v, want FailedPrecondition", err)
	}
	if err := open(1, "abc"); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "second process") {
		t.Fatalf("stream posing as node 1 from another process: got %v, want FailedPrecondition naming a second process", err)
	}
	n2.tr.Send(1, []*raftpb.Message{msg(raftpb.MsgApp, 2, 1, 8)})
	waitFor(t, "2→1 on the original stream", func() bool { return slices.Contains(n1.h.received(1, 2), 8) })
	if got := n2.streams.Load(); got != 3 { // real, refused twice
		t.Errorf("node 2 saw %d streams, want 3", got)
	}
}

// TestPeerOutageLoggedOnce: a peer that goes away is reported once by
// each side, at WARN, however often the dialer retries, and once at INFO
// when it is back; nothing else is logged at WARN or above.
func TestPeerOutageLoggedOnce(t *testing.T) {
	logs := map[uint64]*testkit.LogBuffer{1: {}, 2: {}}
	nodes := clusterWith(t, nil, func(c *transport.Config) {
		c.Logger = slog.New(slog.NewTextHandler(logs[c.NodeID], &slog.HandlerOptions{Level: slog.LevelInfo}))
	}, 1, 2)
	waitConnected(t, nodes)
	n1, n2 := nodes[1], nodes[2]
	count := func(id uint64, s string) int { return strings.Count(logs[id].String(), s) }

	n2.stopServer()
	waitFor(t, "both sides report the outage", func() bool {
		// Traffic during the outage: every send finds no stream.
		n1.tr.Send(7, []*raftpb.Message{msg(raftpb.MsgHeartbeat, 1, 2, 1)})
		return n1.h.unreachableCount(7, 2) > 3 &&
			count(1, `msg="transport: peer unreachable" node=1 peer=2`) == 1 &&
			count(2, `msg="transport: peer unreachable" node=2 peer=1`) == 1
	})
	n2.restartServer(t)
	waitConnected(t, nodes)
	waitFor(t, "both sides report the peer back", func() bool {
		return count(1, `msg="transport: peer reachable again" node=1 peer=2`) == 1 &&
			count(2, `msg="transport: peer reachable again" node=2 peer=1`) == 1
	})
	for id, l := range logs {
		if n := count(id, "peer unreachable"); n != 1 {
			t.Errorf("node %d reported the outage %d times, want once:\n%s", id, n, l)
		}
		if n := count(id, "level=WARN") + count(id, "level=ERROR"); n != 1 {
			t.Errorf("node %d logged %d lines at WARN or above, want 1:\n%s", id, n, l)
		}
	}
}

// A dialer that opens a stream and sends nothing is dropped after the
// handshake timeout: it must not hold a stream of the acceptor's for as
// long as its connection answers pings.
func TestSilentDialerDropped(t *testing.T) {
	nodes := cluster(t, nil, 2)
	cc, err := grpc.NewClient(nodes[2].addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	sctx := metadata.AppendToOutgoingContext(ctx, "kvd-cluster-id", "0", "kvd-from", "1", "kvd-to", "2", "kvd-nonce", "5")
	s, err := peerpb.NewRaftClient(cc).Stream(sctx)
	if err != nil {
		t.Fatal(err)
	}
	// No hello. The acceptor answers the identity, then gives up.
	for {
		_, err := s.Recv()
		if err == nil {
			continue
		}
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "nothing received") {
			t.Fatalf("silent stream ended with %v, want InvalidArgument saying nothing was received", err)
		}
		return
	}
}

package transport_test

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/internal/testkit"
	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/transport"
)

// A node of a release whose peer protocol this one does not speak is
// refused whichever side dials, on streams and snapshots alike; both sides
// log one line that names both versions, and no message crosses.
func TestUnknownPeerProtocolRefused(t *testing.T) {
	future := transport.Protocols{Min: transport.PeerProtocol + 2, Max: transport.PeerProtocol + 2}
	src := &fakeSource{md: &raftpb.SnapshotMetadata{Index: proto.Uint64(10), Term: proto.Uint64(1)}, chunks: makeChunks(1, 1, 8)}
	for _, tc := range []struct {
		name   string
		future uint64 // the node of the newer release; node 1 dials
	}{{"newer node dials", 1}, {"newer node is dialed", 2}} {
		t.Run(tc.name, func(t *testing.T) {
			var logs [3]testkit.LogBuffer
			cfg := func(id uint64) transport.Config {
				c := transport.Config{NodeID: id, ClusterID: 7, Logger: logTo(&logs[id]), Snapshots: src}
				if id == tc.future {
					c = transport.WithProtocols(c, future)
				}
				return c
			}
			n1, n2 := startNode(t, nil, cfg(1)), startNode(t, nil, cfg(2))
			n1.tr.SetPeer(2, n2.addr)
			n2.tr.SetPeer(1, n1.addr)
			old := 3 - tc.future
			// The acceptor refuses and names the dialer's versions first;
			// the dialer logs the acceptor's answer.
			dialer, acceptor := transport.Spoken().String(), future.String()
			if tc.future == 1 {
				dialer, acceptor = acceptor, dialer
			}
			want := []string{"node 1 at ", "speaks peer protocol " + dialer + "; node 2 speaks " + acceptor}
			waitForOr(t, "the refusal logged at ERROR on both sides", func() bool {
				return logs[1].HasError(append(want, "peer=2")...) && logs[2].HasError(append(want, "from=1")...)
			}, func() string { return "\nnode 1:\n" + logs[1].String() + "\nnode 2:\n" + logs[2].String() })

			// A snapshot, which travels on a connection of its own, is
			// refused too.
			snap := msg(raftpb.MsgSnap, old, tc.future, 0)
			snap.Snapshot = &raftpb.Snapshot{Metadata: &raftpb.SnapshotMetadata{Index: proto.Uint64(10), Term: proto.Uint64(1)}}
			sender := map[uint64]*node{1: n1, 2: n2}[old]
			sender.tr.Send(3, []*raftpb.Message{snap})
			waitFor(t, "the snapshot reported failed", func() bool {
				r := sender.h.snapshotReports()
				return len(r) == 1 && r[0].failed
			})
			if !logs[tc.future].HasError("refused a peer's snapshot", "speaks peer protocol") && !logs[tc.future].HasError("peer snapshot refused", "speaks peer protocol") {
				t.Fatalf("the snapshot's refusal is not logged on the newer node:\n%s", logs[tc.future].String())
			}

			n1.tr.Send(1, []*raftpb.Message{msg(raftpb.MsgApp, 1, 2, 5)})
			n2.tr.Send(1, []*raftpb.Message{msg(raftpb.MsgApp, 2, 1, 5)})
			if n1.tr.Stats().Peers[2].Connected || n2.tr.Stats().Peers[1].Connected {
				t.Fatal("a link between nodes without a common peer protocol is up")
			}
			if len(n1.h.received(1, 2))+len(n2.h.received(1, 1))+len(n2.h.received(3, 1))+len(n1.h.received(3, 2)) != 0 {
				t.Fatal("a message crossed between nodes without a common peer protocol")
			}
		})
	}
}

// A node of a build from before versions announces none and checks none;
// it speaks version 1, so this build accepts it whichever side dials, and
// messages flow both ways: a rolling restart from such a build works.
func TestUnversionedPeerAccepted(t *testing.T) {
	for _, tc := range []struct {
		name string
		old  uint64
	}{{"old node dials", 1}, {"old node is dialed", 2}} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := func(id uint64) transport.Config {
				c := transport.Config{NodeID: id, ClusterID: 7}
				if id == tc.old {
					c = transport.WithProtocols(c, transport.Protocols{})
				}
				return c
			}
			n1, n2 := startNode(t, nil, cfg(1)), startNode(t, nil, cfg(2))
			n1.tr.SetPeer(2, n2.addr)
			n2.tr.SetPeer(1, n1.addr)
			waitConnected(t, map[uint64]*node{1: n1, 2: n2})
			n1.tr.Send(1, []*raftpb.Message{msg(raftpb.MsgApp, 1, 2, 5)})
			n2.tr.Send(1, []*raftpb.Message{msg(raftpb.MsgApp, 2, 1, 6)})
			waitFor(t, "a message each way", func() bool {
				return len(n2.h.received(1, 1)) == 1 && len(n1.h.received(1, 2)) == 1
			})
		})
	}
}

// A node of a release that speaks versions 1..2 talks with one that speaks
// only 1: the ranges overlap, so a release adding a version can roll out
// one node at a time.
func TestOverlappingPeerProtocolsAccepted(t *testing.T) {
	next := transport.Protocols{Min: transport.PeerProtocol, Max: transport.PeerProtocol + 1}
	n1 := startNode(t, nil, transport.WithProtocols(transport.Config{NodeID: 1, ClusterID: 7}, next))
	n2 := startNode(t, nil, transport.Config{NodeID: 2, ClusterID: 7})
	n1.tr.SetPeer(2, n2.addr)
	n2.tr.SetPeer(1, n1.addr)
	waitConnected(t, map[uint64]*node{1: n1, 2: n2})
	n2.tr.Send(1, []*raftpb.Message{msg(raftpb.MsgApp, 2, 1, 6)})
	waitFor(t, "node 2's message at node 1", func() bool { return len(n1.h.received(1, 2)) == 1 })
}

// futureAcceptor answers Raft.Stream as a node of a newer release that
// leaves the version check to the dialer would: a header announcing only
// its own version, and a hello.
type futureAcceptor struct {
	peerpb.UnimplementedRaftServer
	version uint32
	opened  chan struct{}
}

func (f *futureAcceptor) Stream(stream peerpb.Raft_StreamServer) error {
	p := transport.Protocols{Min: f.version, Max: f.version}
	hdr := metadata.Join(metadata.Pairs("kvd-cluster-id", "7", "kvd-node-id", "2", "kvd-nonce", "1"), metadata.Pairs(p.Pairs()...))
	if err := stream.SendHeader(hdr); err != nil {
		return err
	}
	if err := stream.Send(&peerpb.Batch{From: 2, To: 1}); err != nil {
		return err
	}
	select {
	case f.opened <- struct{}{}:
	default:
	}
	for {
		if _, err := stream.Recv(); err != nil {
			return nil
		}
	}
}

// The dialer checks the acceptor's versions itself: an acceptor that
// answers with a version this node does not speak is not used, and the
// dialer logs why.
func TestDialerRefusesUnknownPeerProtocol(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fa := &futureAcceptor{version: transport.PeerProtocol + 2, opened: make(chan struct{}, 1)}
	srv := grpc.NewServer()
	peerpb.RegisterRaftServer(srv, fa)
	go srv.Serve(lis) //nolint:errcheck // returns when the server stops
	t.Cleanup(srv.Stop)

	var log1 testkit.LogBuffer
	n1 := startNode(t, nil, transport.Config{NodeID: 1, ClusterID: 7, Logger: logTo(&log1)})
	n1.tr.SetPeer(2, lis.Addr().String())
	want := fmt.Sprintf("node 2 at %s speaks peer protocol %d; node 1 speaks %s", lis.Addr(), fa.version, transport.Spoken())
	waitForOr(t, "the dialer's refusal", func() bool { return log1.HasError("peer=2", want) },
		func() string { return "\nnode 1:\n" + log1.String() })
	if n1.tr.Stats().Peers[2].Connected {
		t.Fatal("node 1 uses a stream to a node whose peer protocol it does not speak")
	}
}

// The announcement's edge cases: none is version 1, a range overlapping
// this build's agrees on the newest shared version, anything else is
// ErrProtocolVersion in one line that names both ranges.
func TestCheckProtocols(t *testing.T) {
	own := transport.Protocols{Min: 1, Max: 2}
	for _, tc := range []struct {
		md   metadata.MD
		want uint32 // 0: refused
		msg  string
	}{
		{metadata.MD{}, 1, ""},
		{metadata.Pairs("kvd-peer-protocol", "1"), 1, ""},
		{metadata.Pairs("kvd-peer-protocol", "2", "kvd-peer-protocol-min", "1"), 2, ""},
		{metadata.Pairs("kvd-peer-protocol", "5", "kvd-peer-protocol-min", "2"), 2, ""},
		{metadata.Pairs("kvd-peer-protocol", "3"), 0, "node 9 at 127.0.0.1:1 speaks peer protocol 3; node 4 speaks 1..2"},
		{metadata.Pairs("kvd-peer-protocol", "4", "kvd-peer-protocol-min", "3"), 0, "speaks peer protocol 3..4; node 4 speaks 1..2"},
		{metadata.Pairs("kvd-peer-protocol", "0"), 0, "an empty range"},
		{metadata.Pairs("kvd-peer-protocol", "two"), 0, `"two", not a version number`},
		{metadata.Pairs("kvd-peer-protocol-min", "1"), 0, "without kvd-peer-protocol"},
	} {
		v, err := transport.CheckProtocols(tc.md, own, 4, "node 9 at 127.0.0.1:1")
		if tc.want != 0 {
			if err != nil || v != tc.want {
				t.Errorf("%v: version %d, err %v; want %d", tc.md, v, err, tc.want)
			}
			continue
		}
		if !errors.Is(err, transport.ErrProtocolVersion) || !strings.Contains(err.Error(), tc.msg) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%v: err %v; want ErrProtocolVersion on one line with %q", tc.md, err, tc.msg)
		}
	}
}

package transport_test

import (
	"errors"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/internal/testkit"
	"github.com/kvd/kvd/transport"
)

// logTo returns a logger writing to l.
func logTo(l *testkit.LogBuffer) *slog.Logger { return slog.New(slog.NewTextHandler(l, nil)) }

// memIncarnations is an in-memory transport.Incarnations.
type memIncarnations struct {
	mu sync.Mutex
	m  map[uint64]uint64
}

func (m *memIncarnations) PeerIncarnation(id uint64) (uint64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.m[id], nil
}

func (m *memIncarnations) RecordPeerIncarnation(id, inc uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.m == nil {
		m.m = map[uint64]uint64{}
	}
	m.m[id] = inc
	return nil
}

// evictions records what Config.Evicted was given.
type evictions struct {
	mu   sync.Mutex
	errs []error
}

func (e *evictions) evicted(err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.errs = append(e.errs, err)
}

func (e *evictions) get() []error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]error(nil), e.errs...)
}

// startNode starts one transport on lis (a new loopback port when nil)
// and stops it when the test ends, unless stopped before.
func startNode(t *testing.T, lis net.Listener, cfg transport.Config) *node {
	t.Helper()
	if lis == nil {
		var err error
		if lis, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	n := &node{id: cfg.NodeID, addr: lis.Addr().String(), h: newRecorder()}
	cfg.Handler = n.h
	n.tr = transport.New(cfg)
	n.serve(lis)
	t.Cleanup(func() {
		n.tr.Stop()
		n.stopServer()
	})
	return n
}

// A second process started with an existing node id is refused, both
// sides log it, and the original node's link keeps working.
func TestSecondNodeWithSameIDRefused(t *testing.T) {
	var log2, logDup testkit.LogBuffer
	n1 := startNode(t, nil, transport.Config{NodeID: 1, ClusterID: 7})
	n2 := startNode(t, nil, transport.Config{NodeID: 2, ClusterID: 7, Logger: logTo(&log2)})
	n1.tr.SetPeer(2, n2.addr)
	n2.tr.SetPeer(1, n1.addr)
	waitConnected(t, map[uint64]*node{1: n1, 2: n2})

	dup := startNode(t, nil, transport.Config{NodeID: 1, ClusterID: 7, Logger: logTo(&logDup)})
	dup.tr.SetPeer(2, n2.addr)
	waitForOr(t, "both sides to log the refusal", func() bool {
		return log2.HasError("from=1", "second process") && logDup.HasError("peer=2", "second process")
	}, func() string { return "\nnode 2:\n" + log2.String() + "\nduplicate:\n" + logDup.String() })
	if dup.tr.Stats().Peers[2].Connected {
		t.Fatal("the duplicate node 1 got a stream to node 2")
	}
	for i := uint64(1); i <= 20; i++ {
		n2.tr.Send(1, []*raftpb.Message{msg(raftpb.MsgApp, 2, 1, i)})
	}
	waitFor(t, "node 2's messages at the original node 1", func() bool { return len(n1.h.received(1, 2)) == 20 })
	if got := dup.h.received(1, 2); len(got) != 0 {
		t.Fatalf("the duplicate node 1 received %v", got)
	}
	if n := n2.streams.Load(); n < 2 {
		t.Fatalf("node 2 saw %d streams; the duplicate never dialed", n)
	}
}

// A peer address that reaches another node is detected on both sides and
// the link is not used; so is a node of another cluster.
func TestWrongAddressDetected(t *testing.T) {
	var log1, log3, logOther testkit.LogBuffer
	n1 := startNode(t, nil, transport.Config{NodeID: 1, ClusterID: 7, Logger: logTo(&log1)})
	n3 := startNode(t, nil, transport.Config{NodeID: 3, ClusterID: 7, Logger: logTo(&log3)})
	other := startNode(t, nil, transport.Config{NodeID: 4, ClusterID: 8, Logger: logTo(&logOther)})
	n1.tr.SetPeer(2, n3.addr) // node 1 thinks node 2 is at node 3's address
	n1.tr.SetPeer(4, other.addr)
	waitForOr(t, "the wrong address logged on both sides", func() bool {
		return log1.HasError("peer=2", n3.addr, "reached node 3") && log3.HasError("from=1", "to=2", "reached node 3")
	}, func() string { return "\nnode 1:\n" + log1.String() + "\nnode 3:\n" + log3.String() })
	waitForOr(t, "the other cluster logged on both sides", func() bool {
		return log1.HasError("peer=4", "cluster 8") && logOther.HasError("from=1", "cluster 7")
	}, func() string { return "\nnode 1:\n" + log1.String() + "\nother:\n" + logOther.String() })
	n1.tr.Send(1, []*raftpb.Message{msg(raftpb.MsgApp, 1, 2, 5), msg(raftpb.MsgApp, 1, 4, 5)})
	st := n1.tr.Stats()
	if st.Peers[2].Connected || st.Peers[4].Connected {
		t.Fatalf("node 1 uses a link to the wrong node: %+v", st.Peers)
	}
	if got := n3.h.received(1, 1); len(got) != 0 {
		t.Fatalf("node 3 received node 1's messages for node 2: %v", got)
	}
	if got := other.h.received(1, 1); len(got) != 0 {
		t.Fatalf("the other cluster's node received %v", got)
	}
}

// A node restarted under its id with a new data dir (incarnation) is
// refused by a peer that knew the old one, whichever side dials, and is
// told so: Evicted fires on the new node only, with ErrNewDataDir.
func TestNewDataDirRefused(t *testing.T) {
	for _, tc := range []struct {
		name  string
		wiped uint64 // the node that comes back with a new data dir
	}{{"wiped node dials", 1}, {"wiped node is dialed", 2}} {
		t.Run(tc.name, func(t *testing.T) {
			var logs [3]testkit.LogBuffer
			var ev [3]evictions
			stores := [3]*memIncarnations{nil, {}, {}}
			cfg := func(id, inc uint64) transport.Config {
				return transport.Config{NodeID: id, ClusterID: 7, Incarnation: inc, Incarnations: stores[id],
					Evicted: ev[id].evicted, Logger: logTo(&logs[id])}
			}
			n1 := startNode(t, nil, cfg(1, 0x11))
			n2 := startNode(t, nil, cfg(2, 0x22))
			n1.tr.SetPeer(2, n2.addr)
			n2.tr.SetPeer(1, n1.addr)
			waitConnected(t, map[uint64]*node{1: n1, 2: n2})

			// The wiped node stops and comes back on its address with an
			// empty store and a new incarnation.
			old, keep := n1, n2
			if tc.wiped == 2 {
				old, keep = n2, n1
			}
			old.tr.Stop()
			old.stopServer()
			var lis net.Listener
			waitFor(t, "listen again on "+old.addr, func() bool {
				var err error
				lis, err = net.Listen("tcp", old.addr)
				return err == nil
			})
			stores[tc.wiped] = &memIncarnations{}
			back := startNode(t, lis, cfg(tc.wiped, 0x99))
			back.tr.SetPeer(keep.id, keep.addr)

			waitForOr(t, "the wiped node evicted, and the refusal logged at ERROR on both sides", func() bool {
				return len(ev[tc.wiped].get()) > 0 && logs[tc.wiped].HasError("new member") && logs[keep.id].HasError("new member")
			},
				func() string { return "\nwiped:\n" + logs[tc.wiped].String() + "\nkept:\n" + logs[keep.id].String() })
			err := ev[tc.wiped].get()[0]
			if !errors.Is(err, transport.ErrNewDataDir) || !strings.Contains(err.Error(), "new member") {
				t.Fatalf("eviction %v, want ErrNewDataDir saying it must rejoin as a new member", err)
			}
			if got := ev[keep.id].get(); len(got) != 0 {
				t.Fatalf("the node that kept its data dir was evicted: %v", got)
			}
			keep.tr.Send(1, []*raftpb.Message{msg(raftpb.MsgHeartbeat, keep.id, tc.wiped, 0)})
			if keep.tr.Stats().Peers[tc.wiped].Connected || back.tr.Stats().Peers[keep.id].Connected {
				t.Fatal("a link to the wiped node is up")
			}
			if got := back.h.received(1, keep.id); slices.Contains(got, 0) {
				t.Fatal("the wiped node received a heartbeat")
			}
		})
	}
}

// A raft message is delivered only as what its stream is: one naming
// another sender, or one of raft's local messages, is dropped and counted,
// on a stream and as a snapshot's header. Otherwise one member could act
// in Raft as another, whatever its certificate says.
func TestMessagesFromAnotherSenderDropped(t *testing.T) {
	src := &fakeSource{
		md:     &raftpb.SnapshotMetadata{Index: proto.Uint64(10), Term: proto.Uint64(1), ConfState: &raftpb.ConfState{Voters: []uint64{1, 2}}},
		chunks: makeChunks(1, 1, 16),
	}
	nodes := cluster(t, src, 1, 2)
	waitConnected(t, nodes)
	n1, n2 := nodes[1], nodes[2]

	forged := msg(raftpb.MsgApp, 3, 2, 1)                        // claims node 3
	local := msg(raftpb.MsgStorageAppendResp, 1, 2, 2)           // raft's own storage thread
	localFrom := msg(raftpb.MsgApp, raft.LocalApplyThread, 2, 3) // a local sender id
	n1.tr.Send(1, []*raftpb.Message{forged, local, localFrom, msg(raftpb.MsgApp, 1, 2, 4)})
	waitFor(t, "the honest message", func() bool { return slices.Contains(n2.h.received(1, 1), 4) })
	if got := n2.h.received(1, 1); !slices.Equal(got, []uint64{4}) {
		t.Fatalf("node 2 got indexes %v from node 1, want only 4", got)
	}
	if got := n2.h.received(1, 3); len(got) != 0 {
		t.Fatalf("node 2 delivered %v as from node 3", got)
	}
	if got := n2.h.received(1, raft.LocalApplyThread); len(got) != 0 {
		t.Fatalf("node 2 delivered %v as from raft's apply thread", got)
	}
	if got := n2.tr.Stats().BadMessages; got != 3 {
		t.Fatalf("BadMessages = %d, want 3", got)
	}

	snap := msg(raftpb.MsgSnap, 3, 2, 0)
	snap.Snapshot = &raftpb.Snapshot{Metadata: &raftpb.SnapshotMetadata{Index: proto.Uint64(10), Term: proto.Uint64(1)}}
	n1.tr.Send(5, []*raftpb.Message{snap})
	waitFor(t, "the forged snapshot reported", func() bool { return len(n1.h.snapshotReports()) == 1 })
	if got, want := n1.h.snapshotReports()[0], (snapReport{5, 2, true}); got != want {
		t.Fatalf("ReportSnapshot = %+v, want %+v", got, want)
	}
	if st := n2.tr.Stats(); st.SnapshotsReceived != 0 {
		t.Fatalf("node 2 took a snapshot claiming to be from node 3: %+v", st)
	}
}

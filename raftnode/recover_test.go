package raftnode

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/storage"
)

// nullSender loses every message: the replicas under test have no peers
// that answer.
type nullSender struct{}

func (nullSender) Send(uint64, []*pb.Message)                  {}
func (nullSender) SendLeaderCheck(uint64, *peerpb.LeaderCheck) {}

// testHost starts a Host over a fresh engine; both stop at cleanup.
func testHost(t *testing.T) (*Host, *storage.Store) {
	t.Helper()
	e, err := storage.OpenStore(t.TempDir(), 1, storage.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	h := NewHost(HostConfig{
		NodeID:       1,
		Store:        e,
		Apply:        func(*storage.Txn, uint64, []byte) any { return "applied" },
		TickInterval: 10 * time.Millisecond,
		ElectionTick: 10, HeartbeatTick: 1,
		SnapshotEntries: 10_000, SnapshotBytes: 64 << 20, MaxPendingProposals: 4096,
	})
	h.Start(nullSender{})
	t.Cleanup(func() {
		h.Stop()
		_ = e.Close()
	})
	return h, e
}

// A shard whose log ends before the commit index of its hard state (its
// storage lost entries this node had acknowledged) is refused with
// ErrLogBehind naming the shard, instead of raft panicking in
// NewRawNode.
func TestAddShardRefusesALogBehindItsHardState(t *testing.T) {
	h, e := testHost(t)
	s, err := e.CreateShard(7, &pb.ConfState{Voters: []uint64{1, 2, 3}})
	if err != nil {
		t.Fatal(err)
	}
	// Entries 2..5 were appended and committed, then lost: the hard state
	// survived them.
	hs := &pb.HardState{Term: proto.Uint64(2), Vote: proto.Uint64(2), Commit: proto.Uint64(5)}
	if err := s.Save(&storage.Update{HardState: hs, Sync: true}); err != nil {
		t.Fatal(err)
	}
	n, err := h.AddShard(7, []uint64{1, 2, 3})
	if !errors.Is(err, ErrLogBehind) || n != nil {
		t.Fatalf("AddShard = %v, %v; want ErrLogBehind", n, err)
	}
	for _, want := range []string{"shard 7", "commits index 5", "ends at index 1", "--join"} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("error %q does not say %q", err, want)
		}
	}
	if h.Node(7) != nil {
		t.Fatal("the refused replica is hosted")
	}
}

// A panic raised by raft while the loop processes one replica (here a
// leader's heartbeat commits beyond the replica's log, as when its log
// lost acknowledged entries) stops that replica with an error, and the
// host's other replicas keep running.
func TestRaftPanicStopsOnlyItsReplica(t *testing.T) {
	h, _ := testHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	short, err := h.AddShard(1, []uint64{1, 2})
	if err != nil {
		t.Fatal(err)
	}
	other, err := h.AddShard(2, []uint64{1})
	if err != nil {
		t.Fatal(err)
	}
	propose := func(n *Node) (any, error) {
		for {
			v, err := n.Propose(ctx, []byte("x"))
			if !errors.Is(err, ErrNotLeader) {
				return v, err
			}
			select { // a single voter elects itself within an election timeout
			case <-time.After(10 * time.Millisecond):
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
	}
	if v, err := propose(other); err != nil || v != "applied" {
		t.Fatalf("propose on shard 2 before: %v, %v", v, err)
	}

	// Shard 1's log ends at index 1; node 2 leads term 2 and says 10 is
	// committed.
	h.HandleMessage(1, &pb.Message{
		Type: pb.MsgHeartbeat.Enum(), From: proto.Uint64(2), To: proto.Uint64(1),
		Term: proto.Uint64(2), Commit: proto.Uint64(10),
	})
	select {
	case <-short.Done():
	case <-ctx.Done():
		t.Fatal("the replica raft panicked on did not stop")
	}
	err = short.Err()
	if !errors.Is(err, ErrRaftPanic) || !errors.Is(err, ErrLogBehind) || !strings.Contains(err.Error(), "shard 1") {
		t.Fatalf("Err = %v, want ErrRaftPanic and ErrLogBehind naming shard 1", err)
	}
	if _, err := short.Propose(ctx, []byte("x")); !errors.Is(err, ErrStopped) {
		t.Fatalf("propose on the stopped replica: %v, want ErrStopped", err)
	}

	if v, err := propose(other); err != nil || v != "applied" {
		t.Fatalf("propose on shard 2 after shard 1 stopped: %v, %v", v, err)
	}
	select {
	case <-other.Done():
		t.Fatalf("shard 2 stopped: %v", other.Err())
	default:
	}
	if other.Err() != nil {
		t.Fatalf("shard 2: %v", other.Err())
	}
}

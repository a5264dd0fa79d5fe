package transport

import (
	"context"
	"errors"
	"testing"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

func rmsg(typ raftpb.MessageType, index uint64, entries ...*raftpb.Entry) *raftpb.Message {
	return &raftpb.Message{Type: typ.Enum(), To: proto.Uint64(2), Index: proto.Uint64(index), Entries: entries}
}

// queueOnly returns a transport with peer 2 registered but no sender
// goroutine, so that what enqueue does can be read off the queues.
func queueOnly(t *testing.T, cfg Config) (*Transport, *peer) {
	t.Helper()
	cfg.NodeID = 1
	tr := New(cfg)
	t.Cleanup(tr.Stop)
	p := newPeer(context.Background(), 2, "127.0.0.1:1", tr.cfg.QueueSize)
	tr.mu.Lock()
	tr.mu.peers[2] = p
	tr.mu.Unlock()
	return tr, p
}

func appendOf(n int) outMsg {
	return outMsg{shard: 1, m: rmsg(raftpb.MsgApp, 0, &raftpb.Entry{Data: make([]byte, n)})}
}

// Appends are bounded by their entry bytes, not only by count; messages
// without entries still queue.
func TestQueueBoundedByEntryBytes(t *testing.T) {
	tr, p := queueOnly(t, Config{MaxQueueBytes: 3 << 20})
	for i := range 3 {
		if err := tr.enqueue(2, appendOf(1<<20)); err != nil {
			t.Fatalf("append %d of 1 MiB under a 3 MiB bound: %v", i, err)
		}
	}
	if err := tr.enqueue(2, appendOf(1<<20)); !errors.Is(err, errQueueFull) {
		t.Fatalf("a fourth 1 MiB append: %v, want errQueueFull", err)
	}
	if err := tr.enqueue(2, outMsg{shard: 1, m: rmsg(raftpb.MsgHeartbeat, 0)}); err != nil {
		t.Fatalf("a heartbeat with the appends' bound reached: %v", err)
	}
	if got := p.queuedBytes.Load(); got != 3<<20 {
		t.Fatalf("queued bytes %d, want %d", got, 3<<20)
	}
	// Taking an append frees its bytes for the next.
	for p.poll() != nil {
	}
	if got := p.queuedBytes.Load(); got != 0 {
		t.Fatalf("queued bytes after draining: %d, want 0", got)
	}
	if err := tr.enqueue(2, appendOf(1<<20)); err != nil {
		t.Fatalf("an append after draining: %v", err)
	}
}

// Heartbeats, votes and leader checks overtake queued appends; appends
// keep their own order, empty ones included.
func TestUrgentMessagesOvertakeAppends(t *testing.T) {
	tr, p := queueOnly(t, Config{})
	for i := range uint64(3) {
		m := outMsg{shard: 1, m: rmsg(raftpb.MsgApp, i, &raftpb.Entry{Data: make([]byte, 100)})}
		if err := tr.enqueue(2, m); err != nil {
			t.Fatal(err)
		}
	}
	empty := outMsg{shard: 1, m: rmsg(raftpb.MsgApp, 3)}
	if err := tr.enqueue(2, empty); err != nil {
		t.Fatal(err)
	}
	if err := tr.enqueue(2, outMsg{shard: 1, m: rmsg(raftpb.MsgHeartbeat, 0)}); err != nil {
		t.Fatal(err)
	}
	var got []string
	for m := p.poll(); m != nil; m = p.poll() {
		if m.m.GetType() == raftpb.MsgApp {
			got = append(got, "app"+string(rune('0'+m.m.GetIndex())))
		} else {
			got = append(got, m.m.GetType().String())
		}
	}
	want := []string{"MsgHeartbeat", "app0", "app1", "app2", "app3"}
	if len(got) != len(want) {
		t.Fatalf("order %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("order %v, want %v", got, want)
		}
	}
}

package storage

import (
	"errors"
	"syscall"
	"testing"

	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// Failed and Err tell other goroutines (the server's health) that the
// engine failed, without waiting for a write to be refused.
func TestEngineFailedIsObservable(t *testing.T) {
	e, _, s := walShard(t)
	select {
	case <-e.Failed():
		t.Fatal("Failed closed on a healthy engine")
	default:
	}
	if err := e.Err(); err != nil {
		t.Fatalf("Err on a healthy engine = %v", err)
	}
	breakWALSync(t, e)
	hs := &pb.HardState{Term: proto.Uint64(1), Commit: proto.Uint64(4)}
	err := s.Save(&Update{HardState: hs, Entries: []*pb.Entry{putEntry(4, 1, "c", "3")}, Sync: true})
	mustIs(t, err, ErrFailed)
	select {
	case <-e.Failed():
	default:
		t.Fatal("Failed not closed after a failed WAL sync")
	}
	mustIs(t, e.Err(), ErrFailed)
	if !errors.Is(e.Err(), syscall.EINVAL) {
		t.Fatalf("Err = %v, want the fdatasync failure", e.Err())
	}
	_ = e.Close()
}

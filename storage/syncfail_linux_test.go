package storage

import (
	"errors"
	"os"
	"syscall"
	"testing"

	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// breakWALSync puts /dev/null where the WAL's file descriptor was: writes
// to it still succeed, but fdatasync fails (EINVAL, a device that cannot
// sync), as it does on a disk that has gone bad. The WAL file keeps what
// was synced before.
func breakWALSync(t *testing.T, e *Engine) {
	t.Helper()
	null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	if err := syscall.Dup3(int(null.Fd()), int(e.wal.f.Fd()), syscall.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Fdatasync(int(e.wal.f.Fd())); err == nil {
		t.Fatal("fdatasync on /dev/null succeeded; the test cannot make the WAL's sync fail here")
	}
}

// A failed WAL fdatasync fails the save waiting for it and every later
// write, and commits nothing more to bbolt; what was acknowledged before
// is all there after a restart, and nothing of the failed save is.
func TestWALSyncFailureFailsTheEngine(t *testing.T) {
	e, path, s := walShard(t) // entries 2 and 3, synced
	breakWALSync(t, e)

	hs := &pb.HardState{Term: proto.Uint64(1), Commit: proto.Uint64(4)}
	err := s.Save(&Update{HardState: hs, Entries: []*pb.Entry{putEntry(4, 1, "c", "3")}, Sync: true})
	mustIs(t, err, ErrFailed)
	if !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("Save error %v does not carry the fdatasync failure", err)
	}
	// The engine refuses writes from now on, even ones that need no sync.
	err = s.Save(&Update{Committed: []*pb.Entry{putEntry(2, 1, "a", "1")}, Apply: applyPut, NoWait: true})
	mustIs(t, err, ErrFailed)
	if err := e.Close(); err != nil {
		t.Logf("Close after the failure: %v", err)
	}

	e2, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e2.Close() })
	s2, err := e2.OpenShard(1)
	if err != nil {
		t.Fatal(err)
	}
	if li, _ := s2.LastIndex(); li != 3 {
		t.Fatalf("LastIndex after restart = %d, want 3 (the acknowledged entries, not the failed save's)", li)
	}
	got, err := s2.Entries(2, 4, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || !proto.Equal(got[0], putEntry(2, 1, "a", "1")) || !proto.Equal(got[1], putEntry(3, 1, "b", "2")) {
		t.Fatalf("entries after restart: %v", got)
	}
	if i, _ := s2.Applied(); i != 1 {
		t.Fatalf("Applied after restart = %d, want 1: nothing applied after the failure may commit", i)
	}
	if d := dump(t, s2); len(d) != 0 {
		t.Fatalf("state after restart: %v, want none", d)
	}
	// The failed save's hard state never reached the disk.
	stored, _, err := s2.InitialState()
	if err != nil {
		t.Fatal(err)
	}
	if stored.GetCommit() >= 4 {
		t.Fatalf("hard state after restart %v carries the failed save's commit", stored)
	}
}

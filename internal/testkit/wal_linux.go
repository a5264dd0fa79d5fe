package testkit

import (
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
)

// BreakWAL makes the write-ahead log of the engine this process opened
// on dataDir fail its next write or fdatasync, as a disk gone bad does:
// /dev/null takes the place of its file descriptor, which is found in
// /proc/self/fd.
func BreakWAL(t testing.TB, dataDir string) {
	t.Helper()
	want := filepath.Join(dataDir, "kvd.wal")
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	for _, fd := range fds {
		if target, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name())); err != nil || target != want {
			continue
		}
		n, err := strconv.Atoi(fd.Name())
		if err != nil {
			t.Fatal(err)
		}
		if err := syscall.Dup3(int(null.Fd()), n, syscall.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Fatalf("no open file descriptor on %s", want)
}

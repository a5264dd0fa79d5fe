package e2e

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/proto/kvpb"
)

// tmpfsSize holds the WAL, which kvd preallocates to 64 MiB, and a few
// MiB of bbolt file before the disk is full.
const tmpfsSize = "72m"

func loopbackPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// A kvd process whose disk fills up exits on its own, non-zero, with the
// reason on its last line, rather than serving on from a failed engine.
func TestDiskFullNodeExits(t *testing.T) {
	kvd, _ := proccluster.Binaries(t)
	mnt := filepath.Join(t.TempDir(), "disk")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", mnt, "tmpfs", 0, "size="+tmpfsSize); err != nil {
		t.Skipf("cannot mount a small tmpfs to fill (needs root or CAP_SYS_ADMIN): %v; server.TestFailedEngineStopsServing and cmd/kvd.TestFailedEngineExitsWithReason check the same in-process", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(mnt, syscall.MNT_DETACH) })

	client := loopbackPort(t)
	var stderr proccluster.SyncBuffer
	cmd := exec.Command(kvd, "--data-dir", filepath.Join(mnt, "data"), "--listen-client", client,
		"--listen-peer", loopbackPort(t), "--listen-metrics", "", "--shards", "1")
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})

	conn, err := grpc.NewClient(client, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	kv := kvpb.NewKVClient(conn)
	value := bytes.Repeat([]byte("x"), 512<<10)
	deadline := time.Now().Add(90 * time.Second)
	for i := 0; ; i++ {
		select {
		case err := <-exited:
			exited <- err // for the cleanup
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 3 {
				t.Fatalf("kvd exited with %v, want exit code 3; stderr:\n%s", err, stderr.String())
			}
			lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
			last := lines[len(lines)-1]
			if !strings.HasPrefix(last, "kvd: node 1 failed: ") || !strings.Contains(last, "no space left on device") || !strings.HasSuffix(last, "it must be restarted") {
				t.Fatalf("last line %q does not give the reason", last)
			}
			t.Logf("kvd's last line: %s", last)
			return
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("kvd did not exit after %d puts on a full disk; stderr:\n%s", i, stderr.String())
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, _ = kv.Put(ctx, &kvpb.PutRequest{Key: []byte{byte(i), byte(i >> 8)}, Value: value})
		cancel()
	}
}

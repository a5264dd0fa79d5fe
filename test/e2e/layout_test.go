package e2e

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/storage"
)

// kvd started on a data dir that a newer release wrote (its data file has
// an on-disk layout above this build's) exits 1 at once, with one line on
// stderr that names the file, both layouts and what to do, and leaves the
// file as it was.
func TestFutureLayoutRefusedInOneLine(t *testing.T) {
	kvd, _ := proccluster.Binaries(t)
	dir := filepath.Join(t.TempDir(), "data")
	file := filepath.Join(dir, "kvd.db")
	e, err := storage.Open(file, storage.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	layout := func(set uint64) (have uint64) {
		db, err := bolt.Open(file, 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		err = db.Update(func(tx *bolt.Tx) error {
			node := tx.Bucket([]byte("node"))
			if set != 0 {
				return node.Put([]byte("layout"), binary.BigEndian.AppendUint64(nil, set))
			}
			have = binary.BigEndian.Uint64(node.Get([]byte("layout")))
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return have
	}
	layout(99)

	port := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return l.Addr().String()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, kvd, "--data-dir", dir, "--listen-client", port(),
		"--listen-peer", port(), "--listen-metrics", "")
	var stderr proccluster.SyncBuffer
	cmd.Stderr = &stderr
	err = cmd.Run() // CommandContext kills it at the deadline, even if this fails
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || ctx.Err() != nil {
		t.Fatalf("kvd exited with %v, want exit code 1 at once; stderr:\n%s", err, stderr.String())
	}
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(stderr.String()), "\n") {
		if strings.HasPrefix(l, "kvd: ") {
			lines = append(lines, l)
		}
	}
	if len(lines) != 1 {
		t.Fatalf("kvd wrote %d error lines, want 1; stderr:\n%s", len(lines), stderr.String())
	}
	t.Logf("stderr: %s", stderr.String())
	for _, want := range []string{file + " has layout 99", "newer than layout 5", "unsupported on-disk layout", "run that release or a later one on this data dir"} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("the error line does not say %q: %s", want, lines[0])
		}
	}
	if have := layout(0); have != 99 {
		t.Fatalf("the refused data file's layout is now %d, want 99 untouched", have)
	}
}

package storage

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	pb "go.etcd.io/raft/v3/raftpb"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/peerpb"
)

func TestMain(m *testing.M) {
	if os.Getenv(crashChildEnv) != "" {
		crashChild()
		return
	}
	// Hundreds of engines: 64 MiB of zeros each would be most of the
	// package's test time.
	walPrealloc = 1 << 20
	goleak.VerifyTestMain(m)
}

// walName is the WAL of the tests' kvd.db files.
const walName = "kvd.wal"

// openTest opens an engine in a fresh temp dir, closed at cleanup.
func openTest(t testing.TB, opts Options) (*Engine, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "data", "kvd.db")
	e, err := Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close() })
	return e, path
}

func reopen(t testing.TB, e *Engine, path string, opts Options) *Engine {
	t.Helper()
	limit := e.cacheLimit
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e2, err := Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	e2.cacheLimit = limit
	t.Cleanup(func() { _ = e2.Close() })
	return e2
}

// ent returns entry index with term and some data whose size depends on
// the index, so that size limits cut at varied places.
func ent(index, term uint64) *pb.Entry {
	return &pb.Entry{
		Index: proto.Uint64(index),
		Term:  proto.Uint64(term),
		Data:  bytes.Repeat([]byte{byte(index)}, int(index%7)*10),
	}
}

// ents returns entries starting at first with the given terms.
func ents(first uint64, terms ...uint64) []*pb.Entry {
	out := make([]*pb.Entry, len(terms))
	for i, t := range terms {
		out[i] = ent(first+uint64(i), t)
	}
	return out
}

// putEntry encodes "k=v" commands applied by applyPut.
func putEntry(index, term uint64, k, v string) *pb.Entry {
	return &pb.Entry{Index: proto.Uint64(index), Term: proto.Uint64(term), Data: []byte(k + "=" + v)}
}

// applyPut applies "k=v" and bumps meta "count".
func applyPut(tx *Txn, e *pb.Entry) {
	k, v, _ := bytes.Cut(e.GetData(), []byte("="))
	if err := tx.Put(k, v); err != nil {
		panic(err)
	}
	n := uint64(0)
	if b := tx.GetMeta([]byte("count")); b != nil {
		n, _ = decodeU64(b)
	}
	if err := tx.PutMeta([]byte("count"), u64(n+1)); err != nil {
		panic(err)
	}
}

// applyLog is an ApplyFunc, applyPut's, that records "ok <index>" for
// each entry Save passes it, in order: which entries were applied.
type applyLog struct {
	mu  sync.Mutex
	got []string
}

func (l *applyLog) apply(tx *Txn, e *pb.Entry) {
	applyPut(tx, e)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.got = append(l.got, fmt.Sprint("ok ", e.GetIndex()))
}

// take returns what was recorded since the last take.
func (l *applyLog) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	got := l.got
	l.got = nil
	return got
}

// dump returns every kv and meta pair of the shard, for comparisons.
func dump(t testing.TB, s *Shard) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := s.View(func(r *Reader) error {
		r.Range(nil, nil, func(k, v []byte) bool {
			out["kv/"+string(k)] = string(v)
			return true
		})
		rangePrefix(r.meta, nil, func(k, v []byte) bool {
			out["meta/"+string(k)] = string(r.GetMeta(k))
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// eofNext is an empty snapshot stream.
func eofNext() ([]*peerpb.SnapshotPair, error) { return nil, io.EOF }

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func mustIs(t testing.TB, err, want error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("error %v, want %v", err, want)
	}
}

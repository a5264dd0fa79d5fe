package storage

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

func openStoreTest(t *testing.T, dir string, partitions int) *Store {
	t.Helper()
	s, err := OpenStore(dir, partitions, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// A new data dir gets the partitions asked for, each shard lives in the
// file of its id modulo the count, and the dir keeps its count whatever
// a later open asks.
func TestStorePartitionsShards(t *testing.T) {
	dir := t.TempDir()
	s := openStoreTest(t, dir, 3)
	if err := s.PutMeta("node-id", []byte("7")); err != nil {
		t.Fatal(err)
	}
	for id := range uint64(6) {
		if _, err := s.CreateShard(id, &pb.ConfState{Voters: []uint64{1}}); err != nil {
			t.Fatal(err)
		}
	}
	want := []string{"kvd.db", "kvd-1.db", "kvd-2.db"}
	var have []string
	for _, p := range s.Paths() {
		have = append(have, filepath.Base(p))
	}
	if !slices.Equal(have, want) {
		t.Fatalf("files %v, want %v", have, want)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = openStoreTest(t, dir, 5)
	if s.Partitions() != 3 {
		t.Fatalf("reopened with 5 asked: %d partitions, want the 3 it was created with", s.Partitions())
	}
	for id := range uint64(6) {
		sh, err := s.OpenShard(id)
		if err != nil {
			t.Fatal(err)
		}
		if sh.e != s.parts[id%3] {
			t.Fatalf("shard %d not in partition %d", id, id%3)
		}
	}
	if v, err := s.GetMeta("node-id"); err != nil || string(v) != "7" {
		t.Fatalf("node metadata after reopen: %q, %v", v, err)
	}
	// Every file says layout 4, which a kvd without partitions refuses.
	for _, p := range s.parts {
		if v, err := p.GetMeta(string(keyLayout)); err != nil || !bytes.Equal(v, u64(layoutPartitioned)) {
			t.Fatalf("%s: layout record %x, %v; want 4", p.db.Path(), v, err)
		}
	}
	// Only kvd.db holds the node metadata.
	if v, err := s.parts[1].GetMeta("node-id"); err != nil || v != nil {
		t.Fatalf("node metadata in kvd-1.db: %q, %v", v, err)
	}
}

// fileWithShard makes a bbolt file at path holding shard 1.
func fileWithShard(t *testing.T, path string) {
	t.Helper()
	e, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.CreateShard(1, &pb.ConfState{Voters: []uint64{1}}); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
}

// A data dir of one file (as every dir was before partitions) stays one
// partition when opened asking for more.
func TestStoreOneFileDirStaysOne(t *testing.T) {
	dir := t.TempDir()
	fileWithShard(t, filepath.Join(dir, "kvd.db"))
	s := openStoreTest(t, dir, 4)
	if s.Partitions() != 1 {
		t.Fatalf("%d partitions, want 1", s.Partitions())
	}
	if _, err := s.OpenShard(1); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "kvd-1.db")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("kvd-1.db created for a one-file dir: %v", err)
	}
}

// A partition file that is missing, or that belongs elsewhere, fails the
// open: its shards would otherwise start empty and vote as if they had
// never acknowledged anything.
func TestStoreRefusesMissingOrForeignPartition(t *testing.T) {
	dir := t.TempDir()
	s := openStoreTest(t, dir, 3)
	if _, err := s.CreateShard(2, &pb.ConfState{Voters: []uint64{1}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	swapped := t.TempDir()
	for _, f := range []string{"kvd.db", "kvd.wal", "kvd-1.db", "kvd-1.wal", "kvd-2.db", "kvd-2.wal"} {
		to := f
		switch f {
		case "kvd-1.db":
			to = "kvd-2.db"
		case "kvd-2.db":
			to = "kvd-1.db"
		case "kvd-1.wal":
			to = "kvd-2.wal"
		case "kvd-2.wal":
			to = "kvd-1.wal"
		}
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(swapped, to), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := OpenStore(swapped, 3, Options{NoSync: true}); !errors.Is(err, ErrLayout) {
		t.Fatalf("partitions 1 and 2 swapped: %v, want ErrLayout", err)
	}

	if err := os.Remove(filepath.Join(dir, "kvd-2.db")); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenStore(dir, 3, Options{NoSync: true}); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("kvd-2.db missing: %v, want an error naming it", err)
	}
}

// A creation that crashed before kvd.db recorded the count leaves empty
// partition files; the next open creates the dir again over them.
func TestStoreCreationRestartsAfterCrash(t *testing.T) {
	dir := t.TempDir()
	for i, name := range []string{"kvd.db", "kvd-1.db"} {
		e, err := Open(filepath.Join(dir, name), Options{NoSync: true})
		if err != nil {
			t.Fatal(err)
		}
		if i == 1 {
			if err := e.PutMeta(keyPartition, []byte("1/4")); err != nil {
				t.Fatal(err)
			}
		}
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
	}
	s := openStoreTest(t, dir, 2)
	if s.Partitions() != 2 {
		t.Fatalf("%d partitions, want 2", s.Partitions())
	}
	if v, err := s.parts[1].GetMeta(keyPartition); err != nil || string(v) != "1/2" {
		t.Fatalf("kvd-1.db records %q, %v; want 1/2", v, err)
	}
}

// SaveAll over shards of several partitions saves each in its own file
// and returns each update's error at its position.
func TestStoreSaveAllAcrossPartitions(t *testing.T) {
	s := openStoreTest(t, t.TempDir(), 2)
	var shards []*Shard
	for id := range uint64(4) {
		sh, err := s.CreateShard(id, &pb.ConfState{Voters: []uint64{1}})
		if err != nil {
			t.Fatal(err)
		}
		shards = append(shards, sh)
	}
	hs := func(commit uint64) *pb.HardState {
		return &pb.HardState{Term: proto.Uint64(1), Commit: proto.Uint64(commit)}
	}
	us := []ShardUpdate{
		{shards[0], &Update{Entries: ents(2, 1, 1), HardState: hs(1)}},
		{shards[1], &Update{Entries: ents(2, 1), HardState: hs(1)}},
		{shards[2], &Update{Entries: ents(5, 1)}}, // a gap: rejected alone
		{shards[3], &Update{Entries: ents(2, 1, 1, 1), HardState: hs(1)}},
	}
	errs := s.SaveAll(us)
	for i, err := range errs {
		if (err != nil) != (i == 2) {
			t.Fatalf("update %d: %v", i, err)
		}
	}
	if !errors.Is(errs[2], ErrLogGap) {
		t.Fatalf("update 2: %v, want ErrLogGap", errs[2])
	}
	for i, want := range []uint64{3, 2, 1, 4} {
		if last, _ := shards[i].LastIndex(); last != want {
			t.Fatalf("shard %d: last index %d, want %d", i, last, want)
		}
	}
	if st := s.Stats(); st.Entries != 6 {
		t.Fatalf("stats count %d entries, want 6", st.Entries)
	}
}

// A new data dir that already holds a kvd-1.db with shards in it (a file
// of another dir, dropped in) is refused rather than taken as partition 1.
func TestStoreRefusesStrayFileInNewDir(t *testing.T) {
	dir := t.TempDir()
	fileWithShard(t, filepath.Join(dir, "kvd-1.db"))
	if s, err := OpenStore(dir, 2, Options{NoSync: true}); !errors.Is(err, ErrLayout) {
		if s != nil {
			_ = s.Close()
		}
		t.Fatalf("OpenStore over a kvd-1.db holding a shard: %v, want ErrLayout", err)
	}
}

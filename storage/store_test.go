package storage

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

func openStoreTest(t *testing.T, dir string, partitions int) *Store {
	t.Helper()
	return openStoreWith(t, dir, partitions, Options{NoSync: true})
}

// openStoreWith opens a store for the test, closed when it ends.
func openStoreWith(t *testing.T, dir string, partitions int, opts Options) *Store {
	t.Helper()
	s, err := OpenStore(dir, partitions, opts)
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
	dir := filepath.Join(t.TempDir(), "data") // created by OpenStore
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
	// Every file says layout 5, which a kvd whose partitions had a WAL
	// each, or had no partitions, refuses; and they share one WAL file.
	for _, p := range s.parts {
		if v, err := p.GetMeta(string(keyLayout)); err != nil || !bytes.Equal(v, u64(layoutSharedWAL)) {
			t.Fatalf("%s: layout record %x, %v; want 5", p.db.Path(), v, err)
		}
	}
	wals, _ := filepath.Glob(filepath.Join(dir, "*.wal"))
	if len(wals) != 1 || filepath.Base(wals[0]) != "kvd.wal" {
		t.Fatalf("WAL files %v, want kvd.wal alone", wals)
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
	for _, f := range []string{"kvd.db", "kvd.wal", "kvd-1.db", "kvd-2.db"} {
		to := f
		switch f {
		case "kvd-1.db":
			to = "kvd-2.db"
		case "kvd-2.db":
			to = "kvd-1.db"
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

// copyDir copies the files of dir into a new directory, as a crash would
// leave them (every writer must be idle), and returns it.
func copyDir(t *testing.T, dir string) string {
	t.Helper()
	to := t.TempDir()
	files, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(dir, f.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, f.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return to
}

// appendAcrossPartitions appends entries 2..last to shards 1..n of s, a
// round each, durable by WAL record only, and returns the shards.
func appendAcrossPartitions(t *testing.T, s *Store, n, last uint64) []*Shard {
	t.Helper()
	var shards []*Shard
	for id := uint64(1); id <= n; id++ {
		sh, err := s.CreateShard(id, voters)
		if err != nil {
			t.Fatal(err)
		}
		shards = append(shards, sh)
	}
	for i := uint64(2); i <= last; i++ {
		var us []ShardUpdate
		for _, sh := range shards {
			us = append(us, ShardUpdate{sh, &Update{Entries: []*pb.Entry{putEntry(i, 1, "k", fmt.Sprintf("%d-%d", sh.ID(), i))}, Sync: true, NoWait: true}})
		}
		for _, err := range s.SaveAll(us) {
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	return shards
}

// checkStoreEntries fails unless shards 1..n of s hold entries 2..last as
// appendAcrossPartitions wrote them.
func checkStoreEntries(t *testing.T, s *Store, n, last uint64) {
	t.Helper()
	for id := uint64(1); id <= n; id++ {
		sh, err := s.OpenShard(id)
		if err != nil {
			t.Fatal(err)
		}
		es, err := sh.Entries(2, last+1, ^uint64(0))
		if err != nil {
			t.Fatalf("shard %d: %v", id, err)
		}
		if uint64(len(es)) != last-1 {
			t.Fatalf("shard %d: %d entries, want %d", id, len(es), last-1)
		}
		for _, en := range es {
			if want := fmt.Sprintf("k=%d-%d", id, en.GetIndex()); string(en.GetData()) != want {
				t.Fatalf("shard %d entry %d = %q, want %q", id, en.GetIndex(), en.GetData(), want)
			}
		}
	}
}

// The partitions' rounds made durable by records in their regions of the
// shared WAL, and never committed to bbolt, are all there after a crash.
func TestStoreSharedWALReplaysEveryPartition(t *testing.T) {
	dir := t.TempDir()
	s := openStoreWith(t, dir, 3, Options{CommitInterval: time.Hour})
	appendAcrossPartitions(t, s, 6, 20)
	for _, p := range s.parts {
		if p.wal.off == 0 {
			t.Fatalf("%s: nothing in its WAL region", p.db.Path())
		}
	}
	crashed := openStoreWith(t, copyDir(t, dir), 3, Options{})
	checkStoreEntries(t, crashed, 6, 20)
}

// A round whose record does not fit in what is left of its WAL region is
// committed to bbolt instead, never written over the next region.
func TestStoreRecordTooLargeForItsRegionCommits(t *testing.T) {
	dir := t.TempDir()
	s := openStoreWith(t, dir, 2, Options{WALSize: 4 << 10, CommitInterval: time.Hour})
	shards := appendAcrossPartitions(t, s, 2, 3)
	before := s.Stats().Commits
	big := putEntry(4, 1, "k", string(make([]byte, 8<<10)))
	if err := shards[0].Save(&Update{Entries: []*pb.Entry{big}, Sync: true, NoWait: true}); err != nil {
		t.Fatal(err)
	}
	if s.Stats().Commits == before {
		t.Fatal("an 8 KiB record in a 4 KiB region was not committed instead")
	}
	if off := shards[0].e.wal.off; off != 0 {
		t.Fatalf("shard 1's partition wrote %d bytes into its region after the commit", off)
	}
	crashed := openStoreWith(t, copyDir(t, dir), 2, Options{})
	checkStoreEntries(t, crashed, 2, 3)
	sh, err := crashed.OpenShard(1)
	if err != nil {
		t.Fatal(err)
	}
	if li, _ := sh.LastIndex(); li != 4 {
		t.Fatalf("shard 1 last index %d after the crash, want 4", li)
	}
}

// A data dir whose partitions each had a WAL file (layout 4) is opened by
// replaying each file into its partition; the files are then removed and
// the dir records the shared WAL (layout 5).
func TestStoreMergesPartitionWALs(t *testing.T) {
	dir := t.TempDir()
	const n = 3
	// Build the old layout by hand: each partition over its own WAL, with
	// rounds in it that no commit holds.
	for i := range uint64(n) {
		e, err := Open(partitionPath(dir, i), Options{CommitInterval: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		rec := map[string][]byte{keyPartition: []byte(fmt.Sprintf("%d/%d", i, n)), string(keyLayout): u64(layoutPartitioned)}
		if i == 0 {
			rec = map[string][]byte{keyPartitions: u64(n), string(keyLayout): u64(layoutPartitioned)}
		}
		if err := e.putNode(rec); err != nil {
			t.Fatal(err)
		}
		for id := i; id < 6; id += n {
			if id == 0 {
				continue
			}
			sh, err := e.CreateShard(id, voters)
			if err != nil {
				t.Fatal(err)
			}
			for j := uint64(2); j <= 10; j++ {
				if err := sh.Save(&Update{Entries: []*pb.Entry{putEntry(j, 1, "k", fmt.Sprintf("%d-%d", id, j))}, Sync: true, NoWait: true}); err != nil {
					t.Fatal(err)
				}
			}
		}
		// "Crash": leave the rounds in the WAL, uncommitted.
		crashed := copyDir(t, dir)
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
		for _, name := range []string{filepath.Base(partitionPath(dir, i)), filepath.Base(walPath(partitionPath(dir, i)))} {
			b, err := os.ReadFile(filepath.Join(crashed, name))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	s := openStoreTest(t, dir, 1)
	if s.Partitions() != n {
		t.Fatalf("%d partitions, want %d", s.Partitions(), n)
	}
	for id := uint64(1); id < 6; id++ {
		sh, err := s.OpenShard(id)
		if err != nil {
			t.Fatal(err)
		}
		if li, _ := sh.LastIndex(); li != 10 {
			t.Fatalf("shard %d: last index %d after the merge, want 10", id, li)
		}
	}
	wals, _ := filepath.Glob(filepath.Join(dir, "*.wal"))
	if len(wals) != 1 || filepath.Base(wals[0]) != "kvd.wal" {
		t.Fatalf("WAL files %v after the merge, want kvd.wal alone", wals)
	}
	for _, p := range s.parts {
		if v, err := p.GetMeta(string(keyLayout)); err != nil || !bytes.Equal(v, u64(layoutSharedWAL)) {
			t.Fatalf("%s: layout record %x, %v; want 5", p.db.Path(), v, err)
		}
	}
}

// Syncs asked for while one runs share the next: many concurrent callers
// cost far fewer fdatasyncs than calls, and each call returns only after
// one that began after it.
func TestFileSyncSharesSyncs(t *testing.T) {
	for _, shared := range []bool{false, true} {
		t.Run(fmt.Sprintf("shared=%v", shared), func(t *testing.T) { testFileSync(t, shared) })
	}
}

func testFileSync(t *testing.T, shared bool) {
	f, err := os.CreateTemp(t.TempDir(), "wal")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fs := fileSync{shared: shared}
	const callers, calls = 8, 50
	var wg sync.WaitGroup
	for range callers {
		wg.Go(func() {
			for range calls {
				fs.mu.Lock()
				began := fs.started
				fs.mu.Unlock()
				if err := fs.sync(f); err != nil {
					t.Error(err)
					return
				}
				fs.mu.Lock()
				synced := fs.synced
				fs.mu.Unlock()
				if synced <= began {
					t.Errorf("sync returned after fdatasync %d, but %d had begun before the call", synced, began)
					return
				}
			}
		})
	}
	wg.Wait()
	if fs.started == 0 || fs.started > callers*calls {
		t.Fatalf("%d fdatasyncs for %d calls", fs.started, callers*calls)
	}
	t.Logf("%d fdatasyncs for %d calls", fs.started, callers*calls)
}

// A store whose partitions share the WAL counts each fdatasync of it once
// in Stats.Syncs, not once per partition whose rounds it covered.
func TestStoreCountsSharedSyncsOnce(t *testing.T) {
	s := openStoreWith(t, t.TempDir(), 3, Options{CommitInterval: time.Hour})
	appendAcrossPartitions(t, s, 6, 20)
	var commits, partitionSyncs, walSyncs uint64
	for _, p := range s.parts {
		st := p.Stats()
		commits += st.Commits
		partitionSyncs += st.Syncs
		walSyncs += st.walSyncs
	}
	fdatasyncs := s.wal.syncs.count()
	if fdatasyncs == 0 || fdatasyncs > walSyncs {
		t.Fatalf("%d fdatasyncs of the file for %d partition WAL syncs", fdatasyncs, walSyncs)
	}
	if got, want := s.Stats().Syncs, commits+fdatasyncs; got != want {
		t.Fatalf("Stats().Syncs = %d, want %d commits + %d fdatasyncs", got, commits, fdatasyncs)
	}
	t.Logf("%d fdatasyncs for %d partition WAL syncs (%d syncs in all per partition)", fdatasyncs, walSyncs, partitionSyncs)
}

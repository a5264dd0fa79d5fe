package storage

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	pb "go.etcd.io/raft/v3/raftpb"
)

// walRounds saves entries 4..last on walShard's shard, one acknowledged
// round (one WAL record) each, and returns the engine, its path, and
// where each entry's record starts (by entry index) and where the last
// ends. No bbolt commit happens: at Open, the records are what holds
// these entries.
func walRounds(t *testing.T, last uint64) (*Engine, string, map[uint64]int64, int64) {
	t.Helper()
	e, path, s := walShard(t)
	before := e.Stats().Commits
	starts := map[uint64]int64{}
	for i := uint64(4); i <= last; i++ {
		starts[i] = e.wal.written.Load()
		if err := s.Save(&Update{Entries: []*pb.Entry{putEntry(i, 1, fmt.Sprintf("k%d", i), "v")}, Sync: true}); err != nil {
			t.Fatal(err)
		}
	}
	if c := e.Stats().Commits - before; c != 0 {
		t.Fatalf("%d commits during the rounds, want none", c)
	}
	return e, path, starts, e.wal.written.Load()
}

// copyEngine copies the engine files at path as a crash would leave them,
// with the WAL's bytes passed through mangle, and opens the copy with a
// logger writing to logs.
func copyEngine(t *testing.T, path string, mangle func(wal []byte), logs *bytes.Buffer) (*Engine, string, error) {
	t.Helper()
	crashed := filepath.Join(t.TempDir(), "kvd.db")
	for _, name := range []string{filepath.Base(path), walName} {
		b, err := os.ReadFile(filepath.Join(filepath.Dir(path), name))
		if err != nil {
			t.Fatal(err)
		}
		if name == walName {
			mangle(b)
		}
		if err := os.WriteFile(filepath.Join(filepath.Dir(crashed), name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	e, err := Open(crashed, Options{Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err == nil {
		t.Cleanup(func() { _ = e.Close() })
	}
	return e, crashed, err
}

// One damaged byte in a record that was synced, with acknowledged records
// after it, is corruption, wherever it lands in the record: Open refuses
// the files, naming the WAL and the record's offset, instead of replaying
// up to it and dropping the acknowledged rounds after it.
func TestWALDamagedMidLogFailsOpen(t *testing.T) {
	_, path, starts, _ := walRounds(t, 12)
	bad := starts[7]
	for _, tc := range []struct {
		name string
		at   int64
	}{
		{"payload", bad + walHeaderSize + 5},
		{"checksum", bad + 1},
		{"length", bad + 4},
		{"generation", bad + 9},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var logs bytes.Buffer
			_, crashed, err := copyEngine(t, path, func(wal []byte) { wal[tc.at] ^= 0x10 }, &logs)
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Open = %v, want ErrCorrupt", err)
			}
			walPath := filepath.Join(filepath.Dir(crashed), walName)
			for _, want := range []string{walPath, fmt.Sprintf("byte offset %d ", bad), "--join"} {
				if !strings.Contains(err.Error(), want) {
					t.Fatalf("error %q does not say %q", err, want)
				}
			}
		})
	}
}

// A torn last record (a crash while it was written, before its sync
// returned, so never acknowledged) is where replay stops: Open succeeds
// with every earlier record, says so at WARN with the offset, and the
// next write overwrites it.
func TestWALTornLastRecordKeepsEarlierRecords(t *testing.T) {
	_, path, starts, end := walRounds(t, 9)
	torn := starts[9]
	for _, tc := range []struct {
		name   string
		mangle func(wal []byte)
		warn   bool
	}{
		{"tail zeroed", func(wal []byte) { clear(wal[torn+walHeaderSize+(end-torn-walHeaderSize)/2 : end]) }, true},
		{"last byte changed", func(wal []byte) { wal[end-1] ^= 0xff }, true},
		{"only the header written", func(wal []byte) { clear(wal[torn+walHeaderSize : end]) }, true},
		{"nothing written", func(wal []byte) { clear(wal[torn:end]) }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var logs bytes.Buffer
			e2, _, err := copyEngine(t, path, tc.mangle, &logs)
			if err != nil {
				t.Fatal(err)
			}
			s2, err := e2.OpenShard(1)
			if err != nil {
				t.Fatal(err)
			}
			checkEntries(t, s2, 8)
			warned := strings.Contains(logs.String(), "level=WARN") && strings.Contains(logs.String(), fmt.Sprintf("offset=%d ", torn))
			if warned != tc.warn {
				t.Fatalf("warned of a torn record at %d: %v, want %v; log:\n%s", torn, warned, tc.warn, logs.String())
			}
			// The next write overwrites the torn record, and a crash after
			// it replays every acknowledged round.
			if err := s2.Save(&Update{Entries: []*pb.Entry{putEntry(9, 2, "k9", "v")}, Sync: true}); err != nil {
				t.Fatal(err)
			}
			logs.Reset()
			e3, _, err := copyEngine(t, e2.db.Path(), func([]byte) {}, &logs)
			if err != nil {
				t.Fatal(err)
			}
			s3, err := e3.OpenShard(1)
			if err != nil {
				t.Fatal(err)
			}
			checkEntries(t, s3, 9)
			if strings.Contains(logs.String(), "level=WARN") {
				t.Fatalf("a clean crash logged a warning:\n%s", logs.String())
			}
		})
	}
}

// checkEntries checks that s holds entries 2..last, as walShard and
// walRounds wrote them.
func checkEntries(t *testing.T, s *Shard, last uint64) {
	t.Helper()
	if li, _ := s.LastIndex(); li != last {
		t.Fatalf("LastIndex = %d, want %d", li, last)
	}
	es, err := s.Entries(4, last+1, ^uint64(0))
	if err != nil {
		t.Fatal(err)
	}
	for _, en := range es {
		if want := fmt.Sprintf("k%d=v", en.GetIndex()); string(en.GetData()) != want {
			t.Fatalf("entry %d = %q, want %q", en.GetIndex(), en.GetData(), want)
		}
	}
}

// testWAL is a WAL in a fresh directory at generation gen, with nothing
// synced.
func testWAL(t *testing.T, gen uint64) *wal {
	t.Helper()
	w, err := openWAL(filepath.Join(t.TempDir(), walName), 0, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.close() })
	w.restart(gen)
	return w
}

func writeOp(t *testing.T, w *wal, shard uint64) int64 {
	t.Helper()
	at := w.off
	if err := w.write([]walOp{{shard: shard, entries: [][]byte{[]byte("entry")}}}); err != nil {
		t.Fatal(err)
	}
	return at
}

func replayShards(t *testing.T, w *wal, gen uint64) ([]uint64, walReplay, error) {
	t.Helper()
	var got []uint64
	res, err := w.replay(gen, func(op walOp) error {
		got = append(got, op.shard)
		return nil
	})
	return got, res, err
}

// The writer writes a round's record while the previous one syncs, so a
// crash may leave a record torn and later ones whole: none of them was
// acknowledged (a later record's sync would have made the torn one
// durable), and it is a torn tail. Once a later record was written after
// the bad one had synced, it is corruption.
func TestWALTellsTornFromDamagedBySyncedOffset(t *testing.T) {
	const gen = 7
	damage := func(w *wal, at int64) {
		if _, err := w.f.WriteAt([]byte{0xee}, at+walHeaderSize+2); err != nil {
			t.Fatal(err)
		}
	}

	w := testWAL(t, gen)
	writeOp(t, w, 1)
	w.synced.Store(w.written.Load()) // record 1 acknowledged
	second := writeOp(t, w, 2)
	writeOp(t, w, 3) // written while record 2 synced
	damage(w, second)
	got, res, err := replayShards(t, w, gen)
	if err != nil || len(got) != 1 || got[0] != 1 || res.torn != second || res.unacked != 1 {
		t.Fatalf("replay of a torn record before an unacknowledged one: shards %v, %+v, %v; want [1], torn at %d, 1 unacknowledged", got, res, err, second)
	}

	w = testWAL(t, gen)
	writeOp(t, w, 1)
	second = writeOp(t, w, 2)
	w.synced.Store(w.written.Load()) // records 1 and 2 acknowledged
	writeOp(t, w, 3)
	damage(w, second)
	if got, _, err := replayShards(t, w, gen); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("replay of a damaged synced record: shards %v, %v; want ErrCorrupt", got, err)
	}

	// Records of an older generation beyond the live ones are not this
	// generation's: a torn live record before them is a torn tail.
	w = testWAL(t, gen)
	for shard := uint64(1); shard <= 4; shard++ {
		writeOp(t, w, shard)
		w.synced.Store(w.written.Load())
	}
	w.restart(gen + 1)
	writeOp(t, w, 5)
	w.synced.Store(w.written.Load())
	second = writeOp(t, w, 6)
	damage(w, second)
	got, res, err = replayShards(t, w, gen+1)
	if err != nil || len(got) != 1 || got[0] != 5 || res.torn != second || res.unacked != 0 {
		t.Fatalf("replay over an older generation: shards %v, %+v, %v; want [5], torn at %d", got, res, err, second)
	}
}

// A WAL written before records carried the synced offset (its
// generation field lacks walFormat2) is replayed as it was written.
func TestWALReplaysLegacyRecords(t *testing.T) {
	const gen = 9
	w := testWAL(t, gen)
	var off int64
	for shard := uint64(1); shard <= 3; shard++ {
		b := make([]byte, walHeaderSize)
		b = appendWALOps(b, []walOp{{shard: shard, entries: [][]byte{[]byte("entry")}}})
		binary.LittleEndian.PutUint32(b[4:], uint32(len(b)-walHeaderSize))
		binary.LittleEndian.PutUint64(b[8:], gen)
		binary.LittleEndian.PutUint32(b[0:], crc32.Checksum(b[8:], crc32c))
		if _, err := w.f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
		off += int64(len(b))
	}
	got, _, err := replayShards(t, w, gen)
	if err != nil || len(got) != 3 || got[2] != 3 {
		t.Fatalf("legacy replay: shards %v, %v; want [1 2 3]", got, err)
	}
}

package storage

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
)

// The write-ahead log makes a round durable with one sequential write and
// one fdatasync, instead of a bbolt commit (B+tree pages written, then two
// fsyncs: data pages, then the meta page). It records only what raft needs
// durable before it answers: each Save's new log entries and hard state.
// The bbolt transaction that holds the same changes, and the state machine
// applied from them, stays open across rounds and commits every
// Options.CommitInterval (or sooner, see Engine.writer); after that commit
// the WAL's records are redundant and it starts over.
//
// Generations tie the two together. Every bbolt commit stores, in the node
// bucket, the generation the WAL continues with, and the WAL then writes
// that generation's records from offset 0. At Open, the records of the
// stored generation, read from offset 0 up to the first that does not
// check out (torn, zeroed, or of an older generation), are exactly the
// rounds acknowledged since the last commit; they are replayed into bbolt
// and committed. Applied state is not in the WAL: the applied index in
// bbolt is the one of the last commit, and raft re-applies from there.
//
// A record is: crc32c (4) | payload length (4) | generation (8) | payload;
// the checksum covers the generation and the payload. The payload is a
// sequence of ops, one per Save: shard id, hard state (length-prefixed
// protobuf, its length plus one, 0 for none), entry count, entries (length-prefixed
// protobuf).
type wal struct {
	f    *os.File
	off  int64  // where the next record goes
	gen  uint64 // generation of the records being written
	sync bool
	// softLimit: past it, the writer commits bbolt, restarting the WAL.
	softLimit int64
	buf       []byte
}

// walPrealloc is the size the file is filled to once, so that rewriting it
// from the start never changes its size and fdatasync need not write file
// metadata. Past 15/16 of it, the writer commits bbolt, which restarts the
// WAL. A variable so that tests, which open hundreds of engines, can use
// less.
var walPrealloc int64 = 64 << 20

const (
	walName       = "kvd.wal"
	walHeaderSize = 16
	// maxWALRecord bounds a record's payload when reading, so a corrupt
	// length cannot make Open allocate gigabytes.
	maxWALRecord = 1 << 30
)

var crc32c = crc32.MakeTable(crc32.Castagnoli)

func openWAL(dir string, sync bool) (*wal, error) {
	path := filepath.Join(dir, walName)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("storage: open wal: %w", err)
	}
	w := &wal{f: f, sync: sync, softLimit: walPrealloc / 16 * 15}
	fi, err := f.Stat()
	if err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("storage: stat wal: %w", err)
	}
	if fi.Size() < walPrealloc {
		if err := w.preallocate(fi.Size(), dir); err != nil {
			_ = f.Close()
			return nil, err
		}
	}
	return w, nil
}

// preallocate fills the file with zeros up to walPrealloc and makes that
// durable, directory entry included.
func (w *wal) preallocate(from int64, dir string) error {
	zeros := make([]byte, 1<<20)
	for off := from; off < walPrealloc; off += int64(len(zeros)) {
		n := min(int64(len(zeros)), walPrealloc-off)
		if _, err := w.f.WriteAt(zeros[:n], off); err != nil {
			return fmt.Errorf("storage: preallocate wal: %w", err)
		}
	}
	if err := w.f.Sync(); err != nil {
		return fmt.Errorf("storage: sync wal: %w", err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("storage: sync wal dir: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("storage: sync wal dir: %w", err)
	}
	return nil
}

func (w *wal) close() error { return w.f.Close() }

// restart makes gen the generation of the records that follow, written
// from the start of the file.
func (w *wal) restart(gen uint64) {
	w.gen, w.off = gen, 0
}

// walOp is one Save's durable part.
type walOp struct {
	shard   uint64
	hard    []byte   // marshalled pb.HardState, nil for none
	entries [][]byte // marshalled pb.Entry
}

func (op *walOp) empty() bool { return op.hard == nil && len(op.entries) == 0 }

// write appends one record holding ops; the syncer makes it durable.
func (w *wal) write(ops []walOp) error {
	var header [walHeaderSize]byte // filled in below
	b := append(w.buf[:0], header[:]...)
	for _, op := range ops {
		b = binary.AppendUvarint(b, op.shard)
		if op.hard == nil {
			b = binary.AppendUvarint(b, 0)
		} else {
			b = binary.AppendUvarint(b, uint64(len(op.hard))+1)
			b = append(b, op.hard...)
		}
		b = binary.AppendUvarint(b, uint64(len(op.entries)))
		for _, e := range op.entries {
			b = binary.AppendUvarint(b, uint64(len(e)))
			b = append(b, e...)
		}
	}
	binary.LittleEndian.PutUint32(b[4:], uint32(len(b)-walHeaderSize))
	binary.LittleEndian.PutUint64(b[8:], w.gen)
	binary.LittleEndian.PutUint32(b[0:], crc32.Checksum(b[8:], crc32c))
	w.buf = b
	if _, err := w.f.WriteAt(b, w.off); err != nil {
		return fmt.Errorf("storage: write wal: %w", err)
	}
	w.off += int64(len(b))
	return nil
}

// replay calls fn for every op of the records of generation gen, from the
// start of the file up to the first record that is not one.
func (w *wal) replay(gen uint64, fn func(walOp) error) (records int, err error) {
	r := bufio.NewReaderSize(io.NewSectionReader(w.f, 0, 1<<62), 1<<20)
	hdr := make([]byte, walHeaderSize)
	for {
		if _, err := io.ReadFull(r, hdr); err != nil {
			return records, nil // end of file: no more records
		}
		n := binary.LittleEndian.Uint32(hdr[4:])
		if binary.LittleEndian.Uint64(hdr[8:]) != gen || n > maxWALRecord {
			return records, nil
		}
		body := make([]byte, 8+int(n))
		copy(body, hdr[8:])
		if _, err := io.ReadFull(r, body[8:]); err != nil {
			return records, nil // torn
		}
		if crc32.Checksum(body, crc32c) != binary.LittleEndian.Uint32(hdr) {
			return records, nil // torn or stale
		}
		ops, err := decodeWALOps(body[8:])
		if err != nil {
			// The checksum matched, so this is not a torn write.
			return records, fmt.Errorf("storage: wal record %d: %w", records, err)
		}
		for _, op := range ops {
			if err := fn(op); err != nil {
				return records, err
			}
		}
		records++
	}
}

var errBadWALRecord = errors.New("malformed record")

func decodeWALOps(b []byte) ([]walOp, error) {
	var ops []walOp
	next := func() (uint64, bool) {
		v, n := binary.Uvarint(b)
		if n <= 0 {
			return 0, false
		}
		b = b[n:]
		return v, true
	}
	bytesOf := func() ([]byte, bool) {
		l, ok := next()
		if !ok || l > uint64(len(b)) {
			return nil, false
		}
		v := b[:l:l]
		b = b[l:]
		return v, true
	}
	for len(b) > 0 {
		var op walOp
		var ok bool
		if op.shard, ok = next(); !ok {
			return nil, errBadWALRecord
		}
		hl, ok := next()
		if !ok || hl > uint64(len(b))+1 {
			return nil, errBadWALRecord
		}
		if hl > 0 {
			op.hard = b[: hl-1 : hl-1]
			b = b[hl-1:]
		}
		count, ok := next()
		if !ok || count > uint64(len(b)) {
			return nil, errBadWALRecord
		}
		for range count {
			e, ok := bytesOf()
			if !ok {
				return nil, errBadWALRecord
			}
			op.entries = append(op.entries, e)
		}
		ops = append(ops, op)
	}
	return ops, nil
}

package storage

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
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
// check out, are exactly the rounds acknowledged since the last commit;
// they are replayed into bbolt and committed. Applied state is not in the
// WAL: the applied index in bbolt is the one of the last commit, and raft
// re-applies from there. A new bbolt file starts at a random generation,
// so that the records of a WAL left over from another file never match.
//
// A record is: crc32c (4) | payload length (4) | generation (8) | payload;
// the checksum covers the generation and the payload. The generation
// field carries walFormat2 (its top bit). The payload starts with the
// synced offset, a uvarint: the end of the records whose fdatasync had
// completed (so that Save had acknowledged them) when this record was
// written. Then come ops, one per Save: shard id, hard state
// (length-prefixed protobuf, its length plus one, 0 for none), entry
// count, entries (length-prefixed protobuf).
//
// The synced offset tells a torn tail from a damaged log. Replay stops at
// the first record that does not check out; the rest of the file is then
// scanned, at every offset, for a valid record of the same generation (the
// generation is unique to one pass over the file, so older records lying
// beyond the live ones never match). A later record whose synced offset
// lies beyond the bad one proves the bad one had been made durable and
// acknowledged: the file was damaged afterwards, and Open fails with
// ErrCorrupt rather than drop the acknowledged rounds after it. Otherwise
// the bad record was being written when the node stopped (the writer
// writes the next rounds' records while the previous one syncs, so later
// records of that window may be whole while it is torn): none of it was
// acknowledged, replay ends there, and the next generation overwrites it.
// A damaged record that is the last one written cannot be told from a torn
// one; raft then finds its log behind what it acknowledged
// (raftnode.ErrLogBehind).
//
// The partitions of a store (store.go) share one WAL file, each writing
// its records in a region of its own, [base, base+size), as if the
// region were the whole file: offsets, restarts and replay are the
// region's. They share its fdatasyncs too (fileSync), so that the disk
// syncs one file per round, not one per partition. A record that does not
// fit in what is left of its region is never written: the writer commits
// the round to bbolt instead (errWALFull), which restarts the region.
//
// Records written before the synced offset existed have a generation
// field without walFormat2. A file that holds them was left by an older
// kvd that did not commit bbolt before it stopped; they are replayed as
// that kvd did (up to the first that does not check out) and the commit
// at the end of Open moves on to a new generation in the current format.
type wal struct {
	// f is the file, shared with the other partitions' WALs when the
	// store's partitions share one (openSharedWAL); owned says whether
	// close closes it. The records live in [base, base+size) of it.
	f     *os.File
	owned bool
	path  string
	base  int64
	size  int64
	off   int64  // where the next record goes, from base
	gen   uint64 // generation of the records being written
	sync  bool
	syncs *fileSync // the fdatasyncs of f, shared with f's other WALs
	// softLimit: past it, the writer commits bbolt, restarting the WAL.
	softLimit int64
	buf       []byte
	// written is off, published for the syncer, which stores in synced the
	// written it loaded before an fdatasync that then completed: every
	// record before synced was acknowledged as durable. The writer puts
	// synced in each record.
	written, synced atomic.Int64
}

// walPrealloc is the size the file is filled to once (unless
// Options.WALSize says otherwise), so that rewriting it from the start
// never changes its size and fdatasync need not write file metadata. Past
// 15/16 of it, the writer commits bbolt, which restarts the WAL. A
// variable so that tests, which open hundreds of engines, can use less.
var walPrealloc int64 = 64 << 20

// walPath names the WAL of the bbolt file at dbPath: kvd.db's is kvd.wal.
func walPath(dbPath string) string {
	return strings.TrimSuffix(dbPath, filepath.Ext(dbPath)) + ".wal"
}

const (
	walHeaderSize = 16
	// maxWALRecord bounds a record's payload when reading, so a corrupt
	// length cannot make Open allocate gigabytes.
	maxWALRecord = 1 << 30
	// walFormat2 marks, in a record's generation field, a record whose
	// payload starts with the synced offset.
	walFormat2 = 1 << 63
)

var crc32c = crc32.MakeTable(crc32.Castagnoli)

// openWAL opens the WAL at path, filled to size bytes (walPrealloc when
// 0) or kept at the size it has if larger.
func openWAL(path string, size int64, sync bool) (*wal, error) {
	if size <= 0 {
		size = walPrealloc
	}
	dir := filepath.Dir(path)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("storage: open wal: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("storage: stat wal: %w", err)
	}
	size = max(size, fi.Size())
	w := newWAL(f, path, 0, size, sync, &fileSync{})
	w.owned = true
	if fi.Size() < size {
		if err := preallocate(f, fi.Size(), size, dir); err != nil {
			_ = f.Close()
			return nil, err
		}
	}
	return w, nil
}

func newWAL(f *os.File, path string, base, size int64, sync bool, syncs *fileSync) *wal {
	return &wal{f: f, path: path, base: base, size: size, sync: sync, syncs: syncs, softLimit: size / 16 * 15}
}

// openSharedWAL opens the one WAL file at path of a store's partitions:
// n regions of region bytes, one WAL each, in that order, so that one
// fdatasync makes durable the records every partition wrote before it
// (fileSync). The file is filled to n*region bytes, or kept larger. file
// is the whole file, which owns it: closing it closes the regions' file.
func openSharedWAL(path string, n int, region int64, sync bool) (file *wal, regions []*wal, err error) {
	file, err = openWAL(path, int64(n)*region, sync)
	if err != nil {
		return nil, nil, err
	}
	file.syncs.shared = n > 1
	regions = make([]*wal, n)
	for i := range regions {
		regions[i] = newWAL(file.f, path, int64(i)*region, region, sync, file.syncs)
	}
	return file, regions, nil
}

// preallocate fills f with zeros from from up to size and makes that
// durable, directory entry included.
func preallocate(f *os.File, from, size int64, dir string) error {
	zeros := make([]byte, 1<<20)
	for off := from; off < size; off += int64(len(zeros)) {
		n := min(int64(len(zeros)), size-off)
		if _, err := f.WriteAt(zeros[:n], off); err != nil {
			return fmt.Errorf("storage: preallocate wal: %w", err)
		}
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("storage: sync wal: %w", err)
	}
	return syncDir(dir)
}

// syncDir makes dir's entries durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("storage: sync dir %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("storage: sync dir %s: %w", dir, err)
	}
	return nil
}

// close closes the file unless other WALs share it (the store closes it).
func (w *wal) close() error {
	if !w.owned {
		return nil
	}
	return w.f.Close()
}

// restart makes gen the generation of the records that follow, written
// from the start of the WAL's region.
func (w *wal) restart(gen uint64) {
	w.gen, w.off = gen, 0
	w.written.Store(0)
	w.synced.Store(0)
}

// walOp is one Save's durable part.
type walOp struct {
	shard   uint64
	hard    []byte   // marshalled pb.HardState, nil for none
	entries [][]byte // marshalled pb.Entry
}

func (op *walOp) empty() bool { return op.hard == nil && len(op.entries) == 0 }

// errWALFull is write's answer for a record that does not fit in what is
// left of the WAL: the writer commits the round to bbolt instead.
var errWALFull = errors.New("storage: record does not fit in the WAL")

// write appends one record holding ops; the syncer makes it durable.
func (w *wal) write(ops []walOp) error {
	var header [walHeaderSize]byte // filled in below
	b := append(w.buf[:0], header[:]...)
	b = binary.AppendUvarint(b, uint64(w.synced.Load()))
	b = appendWALOps(b, ops)
	binary.LittleEndian.PutUint32(b[4:], uint32(len(b)-walHeaderSize))
	binary.LittleEndian.PutUint64(b[8:], w.gen|walFormat2)
	binary.LittleEndian.PutUint32(b[0:], crc32.Checksum(b[8:], crc32c))
	w.buf = b
	if w.off+int64(len(b)) > w.size {
		return errWALFull
	}
	if _, err := w.f.WriteAt(b, w.base+w.off); err != nil {
		return fmt.Errorf("storage: write wal: %w", err)
	}
	w.off += int64(len(b))
	w.written.Store(w.off)
	return nil
}

func appendWALOps(b []byte, ops []walOp) []byte {
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
	return b
}

// walCorruptAdvice ends the errors of a damaged WAL: what an operator does.
const walCorruptAdvice = "do not delete or edit the file to get past this: restore the node's data directory from a backup, " +
	"or remove it and add the node back to its cluster as a new member (a new --id, with --join)"

// walReplay is what replay found.
type walReplay struct {
	records int
	// torn is the offset of the torn record replay stopped at, -1 when
	// the generation's records simply ended.
	torn int64
	// unacked counts valid records of the generation after the torn one:
	// written while it synced, never acknowledged, dropped with it.
	unacked int
}

// replay calls fn for every op of the records of generation gen, from the
// start of the file up to the first record that is not one, and checks
// that nothing acknowledged lies beyond it (see the top of this file).
func (w *wal) replay(gen uint64, fn func(walOp) error) (walReplay, error) {
	res := walReplay{torn: -1}
	size := w.size
	r := bufio.NewReaderSize(io.NewSectionReader(w.f, w.base, size), 1<<20)
	tag := gen | walFormat2
	legacy := false
	hdr := make([]byte, walHeaderSize)
	var off int64 // where the record being read starts
	for {
		if _, err := io.ReadFull(r, hdr); err != nil {
			break // end of file: no more records
		}
		g := binary.LittleEndian.Uint64(hdr[8:])
		if off == 0 && g == gen {
			legacy = true
		}
		if g != tag && !(legacy && g == gen) {
			break // zeros or an older generation: the end, unless damaged
		}
		body, ok, err := readRecord(hdr, off, size, func(p []byte) error {
			_, err := io.ReadFull(r, p)
			return err
		})
		if err != nil {
			return res, err
		}
		if !ok {
			res.torn = off
			break
		}
		payload := body
		if !legacy {
			if _, k := binary.Uvarint(payload); k > 0 {
				payload = payload[k:]
			} else {
				payload = nil
			}
		}
		ops, err := decodeWALOps(payload)
		if payload == nil || err != nil {
			// The checksum matched, so this is not a torn write.
			return res, fmt.Errorf("%w: %s: record %d at byte offset %d is malformed though its checksum matches; %s", ErrCorrupt, w.path, res.records, w.base+off, walCorruptAdvice)
		}
		for _, op := range ops {
			if err := fn(op); err != nil {
				return res, err
			}
		}
		res.records++
		off += walHeaderSize + int64(len(body))
	}
	if legacy {
		// Written before records carried the synced offset: a damaged
		// record cannot be told from a torn one.
		return res, nil
	}
	return res, w.checkTail(tag, off, size, &res)
}

// checkTail scans the file after stop, where replay stopped, at every
// offset for a valid record of the generation tagged tag. One that says
// the record at stop was synced before it was written proves the log
// damaged (ErrCorrupt); others were never acknowledged, and make the
// record at stop a torn one.
func (w *wal) checkTail(tag uint64, stop, size int64, res *walReplay) error {
	var pat [8]byte
	binary.LittleEndian.PutUint64(pat[:], tag)
	buf := make([]byte, 1<<20)
	// pos is the file offset of buf[0]; a record's generation field is
	// 8 bytes into it.
	for pos := stop + 1 + 8; pos+8 <= size; {
		n, err := w.f.ReadAt(buf[:min(int64(len(buf)), size-pos)], w.base+pos)
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("storage: read wal: %w", err)
		}
		chunk := buf[:n]
		for i := 0; ; {
			j := bytes.Index(chunk[i:], pat[:])
			if j < 0 {
				break
			}
			at := pos + int64(i+j) - 8
			synced, ok, err := w.recordAt(at, size)
			if err != nil {
				return err
			}
			if ok && synced > stop {
				return fmt.Errorf("%w: %s: the record at byte offset %d does not check out, but the one at offset %d was written after it had been synced: "+
					"the file was damaged after it was written, and replaying up to the damage would lose acknowledged writes; %s",
					ErrCorrupt, w.path, w.base+stop, w.base+at, walCorruptAdvice)
			}
			if ok {
				res.unacked++
				if res.torn < 0 {
					res.torn = stop
				}
			}
			i += j + 1
		}
		if n < 8 || pos+int64(n) >= size {
			break
		}
		// Overlap the next chunk so a tag across the boundary is found.
		pos += int64(n) - 7
	}
	return nil
}

// recordAt reads the record at off if it checks out, and returns its
// synced offset.
func (w *wal) recordAt(off, size int64) (synced int64, ok bool, err error) {
	if off+walHeaderSize > size {
		return 0, false, nil
	}
	hdr := make([]byte, walHeaderSize)
	if _, err := w.f.ReadAt(hdr, w.base+off); err != nil {
		return 0, false, fmt.Errorf("storage: read wal: %w", err)
	}
	payload, ok, err := readRecord(hdr, off, size, func(p []byte) error {
		_, err := w.f.ReadAt(p, w.base+off+walHeaderSize)
		return err
	})
	if !ok || err != nil {
		return 0, false, err
	}
	v, k := binary.Uvarint(payload)
	if k <= 0 {
		return 0, false, nil
	}
	return int64(v), true, nil
}

// readRecord reads, through read, the payload of the record at off whose
// header is hdr, in a file of size bytes; ok is false if the record does
// not check out (its length runs past the file or the bound, or its
// checksum fails).
func readRecord(hdr []byte, off, size int64, read func(p []byte) error) (payload []byte, ok bool, err error) {
	n := int64(binary.LittleEndian.Uint32(hdr[4:]))
	if n > maxWALRecord || off+walHeaderSize+n > size {
		return nil, false, nil
	}
	body := make([]byte, 8+n)
	copy(body, hdr[8:])
	if err := read(body[8:]); err != nil {
		return nil, false, fmt.Errorf("storage: read wal: %w", err)
	}
	if crc32.Checksum(body, crc32c) != binary.LittleEndian.Uint32(hdr) {
		return nil, false, nil
	}
	return body[8:], true, nil
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

package fsm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
)

// A shard's history is the list of its changes, one peerpb.HistoryEvent per
// put or delete, kept apart from the metadata (State.PutHistory) under
//
//	revision BE8 | index BE4
//
// where index orders the writes of one transaction (which share its
// revision). Apply writes an event in the same transaction as the change,
// so the history is exactly as durable as the data; like the metadata,
// events travel in snapshots, carry the store's checksum and are part of
// the state hash: replicas that applied the same log hold the same history,
// and the hash check proves it. Revisions are dense (every revision has at
// least one event), so the history holds exactly the revisions from its
// first key on: compaction (CompactHistory) drops a prefix and nothing
// else.
//
// Each event keeps the key's previous record as well, which the put or
// delete read anyway: a read at a past revision undoes the events after
// it (GetAt, RangeAt) instead of keeping every version under its own key.
// MaxCompactEvents bounds the events one CompactHistory command drops, so
// that one apply (and the write round holding it) stays short however far
// behind the trim is; the leader proposes the command again until done.
const MaxCompactEvents = 10_000

var (
	// ErrCompacted: a read or watch needs history the shard has dropped.
	// Returned wrapped in a *CompactedError.
	ErrCompacted = errors.New("fsm: revision compacted")
	// ErrFutureRevision: a read at a revision the shard has not reached.
	ErrFutureRevision = errors.New("fsm: revision not reached yet")
)

// CompactedError says which revisions a shard's history still holds.
type CompactedError struct {
	Revision int64 // asked for
	Oldest   int64 // the oldest revision whose changes are kept
}

func (e *CompactedError) Error() string {
	return fmt.Sprintf("%v: revision %d is gone; the shard's history starts at revision %d (reads from %d, watches from %d)",
		ErrCompacted, e.Revision, e.Oldest, e.Oldest-1, e.Oldest)
}

func (e *CompactedError) Unwrap() error { return ErrCompacted }

// changes records the events of one command: they share its revision and
// the proposer's time. history is the bytes the shard's history held
// before the command; bytes, what its events add.
type changes struct {
	rev, time      int64
	n              uint32
	history, bytes int64
}

// newChanges starts the changes of a command applied at the shard's next
// revision.
func newChanges(tx State, time int64) *changes {
	rev, history := loadRevision(tx)
	return &changes{rev: rev + 1, time: time, history: history}
}

// record stores one change event; prev is the key's record before it.
func (c *changes) record(tx State, ev *peerpb.HistoryEvent, prev *peerpb.StoredValue) error {
	ev.Prev, ev.TimeUnixMs = prev, c.time
	k := historyKey(c.rev)
	k = binary.BigEndian.AppendUint32(k, c.n)
	c.n++
	v := encodeEvent(ev)
	c.bytes += int64(len(k) + len(v))
	return tx.PutHistory(k, v)
}

// commit makes the command's revision the shard's, with its history's
// new size.
func (c *changes) commit(tx State) {
	storeRevision(tx, c.rev, c.history+c.bytes)
}

// historyKey is the first key of rev's events.
func historyKey(rev int64) []byte {
	return binary.BigEndian.AppendUint64(make([]byte, 0, 12), uint64(rev))
}

func historyRev(k []byte) (int64, bool) {
	if len(k) != 12 {
		return 0, false
	}
	return int64(binary.BigEndian.Uint64(k)), true
}

// compactHistory drops up to MaxCompactEvents events below c.below (capped
// at the shard revision + 1).
func compactHistory(tx State, c *peerpb.CompactHistory) *peerpb.CompactHistoryResult {
	rev, history := loadRevision(tx)
	below := min(c.GetBelow(), rev+1)
	limit := int(c.GetMaxEvents())
	if limit <= 0 || limit > MaxCompactEvents {
		limit = MaxCompactEvents
	}
	var (
		drop    [][]byte
		dropped int64
	)
	oldest := rev + 1
	tx.RangeHistory(nil, func(k, v []byte) bool {
		r, ok := historyRev(k)
		if !ok {
			return true
		}
		if r >= below || len(drop) == limit {
			oldest = r
			return false
		}
		drop = append(drop, bytes.Clone(k))
		dropped += int64(len(k) + len(v))
		return true
	})
	for _, k := range drop {
		tx.DeleteHistory(k)
	}
	if dropped > 0 {
		storeRevision(tx, rev, max(history-dropped, 0))
	}
	return &peerpb.CompactHistoryResult{Oldest: oldest, Done: oldest >= below}
}

// HistoryBytes is the size of a shard's history: the bytes of its events'
// keys and encoded values, kept with the revision as events are written
// and dropped.
func HistoryBytes(r View) int64 {
	_, history := decodeRevision(r.GetMeta(metaRevision))
	return history
}

// HistoryByteCut returns the revision below which dropping the oldest
// events frees at least excess bytes (whole revisions: a revision's events
// go together), looking at no more than maxScan events: past them, the
// revision after the last one looked at.
func HistoryByteCut(r View, excess int64, maxScan int) int64 {
	oldest, _ := HistoryBounds(r)
	cut, n := oldest, 0
	var freed int64
	r.ScanHistory(nil, nil, func(k, v []byte) bool {
		rev, ok := historyRev(k)
		if !ok {
			return true
		}
		if rev >= cut && (freed >= excess || n >= maxScan) {
			return false
		}
		freed += int64(len(k) + len(v))
		cut = rev + 1
		n++
		return true
	})
	return cut
}

// HistoryBounds returns the oldest revision a shard's history holds (its
// revision + 1 when it holds none) and the shard's revision. Reads are
// possible at oldest-1 and later, watches from oldest.
func HistoryBounds(r View) (oldest, rev int64) {
	rev = Revision(r)
	oldest = rev + 1
	r.ScanHistory(nil, nil, func(k, _ []byte) bool {
		if h, ok := historyRev(k); ok {
			oldest = h
			return false
		}
		return true
	})
	return oldest, rev
}

// HistoryCut returns the revision of the first event recorded at or after
// cutoffMs (by the proposer's clock), looking at no more than maxScan
// events: past them, the revision after the last one looked at. The
// leader trims below it for --history-retention.
func HistoryCut(r View, cutoffMs int64, maxScan int) (int64, error) {
	oldest, _ := HistoryBounds(r)
	cut, n := oldest, 0
	err := events(r, oldest, func(rev int64, he *peerpb.HistoryEvent) bool {
		if he.GetTimeUnixMs() >= cutoffMs {
			cut = rev
			return false
		}
		cut = rev + 1
		n++
		return n < maxScan
	})
	return cut, err
}

// EventPos is a place in a shard's history: the event numbered Index
// (from 0) of revision Rev. {Rev, 0} is the start of revision Rev.
type EventPos struct {
	Rev   int64
	Index uint32
}

// Before reports whether p comes before q.
func (p EventPos) Before(q EventPos) bool {
	return p.Rev < q.Rev || p.Rev == q.Rev && p.Index < q.Index
}

// EventOverhead is at most what one event's encoding in a WatchResponse
// takes beyond its key (twice, with a prev kv) and its values: field
// tags, lengths, revisions, version, lease and shard.
const EventOverhead = 160

// ReadEvents returns the events from position from on whose key match
// accepts, in order, with their values and prev kvs (kv.Value is filled in
// as history.go's header explains) and each one's index in its revision,
// and next: where a read that goes on starts. It stops before an event that
// would take it past limit events or maxBytes (0: no limit; each event
// counted at its key twice, its value, its prev value and EventOverhead)
// but reads at least one: at the start of that event's revision when it
// has read an earlier one, so that revisions are split only where one
// alone is past the limit. next is then {that revision, 0}, or, when it
// split one, that revision and the index of its first event not read;
// after the last event, {the shard's revision + 1, 0}. Every revision
// before next.Rev is complete. A from below the oldest revision kept is a
// *CompactedError. Events' Shard is not set.
func ReadEvents(r View, from EventPos, match func(key []byte) bool, limit int, maxBytes int64) (evs []*kvpb.Event, index []uint32, next EventPos, err error) {
	oldest, cur := HistoryBounds(r)
	if from.Rev < oldest {
		return nil, nil, EventPos{}, &CompactedError{Revision: from.Rev, Oldest: oldest}
	}
	next = EventPos{Rev: cur + 1}
	// open: the puts whose value the key's next change (or its current
	// record) tells, by key.
	open := map[string]*kvpb.Event{}
	var (
		size     int64 // of the events gathered, their values included
		revStart int   // the first event in evs of the revision being read
	)
	err = eventsFrom(r, from, func(pos EventPos, he *peerpb.HistoryEvent) bool {
		if len(evs) > 0 && pos.Rev > evs[len(evs)-1].GetKv().GetModRevision() {
			revStart = len(evs)
		}
		if !match(he.GetKey()) {
			return true
		}
		n := int64(2*len(he.GetKey())) + he.GetValueSize() + int64(len(he.GetPrev().GetValue())) + EventOverhead
		if len(evs) > 0 && ((limit > 0 && len(evs) >= limit) || (maxBytes > 0 && size+n > maxBytes)) {
			if revStart == 0 {
				next = pos // this revision alone is past the limit
				return false
			}
			// Stop at the start of this revision: what was read of it
			// goes, and a put among it no longer waits for its value.
			for _, ev := range evs[revStart:] {
				if k := string(ev.GetKv().GetKey()); open[k] == ev {
					delete(open, k)
				}
			}
			evs, index = evs[:revStart], index[:revStart]
			next = EventPos{Rev: pos.Rev}
			return false
		}
		size += n
		ev := toEvent(pos.Rev, he)
		if p, ok := open[string(he.GetKey())]; ok {
			p.Kv.Value = ev.GetPrevKv().GetValue()
			delete(open, string(he.GetKey()))
		}
		if ev.GetType() == kvpb.Event_PUT {
			open[string(he.GetKey())] = ev
		}
		evs = append(evs, ev)
		index = append(index, pos.Index)
		return true
	})
	if err != nil || len(open) == 0 {
		return evs, index, next, err
	}
	// The rest changed at or after next, or not since: their value is the
	// current record's, or the prev of their next change.
	later := map[string]*kvpb.Event{}
	for k, ev := range open {
		kv, err := Get(r, []byte(k))
		if err != nil {
			return nil, nil, EventPos{}, err
		}
		if kv != nil && kv.GetModRevision() == ev.GetKv().GetModRevision() {
			ev.Kv.Value = kv.GetValue()
			continue
		}
		later[k] = ev
	}
	if len(later) == 0 {
		return evs, index, next, nil
	}
	err = eventsFrom(r, next, func(_ EventPos, he *peerpb.HistoryEvent) bool {
		if ev, ok := later[string(he.GetKey())]; ok {
			ev.Kv.Value = he.GetPrev().GetValue()
			delete(later, string(he.GetKey()))
		}
		return len(later) > 0
	})
	return evs, index, next, err
}

// events calls fn with each stored event from revision from on, in order,
// until fn returns false.
func events(r View, from int64, fn func(rev int64, he *peerpb.HistoryEvent) bool) error {
	return eventsFrom(r, EventPos{Rev: from}, func(pos EventPos, he *peerpb.HistoryEvent) bool { return fn(pos.Rev, he) })
}

// eventsFrom calls fn with each stored event from position from on, in
// order, until fn returns false.
func eventsFrom(r View, from EventPos, fn func(pos EventPos, he *peerpb.HistoryEvent) bool) error {
	var err error
	start := historyKey(from.Rev)
	if from.Index > 0 {
		start = binary.BigEndian.AppendUint32(start, from.Index)
	}
	r.ScanHistory(start, nil, func(k, v []byte) bool {
		rev, ok := historyRev(k)
		if !ok {
			return true
		}
		var he peerpb.HistoryEvent
		if err = proto.Unmarshal(v, &he); err != nil {
			err = fmt.Errorf("%w: history event at revision %d: %v", ErrCorrupt, rev, err)
			return false
		}
		return fn(EventPos{Rev: rev, Index: binary.BigEndian.Uint32(k[8:])}, &he)
	})
	return err
}

// toEvent is he as a kvpb.Event without the value of a put.
func toEvent(rev int64, he *peerpb.HistoryEvent) *kvpb.Event {
	ev := &kvpb.Event{Kv: &kvpb.KeyValue{Key: he.GetKey(), ModRevision: rev}}
	if he.GetDelete() {
		ev.Type = kvpb.Event_DELETE
	} else {
		ev.Kv.CreateRevision, ev.Kv.Version = he.GetCreateRevision(), he.GetVersion()
	}
	if p := he.GetPrev(); p != nil {
		ev.PrevKv = toKV(he.GetKey(), p)
	}
	return ev
}

// pastRevision checks that the shard can be read at rev.
func pastRevision(r View, rev int64) error {
	oldest, cur := HistoryBounds(r)
	switch {
	case rev > cur:
		return fmt.Errorf("%w: revision %d; the shard is at revision %d", ErrFutureRevision, rev, cur)
	case rev < oldest-1:
		return &CompactedError{Revision: rev, Oldest: oldest}
	}
	return nil
}

// GetAt reads key as it was at revision rev of its shard: the previous
// record of the first event on key after rev, or the current record if
// none changed it since. It scans the history after rev.
func GetAt(r View, key []byte, rev int64) (*kvpb.KeyValue, error) {
	if err := pastRevision(r, rev); err != nil {
		return nil, err
	}
	var (
		kv    *kvpb.KeyValue
		found bool
	)
	err := events(r, rev+1, func(_ int64, he *peerpb.HistoryEvent) bool {
		if bytes.Equal(he.GetKey(), key) {
			if p := he.GetPrev(); p != nil {
				kv = toKV(key, p)
			}
			found = true
			return false
		}
		return true
	})
	if err != nil || found {
		return kv, err
	}
	return Get(r, key)
}

// RangeAt calls fn for each key in [start, end) as it was at revision rev,
// in key order, until fn returns false. It undoes the events after rev on
// the keys of the range, so it costs a scan of the history after rev. Of
// each key it touched it holds where its earliest change is, not the
// record that change replaced: a page of a few keys must not hold every
// value the history after rev replaced (up to the history's size). The
// records are read back as they are emitted.
func RangeAt(r View, start, end []byte, rev int64, fn func(*kvpb.KeyValue) bool) error {
	if err := pastRevision(r, rev); err != nil {
		return err
	}
	past := map[string]pastRef{} // key → its earliest change after rev
	var err error
	r.ScanHistory(historyKey(rev+1), nil, func(hk, v []byte) bool {
		if _, ok := historyRev(hk); !ok {
			return true
		}
		var he peerpb.HistoryEvent
		if err = proto.Unmarshal(v, &he); err != nil {
			err = fmt.Errorf("%w: history event %x: %v", ErrCorrupt, hk, err)
			return false
		}
		k := he.GetKey()
		if bytes.Compare(k, start) < 0 || (len(end) > 0 && bytes.Compare(k, end) >= 0) {
			return true
		}
		if _, ok := past[string(k)]; !ok {
			past[string(k)] = pastRef{event: bytes.Clone(hk), existed: he.GetPrev() != nil}
		}
		return true
	})
	if err != nil {
		return err
	}
	// record reads back key's record at rev from its earliest change.
	record := func(key string) (*kvpb.KeyValue, bool) {
		var kv *kvpb.KeyValue
		r.ScanHistory(past[key].event, nil, func(hk, v []byte) bool {
			var he peerpb.HistoryEvent
			if e := proto.Unmarshal(v, &he); e != nil || !bytes.Equal(hk, past[key].event) || he.GetPrev() == nil {
				err = fmt.Errorf("%w: history event %x changed while read", ErrCorrupt, past[key].event)
				return false
			}
			kv = toKV([]byte(key), he.GetPrev())
			return false
		})
		return kv, err == nil && kv != nil
	}
	// Keys that existed at rev and are gone now come from past alone;
	// merge them, in order, with the current keys.
	var gone []string
	for k, p := range past {
		if p.existed {
			gone = append(gone, k)
		}
	}
	slices.Sort(gone)
	more := true
	emit := func(key string) bool {
		kv, ok := record(key)
		return ok && fn(kv)
	}
	emitGone := func(until []byte) bool {
		for len(gone) > 0 && (until == nil || gone[0] < string(until)) {
			k := gone[0]
			gone = gone[1:]
			if !emit(k) {
				return false
			}
		}
		return true
	}
	rerr := Range(r, start, end, func(kv *kvpb.KeyValue) bool {
		k := string(kv.GetKey())
		if more = emitGone(kv.GetKey()); !more {
			return false
		}
		if p, ok := past[k]; ok {
			if len(gone) > 0 && gone[0] == k {
				gone = gone[1:]
			}
			if !p.existed {
				return true
			}
			more = emit(k)
			return more
		}
		more = fn(kv)
		return more
	})
	if rerr != nil {
		return rerr
	}
	if more {
		emitGone(nil)
	}
	return err
}

// pastRef is where RangeAt finds a key's record at its revision: the
// history key of the key's earliest change after it, and whether the key
// existed before that change.
type pastRef struct {
	event   []byte
	existed bool
}

package storage

import (
	"slices"
	"time"
)

// Stats are the engine's cumulative counters since Open.
type Stats struct {
	// Commits counts bbolt transactions committed; each spans the rounds
	// since the previous one.
	Commits uint64
	// Updates counts Shard.Save calls merged into rounds; Updates / Syncs
	// is the group-commit factor.
	Updates uint64
	// Entries counts raft entries appended to shard logs.
	Entries uint64
	// Applied counts committed entries applied (all types).
	Applied uint64
	// Syncs counts the times rounds were made durable: an fdatasync of
	// the WAL, covering every round written since the previous one, or a
	// bbolt commit (which syncs data pages, then the meta page), between
	// rounds too. Entries / Syncs is entries per sync. A Store whose
	// partitions share the WAL counts each fdatasync of it once, however
	// many partitions' rounds it made durable.
	Syncs uint64
	// walSyncs is the part of Syncs that are WAL fdatasyncs.
	walSyncs uint64
	// SyncNanos is the distribution of the time from a round's WAL write
	// to the fdatasync that made it durable (the oldest round's, when one
	// covers several), or of a bbolt commit.
	SyncNanos Histogram
	// CommitNanos is the distribution of bbolt commit latency: page
	// writes and fsyncs.
	CommitNanos Histogram
	// CommitBytes counts the bytes of the pages bbolt commits wrote: a
	// value lands in a shard's log, its state and its history, so large
	// writes cost several times their size here.
	CommitBytes uint64
}

// Histogram counts observations in fixed buckets.
type Histogram struct {
	// Bounds are the inclusive upper bounds of the buckets in nanoseconds,
	// ascending: powers of two from 64 µs to about 1 s.
	Bounds []uint64
	// Counts has len(Bounds)+1 entries; the last counts observations above
	// every bound.
	Counts []uint64
	// Sum is the total of all observations in nanoseconds.
	Sum uint64
}

// Observe adds one observation.
func (h *Histogram) Observe(d time.Duration) {
	ns := uint64(max(d, 0))
	i, _ := slices.BinarySearch(h.Bounds, ns)
	h.Counts[i]++
	h.Sum += ns
}

// Count returns the number of observations.
func (h *Histogram) Count() uint64 {
	var n uint64
	for _, c := range h.Counts {
		n += c
	}
	return n
}

func newStats() Stats {
	var bounds []uint64
	for b := 64 * time.Microsecond; b <= 1100*time.Millisecond; b *= 2 {
		bounds = append(bounds, uint64(b))
	}
	return Stats{
		CommitNanos: Histogram{Bounds: bounds, Counts: make([]uint64, len(bounds)+1)},
		SyncNanos:   Histogram{Bounds: slices.Clone(bounds), Counts: make([]uint64, len(bounds)+1)},
	}
}

func (s Stats) clone() Stats {
	s.CommitNanos.Bounds = slices.Clone(s.CommitNanos.Bounds)
	s.CommitNanos.Counts = slices.Clone(s.CommitNanos.Counts)
	s.SyncNanos.Bounds = slices.Clone(s.SyncNanos.Bounds)
	s.SyncNanos.Counts = slices.Clone(s.SyncNanos.Counts)
	return s
}

// add adds o's counters to s's; both have the buckets newStats makes.
func (s *Stats) add(o Stats) {
	s.Commits += o.Commits
	s.CommitBytes += o.CommitBytes
	s.Updates += o.Updates
	s.Entries += o.Entries
	s.Applied += o.Applied
	s.Syncs += o.Syncs
	s.walSyncs += o.walSyncs
	s.SyncNanos.add(o.SyncNanos)
	s.CommitNanos.add(o.CommitNanos)
}

func (h *Histogram) add(o Histogram) {
	for i, c := range o.Counts {
		h.Counts[i] += c
	}
	h.Sum += o.Sum
}

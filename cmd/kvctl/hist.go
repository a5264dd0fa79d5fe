package main

import (
	"math"
	"math/bits"
	"time"
)

// histogram records durations in log-linear buckets, the layout of
// HdrHistogram: values below 2^histSubBits ns get a bucket each; above,
// every power of two is split into 2^(histSubBits-1) equal buckets. A
// recorded value is off by at most 1/2^(histSubBits-1) of itself (0.8 %
// with 8 bits), over the whole range from 1 ns to hours, in a fixed 60 KB
// of counters, and recording is an index computation and an increment.
//
// A histogram is not safe for concurrent use: each bench worker records
// into its own, and the report merges them.
//
// It is not github.com/HdrHistogram/hdrhistogram-go (v1.4.0), whose layout
// at 2 significant digits is this one: that library rounds a quantile's
// rank half up and answers its bucket's highest value uncapped, so a p90 of
// 7 recordings is the 6th and p100 exceeds the largest recording, and its
// min, max and mean are bucket approximations. The report promises
// quantiles that never understate and an exact min, mean and max; keeping
// those beside the library would leave only the bucket index to it.
type histogram struct {
	counts   []uint64
	n        uint64
	min, max int64
	sum      float64
}

const (
	histSubBits = 8
	histSub     = 1 << histSubBits // values below get exact buckets
	histHalf    = histSub / 2      // buckets per power of two above
	histMaxExp  = 63 - histSubBits // shifts up to the top of int64
	histBuckets = histSub + histMaxExp*histHalf
)

func newHistogram() *histogram {
	return &histogram{counts: make([]uint64, histBuckets), min: math.MaxInt64}
}

// bucketOf returns the index of v's bucket (v ≥ 0).
func bucketOf(v int64) int {
	if v < histSub {
		return int(max(v, 0))
	}
	e := bits.Len64(uint64(v)) - histSubBits // ≥ 1
	top := int(v >> e)                       // in [histHalf, histSub)
	return histSub + (e-1)*histHalf + top - histHalf
}

// bucketRange returns the smallest and largest value of bucket i.
func bucketRange(i int) (lo, hi int64) {
	if i < histSub {
		return int64(i), int64(i)
	}
	e := (i-histSub)/histHalf + 1
	top := int64((i-histSub)%histHalf + histHalf)
	return top << e, (top+1)<<e - 1
}

func (h *histogram) record(d time.Duration) {
	v := max(int64(d), 0)
	h.counts[bucketOf(v)]++
	h.n++
	h.sum += float64(v)
	h.min = min(h.min, v)
	h.max = max(h.max, v)
}

func (h *histogram) merge(o *histogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.sum += o.sum
	h.min = min(h.min, o.min)
	h.max = max(h.max, o.max)
}

// quantile returns the value at quantile q in [0, 1]: the largest value
// of the bucket holding the ceil(q·n)-th smallest recording (HdrHistogram's
// "highest equivalent value"), capped by the largest value recorded. So it
// never understates a latency.
func (h *histogram) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	rank = min(max(rank, 1), h.n)
	var seen uint64
	for i, c := range h.counts {
		if seen += c; seen >= rank {
			_, hi := bucketRange(i)
			return time.Duration(min(hi, h.max))
		}
	}
	return time.Duration(h.max)
}

func (h *histogram) mean() time.Duration {
	if h.n == 0 {
		return 0
	}
	return time.Duration(h.sum / float64(h.n))
}

// histRow is one row of the printed histogram: the recordings in
// [LT/2, LT) (the first row also holds 0).
type histRow struct {
	LT    time.Duration
	Count uint64
}

// rows folds the fine buckets into power-of-two rows for display, from the
// first non-empty one to the last (a log scale: each row doubles). A fine
// bucket never straddles a power of two, so the folding is exact.
func (h *histogram) rows() []histRow {
	if h.n == 0 {
		return nil
	}
	var byPow [65]uint64 // byPow[k]: values v with bits.Len64(v) == k, i.e. v < 2^k
	for i, c := range h.counts {
		if c > 0 {
			lo, _ := bucketRange(i)
			byPow[bits.Len64(uint64(lo))] += c
		}
	}
	first, last := -1, 0
	for k, c := range byPow {
		if c > 0 {
			if first < 0 {
				first = k
			}
			last = k
		}
	}
	var out []histRow
	for k := first; k <= last; k++ {
		out = append(out, histRow{LT: time.Duration(uint64(1) << min(k, 63)), Count: byPow[k]})
	}
	return out
}

package hashring

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"math/bits"
	"slices"

	"github.com/cespare/xxhash/v2"
)

// DefaultVnodes is the number of virtual points each shard owns unless the
// cluster map says otherwise.
const DefaultVnodes = 128

// Errors returned by New. Match them with errors.Is; New wraps them with the
// offending value.
var (
	ErrNoShards       = errors.New("hashring: no shards")
	ErrDuplicateShard = errors.New("hashring: duplicate shard id")
	ErrVnodes         = errors.New("hashring: invalid vnode count")
)

// Ring maps keys to shards. It is immutable once New returns it, so any
// number of goroutines may call its methods concurrently. A Ring must be
// built by New; the zero value is not usable.
type Ring struct {
	// hashes and owners are parallel: point i sits at hashes[i] and belongs
	// to owners[i]. Sorted by (hash, owner), so a lower-bound search on
	// hashes finds the first point at or after a key's hash, and among
	// points with equal hashes the lowest shard id wins.
	hashes []uint64
	owners []uint64
	shards []uint64 // sorted, distinct
	vnodes int
}

// Bounds of a ring's size. A ring is built from a cluster map that came
// over the network (from a peer, or to a client), and its point table is
// allocated up front: a map claiming billions of vnodes must be an error,
// not an allocation that kills the process.
const (
	MaxVnodes = 4096    // points per shard
	MaxPoints = 1 << 22 // points in all: 64 MiB of table
)

// New builds the ring for the given shard ids, each owning vnodes points.
// The order of shards does not matter; the slice is not retained. It
// returns ErrNoShards for an empty list, ErrDuplicateShard when an id
// repeats and ErrVnodes when vnodes is not in [1, MaxVnodes] or the ring
// would have more than MaxPoints points.
func New(shards []uint64, vnodes int) (*Ring, error) {
	if len(shards) == 0 {
		return nil, ErrNoShards
	}
	if vnodes < 1 || vnodes > MaxVnodes || vnodes > MaxPoints/len(shards) {
		return nil, fmt.Errorf("%w: %d for %d shards (at most %d per shard, %d points in all)", ErrVnodes, vnodes, len(shards), MaxVnodes, MaxPoints)
	}
	sorted := slices.Clone(shards)
	slices.Sort(sorted)
	for i := 1; i < len(sorted); i++ {
		if sorted[i] == sorted[i-1] {
			return nil, fmt.Errorf("%w: %d", ErrDuplicateShard, sorted[i])
		}
	}
	pts := make([]ringPoint, 0, len(sorted)*vnodes)
	for _, s := range sorted {
		for v := 0; v < vnodes; v++ {
			pts = append(pts, ringPoint{hash: pointHash(s, uint64(v), uint64(vnodes)), shard: s})
		}
	}
	r := build(pts)
	r.shards = sorted
	r.vnodes = vnodes
	return r, nil
}

type ringPoint struct {
	hash  uint64
	shard uint64
}

// build sorts pts by (hash, shard) and lays them out for binary search.
func build(pts []ringPoint) *Ring {
	slices.SortFunc(pts, func(a, b ringPoint) int {
		if c := cmp.Compare(a.hash, b.hash); c != 0 {
			return c
		}
		return cmp.Compare(a.shard, b.shard)
	})
	r := &Ring{
		hashes: make([]uint64, len(pts)),
		owners: make([]uint64, len(pts)),
	}
	for i, p := range pts {
		r.hashes[i] = p.hash
		r.owners[i] = p.shard
	}
	return r
}

// Shard returns the shard that owns key: the owner of the first point at or
// after KeyHash(key), wrapping past the top of the circle to the first
// point. It does not allocate and does not retain key.
func (r *Ring) Shard(key []byte) uint64 {
	return r.lookup(KeyHash(key))
}

// lookup is Shard for an already computed hash.
func (r *Ring) lookup(h uint64) uint64 {
	// Lower bound: the first i with hashes[i] >= h.
	lo, hi := 0, len(r.hashes)
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		if r.hashes[mid] < h {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	if lo == len(r.hashes) {
		lo = 0 // past the last point: wrap to the first
	}
	return r.owners[lo]
}

// Shards returns the ring's shard ids in ascending order. The slice is a
// copy the caller owns.
func (r *Ring) Shards() []uint64 {
	return slices.Clone(r.shards)
}

// Vnodes returns the number of points each shard owns.
func (r *Ring) Vnodes() int { return r.vnodes }

// HashTag returns the part of key that is hashed: the bytes between the
// first '{' and the first '}' after it when that part is non-empty (as in
// Redis Cluster), otherwise the whole key. The result aliases key.
func HashTag(key []byte) []byte {
	open := bytes.IndexByte(key, '{')
	if open < 0 {
		return key
	}
	n := bytes.IndexByte(key[open+1:], '}')
	if n <= 0 { // no closing brace, or "{}": hash the whole key
		return key
	}
	return key[open+1 : open+1+n]
}

// KeyHash returns the position of key on the circle: the 64-bit xxHash
// (XXH64, seed 0) of HashTag(key). XXH64 is specified byte for byte, so
// every node, client and Go version computes the same value.
func KeyHash(key []byte) uint64 {
	return xxhash.Sum64(HashTag(key))
}

// pointHash returns the position of vnode v of shard on a ring with vnodes
// points per shard. It depends only on its arguments, never on the other
// shards, so adding or removing a shard never moves another shard's points
// and therefore never moves a key between two shards that stay.
//
// The circle is cut into vnodes equal arcs; vnode v of every shard lies in
// arc v, at the fraction offset(shard-1, v) of the arc. See doc.go for why.
func pointHash(shard, v, vnodes uint64) uint64 {
	// (v*2^64 + off) / vnodes: arc v starts at v*2^64/vnodes and off/2^64
	// is the fraction of the arc. v < vnodes, so the quotient fits.
	q, _ := bits.Div64(v, offset(shard-1, v), vnodes)
	return q
}

// offset returns, as a 64-bit binary fraction, where sequence index i sits
// inside arc v. Index 0 sits at 0. Index 2^k + j (level k) sits half a
// level-k gap, 2^-(k+1), before the index it splits, (j + rot(v,k)) mod 2^k.
// The first 2^k indices therefore form the grid of multiples of 2^-k, and
// any prefix of the sequence leaves gaps of one or two 2^-(k+1) units.
// rot changes with the arc, so which older index a new one splits rotates
// evenly over the arcs.
func offset(i, v uint64) uint64 {
	var off uint64
	for i != 0 {
		k := bits.Len64(i) - 1
		off -= 1 << (63 - k)
		mask := uint64(1)<<k - 1
		i = (i&mask + rot(v, k)) & mask
	}
	return off
}

// rot is the level-k rotation in arc v: v*g + c with g odd, fixed per
// level. For a fixed k, v -> rot(v,k) mod 2^k is a bijection on every run
// of 2^k consecutive arcs, so when 2^k divides vnodes each older index is
// split by the level-k indices in exactly the same number of arcs. The
// per-level constants keep arcs from being mere relabelings of each other
// when ids are not dense (for example random 64-bit ids).
func rot(v uint64, k int) uint64 {
	g := splitmix64(uint64(2*k+1)) | 1
	c := splitmix64(uint64(2*k + 2))
	return v*g + c
}

// splitmix64 is the SplitMix64 output function (Steele, Lea, Flood 2014):
// a fixed bijective mixer, used only to derive constants.
func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

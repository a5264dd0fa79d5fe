// Package memstate is a shard's state machine state held in memory: three
// sorted maps (kv, meta and history) and a state hash, implementing fsm.State and
// fsm.View without a storage engine. fsm's unit tests and fuzzers apply
// commands to it; it is not for production, where state must survive a
// crash (storage.Txn).
package memstate

import (
	"bytes"
	"encoding/binary"
	"errors"
	"slices"
	"strings"

	"github.com/cespare/xxhash/v2"
)

// ErrInvalidKey is Put's answer for an empty key, as storage refuses one.
var ErrInvalidKey = errors.New("memstate: empty key")

// State is one shard's kv data and metadata. Index is the log index of the
// command being applied, which CheckHash records; the caller moves it.
// Not safe for concurrent use.
type State struct {
	Index uint64

	kv, meta, hist table
	hash           uint64
	// checked is what the last CheckHash recorded.
	checkedIndex, checkedHash uint64
	checked                   bool
}

// New returns an empty State.
func New() *State {
	return &State{kv: table{name: 'k'}, meta: table{name: 'm'}, hist: table{name: 'h'}}
}

// table is a sorted map: keys in order beside a map from key to value.
type table struct {
	name byte // mixed into each pair's checksum, so the tables differ
	keys []string
	vals map[string][]byte
}

// sum is the checksum of one pair, summed into the state hash: a sum,
// like storage's, does not depend on the order pairs were written in.
func (t *table) sum(key string, value []byte) uint64 {
	var d xxhash.Digest
	d.Reset()
	_, _ = d.Write([]byte{t.name})
	_, _ = d.Write(binary.BigEndian.AppendUint64(nil, uint64(len(key))))
	_, _ = d.WriteString(key)
	_, _ = d.Write(value)
	return d.Sum64()
}

func (t *table) get(key []byte) []byte { return t.vals[string(key)] }

// put sets key and returns how the state hash moves.
func (t *table) put(key, value []byte) (add, sub uint64) {
	k := string(key)
	if old, ok := t.vals[k]; ok {
		sub = t.sum(k, old)
	} else {
		i, _ := slices.BinarySearch(t.keys, k)
		t.keys = slices.Insert(t.keys, i, k)
	}
	if t.vals == nil {
		t.vals = map[string][]byte{}
	}
	v := bytes.Clone(value)
	if v == nil {
		v = []byte{} // a present key never reads as nil
	}
	t.vals[k] = v
	return t.sum(k, v), sub
}

func (t *table) del(key []byte) (sub uint64) {
	k := string(key)
	old, ok := t.vals[k]
	if !ok {
		return 0
	}
	delete(t.vals, k)
	i, _ := slices.BinarySearch(t.keys, k)
	t.keys = slices.Delete(t.keys, i, i+1)
	return t.sum(k, old)
}

// scan calls fn for the keys from start on while in(key) holds. It walks
// a copy of the key list, so fn may delete the key it is given.
func (t *table) scan(start string, in func(string) bool, fn func(k, v []byte) bool) {
	i, _ := slices.BinarySearch(t.keys, start)
	for _, k := range slices.Clone(t.keys[i:]) {
		if !in(k) {
			return
		}
		v, ok := t.vals[k]
		if !ok {
			continue // deleted by fn
		}
		if !fn([]byte(k), v) {
			return
		}
	}
}

func (s *State) move(add, sub uint64) { s.hash += add - sub }

// Get returns key's kv value, nil if absent.
func (s *State) Get(key []byte) []byte { return s.kv.get(key) }

// GetMeta returns key's metadata value, nil if absent.
func (s *State) GetMeta(key []byte) []byte { return s.meta.get(key) }

// Put sets key's kv value.
func (s *State) Put(key, value []byte) error {
	if len(key) == 0 {
		return ErrInvalidKey
	}
	s.move(s.kv.put(key, value))
	return nil
}

// PutMeta sets key's metadata value.
func (s *State) PutMeta(key, value []byte) error {
	if len(key) == 0 {
		return ErrInvalidKey
	}
	s.move(s.meta.put(key, value))
	return nil
}

// Delete removes key from the kv data.
func (s *State) Delete(key []byte) error {
	s.move(0, s.kv.del(key))
	return nil
}

// DeleteMeta removes key from the metadata.
func (s *State) DeleteMeta(key []byte) error {
	s.move(0, s.meta.del(key))
	return nil
}

// DeleteMetaRange removes every metadata key in [start, end).
func (s *State) DeleteMetaRange(start, end []byte) error {
	s.meta.scan(string(start), func(k string) bool { return k < string(end) }, func(k, _ []byte) bool {
		s.move(0, s.meta.del(k))
		return true
	})
	return nil
}

// Range calls fn for each kv key in [start, end) (end nil: to the last
// key) in key order until fn returns false.
func (s *State) Range(start, end []byte, fn func(k, v []byte) bool) {
	s.kv.scan(string(start), func(k string) bool { return end == nil || k < string(end) }, fn)
}

// RangeMeta calls fn for each metadata key with prefix in key order until
// fn returns false; fn may delete the key it is given.
func (s *State) RangeMeta(prefix []byte, fn func(k, v []byte) bool) {
	p := string(prefix)
	s.meta.scan(p, func(k string) bool { return strings.HasPrefix(k, p) }, fn)
}

// ScanMeta calls fn for each metadata key in [start, end) in key order
// until fn returns false.
func (s *State) ScanMeta(start, end []byte, fn func(k, v []byte) bool) {
	s.meta.scan(string(start), func(k string) bool { return end == nil || k < string(end) }, fn)
}

// PutHistory sets key's history value.
func (s *State) PutHistory(key, value []byte) error {
	if len(key) == 0 {
		return ErrInvalidKey
	}
	s.move(s.hist.put(key, value))
	return nil
}

// DeleteHistory removes key from the history.
func (s *State) DeleteHistory(key []byte) error {
	s.move(0, s.hist.del(key))
	return nil
}

// RangeHistory calls fn for each history key from start in key order
// until fn returns false.
func (s *State) RangeHistory(start []byte, fn func(k, v []byte) bool) {
	s.ScanHistory(start, nil, fn)
}

// ScanHistory calls fn for each history key in [start, end) (end nil: to
// the last) in key order until fn returns false.
func (s *State) ScanHistory(start, end []byte, fn func(k, v []byte) bool) {
	s.hist.scan(string(start), func(k string) bool { return end == nil || k < string(end) }, fn)
}

// StateHash is the sum of the checksums of every kv, metadata and history
// pair.
func (s *State) StateHash() uint64 { return s.hash }

// CheckHash records the state hash at Index and returns both.
func (s *State) CheckHash() (index, hash uint64, err error) {
	s.checkedIndex, s.checkedHash, s.checked = s.Index, s.hash, true
	return s.Index, s.hash, nil
}

// HashCheck returns what the last CheckHash recorded; ok is false if none
// did.
func (s *State) HashCheck() (index, hash uint64, ok bool) {
	return s.checkedIndex, s.checkedHash, s.checked
}

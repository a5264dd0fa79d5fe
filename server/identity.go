package server

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"strconv"
	"sync"

	"github.com/kvd/kvd/storage"
)

// Node metadata of peer identity (see transport's handshake).
const (
	// metaIncarnation is a random number drawn when the data dir is first
	// used. A node id that comes back with another one lost its raft
	// state, and its peers refuse it.
	metaIncarnation = "incarnation"
	// metaPeerIncarnation prefixes, per peer id, the incarnation this node
	// first saw that peer with.
	metaPeerIncarnation = "peer-incarnation/"
)

// loadIncarnation returns the data dir's incarnation, drawing and
// persisting one if it has none yet: a fresh data dir, or one written
// before incarnations existed, whose peers have no record to contradict.
// A bootstrap that crashes before completing keeps the one it drew.
func loadIncarnation(e *storage.Engine) (uint64, error) {
	b, err := e.GetMeta(metaIncarnation)
	if err != nil {
		return 0, err
	}
	if b != nil {
		return fromU64(b), nil
	}
	var r [8]byte
	var inc uint64
	for inc == 0 {
		if _, err := rand.Read(r[:]); err != nil {
			return 0, fmt.Errorf("draw the data dir's incarnation: %w", err)
		}
		inc = binary.BigEndian.Uint64(r[:])
	}
	if err := e.PutMeta(metaIncarnation, u64(inc)); err != nil {
		return 0, err
	}
	return inc, nil
}

// peerIncarnations implements transport.Incarnations over the engine's
// node metadata, with a cache: the transport asks on every stream.
type peerIncarnations struct {
	e  *storage.Engine
	mu sync.Mutex
	m  map[uint64]uint64
}

func newPeerIncarnations(e *storage.Engine) *peerIncarnations {
	return &peerIncarnations{e: e, m: map[uint64]uint64{}}
}

func (p *peerIncarnations) PeerIncarnation(id uint64) (uint64, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if inc, ok := p.m[id]; ok {
		return inc, nil
	}
	b, err := p.e.GetMeta(metaPeerIncarnation + strconv.FormatUint(id, 10))
	if err != nil {
		return 0, err
	}
	if b == nil {
		return 0, nil
	}
	p.m[id] = fromU64(b)
	return p.m[id], nil
}

func (p *peerIncarnations) RecordPeerIncarnation(id, inc uint64) error {
	if err := p.e.PutMeta(metaPeerIncarnation+strconv.FormatUint(id, 10), u64(inc)); err != nil {
		return err
	}
	p.mu.Lock()
	p.m[id] = inc
	p.mu.Unlock()
	return nil
}

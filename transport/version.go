package transport

import (
	"errors"
	"fmt"
	"strconv"

	"google.golang.org/grpc/metadata"
)

// Peer protocol versions. The peer protocol is everything two kvd nodes
// exchange on the peer port: the Raft and Internal services, the Cluster
// and forwarded KV calls served there, and the encoding of what they carry
// (peerpb, and the raftpb messages inside). A change that an older node
// would misread gets a new version; a change it safely ignores (a new
// proto field it skips) does not.
//
// Every node announces the range of versions it speaks, on every peer
// stream and every peer call, and refuses a peer whose range does not
// overlap its own, on both sides, with one line naming both ranges. The
// two nodes then speak the newest version they share (Agree), so a release
// that adds version N+1 and keeps speaking N can be rolled out one node at
// a time.
const (
	// PeerProtocol is the newest peer protocol version this build speaks.
	PeerProtocol = 1
	// MinPeerProtocol is the oldest one it still speaks.
	MinPeerProtocol = 1
)

// The metadata keys of the announcement, in decimal. A call or stream that
// carries neither comes from a build older than versions: those speak
// version 1 exactly, the protocol of the first release that announces it,
// so a rolling restart from such a build works.
const (
	// MetadataProtocol is the newest version the sender speaks.
	MetadataProtocol = "kvd-peer-protocol"
	// MetadataProtocolMin is the oldest; absent, it equals the newest.
	MetadataProtocolMin = "kvd-peer-protocol-min"
)

// ErrProtocolVersion: a peer speaks no peer protocol version this node
// speaks. toStatus answers it with FailedPrecondition, as the other
// identity refusals.
var ErrProtocolVersion = errors.New("transport: peer protocol version not spoken")

// Protocols is a range of peer protocol versions, both ends included.
type Protocols struct{ Min, Max uint32 }

// Spoken is the range of peer protocol versions this build speaks.
func Spoken() Protocols { return Protocols{Min: MinPeerProtocol, Max: PeerProtocol} }

// unversioned is what a peer from before versions speaks.
func unversioned() Protocols { return Protocols{Min: 1, Max: 1} }

func (p Protocols) String() string {
	if p.Min == p.Max {
		return strconv.FormatUint(uint64(p.Max), 10)
	}
	return fmt.Sprintf("%d..%d", p.Min, p.Max)
}

// Pairs is p as metadata key-value pairs, for an outgoing call or a header.
func (p Protocols) Pairs() []string {
	return []string{MetadataProtocol, strconv.FormatUint(uint64(p.Max), 10),
		MetadataProtocolMin, strconv.FormatUint(uint64(p.Min), 10)}
}

// ProtocolsOf reads the range a peer announced in md. No announcement is
// version 1 (see MetadataProtocol); one that does not parse, or is empty
// (Min above Max, or version 0), is an error: it comes from no build this
// one knows of.
func ProtocolsOf(md metadata.MD) (Protocols, error) {
	maxv, minv := md.Get(MetadataProtocol), md.Get(MetadataProtocolMin)
	if len(maxv) == 0 && len(minv) == 0 {
		return unversioned(), nil
	}
	if len(maxv) == 0 {
		return Protocols{}, fmt.Errorf("announces %s %q without %s", MetadataProtocolMin, minv[0], MetadataProtocol)
	}
	hi, err := strconv.ParseUint(maxv[0], 10, 32)
	if err != nil {
		return Protocols{}, fmt.Errorf("announces peer protocol %q, not a version number", maxv[0])
	}
	p := Protocols{Min: uint32(hi), Max: uint32(hi)}
	if len(minv) > 0 {
		lo, err := strconv.ParseUint(minv[0], 10, 32)
		if err != nil {
			return Protocols{}, fmt.Errorf("announces oldest peer protocol %q, not a version number", minv[0])
		}
		p.Min = uint32(lo)
	}
	if p.Min == 0 || p.Min > p.Max {
		return Protocols{}, fmt.Errorf("announces peer protocol %s, an empty range", p)
	}
	return p, nil
}

// Agree returns the version p and peer speak with each other, the newest
// both speak; false when they share none.
func (p Protocols) Agree(peer Protocols) (uint32, bool) {
	v := min(p.Max, peer.Max)
	return v, v >= max(p.Min, peer.Min)
}

// CheckProtocols checks the versions a peer announced in md against own,
// and returns the version the two speak. self is this node's id and who
// names the peer ("node 2 at 127.0.0.1:2380"), for the error: one line with
// both ranges and what to do.
func CheckProtocols(md metadata.MD, own Protocols, self uint64, who string) (uint32, error) {
	theirs, err := ProtocolsOf(md)
	if err != nil {
		return 0, fmt.Errorf("%w: %s %v; node %d speaks peer protocol %s", ErrProtocolVersion, who, err, self, own)
	}
	v, ok := own.Agree(theirs)
	if !ok {
		return 0, fmt.Errorf("%w: %s speaks peer protocol %s; node %d speaks %s: run kvd releases that share a peer protocol version (docs/design.md, Versions and compatibility)",
			ErrProtocolVersion, who, theirs, self, own)
	}
	return v, nil
}

package hashring

import "github.com/kvd/kvd/proto/kvpb"

// MetaShard is the shard that holds the cluster map itself. It is never on
// the ring: no key is routed to it.
const MetaShard = 0

// DataShards returns the ids of m's data shards, in map order: every shard
// of m but the meta shard (id 0).
func DataShards(m *kvpb.ClusterMap) []uint64 {
	var out []uint64
	for _, s := range m.GetShards() {
		if s.GetId() != MetaShard {
			out = append(out, s.GetId())
		}
	}
	return out
}

// FromMap builds the ring every node and client computes from cluster
// map m: its data shards, each with m's vnode count. It fails as New does;
// a map without data shards (a cluster still bootstrapping) is
// ErrNoShards.
func FromMap(m *kvpb.ClusterMap) (*Ring, error) {
	return New(DataShards(m), int(m.GetVnodes()))
}

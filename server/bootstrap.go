package server

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"slices"

	"github.com/kvd/kvd/hashring"
	"github.com/kvd/kvd/proto/kvpb"
)

// MetaShard is the Raft group that holds the cluster map.
const MetaShard = hashring.MetaShard

// InitialMap is the cluster map every node computes from the same bootstrap
// flags: members sorted by id, shard s (0 = meta, 1..shards = data) on
// replicas consecutive members starting at s mod n. It is deterministic, so
// the nodes of a new cluster agree without talking.
func InitialMap(initial map[uint64]string, shards, replicas int) *kvpb.ClusterMap {
	ids := make([]uint64, 0, len(initial))
	for id := range initial {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	r := min(replicas, len(ids))
	m := &kvpb.ClusterMap{Epoch: 1, Vnodes: hashring.DefaultVnodes, Replicas: uint32(replicas)}
	for _, id := range ids {
		m.Members = append(m.Members, &kvpb.Member{Id: id, PeerAddr: initial[id]})
	}
	for s := 0; s <= shards; s++ {
		sr := &kvpb.ShardReplicas{Id: uint64(s)}
		for j := 0; j < r; j++ {
			sr.Replicas = append(sr.Replicas, ids[(s+j)%len(ids)])
		}
		slices.Sort(sr.Replicas)
		m.Shards = append(m.Shards, sr)
	}
	m.ClusterId = clusterID(FormatInitialCluster(initial), shards, r)
	return m
}

// clusterID names a cluster by its bootstrap parameters, so a node started
// on a data dir of another cluster is refused.
func clusterID(initial string, shards, replicas int) uint64 {
	h := fnv.New64a()
	fmt.Fprintf(h, "%s;shards=%d;replicas=%d", initial, shards, replicas)
	return h.Sum64()
}

// localShards lists the shards of m that node id replicates, with voters.
func localShards(m *kvpb.ClusterMap, id uint64) map[uint64][]uint64 {
	out := map[uint64][]uint64{}
	for _, s := range m.GetShards() {
		if slices.Contains(s.GetReplicas(), id) {
			out[s.GetId()] = s.GetReplicas()
		}
	}
	return out
}

func replicasOf(m *kvpb.ClusterMap, shard uint64) []uint64 {
	for _, s := range m.GetShards() {
		if s.GetId() == shard {
			return s.GetReplicas()
		}
	}
	return nil
}

func member(m *kvpb.ClusterMap, id uint64) *kvpb.Member {
	for _, mb := range m.GetMembers() {
		if mb.GetId() == id {
			return mb
		}
	}
	return nil
}

func u64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

func fromU64(b []byte) uint64 {
	if len(b) != 8 {
		return 0
	}
	return binary.BigEndian.Uint64(b)
}

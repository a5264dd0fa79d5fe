package hashring

import (
	"errors"
	"slices"
	"testing"

	"github.com/kvd/kvd/proto/kvpb"
)

func clusterMap(vnodes uint32, shards ...uint64) *kvpb.ClusterMap {
	m := &kvpb.ClusterMap{Epoch: 3, Vnodes: vnodes}
	for _, id := range shards {
		m.Shards = append(m.Shards, &kvpb.ShardReplicas{Id: id, Replicas: []uint64{1, 2, 3}})
	}
	return m
}

func TestDataShards(t *testing.T) {
	for _, tc := range []struct {
		name string
		m    *kvpb.ClusterMap
		want []uint64
	}{
		{"nil map", nil, nil},
		{"meta shard only", clusterMap(8, 0), nil},
		{"meta shard first", clusterMap(8, 0, 1, 2, 3), []uint64{1, 2, 3}},
		{"map order kept", clusterMap(8, 3, 0, 1, 2), []uint64{3, 1, 2}},
		{"no meta shard", clusterMap(8, 1, 2), []uint64{1, 2}},
	} {
		if got := DataShards(tc.m); !slices.Equal(got, tc.want) {
			t.Errorf("%s: DataShards = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestFromMap checks that the ring of a map is New's ring of the map's data
// shards and vnode count, so every caller that builds one agrees.
func TestFromMap(t *testing.T) {
	m := clusterMap(64, 0, 4, 1, 3, 2)
	got, err := FromMap(m)
	if err != nil {
		t.Fatal(err)
	}
	want := mustNew(t, []uint64{1, 2, 3, 4}, 64)
	if !slices.Equal(got.Shards(), want.Shards()) || got.Vnodes() != 64 {
		t.Fatalf("FromMap: shards %v vnodes %d, want %v 64", got.Shards(), got.Vnodes(), want.Shards())
	}
	for _, k := range randomKeys(2000, 11) {
		if g, w := got.Shard(k), want.Shard(k); g != w {
			t.Fatalf("key %x: FromMap ring says shard %d, New says %d", k, g, w)
		}
	}
}

func TestFromMapErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		m    *kvpb.ClusterMap
		want error
	}{
		{"nil map", nil, ErrNoShards},
		{"meta shard only", clusterMap(8, 0), ErrNoShards},
		{"no data shards and no vnodes", clusterMap(0), ErrNoShards},
		{"zero vnodes", clusterMap(0, 0, 1, 2), ErrVnodes},
		{"billions of vnodes", clusterMap(4e9, 0, 1, 2), ErrVnodes},
		{"duplicate shard", clusterMap(8, 0, 1, 2, 1), ErrDuplicateShard},
	} {
		if _, err := FromMap(tc.m); !errors.Is(err, tc.want) {
			t.Errorf("%s: FromMap: %v, want %v", tc.name, err, tc.want)
		}
	}
}

package concurrency

import (
	"testing"

	"github.com/kvd/kvd/proto/kvpb"
)

// TestLeaderChanged: an observer is told of another candidacy or another
// value, not of a leader that wrote the same value again.
func TestLeaderChanged(t *testing.T) {
	kv := func(key string, create, mod int64, value string) *kvpb.KeyValue {
		return &kvpb.KeyValue{Key: []byte(key), CreateRevision: create, ModRevision: mod, Value: []byte(value)}
	}
	last := kv("{e}/1", 5, 6, "a")
	for _, c := range []struct {
		name string
		l    *kvpb.KeyValue
		want bool
	}{
		{"the same value written again", kv("{e}/1", 5, 9, "a"), false},
		{"another value", kv("{e}/1", 5, 9, "b"), true},
		{"another candidacy of the session's key", kv("{e}/1", 8, 8, "a"), true},
		{"another key", kv("{e}/2", 7, 7, "a"), true},
	} {
		if got := leaderChanged(last, c.l); got != c.want {
			t.Errorf("%s: leaderChanged = %v, want %v", c.name, got, c.want)
		}
	}
	if !leaderChanged(nil, last) {
		t.Error("the first leader seen is not news")
	}
}

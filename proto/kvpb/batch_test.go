package kvpb

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"
)

// TestFittingCutsAtOneMessage: answers are packed up to
// maxBatchResponseBytes, and every message carries at least one.
func TestFittingCutsAtOneMessage(t *testing.T) {
	answer := func(n int) reply {
		it := &BatchResponseItem{Response: &BatchResponseItem_Get{Get: &GetResponse{Kv: &KeyValue{Value: bytes.Repeat([]byte("v"), n)}}}}
		return reply{it: it, size: proto.Size(it)}
	}
	big := 600 << 10
	for _, tc := range []struct {
		name  string
		items []reply
		want  int
	}{
		{"one answer over the limit goes alone", []reply{answer(2 << 20)}, 1},
		{"small answers share a message", []reply{answer(10), answer(10), answer(10)}, 3},
		{"the answer that crosses the limit opens the next message", []reply{answer(big), answer(big), answer(10)}, 1},
		{"up to the limit", []reply{answer(10), answer(big), answer(big)}, 2},
	} {
		if got := fitting(tc.items); got != tc.want {
			t.Errorf("%s: fitting = %d, want %d", tc.name, got, tc.want)
		}
	}
}

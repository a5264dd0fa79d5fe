package client

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"testing"

	"github.com/kvd/kvd/proto/kvpb"
)

// TestWatchReopenedLeavesOutDeliveredFragments: a watch whose stream broke
// after the first fragments of a revision is opened again at that
// revision; the parts delivered before are left out, however the node
// splits the revision this time, and the watch goes on past it.
func TestWatchReopenedLeavesOutDeliveredFragments(t *testing.T) {
	ev := func(rev int64, i int) *kvpb.Event {
		return &kvpb.Event{Shard: 1, Kv: &kvpb.KeyValue{Key: fmt.Appendf(nil, "%d.%d", rev, i), ModRevision: rev}}
	}
	resp := func(through int64, fragment bool, evs ...*kvpb.Event) *kvpb.WatchResponse {
		return &kvpb.WatchResponse{Header: &kvpb.ResponseHeader{Revision: through}, Fragment: fragment, Events: evs}
	}
	w := &watch{ch: make(chan WatchResponse, 16), next: map[uint64]int64{1: 10}, sent: map[uint64]int{}}
	deliver := func(rs ...*kvpb.WatchResponse) {
		sub := &watchSub{ch: make(chan *kvpb.WatchResponse, len(rs))}
		for _, r := range rs {
			sub.ch <- r
		}
		close(sub.ch) // the stream breaks after them
		if err := w.receive(context.Background(), 1, sub); err != nil {
			t.Fatal(err)
		}
	}
	deliver(
		resp(9, false),                       // created
		resp(10, false, ev(10, 0)),           // revision 10
		resp(10, true, ev(11, 0), ev(11, 1)), // the first part of 11
		resp(10, false),                      // progress
	)
	if w.next[1] != 11 || w.sent[1] != 2 {
		t.Fatalf("after the first stream: next %d, %d sent; want 11, 2", w.next[1], w.sent[1])
	}
	deliver(
		resp(10, false),           // created again, at 11
		resp(10, true, ev(11, 0)), // split otherwise this time
		resp(10, true, ev(11, 1), ev(11, 2)),
		resp(12, false, ev(11, 3), ev(12, 0)),
	)
	var got []string
	var resumes []int64
	for len(w.ch) > 0 {
		r := <-w.ch
		for _, e := range r.Events {
			got = append(got, string(e.GetKv().GetKey()))
		}
		next, err := decodeWatchToken(r.Resume)
		if err != nil {
			t.Fatal(err)
		}
		resumes = append(resumes, next[1])
	}
	if want := []string{"10.0", "11.0", "11.1", "11.2", "11.3", "12.0"}; !slices.Equal(got, want) {
		t.Fatalf("delivered %q, want %q", got, want)
	}
	// A token taken within revision 11 replays it.
	if want := []int64{11, 11, 11, 13}; !slices.Equal(resumes, want) {
		t.Fatalf("resume tokens at %v, want %v", resumes, want)
	}
	if w.next[1] != 13 || w.sent[1] != 0 {
		t.Fatalf("at the end: next %d, %d sent; want 13, 0", w.next[1], w.sent[1])
	}
}

// TestResumeTokenOfAShardNotStarted: a prefix watch from now delivers one
// shard's events while another shard's watch has not started (its leader
// unreachable); the Resume it hands out is a token Watch accepts, and it
// starts that shard from now again.
func TestResumeTokenOfAShardNotStarted(t *testing.T) {
	w := &watch{ch: make(chan WatchResponse, 4), next: map[uint64]int64{1: 0, 2: 10}, sent: map[uint64]int{}}
	sub := &watchSub{ch: make(chan *kvpb.WatchResponse, 1)}
	sub.ch <- &kvpb.WatchResponse{Header: &kvpb.ResponseHeader{Revision: 10}, Events: []*kvpb.Event{{Shard: 2, Kv: &kvpb.KeyValue{Key: []byte("k"), ModRevision: 10}}}}
	close(sub.ch)
	if err := w.receive(context.Background(), 2, sub); err != nil {
		t.Fatal(err)
	}
	r := <-w.ch
	next, err := decodeWatchToken(r.Resume)
	if err != nil {
		t.Fatalf("the watch's own Resume refused: %v", err)
	}
	if want := map[uint64]int64{1: 0, 2: 11}; !maps.Equal(next, want) {
		t.Fatalf("token holds %v, want %v", next, want)
	}
}

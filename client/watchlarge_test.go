package client_test

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/proto/kvpb"
)

// TestWatchDeliversWhatExceedsTheReceiveLimit: a client receives at most
// 4 MiB per message (gRPC's default), and neither a run of large puts nor
// one revision larger than that (a transaction deleting eight values of
// 1000 KiB, watched with their previous values) may stop a watch.
func TestWatchDeliversWhatExceedsTheReceiveLimit(t *testing.T) {
	_, c, ctx := startRealClient(t, 1, 1, 60*time.Second)
	const keys = 8
	val := func(i int) []byte { return bytes.Repeat([]byte{byte('a' + i)}, 1000<<10) }
	var first int64
	for i := range keys {
		resp, err := c.Put(ctx, []byte(fmt.Sprint("p/", i)), val(i))
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first = resp.GetHeader().GetRevision()
		}
	}
	txn := &kvpb.TxnRequest{}
	for i := range keys {
		txn.Success = append(txn.Success, &kvpb.RequestOp{Op: &kvpb.RequestOp_Delete{Delete: &kvpb.DeleteRequest{Key: []byte(fmt.Sprint("p/", i))}}})
	}
	if _, err := c.Txn(ctx, txn); err != nil {
		t.Fatal(err)
	}
	evs, _ := collect(t, c.Watch(ctx, []byte("p/"), client.WithPrefix(), client.WithRevision(first), client.WithPrevKV()), 2*keys)
	if len(evs) != 2*keys {
		t.Fatalf("%d events, want %d", len(evs), 2*keys)
	}
	for i, ev := range evs {
		k := i % keys
		wantType, want := kvpb.Event_PUT, val(k)
		if i >= keys {
			wantType = kvpb.Event_DELETE
		}
		got := ev.GetKv().GetValue()
		if wantType == kvpb.Event_DELETE {
			got = ev.GetPrevKv().GetValue()
		}
		if ev.GetType() != wantType || string(ev.GetKv().GetKey()) != fmt.Sprint("p/", k) || !bytes.Equal(got, want) {
			t.Fatalf("event %d: %v %q (%d bytes), want %v p/%d", i, ev.GetType(), ev.GetKv().GetKey(), len(got), wantType, k)
		}
	}
}

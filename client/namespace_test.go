package client_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/embed"
	"github.com/kvd/kvd/proto/kvpb"
)

func embedded(t *testing.T) *client.Client {
	t.Helper()
	n, err := embed.Start(t.Context(), embed.Config{DataDir: t.TempDir(), Shards: 4})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Close() })
	select {
	case <-n.Ready():
	case <-time.After(30 * time.Second):
		t.Fatal("node not ready")
	}
	return n.Client()
}

func TestNamespacesDoNotSeeEachOther(t *testing.T) {
	c := embedded(t)
	ctx := t.Context()
	app1, app2 := client.WithNamespace(c, "app1/"), client.WithNamespace(c, "app2/")
	for _, k := range []string{"a", "b", "c"} {
		if _, err := app1.Put(ctx, []byte(k), []byte("one-"+k)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := app2.Put(ctx, []byte("a"), []byte("two-a")); err != nil {
		t.Fatal(err)
	}

	kv, err := app1.Get(ctx, []byte("a"))
	if err != nil || string(kv.GetKey()) != "a" || string(kv.GetValue()) != "one-a" {
		t.Fatalf("app1 get a: %v %q=%q, want a=one-a", err, kv.GetKey(), kv.GetValue())
	}
	if kv, err := c.Get(ctx, []byte("app2/a")); err != nil || string(kv.GetValue()) != "two-a" {
		t.Fatalf("raw get app2/a: %v %q", err, kv.GetValue())
	}
	if _, err := app2.Get(ctx, []byte("b")); !errors.Is(err, client.ErrNotFound) {
		t.Fatalf("app2 sees app1's b: %v", err)
	}

	page, err := app1.Scan(ctx, nil, nil, client.ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, kv := range page.KVs {
		keys = append(keys, string(kv.GetKey()))
	}
	if len(keys) != 3 || keys[0] != "a" || keys[1] != "b" || keys[2] != "c" {
		t.Fatalf("app1 scan: %q, want [a b c] without prefix", keys)
	}
	if n, err := app2.Count(ctx, nil, nil, false); err != nil || n != 1 {
		t.Fatalf("app2 count: %d %v, want 1", n, err)
	}

	// A transaction's compares, operations and answers are namespaced.
	resp, err := app2.Txn(ctx, &kvpb.TxnRequest{
		Compare: []*kvpb.Compare{{Key: []byte("a"), Target: kvpb.Compare_VALUE, Result: kvpb.Compare_EQUAL, Value: []byte("two-a")}},
		Success: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Get{Get: &kvpb.GetRequest{Key: []byte("a")}}}},
	})
	if err != nil || !resp.GetSucceeded() {
		t.Fatalf("app2 txn: %v succeeded=%v, want success", err, resp.GetSucceeded())
	}
	if got := resp.GetResponses()[0].GetGet().GetKv(); string(got.GetKey()) != "a" || string(got.GetValue()) != "two-a" {
		t.Fatalf("app2 txn get: %q=%q, want a=two-a", got.GetKey(), got.GetValue())
	}

	// A watch of the whole namespace sees its own changes only, keys
	// stripped.
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	w := app1.Watch(wctx, nil, client.WithPrefix(), client.WithResume(page.Resume))
	if _, err := app2.Put(ctx, []byte("z"), []byte("two-z")); err != nil {
		t.Fatal(err)
	}
	if _, err := app1.Delete(ctx, []byte("b")); err != nil {
		t.Fatal(err)
	}
	for r := range w {
		if r.Err != nil {
			t.Fatalf("watch: %v", r.Err)
		}
		for _, ev := range r.Events {
			if string(ev.GetKv().GetKey()) != "b" || ev.GetType() != kvpb.Event_DELETE {
				t.Fatalf("app1 watch saw %v %q; want only the delete of b", ev.GetType(), ev.GetKv().GetKey())
			}
			return
		}
	}
	t.Fatal("watch ended without the delete of b")
}

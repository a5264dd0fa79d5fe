package client_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/proto/kvpb"
)

// TestScanResumeWatchesAfterTheRead: a paged prefix scan reads every shard
// at the revision its first page saw, whatever is written between pages,
// and a watch from the scan's Resume token delivers exactly the changes
// after what the scan read: every write the scan did not see arrives once,
// none it saw arrives at all.
func TestScanResumeWatchesAfterTheRead(t *testing.T) {
	_, c, ctx := startRealClient(t, 1, 4, 2*time.Minute)
	put := func(k, v string) {
		t.Helper()
		if _, err := c.Put(ctx, []byte(k), []byte(v)); err != nil {
			t.Fatal(err)
		}
	}

	const keys = 40
	for i := range keys {
		put(fmt.Sprint("s/", i), "before")
	}

	// A writer adds new keys while the scan runs: each must show up once,
	// in the scan or in the watch. It stops between puts, so every put it
	// made was acknowledged.
	stopWriter := make(chan struct{})
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		written []string // guarded by mu
		werr    error
	)
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stopWriter:
				return
			default:
			}
			k := fmt.Sprint("s/c/", i)
			if _, err := c.Put(ctx, []byte(k), []byte("concurrent")); err != nil {
				werr = err
				return
			}
			mu.Lock()
			written = append(written, k)
			mu.Unlock()
		}
	})
	writtenSoFar := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(written)
	}
	proccluster.WaitFor(t, 20*time.Second, "the writer's first puts", func() bool { return writtenSoFar() >= 5 })

	prefix := []byte("s/")
	opts := client.ScanOptions{Limit: 5}
	first, err := c.Scan(ctx, prefix, client.PrefixEnd(prefix), opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(first.Revisions) != 4 || first.Resume == "" || first.Next == "" {
		t.Fatalf("first page: revisions %v, resume %q, next %q", first.Revisions, first.Resume, first.Next)
	}
	// Changes between pages: later pages must not see them.
	var during []string
	for i := range keys {
		k := fmt.Sprint("s/", i)
		put(k, "during")
		during = append(during, k)
	}
	scanned := map[string]string{}
	for _, kv := range first.KVs {
		scanned[string(kv.GetKey())] = string(kv.GetValue())
	}
	for page := first; page.Next != ""; {
		opts.Token = page.Next
		if page, err = c.Scan(ctx, prefix, client.PrefixEnd(prefix), opts); err != nil {
			t.Fatal(err)
		}
		if !maps.Equal(page.Revisions, first.Revisions) || page.Resume != first.Resume {
			t.Fatalf("a later page read at %v (resume %q), the first at %v (%q)", page.Revisions, page.Resume, first.Revisions, first.Resume)
		}
		for _, kv := range page.KVs {
			if _, dup := scanned[string(kv.GetKey())]; dup {
				t.Fatalf("key %q scanned twice", kv.GetKey())
			}
			scanned[string(kv.GetKey())] = string(kv.GetValue())
		}
	}
	close(stopWriter)
	wg.Wait()
	if werr != nil {
		t.Fatal(werr)
	}
	for i := range keys {
		if k := fmt.Sprint("s/", i); scanned[k] != "before" {
			t.Fatalf("scan read %q = %q, want the value of before the scan", k, scanned[k])
		}
	}

	// Changes after the scan.
	var after []string
	for i := range 10 {
		k := fmt.Sprint("s/", i)
		if _, err := c.Delete(ctx, []byte(k)); err != nil {
			t.Fatal(err)
		}
		after = append(after, k)
	}

	// Want: every change after the read, once: the writes between pages,
	// the deletes after, and the concurrent puts the scan did not see.
	want := map[string]int{}
	for _, k := range append(during, after...) {
		want[k]++
	}
	inScan := 0
	for _, k := range written {
		if v, ok := scanned[k]; ok {
			if v != "concurrent" {
				t.Fatalf("scan read %q = %q", k, v)
			}
			inScan++
			continue
		}
		want[k]++
	}
	for k := range scanned {
		if strings.HasPrefix(k, "s/c/") && !strings.Contains(strings.Join(written, " ")+" ", k+" ") {
			t.Fatalf("scan read %q, which the writer never acknowledged", k)
		}
	}
	t.Logf("%d concurrent puts: %d in the scan, %d after it", len(written), inScan, len(written)-inScan)

	// An end marker per shard closes the check: a shard's events come in
	// revision order, so anything extra on it would arrive before its
	// marker.
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	ch := c.Watch(watchCtx, prefix, client.WithPrefix(), client.WithResume(first.Resume))
	got := map[string]int{}
	ended := map[uint64]bool{}
	for marker := 0; len(ended) < len(first.Revisions); {
		put(fmt.Sprint("s/end/", marker), "end")
		marker++
		deadline := time.After(time.Second)
	read:
		for {
			select {
			case r, ok := <-ch:
				if !ok || r.Err != nil {
					t.Fatalf("watch ended: %v", r.Err)
				}
				for _, ev := range r.Events {
					k := string(ev.GetKv().GetKey())
					if strings.HasPrefix(k, "s/end/") {
						ended[ev.GetShard()] = true
						continue
					}
					if ended[ev.GetShard()] {
						t.Fatalf("event on %q after shard %d's end marker", k, ev.GetShard())
					}
					if rev := ev.GetKv().GetModRevision(); rev <= first.Revisions[ev.GetShard()] {
						t.Fatalf("event on %q at revision %d, which the scan read (shard %d at %d)", k, rev, ev.GetShard(), first.Revisions[ev.GetShard()])
					}
					if ev.GetType() == kvpb.Event_PUT && string(ev.GetKv().GetValue()) == "before" {
						t.Fatalf("event on %q with the value the scan read", k)
					}
					got[k]++
				}
			case <-deadline:
				break read // the marker's shard may already have ended: put another
			}
		}
	}
	if !maps.Equal(got, want) {
		for k, n := range want {
			if got[k] != n {
				t.Errorf("%q: %d events, want %d", k, got[k], n)
			}
		}
		for k, n := range got {
			if want[k] == 0 {
				t.Errorf("%q: %d events, want none", k, n)
			}
		}
		t.FailNow()
	}

	// Latest pages see what is written between them, and give no
	// position; pinned pages do not see it.
	for _, latest := range []bool{false, true} {
		opts := client.ScanOptions{Limit: 5, KeysOnly: true, Latest: latest}
		page, err := c.Scan(ctx, prefix, client.PrefixEnd(prefix), opts)
		if err != nil {
			t.Fatal(err)
		}
		late := fmt.Sprint("s/zz/", latest)
		put(late, "late")
		seen := false
		for {
			if (page.Resume == "") != latest || (page.Revisions == nil) != latest {
				t.Fatalf("latest=%v: page with revisions %v, resume %q", latest, page.Revisions, page.Resume)
			}
			for _, kv := range page.KVs {
				seen = seen || string(kv.GetKey()) == late
			}
			if page.Next == "" {
				break
			}
			opts.Token = page.Next
			if page, err = c.Scan(ctx, prefix, client.PrefixEnd(prefix), opts); err != nil {
				t.Fatal(err)
			}
		}
		if seen != latest {
			t.Errorf("latest=%v: the key put between pages seen %v", latest, seen)
		}
	}

	// A scan whose pinned revision a shard no longer keeps history for
	// fails with a *CompactedError, not with a page of another revision.
	page, err := c.Scan(ctx, prefix, client.PrefixEnd(prefix), client.ScanOptions{Limit: 5})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		resp, err := c.Put(ctx, []byte(fmt.Sprint("s/cmp/", i)), []byte("v"))
		if err != nil {
			t.Fatal(err)
		}
		h := resp.GetHeader()
		if h.GetRevision() < page.Revisions[h.GetShard()]+2 {
			continue
		}
		if _, err := c.Compact(ctx, h.GetShard(), h.GetRevision()); err != nil {
			t.Fatal(err)
		}
		break
	}
	_, err = c.Scan(ctx, prefix, client.PrefixEnd(prefix), client.ScanOptions{Limit: 5, Token: page.Next})
	var ce *client.CompactedError
	if !errors.As(err, &ce) {
		t.Fatalf("a page below the history: %v, want a *CompactedError", err)
	}
}

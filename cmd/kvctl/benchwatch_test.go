package main

import (
	"encoding/json"
	"runtime"
	"testing"

	"github.com/kvd/kvd/internal/proccluster"
)

// TestBenchWatchCountsAddUp runs bench watch briefly against a real
// 3-node cluster of kvd processes (the in-process fake serves no
// watches) and checks its books: every acknowledged put reached every
// watcher of its key exactly once, and nothing else arrived.
func TestBenchWatchCountsAddUp(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("process cluster: Linux only")
	}
	if testing.Short() {
		t.Skip("-short: starts kvd processes")
	}
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 2})
	const watchers, keys, total = 40, 5, 300
	r := kvctl(t, c.Endpoints(), "", "-o", "json", "bench", "watch",
		"--watchers", "40", "--keys", "5", "--writers", "4", "--total", "300", "--val-size", "16")
	var rep benchWatchReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); r.code != 0 || err != nil {
		t.Fatalf("bench watch: exit %d, %v: %+v", r.code, err, r)
	}
	if rep.Puts != total || rep.PutErrors != 0 {
		t.Fatalf("puts %d (%d failed), want %d (0)", rep.Puts, rep.PutErrors, total)
	}
	// Each key gets total/keys puts and has watchers/keys watchers.
	want := int64(total * watchers / keys)
	if rep.Expected != want || rep.Delivered != want || rep.Missing != 0 || rep.Duplicated != 0 || rep.Unexpected != 0 ||
		rep.OfFailed != 0 || rep.WatchErrors != 0 || rep.DrainError != "" {
		t.Fatalf("events: want %d expected and delivered, nothing missing, duplicated or unexpected; got %+v", want, rep)
	}
	if rep.EventsPerS <= 0 || rep.Delivery.P99 < rep.Delivery.P50 || rep.Delivery.Max < rep.Delivery.P99 || rep.Put.P50 <= 0 {
		t.Fatalf("figures: %+v", rep)
	}
	// Watchers took one client instance, writers one: 2 × 3 members.
	if rep.Conns != 6 || rep.Watchers != watchers || rep.Keys != keys {
		t.Fatalf("report: %+v", rep)
	}
}

func TestBenchWatchUsage(t *testing.T) {
	for _, args := range [][]string{
		{"--val-size", "7"},
		{"--watchers", "0"},
		{"--total", "10", "--duration", "1s"},
		{"--keys", "11", "--key-size", "1"},
		{"--conns", "5", "--writers", "4"},
	} {
		if r := kvctl(t, "127.0.0.1:1", "", append([]string{"bench", "watch"}, args...)...); r.code != exitUsage {
			t.Errorf("bench watch %v: exit %d, want %d (%s)", args, r.code, exitUsage, r.stderr)
		}
	}
}

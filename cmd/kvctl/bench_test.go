package main

import (
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestHistogramAgainstSortedSlice checks the histogram against the dumb
// reference: the exact quantile of the sorted recordings.
func TestHistogramAgainstSortedSlice(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	for _, gen := range []struct {
		name string
		f    func() time.Duration
	}{
		{"uniform µs", func() time.Duration { return time.Duration(rng.Int64N(int64(time.Millisecond))) }},
		{"log-normal", func() time.Duration { return time.Duration(1e6 * rng.ExpFloat64() * rng.ExpFloat64()) }},
		{"tiny", func() time.Duration { return time.Duration(rng.Int64N(300)) }},
		{"huge", func() time.Duration { return time.Duration(rng.Int64N(int64(time.Hour))) }},
	} {
		h := newHistogram()
		var ref []int64
		for range 20000 {
			d := gen.f()
			h.record(d)
			ref = append(ref, int64(d))
		}
		slices.Sort(ref)
		for _, q := range []float64{0, 0.001, 0.25, 0.5, 0.9, 0.99, 0.999, 1} {
			rank := max(int(float64(len(ref))*q+0.999999999), 1)
			want := ref[rank-1]
			got := int64(h.quantile(q))
			// Never below the true value; above by at most the bucket width.
			if got < want || float64(got-want) > float64(want)/float64(histHalf)+1 {
				t.Errorf("%s: quantile(%g) = %d, want %d (within %.1f%%)", gen.name, q, got, want, 100.0/histHalf)
			}
		}
		if int64(h.quantile(1)) != ref[len(ref)-1] || h.min != ref[0] {
			t.Errorf("%s: max %v min %v, want %v %v", gen.name, h.quantile(1), h.min, ref[len(ref)-1], ref[0])
		}
		var n uint64
		for _, row := range h.rows() {
			n += row.Count
		}
		if n != h.n {
			t.Errorf("%s: rows hold %d recordings, want %d", gen.name, n, h.n)
		}
	}
}

func TestHistogramBuckets(t *testing.T) {
	prevHi := int64(-1)
	for i := range histBuckets {
		lo, hi := bucketRange(i)
		if lo != prevHi+1 || hi < lo {
			t.Fatalf("bucket %d = [%d, %d] after %d: not contiguous", i, lo, hi, prevHi)
		}
		if bucketOf(lo) != i || bucketOf(hi) != i {
			t.Fatalf("bucket %d = [%d, %d], but bucketOf gives %d, %d", i, lo, hi, bucketOf(lo), bucketOf(hi))
		}
		prevHi = hi
		if hi < 0 { // wrapped past the top of int64
			t.Fatalf("bucket %d overflows", i)
		}
	}
	if bucketOf(1<<63-1) != histBuckets-1 {
		t.Fatalf("the largest value lands in bucket %d of %d", bucketOf(1<<63-1), histBuckets)
	}
	a, b := newHistogram(), newHistogram()
	a.record(time.Millisecond)
	b.record(3 * time.Millisecond)
	a.merge(b)
	if a.n != 2 || a.quantile(0.5) < time.Millisecond || a.quantile(0.5) > 1010*time.Microsecond || a.quantile(1) != 3*time.Millisecond {
		t.Fatalf("merge: n %d p50 %v max %v", a.n, a.quantile(0.5), a.quantile(1))
	}
}

func TestBenchKey(t *testing.T) {
	for _, tc := range []struct {
		size int
		i    int64
		want string
	}{{8, 0, "00000000"}, {8, 49999, "00049999"}, {3, 7, "007"}, {1, 9, "9"}, {24, 12, "000000000000000000000012"}} {
		if got := string(benchKey(make([]byte, tc.size), tc.i)); got != tc.want {
			t.Errorf("benchKey(%d, %d) = %q, want %q", tc.size, tc.i, got, tc.want)
		}
	}
}

func benchJSON(t *testing.T, r result) benchReport {
	t.Helper()
	var rep benchReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil || r.code != 0 {
		t.Fatalf("bench -o json: exit %d, %v: %+v", r.code, err, r)
	}
	return rep
}

func TestBenchWorkloads(t *testing.T) {
	f, eps := cluster(t)
	rep := benchJSON(t, kvctl(t, eps, "", "-o", "json", "bench", "put", "--clients", "4", "--conns", "2", "--total", "300"))
	if rep.Ops != 300 || rep.Errors != 0 || rep.OpsByType["put"] != 300 || rep.OpsPerSec <= 0 || rep.Latency.P50 <= 0 ||
		rep.Latency.P50 > rep.Latency.P99 || rep.Latency.P99 > rep.Latency.Max || len(rep.Histogram) == 0 || rep.Mode != "closed" {
		t.Fatalf("bench put report: %+v", rep)
	}
	// --conns counts connections in all: 2 on 3 members round to one
	// client instance, its 3 connections.
	if rep.Instances != 1 || rep.Conns != 3 {
		t.Fatalf("--conns 2 on 3 members: %d instances, %d connections; want 1, 3", rep.Instances, rep.Conns)
	}
	rep = benchJSON(t, kvctl(t, eps, "", "-o", "json", "bench", "put", "--clients", "20", "--conns", "10", "--total", "100"))
	if rep.Instances != 3 || rep.Conns != 9 || rep.Errors != 0 {
		t.Fatalf("--conns 10 on 3 members: %d instances, %d connections, %d errors; want 3, 9, 0", rep.Instances, rep.Conns, rep.Errors)
	}
	// Default key space = total: 300 distinct 8-byte keys.
	if r := kvctl(t, eps, "", "get", "--prefix", "000", "--count-only"); r.stdout != "300\n" {
		t.Fatalf("bench put wrote %s keys, want 300", r.stdout)
	}
	if r := kvctl(t, eps, "", "get", "00000299"); r.code != 0 || len(r.stdout) != 257 {
		t.Fatalf("bench value: %+v", r)
	}

	rep = benchJSON(t, kvctl(t, eps, "", "-o", "json", "bench", "get", "--clients", "3", "--total", "200", "--key-space", "50", "--key-size", "4", "--consistency", "serializable"))
	if rep.Ops != 200 || rep.Errors != 0 || rep.Prefilled != 50 || rep.OpsByType["get"] != 200 || rep.Consistency != "serializable" {
		t.Fatalf("bench get report: %+v", rep)
	}
	rep = benchJSON(t, kvctl(t, eps, "", "-o", "json", "bench", "mixed", "--clients", "3", "--total", "400", "--key-space", "20", "--read-ratio", "0.5"))
	if rep.Ops != 400 || rep.OpsByType["get"] < 120 || rep.OpsByType["put"] < 120 || rep.ReadRatio == nil || *rep.ReadRatio != 0.5 {
		t.Fatalf("bench mixed report: %+v", rep)
	}
	rep = benchJSON(t, kvctl(t, eps, "", "-o", "json", "bench", "txn", "--clients", "2", "--total", "100", "--key-space", "10", "--key-size", "2"))
	if rep.Ops != 100 || rep.Errors != 0 || rep.CompareFailed != 10 || rep.OpsByType["txn"] != 100 {
		t.Fatalf("bench txn report: %+v", rep)
	}

	// Duration and open loop: about rate × duration operations.
	rep = benchJSON(t, kvctl(t, eps, "", "-o", "json", "bench", "put", "--clients", "4", "--duration", "500ms", "--rate", "200", "--key-space", "10"))
	if rep.Mode != "open" || rep.Ops < 90 || rep.Ops > 101 {
		t.Fatalf("open-loop report: %+v", rep)
	}

	// Text report.
	r := kvctl(t, eps, "", "bench", "put", "--total", "50", "--key-space", "1")
	for _, s := range []string{"bench put: 50 ops", "throughput", "errors      0", "latency", "p99.9", "histogram", "#"} {
		if r.code != 0 || !strings.Contains(r.stdout, s) {
			t.Fatalf("text report lacks %q: %+v", s, r)
		}
	}
	if strings.Contains(r.stdout, "reads") {
		t.Fatalf("a put workload's report speaks of reads: %q", r.stdout)
	}
	if r.stderr != "" {
		t.Fatalf("progress printed though stderr is not a terminal: %q", r.stderr)
	}
	r = kvctl(t, eps, "", "bench", "get", "--total", "20", "--key-space", "5", "--consistency", "serializable")
	if r.code != 0 || !strings.Contains(r.stdout, "serializable reads") {
		t.Fatalf("a get workload's report names its read consistency: %+v", r)
	}
	r = kvctl(t, eps, "", "bench", "put", "--duration", "1200ms", "--rate", "50", "--progress")
	if r.code != 0 || !strings.Contains(r.stderr, "ops/s") {
		t.Fatalf("--progress: %+v", r)
	}

	// --cpuprofile writes a profile go tool pprof reads (gzipped protobuf);
	// a path that cannot be created fails before any work.
	prof := filepath.Join(t.TempDir(), "client.pprof")
	if r := kvctl(t, eps, "", "bench", "put", "--total", "200", "--key-space", "5", "--cpuprofile", prof); r.code != 0 {
		t.Fatalf("bench --cpuprofile: %+v", r)
	}
	if data, err := os.ReadFile(prof); err != nil || len(data) < 2 || data[0] != 0x1f || data[1] != 0x8b {
		t.Fatalf("--cpuprofile wrote %d bytes (err %v), want a gzipped profile", len(data), err)
	}
	if r := kvctl(t, eps, "", "bench", "put", "--total", "1", "--cpuprofile", filepath.Join(t.TempDir(), "no", "such", "dir")); r.code != 2 || !strings.Contains(r.stderr, "--cpuprofile") {
		t.Fatalf("bench --cpuprofile into a missing dir: %+v", r)
	}

	// Errors are counted by class; all failing is exit 3.
	noQuorum(t, f)
	r = kvctl(t, eps, "", "--timeout", "200ms", "-o", "json", "bench", "put", "--total", "4", "--clients", "2")
	rep = benchReport{}
	json.Unmarshal([]byte(r.stdout), &rep)
	if r.code != 3 || rep.Errors != 4 || len(rep.ErrorsByClass) == 0 || !strings.Contains(r.stderr, "every one of 4 operations failed") {
		t.Fatalf("bench without leaders: %+v", r)
	}
	t.Logf("error classes: %v", rep.ErrorsByClass)
}

func TestBenchUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"bench"}, "needs a subcommand"},
		{[]string{"bench", "scan"}, "unknown command"},
		{[]string{"bench", "put", "--total", "5", "--duration", "1s"}, "not both"},
		{[]string{"bench", "put", "--clients", "0"}, "--clients"},
		{[]string{"bench", "put", "--clients", "2", "--conns", "3"}, "--conns"},
		{[]string{"bench", "put", "--key-size", "2", "--key-space", "1000"}, "holds at most 100"},
		{[]string{"bench", "get", "--consistency", "eventual"}, "--consistency"},
		{[]string{"bench", "put", "--read-ratio", "0.5"}, "unknown flag"},
		{[]string{"bench", "mixed", "--read-ratio", "2"}, "--read-ratio"},
		{[]string{"bench", "put", "--rate", "-1"}, "--rate"},
	} {
		if r := kvctl(t, "127.0.0.1:1", "", tc.args...); r.code != 2 || !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("kvctl %q: exit %d %q, want 2 and %q", tc.args, r.code, r.stderr, tc.msg)
		}
	}
}

package jepsenlite

import (
	"context"
	"flag"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/internal/proccluster"
)

var (
	flagDuration  = flag.Duration("jepsen.duration", 0, "TestJepsen: total workload time, split across the seeds (0 skips TestJepsen unless -jepsen.seed is set)")
	flagSeeds     = flag.Int("jepsen.seeds", 3, "TestJepsen: number of seeds (runs) when -jepsen.seed is not set")
	flagSeed      = flag.Uint64("jepsen.seed", 0, "replay this seed (TestJepsenShort and TestJepsen)")
	flagFaults    = flag.String("jepsen.faults", strings.Join(AllFaults, ","), "faults the nemesis combines")
	flagOpTimeout = flag.Duration("jepsen.op-timeout", 0, "deadline of one client operation, retries included (default 1.5s)")
	flagOut       = flag.String("jepsen.out", "", "directory for histories (default: a temporary directory kept only on failure)")
	flagTLS       = flag.String("jepsen.tls", os.Getenv("TLS"), "mutual TLS on the peer and client ports: true or false (default: $TLS; when empty, the short run with TLS, as compose deploys, and the long run without)")
)

// useTLS is -jepsen.tls, or def when it is empty or not a boolean.
func useTLS(def bool) bool {
	if v, err := strconv.ParseBool(*flagTLS); err == nil {
		return v
	}
	return def
}

func skipUnlessLinux(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("jepsen-lite's proxies identify peers through /proc (Linux only)")
	}
}

func newSeed() uint64 {
	if *flagSeed != 0 {
		return *flagSeed
	}
	return uint64(time.Now().UnixNano()) & (1<<53 - 1)
}

func faults() []string {
	var out []string
	for _, f := range strings.Split(*flagFaults, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// TestCheckerDetectsStaleReads shows the harness can fail: with the
// deliberately unsafe mode (serializable reads presented as linearizable),
// a read from a node cut off from the majority returns the value it had
// before the majority moved on, and the checker must flag the history. It
// also shows the safe mode does not: a linearizable read through the same
// cut fails instead of answering.
func TestCheckerDetectsStaleReads(t *testing.T) {
	skipUnlessLinux(t)
	e := startEnv(t, 3, 2, false)
	dir := outDir(t, *flagOut)
	h := newHistory()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var procs atomic.Int64
	cl, err := e.newClient(ctx)
	if err != nil {
		t.Fatal(err)
	}
	r := newRecorder(h, cl, 10*time.Second, &procs)
	const key = "jl/stale"

	mustPut := func(v string) {
		t.Helper()
		var last Op
		proccluster.WaitFor(t, 30*time.Second, "put "+v, func() bool {
			last = r.put(key, v)
			if last.Status != statusOK {
				t.Logf("put %s: %s: %s; nodes say: %s", v, last.Status, last.Err, shardViews(ctx, e.c))
			}
			return last.Status == statusOK
		})
	}
	mustPut("v1")
	// Every replica has applied v1 before the cut.
	for _, nd := range e.c.Nodes {
		proccluster.WaitFor(t, 10*time.Second, fmt.Sprintf("node %d applies v1", nd.ID), func() bool {
			kv, err := proccluster.LocalGet(ctx, nd.ClientAddr, key)
			return err == nil && string(kv.GetValue()) == "v1"
		})
	}

	isolated := e.c.Nodes[2]
	majority := []uint64{e.c.Nodes[0].ID, e.c.Nodes[1].ID}
	e.net.Cut([]uint64{isolated.ID}, majority)
	h.event("isolate node %d from peers", isolated.ID)
	mustPut("v2") // through the majority, electing a new leader if need be
	// Now the clients reach only the isolated node.
	e.net.Cut([]uint64{clientID}, majority)
	h.event("cut clients from nodes %v", majority)

	r.unsafeNode = isolated.ClientAddr
	var stale Op
	proccluster.WaitFor(t, 30*time.Second, "unsafe read", func() bool {
		stale = r.get(key, false)
		if stale.Status != statusOK {
			t.Logf("unsafe read: %s: %s", stale.Status, stale.Err)
		}
		return stale.Status == statusOK
	})
	if stale.Read != "v1" {
		t.Fatalf("serializable read from the isolated node returned %q, want the stale v1", stale.Read)
	}
	r.unsafeNode = ""
	r.timeout = 3 * time.Second
	if safe := r.get(key, false); safe.Status == statusOK && safe.Read != "v2" {
		t.Errorf("linearizable read through the cut returned %q: a stale linearizable answer", safe.Read)
	} else {
		t.Logf("linearizable read through the cut: %s %q %s", safe.Status, safe.Read, safe.Err)
	}
	e.net.Heal()

	ops, events := h.snapshot()
	hist := dir + "/history-stale-reads.jsonl"
	if err := writeHistory(hist, ops, events); err != nil {
		t.Fatal(err)
	}
	lin := checkLinearizable(ops, events, 10*time.Second, 30*time.Second, dir+"/history-stale-reads.html")
	t.Logf("unsafe mode: %d ops, %d keys, %d NOT linearizable; visualization %s", len(ops), lin.keys, lin.illegal, lin.vizPath)
	if lin.illegal != 1 || lin.vizPath == "" {
		t.Fatalf("the checker missed the stale read (illegal=%d, visualization %q):\n%s", lin.illegal, lin.vizPath, excerpt(ops, key, 20))
	}
	if _, err := os.Stat(lin.vizPath); err != nil {
		t.Fatal(err)
	}
}

// TestJepsenShort is the run `make test` includes: about a minute, with
// mutual TLS on unless -jepsen.tls=false.
func TestJepsenShort(t *testing.T) {
	skipUnlessLinux(t)
	if testing.Short() {
		t.Skip("-short")
	}
	res := Run(t, Config{Seed: newSeed(), Duration: 40 * time.Second, Faults: faults(), OutDir: *flagOut, OpTimeout: *flagOpTimeout, TLS: useTLS(true)})
	fmt.Println(summary([]Result{res}))
}

// TestJepsen is the long run of `make jepsen`: -jepsen.duration split
// across -jepsen.seeds seeds, or one -jepsen.seed replayed.
func TestJepsen(t *testing.T) {
	skipUnlessLinux(t)
	if *flagDuration == 0 && *flagSeed == 0 {
		t.Skip("set -jepsen.duration (and -jepsen.seeds) or -jepsen.seed; `make jepsen` does")
	}
	seeds := *flagSeeds
	if *flagSeed != 0 || seeds < 1 {
		seeds = 1
	}
	total := *flagDuration
	if total == 0 {
		total = 60 * time.Second
	}
	per := total / time.Duration(seeds)
	var results []Result
	base := newSeed()
	for i := range seeds {
		seed := base + uint64(i)
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			results = append(results, Run(t, Config{
				Seed: seed, Duration: per, Faults: faults(), OutDir: *flagOut, OpTimeout: *flagOpTimeout, TLS: useTLS(false),
				CheckBudget: 5 * time.Minute, CheckPerKey: time.Minute,
				// Longer faults than the short run: partitions that
				// outlast kvd's 4 s dead-stream detection.
				HoldMax: 10 * time.Second, QuietMax: 4 * time.Second,
			}))
		})
	}
	fmt.Println(summary(results))
}

// TestTLSEnvServesThroughProxies: the TLS environment (certificates from
// `kvd cert cluster`) serves clients through the fault proxies, with the
// nodes' peer traffic crossing them too, and refuses a plaintext client.
func TestTLSEnvServesThroughProxies(t *testing.T) {
	skipUnlessLinux(t)
	e := startEnv(t, 3, 2, true)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cl, err := e.newClient(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		k := fmt.Sprint("jl/tls/", i)
		if _, err := cl.Put(ctx, []byte(k), []byte("v")); err != nil {
			t.Fatalf("put %s over mTLS through the proxies: %v", k, err)
		}
		if kv, err := cl.Get(ctx, []byte(k)); err != nil || string(kv.GetValue()) != "v" {
			t.Fatalf("get %s: %v, %v", k, kv, err)
		}
	}
	if e.net.unknownSources.Load() != 0 {
		t.Errorf("%d peer connections the proxies could not attribute to a node", e.net.unknownSources.Load())
	}
	// A client without TLS does not get in.
	plainCtx, plainCancel := context.WithTimeout(ctx, 3*time.Second)
	defer plainCancel()
	if plain, err := client.New(plainCtx, client.Config{Endpoints: e.endpoints, DialTimeout: time.Second}); err == nil {
		plain.Close()
		t.Fatal("a plaintext client connected to the TLS cluster")
	}
}

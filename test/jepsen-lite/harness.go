package jepsenlite

import (
	"context"
	"crypto/tls"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/internal/pki"
	"github.com/kvd/kvd/internal/proccluster"
)

// Config is one run: one cluster, one seed, one history.
type Config struct {
	Seed     uint64
	Duration time.Duration // workload and nemesis
	Faults   []string
	Nodes    int // 3
	Shards   int // data shards
	// TLS runs the cluster with mutual TLS on the peer and client ports,
	// with certificates `kvd cert cluster` writes; clients present a
	// client certificate.
	TLS bool

	RegisterWorkers, CounterWorkers, Counters int
	LockWorkers                               int // lock.go; <0: none
	KeySlots, OpsPerKey                       int
	OpTimeout                                 time.Duration // per operation, client retries included
	Pace                                      time.Duration // max think time between a worker's ops

	// Fault durations and the calm between faults.
	HoldMin, HoldMax, QuietMin, QuietMax time.Duration

	// CheckPerKey bounds porcupine per key, CheckBudget the whole check.
	CheckPerKey, CheckBudget time.Duration

	// OutDir receives history-SEED.jsonl (and .html on a violation, and
	// the node logs on a failure). "" means a temporary directory that is
	// removed when the test passes.
	OutDir string
}

func (c *Config) setDefaults() {
	def := func(p *int, v int) {
		if *p == 0 {
			*p = v
		}
	}
	defd := func(p *time.Duration, v time.Duration) {
		if *p == 0 {
			*p = v
		}
	}
	def(&c.Nodes, 3)
	def(&c.Shards, 4)
	def(&c.RegisterWorkers, 6)
	def(&c.CounterWorkers, 2)
	def(&c.Counters, 3)
	def(&c.LockWorkers, 3)
	def(&c.KeySlots, 5)
	def(&c.OpsPerKey, 150)
	defd(&c.OpTimeout, 1500*time.Millisecond)
	defd(&c.Pace, 20*time.Millisecond)
	defd(&c.HoldMin, time.Second)
	defd(&c.HoldMax, 5*time.Second)
	defd(&c.QuietMin, time.Second)
	defd(&c.QuietMax, 3*time.Second)
	defd(&c.CheckPerKey, 20*time.Second)
	defd(&c.CheckBudget, 2*time.Minute)
	if len(c.Faults) == 0 {
		c.Faults = AllFaults
	}
}

// Result holds a run's figures.
type Result struct {
	Seed                                  uint64
	Ops, Faults, Indeterminate, Anomalies int
	Lost                                  int
	Keys, KeysUnchecked                   int
	WatchEvents                           int
	Locks, FencedWrites                   int
	TakeoverMax                           time.Duration
	HistoryPath                           string
}

// env is a kvd cluster behind the harness's proxies: every node's client
// and peer port has a proxy in front, and the nodes advertise the proxies,
// so every byte between nodes, and between clients and nodes, crosses the
// link table in net.
type env struct {
	t       testing.TB
	c       *proccluster.Cluster
	net     *Net
	proxies []*proxy
	// endpoints are the client proxies, by node index.
	endpoints []string
	// clientTLS is what clients dial with; nil: plaintext.
	clientTLS *tls.Config
}

// unknownSource stands for a peer connection whose dialer the proxy could
// not identify; see Net.link.
const unknownSource = ^uint64(0)

func startEnv(t testing.TB, nodes, shards int, withTLS bool) *env {
	t.Helper()
	e := &env{t: t, net: newNet()}
	t.Cleanup(func() {
		for _, p := range e.proxies {
			p.Close()
		}
	})
	var all []*proccluster.Node
	peerSource := func(c net.Conn) uint64 {
		pids := make([]int, 0, len(all))
		byPid := map[int]uint64{}
		for _, nd := range all {
			if pid := nd.Pid(); pid != 0 {
				pids = append(pids, pid)
				byPid[pid] = nd.ID
			}
		}
		if id, ok := byPid[connOwner(c, pids)]; ok {
			return id
		}
		e.net.unknownSources.Add(1)
		return unknownSource
	}
	opts := proccluster.Options{
		Shards: shards,
		// Far more history than a run makes (a few thousand revisions
		// per shard): a watch that ends with ErrCompacted is a bug.
		Args: []string{"--history-revisions=100000"},
		Advertise: func(nd *proccluster.Node) (string, string) {
			all = append(all, nd)
			cp, err := newProxy(e.net, nd.ID, nd.ClientAddr, func(net.Conn) uint64 { return clientID })
			if err != nil {
				t.Fatal(err)
			}
			e.proxies = append(e.proxies, cp)
			pp, err := newProxy(e.net, nd.ID, nd.PeerAddr, peerSource)
			if err != nil {
				t.Fatal(err)
			}
			e.proxies = append(e.proxies, pp)
			e.endpoints = append(e.endpoints, cp.Addr())
			return cp.Addr(), pp.Addr()
		},
	}
	if withTLS {
		// The proxies relay bytes, so TLS runs end to end between the
		// nodes (and between clients and nodes) through them; the
		// certificates name 127.0.0.1, where the proxies listen too.
		dir := writeCerts(t, nodes)
		opts.NodeArgs = func(nd *proccluster.Node) []string {
			c, k := filepath.Join(dir, fmt.Sprintf("node-%d.crt", nd.ID)), filepath.Join(dir, fmt.Sprintf("node-%d.key", nd.ID))
			ca := filepath.Join(dir, "ca.crt")
			return []string{"--peer-cert", c, "--peer-key", k, "--peer-ca", ca, "--client-cert", c, "--client-key", k, "--client-ca", ca}
		}
		cfg, err := pki.ClientConfig(filepath.Join(dir, "ca.crt"), filepath.Join(dir, "client-root.crt"), filepath.Join(dir, "client-root.key"))
		if err != nil {
			t.Fatal(err)
		}
		opts.ClientTLS, e.clientTLS = cfg, cfg
	}
	e.c = proccluster.Start(t, nodes, opts)
	return e
}

// writeCerts has the kvd binary under test write a CA, a certificate for
// each node and one for the client (`kvd cert cluster`), and returns
// their directory.
func writeCerts(t testing.TB, nodes int) string {
	t.Helper()
	kvd, _ := proccluster.Binaries(t)
	dir := t.TempDir()
	out, err := exec.Command(kvd, "cert", "cluster", "--dir", dir, "--nodes", strconv.Itoa(nodes), "--client", "root").CombinedOutput()
	if err != nil {
		t.Fatalf("kvd cert cluster: %v: %s", err, out)
	}
	return dir
}

// newClient connects a kvd client through the client proxies. A short
// attempt timeout makes the client retry (same session and sequence) on
// another node well within one operation's deadline.
func (e *env) newClient(ctx context.Context) (*client.Client, error) {
	cl, err := client.New(ctx, client.Config{
		Endpoints:      e.endpoints,
		DialTimeout:    time.Second,
		AttemptTimeout: 500 * time.Millisecond,
		TLS:            e.clientTLS,
	})
	if err != nil {
		return nil, err
	}
	e.t.Cleanup(func() { cl.Close() })
	return cl, nil
}

// restartAll kills every node with SIGKILL and starts them again.
func (e *env) restartAll() {
	for _, nd := range e.c.Nodes {
		e.c.Kill(nd)
	}
	for _, nd := range e.c.Nodes {
		e.c.StartNode(nd)
	}
	e.c.WaitReady(60 * time.Second)
}

// outDir returns cfg.OutDir, creating it, or a temporary directory kept
// only when the test fails.
func outDir(t testing.TB, dir string) string {
	t.Helper()
	if dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	d, err := os.MkdirTemp("", "jepsen-lite-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("history and node logs kept in %s", d)
			return
		}
		os.RemoveAll(d)
	})
	return d
}

// Run runs one seed: cluster, workload under the nemesis, final heal and
// restart of every node, final reads, checks. It reports anomalies with
// t.Errorf and returns the figures.
func Run(t *testing.T, cfg Config) Result {
	t.Helper()
	cfg.setDefaults()
	if err := validateFaults(cfg.Faults); err != nil {
		t.Fatal(err)
	}
	logf := func(format string, args ...any) { t.Logf(format, args...) }
	logf("jepsen-lite: seed %d (replay with -jepsen.seed=%d), %v, faults %v, tls %v", cfg.Seed, cfg.Seed, cfg.Duration, cfg.Faults, cfg.TLS)
	dir := outDir(t, cfg.OutDir)

	e := startEnv(t, cfg.Nodes, cfg.Shards, cfg.TLS)
	h := newHistory()
	h.event("cluster ready")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Workers: one client (one session) each.
	var procs atomic.Int64
	ks := newKeySpace(cfg.KeySlots, cfg.OpsPerKey)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var stopOnce sync.Once
	stopWorkers := func() {
		stopOnce.Do(func() { close(stop) })
		wg.Wait()
	}
	t.Cleanup(stopWorkers) // also on t.Fatal: before the nodes are killed

	// Watchers, started (and seen to watch every shard) before the
	// first write; they run on through the final restart, until every
	// one has seen the end marker on every key it watches.
	watchStop := make(chan struct{})
	var watchWG sync.WaitGroup
	var watchOnce sync.Once
	stopWatchers := func() {
		watchOnce.Do(func() { close(watchStop) })
		watchWG.Wait()
	}
	t.Cleanup(stopWatchers)
	watchers, err := startWatchers(e, h, cfg.Seed, cfg.Counters, cfg.KeySlots, cfg.Shards, watchStop, &watchWG)
	if err != nil {
		t.Fatal(err)
	}
	h.event("watchers ready")
	for i := range cfg.RegisterWorkers + cfg.CounterWorkers + max(cfg.LockWorkers, 0) {
		cl, err := e.newClient(ctx)
		if err != nil {
			t.Fatal(err)
		}
		r := newRecorder(h, cl, cfg.OpTimeout, &procs)
		rng := rand.New(rand.NewPCG(cfg.Seed, uint64(i)+1))
		wg.Add(1)
		switch {
		case i < cfg.RegisterWorkers:
			go func() { defer wg.Done(); registerWorker(r, i, rng, ks, stop, cfg.Pace) }()
		case i < cfg.RegisterWorkers+cfg.CounterWorkers:
			go func() { defer wg.Done(); counterWorker(r, rng, cfg.Counters, stop, cfg.Pace) }()
		default:
			go func() { defer wg.Done(); lockWorker(r, i, rng, stop, cfg.Pace) }()
		}
	}

	nem := &nemesis{
		c: e.c, net: e.net, h: h, logf: logf,
		rng:     rand.New(rand.NewPCG(cfg.Seed, 0)),
		faults:  cfg.Faults,
		shards:  cfg.Shards,
		holdMin: cfg.HoldMin, holdMax: cfg.HoldMax, quietMin: cfg.QuietMin, quietMax: cfg.QuietMax,
		paused: map[uint64]bool{},
	}
	nem.run(time.Now().Add(cfg.Duration))
	stopAt := h.now()
	stopWorkers()

	// Final heal, then kill -9 and restart every node: what survives is
	// what was durable.
	nem.heal()
	h.event("final: kill -9 every node and restart")
	logf("final: kill -9 every node and restart")
	e.restartAll()
	h.event("final reads")

	fctx, fcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer fcancel()
	cl, err := e.newClient(fctx)
	if err != nil {
		t.Fatal(err)
	}
	fr := newRecorder(h, cl, 5*time.Second, &procs)
	fr.final = true
	var finalKeys []string
	finalKeys = append(finalKeys, ks.keys()...)
	for i := range cfg.Counters {
		finalKeys = append(finalKeys, counterKey(i))
	}
	deadline := time.Now().Add(60 * time.Second)
	for _, k := range finalKeys {
		for fr.get(k, isCounterKey(k)).Status != statusOK {
			if time.Now().After(deadline) {
				t.Errorf("final read of %s: no success within 60s of the restart", k)
				break
			}
		}
	}

	if cfg.LockWorkers > 0 {
		for fr.lockRead().Status != statusOK {
			if time.Now().After(deadline) {
				t.Errorf("final read of %s: no success within 60s of the restart", lockRegister)
				break
			}
		}
	}

	if err := endWatchers(cl, watchers, finalKeys, time.Now().Add(60*time.Second)); err != nil {
		t.Errorf("seed %d: %v", cfg.Seed, err)
	}
	stopWatchers()

	// Checks.
	all, events := h.snapshot()
	// The register, counter and watch checks see their own ops; the lock
	// workload's go to checkLocks.
	var ops []Op
	for _, op := range all {
		if !op.Lock {
			ops = append(ops, op)
		}
	}
	res := Result{Seed: cfg.Seed, Faults: nem.injected}
	res.HistoryPath = filepath.Join(dir, fmt.Sprintf("history-%d.jsonl", cfg.Seed))
	if err := writeHistory(res.HistoryPath, all, events); err != nil {
		t.Errorf("write history: %v", err)
	}
	var kinds = map[string]map[string]int{}
	for _, op := range all {
		if op.Final {
			continue
		}
		res.Ops++
		if op.Status == statusInfo {
			res.Indeterminate++
		}
		if kinds[op.Kind] == nil {
			kinds[op.Kind] = map[string]int{}
		}
		kinds[op.Kind][op.Status]++
	}
	logf("history: %s: %d ops (%d final reads), %d nemesis events, %d faults injected; unidentified peer connections: %d",
		res.HistoryPath, res.Ops, len(all)-res.Ops, len(events), res.Faults, e.net.unknownSources.Load())
	for _, k := range []string{kindGet, kindPut, kindDel, kindCas, kindLock, kindFenced, kindUnlock, kindAbandon} {
		logf("  %-3s ok=%d fail=%d info=%d", k, kinds[k][statusOK], kinds[k][statusFail], kinds[k][statusInfo])
	}

	viz := filepath.Join(dir, fmt.Sprintf("history-%d.html", cfg.Seed))
	lin := checkLinearizable(ops, events, cfg.CheckPerKey, cfg.CheckBudget, viz)
	res.Keys, res.KeysUnchecked = lin.keys, lin.unknown
	logf("linearizability: %d keys checked in %v: %d linearizable, %d NOT linearizable, %d unknown (check timed out)",
		lin.keys, lin.elapsed.Round(time.Millisecond), lin.keys-lin.illegal-lin.unknown, lin.illegal, lin.unknown)
	for _, k := range lin.illegalKeys {
		t.Errorf("seed %d: key %s is not linearizable; history of the key:\n%s", cfg.Seed, k, excerpt(ops, k, 60))
	}
	if lin.vizPath != "" {
		t.Errorf("seed %d: porcupine visualization: %s", cfg.Seed, lin.vizPath)
	}

	dur := checkDurable(ops)
	logf("durability: %d register keys, %d acknowledged writes, %d lost", dur.keys, dur.acked, dur.lost)
	for _, ex := range dur.examples {
		t.Errorf("seed %d: %s", cfg.Seed, ex)
	}

	ctr := checkCounters(ops)
	logf("exactly-once: %d counters, %d acknowledged increments, %d indeterminate; %d below range, %d above",
		ctr.counters, ctr.acked, ctr.indeterminate, ctr.below, ctr.above)
	for _, l := range ctr.lines {
		logf("  %s", l)
	}
	if ctr.below+ctr.above > 0 {
		t.Errorf("seed %d: counter anomalies: %d below, %d above their range", cfg.Seed, ctr.below, ctr.above)
	}

	var logs []watchLog
	resumes := 0
	for _, w := range watchers {
		logs = append(logs, w.log())
		resumes += logs[len(logs)-1].Resumes
	}
	if err := writeWatchLogs(filepath.Join(dir, fmt.Sprintf("watch-%d.jsonl", cfg.Seed)), logs); err != nil {
		t.Errorf("write watch events: %v", err)
	}
	wr := checkWatches(ops, logs)
	res.WatchEvents = wr.events
	logf("watch: %d watchers (%d resumed with a token), %d keys, %d events checked: %d dropped, %d duplicated, %d phantom, %d misordered, %d final mismatches, %d ended",
		wr.watchers, resumes, wr.keys, wr.events, wr.dropped, wr.duplicated, wr.phantom, wr.misordered, wr.final, wr.ended)
	for _, ex := range wr.examples {
		t.Errorf("seed %d: watch: %s", cfg.Seed, ex)
	}

	lk := checkLocks(all, events, lockTakeoverBound, stopAt)
	res.Locks, res.FencedWrites, res.TakeoverMax = lk.locks, lk.fenced, lk.takeoverMax
	logf("locks: %d acquired, %d fenced writes committed, %d refused (lock lost), %d indeterminate; %d abandoned, %d taken over (max %v), %d of them with no fault in the way (max %v; bound %v after the abandon or the last fault's end)",
		lk.locks, lk.fenced, lk.fencedRefused, lk.fencedInfo, lk.abandons, lk.takeovers, lk.takeoverMax.Round(time.Millisecond),
		lk.quiet, lk.quietMax.Round(time.Millisecond), lockTakeoverBound)
	for _, ex := range lk.examples {
		t.Errorf("seed %d: lock: %s", cfg.Seed, ex)
	}

	res.Anomalies = lin.illegal + ctr.above + wr.anomalies() + lk.anomalies
	res.Lost = dur.lost + ctr.below
	if t.Failed() {
		saveLogs(t, e, dir)
	}
	logf("seed %d: ops=%d faults=%d indeterminate=%d anomalies=%d lost=%d watch-events=%d locks=%d fenced-writes=%d takeover-max=%.1fs",
		cfg.Seed, res.Ops, res.Faults, res.Indeterminate, res.Anomalies, res.Lost, res.WatchEvents, res.Locks, res.FencedWrites, res.TakeoverMax.Seconds())
	return res
}

func isCounterKey(k string) bool { return len(k) > 6 && k[:6] == "jl/ctr" }

// saveLogs copies the node logs next to the history (the cluster's own
// directory is removed with the test).
func saveLogs(t testing.TB, e *env, dir string) {
	for _, nd := range e.c.Nodes {
		if b, err := os.ReadFile(nd.LogPath); err == nil {
			_ = os.WriteFile(filepath.Join(dir, filepath.Base(nd.LogPath)), b, 0o644)
		}
	}
}

// summary is the line `make jepsen` and the short test end with.
func summary(rs []Result) string {
	var ops, faults, info, anom, lost, wev, locks, fenced int
	var takeover time.Duration
	for _, r := range rs {
		locks += r.Locks
		fenced += r.FencedWrites
		takeover = max(takeover, r.TakeoverMax)
		wev += r.WatchEvents
		ops += r.Ops
		faults += r.Faults
		info += r.Indeterminate
		anom += r.Anomalies
		lost += r.Lost
	}
	return fmt.Sprintf("jepsen-lite: histories=%d ops=%d faults=%d indeterminate=%d anomalies=%d lost=%d watch-events=%d locks=%d fenced-writes=%d takeover-max=%.1fs",
		len(rs), ops, faults, info, anom, lost, wev, locks, fenced, takeover.Seconds())
}

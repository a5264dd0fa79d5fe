package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/signal"
	"regexp"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/proto/kvpb"
)

// benchOpts are the flags of kvctl bench.
type benchOpts struct {
	workload    string // put, get, mixed or txn
	clients     int
	conns       int
	total       int64
	duration    time.Duration
	keySize     int
	valSize     int
	keySpace    int64
	consistency string
	readRatio   float64
	rate        float64
	seed        uint64
	progress    bool
	cpuProfile  string // file for the client's CPU profile of the measured phase
}

const (
	defaultBenchTotal         = 10000
	defaultBenchDurationSpace = 100000 // --key-space with --duration
	prefillWriters            = 64
)

const benchLong = `--clients workers run concurrently over about --conns gRPC connections in
all, the way etcd's benchmark counts them. A client instance holds one
connection to every member, since it sends each request to its shard's
leader, so the workers share round(--conns / members) instances (at least
one) round-robin: --conns 10 on 3 members is 3 instances, 9 connections.
The report says how many were opened. Keys are --key-size bytes,
the zero-padded decimal index of the key, so every key has the same size;
values are --val-size bytes. Each operation has --timeout.

Closed loop (--rate 0, the default): each worker sends its next request as
soon as the previous one answers; latency is the request's own time.
Open loop (--rate R): requests are scheduled at R per second in total,
request i at start + i/R, whatever the cluster does, and latency is
measured from the scheduled start, not from when a worker got round to
sending it. A stall therefore shows up in the latency of every request it
delayed instead of vanishing from the numbers ("coordinated omission").
Give enough --clients to keep up with R, or the queueing is yours, not the
cluster's.

The report (stdout) gives throughput of successful operations, errors by
class (gRPC code, or the last code seen before --timeout ran out), latency
of successful operations (min, mean, p50, p90, p99, p99.9, max, from a
log-bucketed histogram accurate to 1 %) and a histogram with one row per
doubling of latency; -o json prints the same as one JSON object. A progress
line (ops, ops/s, errors) goes to stderr every second when stderr is a
terminal or with --progress. Ctrl-C stops early and reports what ran.
Exit 0 when any operation succeeded, 3 when every one failed.`

func (a *app) benchCmd() *cobra.Command {
	cmd := groupCmd("bench", "Measure throughput and latency of the cluster", `  kvctl bench put --clients 100 --conns 10 --total 50000
  kvctl bench get --clients 100 --conns 10 --key-space 10000 --consistency serializable
  kvctl bench mixed --read-ratio 0.9 --duration 30s --clients 50`)
	cmd.Long = `Run a workload against the cluster and report throughput, errors and
latency percentiles with a log-scale histogram. Workloads: put, get, mixed,
txn (see 'kvctl bench put --help' for the flags), and watch: events
delivered to many watchers under writers ('kvctl bench watch --help').

` + benchLong
	cmd.AddCommand(
		a.benchWorkloadCmd("put", "Write keys: operation i writes key i mod --key-space",
			`Write values: operation i writes key i mod --key-space, so with the
default --key-space (= --total) every operation writes a new key, and with
--key-space 1 every operation writes the same key.`,
			`  kvctl bench put --clients 1 --total 5000
  kvctl bench put --clients 100 --conns 10 --total 50000
  kvctl bench put --clients 100 --conns 10 --total 30000 --key-space 1
  kvctl bench put --rate 2000 --duration 1m --clients 200 -o json`),
		a.benchWorkloadCmd("get", "Read random keys of a prefilled key space",
			`Read keys chosen uniformly at random (by --seed) from the key space.
Every key of the key space is written once first, in parallel (64 writers,
or --clients if more); the prefill is not measured.`,
			`  kvctl bench get --clients 100 --conns 10 --total 100000 --key-space 10000
  kvctl bench get --clients 100 --conns 10 --key-space 10000 --consistency serializable`),
		a.benchWorkloadCmd("mixed", "Read and write random keys (--read-ratio reads)",
			`Operations on keys chosen uniformly at random: a --read-ratio fraction of
them are reads, the rest writes. Every key of the key space is written once
first, in parallel; the prefill is not measured.`,
			`  kvctl bench mixed --read-ratio 0.9 --duration 30s --clients 50
  kvctl bench mixed --read-ratio 0.5 --rate 1000 --clients 100`),
		a.benchWorkloadCmd("txn", "Compare-and-swap transactions on one key each",
			`Run single-key compare-and-swap transactions: compare the key's value with
the bench value, put it on success, put it on failure (so every transaction
writes). Operation i uses key i mod --key-space. The first transaction on a
key finds nothing to match and runs the failure branch; the report counts
those.`,
			`  kvctl bench txn --clients 10 --key-space 100
  kvctl bench txn --clients 50 --conns 5 --total 20000`),
		a.benchWatchCmd(),
	)
	return cmd
}

func (a *app) benchWorkloadCmd(workload, short, long, example string) *cobra.Command {
	o := &benchOpts{workload: workload}
	var progress bool
	cmd := &cobra.Command{
		Annotations: map[string]string{outputsKey: "simple,json"},
		Use:         workload,
		Short:       short,
		Long:        long + "\n\n" + benchLong,
		Example:     example,
		Args:        exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			f := cmd.Flags()
			if err := o.check(f.Changed("total"), f.Changed("duration"), f.Changed("key-space")); err != nil {
				return err
			}
			o.progress = progress
			if !f.Changed("progress") {
				o.progress = isTerminal(a.stderr)
			}
			return a.runBench(o)
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.clients, "clients", 1, "concurrent workers")
	f.IntVar(&o.conns, "conns", 1, "gRPC connections in all, counted as etcd's benchmark counts them: the workers share round(conns/members) client instances (at least 1), each connected to every member")
	f.Int64Var(&o.total, "total", defaultBenchTotal, "operations to run (not with --duration)")
	f.DurationVar(&o.duration, "duration", 0, "run for this long instead of --total operations")
	f.IntVar(&o.keySize, "key-size", 8, "key size in bytes")
	f.IntVar(&o.valSize, "val-size", 256, "value size in bytes")
	f.Int64Var(&o.keySpace, "key-space", 0, fmt.Sprintf("distinct keys (default: --total, or %d with --duration)", defaultBenchDurationSpace))
	f.StringVar(&o.consistency, "consistency", "linearizable", "reads: linearizable (via the leader) or serializable (any replica, may be stale)")
	f.Float64Var(&o.rate, "rate", 0, "open loop: target operations per second over all workers, latency counted from each operation's scheduled start (0: closed loop)")
	f.Uint64Var(&o.seed, "seed", 1, "seed of the random key choice and the value bytes (same seed, same keys)")
	f.StringVar(&o.cpuProfile, "cpuprofile", "", "write the client's CPU profile of the measured phase (not the prefill) to this file, for go tool pprof")
	f.BoolVar(&progress, "progress", false, "print progress to stderr every second even when stderr is not a terminal")
	if workload == "mixed" {
		f.Float64Var(&o.readRatio, "read-ratio", 0.9, "fraction of operations that are reads")
	}
	return cmd
}

// check validates the flags and fills in defaults.
func (o *benchOpts) check(totalSet, durationSet, keySpaceSet bool) error {
	switch {
	case totalSet && durationSet:
		return usageErrorf("give --total or --duration, not both")
	case o.clients < 1:
		return usageErrorf("--clients must be ≥ 1, got %d", o.clients)
	case o.conns < 1 || o.conns > o.clients:
		return usageErrorf("--conns must be between 1 and --clients (%d), got %d", o.clients, o.conns)
	case durationSet && o.duration <= 0:
		return usageErrorf("--duration must be positive, got %v", o.duration)
	case !durationSet && o.total < 1:
		return usageErrorf("--total must be ≥ 1, got %d", o.total)
	case o.keySize < 1:
		return usageErrorf("--key-size must be ≥ 1, got %d", o.keySize)
	case o.valSize < 0:
		return usageErrorf("--val-size must be ≥ 0, got %d", o.valSize)
	case o.rate < 0:
		return usageErrorf("--rate must be ≥ 0, got %g", o.rate)
	case o.readRatio < 0 || o.readRatio > 1:
		return usageErrorf("--read-ratio must be between 0 and 1, got %g", o.readRatio)
	}
	serializable, err := parseConsistency(o.consistency)
	if err != nil {
		return err
	}
	o.consistency = "linearizable" // the report names it in full
	if serializable {
		o.consistency = "serializable"
	}
	if durationSet {
		o.total = 0
	}
	if !keySpaceSet {
		o.keySpace = o.total
		if durationSet {
			o.keySpace = defaultBenchDurationSpace
		}
	}
	if o.keySpace < 1 {
		return usageErrorf("--key-space must be ≥ 1, got %d", o.keySpace)
	}
	if o.keySize < 19 {
		limit := int64(1)
		for range o.keySize {
			limit *= 10
		}
		if o.keySpace > limit {
			return usageErrorf("--key-size %d holds at most %d distinct keys (decimal indexes), but --key-space is %d; raise --key-size",
				o.keySize, limit, o.keySpace)
		}
	}
	return nil
}

// benchKey writes key index i into buf: i in decimal, zero-padded to
// len(buf), so every key has the same size.
func benchKey(buf []byte, i int64) []byte {
	for j := range buf {
		buf[j] = '0'
	}
	d := strconv.AppendInt(nil, i, 10)
	copy(buf[max(len(buf)-len(d), 0):], d[max(len(d)-len(buf), 0):])
	return buf
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// benchWorker is one worker's tally; only its goroutine writes it until
// the run ends.
type benchWorker struct {
	hist          *histogram
	errs          map[string]int64
	okByType      map[string]int64
	compareFailed int64
}

// benchRun is the shared state of one run.
type benchRun struct {
	o       *benchOpts
	timeout time.Duration
	clients []*client.Client
	members int // in the cluster map: each client holds a connection to every one
	value   []byte

	next atomic.Int64 // index of the next operation
	done atomic.Int64 // operations finished (ok or failed)
	errs atomic.Int64
}

func (a *app) runBench(o *benchOpts) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	// Open the profile's file first: a bad path should fail before the
	// prefill, not after it.
	var profile *os.File
	if o.cpuProfile != "" {
		f, err := os.Create(o.cpuProfile)
		if err != nil {
			return usageErrorf("--cpuprofile: %v", err)
		}
		defer f.Close()
		profile = f
	}
	r := &benchRun{o: o, timeout: a.timeout, value: make([]byte, o.valSize)}
	rng := rand.New(rand.NewPCG(o.seed, 0x6b7664))
	for i := range r.value {
		r.value[i] = 'a' + byte(rng.IntN(26))
	}
	defer func() {
		for _, c := range r.clients {
			c.Close()
		}
	}()
	connect := func() error {
		c, err := a.connectWith(func(cfg *client.Config) {
			// Let every worker have a request in flight to one node:
			// the bench measures the cluster, not the client's bulkhead.
			cfg.MaxInFlightPerNode = max(client.DefaultMaxInFlightPerNode, o.clients)
		})
		if err == nil {
			r.clients = append(r.clients, c)
		}
		return err
	}
	if err := connect(); err != nil {
		return err
	}
	// --conns counts connections as etcd's benchmark does, in all. A
	// client instance holds one to every member (it sends each request
	// to its shard's leader), so the workers share round(conns/members)
	// instances: 100 clients over 10 connections are 3 instances, 9
	// connections, on a 3-member cluster.
	mctx, cancel := a.ctx()
	m, err := r.clients[0].Map(mctx)
	cancel()
	if err != nil {
		return fmt.Errorf("bench: cluster map: %w", err)
	}
	r.members = max(len(m.GetMembers()), 1)
	instances := min(max((o.conns+r.members/2)/r.members, 1), o.clients)
	for len(r.clients) < instances {
		if err := connect(); err != nil {
			return err
		}
	}

	var prefilled int64
	if o.workload == "get" || o.workload == "mixed" {
		if o.progress {
			fmt.Fprintf(a.stderr, "bench: prefilling %d keys (not measured)\n", o.keySpace)
		}
		if err := r.prefill(ctx); err != nil {
			return err
		}
		prefilled = o.keySpace
	}
	if ctx.Err() != nil {
		return usageErrorf("interrupted during the prefill")
	}

	stopProfile, err := startCPUProfile(profile)
	if err != nil {
		return err
	}
	workers := make([]*benchWorker, o.clients)
	start := time.Now()
	var wg sync.WaitGroup
	for w := range o.clients {
		workers[w] = &benchWorker{hist: newHistogram(), errs: map[string]int64{}, okByType: map[string]int64{}}
		c := r.clients[w%len(r.clients)]
		wrng := rand.New(rand.NewPCG(o.seed, uint64(w)+1))
		wg.Go(func() { r.work(ctx, c, workers[w], wrng, start) })
	}
	stopProgress := func() {}
	if o.progress {
		stopProgress = r.showProgress(a.stderr, start)
	}
	wg.Wait()
	elapsed := time.Since(start)
	stopProgress()
	if err := stopProfile(); err != nil {
		return err
	}

	rep := r.report(workers, elapsed, prefilled, ctx.Err() != nil)
	if err := a.printBench(rep); err != nil {
		return err
	}
	if rep.Ops > 0 && rep.Errors == rep.Ops {
		var classes []string
		for c, n := range rep.ErrorsByClass {
			classes = append(classes, fmt.Sprintf("%s: %d", c, n))
		}
		slices.Sort(classes)
		return &exitError{code: exitUnavailable, msg: fmt.Sprintf(
			"every one of %d operations failed (%s); check the cluster with 'kvctl cluster status'",
			rep.Ops, strings.Join(classes, ", "))}
	}
	return nil
}

// prefill writes every key of the key space once, in parallel.
func (r *benchRun) prefill(ctx context.Context) error {
	var (
		next     atomic.Int64
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for w := range max(r.o.clients, prefillWriters) {
		c := r.clients[w%len(r.clients)]
		wg.Go(func() {
			key := make([]byte, r.o.keySize)
			for {
				i := next.Add(1) - 1
				if i >= r.o.keySpace || ctx.Err() != nil {
					return
				}
				octx, ocancel := context.WithTimeout(ctx, r.timeout)
				_, err := c.Put(octx, benchKey(key, i), r.value)
				ocancel()
				if err != nil && ctx.Err() == nil {
					errOnce.Do(func() { firstErr = err })
					cancel()
					return
				}
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return fmt.Errorf("prefill of the key space: %w", firstErr)
	}
	// A node makes applied writes readable when its storage commits
	// (every --commit-interval), and a linearizable read makes it commit at once: one
	// linearizable count over every shard, and the serializable reads that
	// follow find the prefilled keys on the leaders.
	cctx, ccancel := context.WithTimeout(ctx, r.timeout)
	defer ccancel()
	if _, err := r.clients[0].Count(cctx, nil, nil, false); err != nil {
		return fmt.Errorf("prefill of the key space: settle: %w", err)
	}
	return nil
}

// work runs operations until the total is reached, the duration is over
// or ctx ends.
func (r *benchRun) work(ctx context.Context, c *client.Client, w *benchWorker, rng *rand.Rand, start time.Time) {
	o := r.o
	key := make([]byte, o.keySize)
	var readOpts []client.ReadOption
	if o.consistency == "serializable" {
		readOpts = append(readOpts, client.WithSerializable())
	}
	end := start.Add(o.duration)
	var timer *time.Timer
	for ctx.Err() == nil {
		i := r.next.Add(1) - 1
		if o.total > 0 && i >= o.total {
			return
		}
		began := time.Now()
		if o.rate > 0 {
			// Open loop: op i is due at start + i/rate, and its latency
			// counts from then, however late a worker picks it up.
			began = start.Add(time.Duration(float64(i) * float64(time.Second) / o.rate))
			if o.duration > 0 && !began.Before(end) {
				return
			}
			if d := time.Until(began); d > 0 {
				if timer == nil {
					timer = time.NewTimer(d)
				} else {
					timer.Reset(d)
				}
				select {
				case <-timer.C:
				case <-ctx.Done():
					return
				}
			}
		} else if o.duration > 0 && !began.Before(end) {
			return
		}

		octx, cancel := context.WithTimeout(ctx, r.timeout)
		kind, err := r.op(octx, c, i, key, rng, readOpts, w)
		cancel()
		lat := time.Since(began)
		if ctx.Err() != nil {
			return // interrupted: the operation's outcome says nothing
		}
		r.done.Add(1)
		if err != nil {
			r.errs.Add(1)
			w.errs[errClass(err)]++
			continue
		}
		w.okByType[kind]++
		w.hist.record(lat)
	}
}

// op runs operation i and says what kind it was.
func (r *benchRun) op(ctx context.Context, c *client.Client, i int64, key []byte, rng *rand.Rand,
	readOpts []client.ReadOption, w *benchWorker) (string, error) {
	o := r.o
	switch o.workload {
	case "put":
		_, err := c.Put(ctx, benchKey(key, i%o.keySpace), r.value)
		return "put", err
	case "get":
		_, err := c.Get(ctx, benchKey(key, rng.Int64N(o.keySpace)), readOpts...)
		return "get", err
	case "mixed":
		k := benchKey(key, rng.Int64N(o.keySpace))
		if rng.Float64() < o.readRatio {
			_, err := c.Get(ctx, k, readOpts...)
			return "get", err
		}
		_, err := c.Put(ctx, k, r.value)
		return "put", err
	default: // txn
		k := benchKey(key, i%o.keySpace)
		put := &kvpb.RequestOp{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: k, Value: r.value}}}
		resp, err := c.Txn(ctx, &kvpb.TxnRequest{
			Compare: []*kvpb.Compare{{Key: k, Target: kvpb.Compare_VALUE, Result: kvpb.Compare_EQUAL, Value: r.value}},
			Success: []*kvpb.RequestOp{put},
			Failure: []*kvpb.RequestOp{put},
		})
		if err == nil && !resp.GetSucceeded() {
			w.compareFailed++ // the key's first write: the compare had nothing to match
		}
		return "txn", err
	}
}

var lastCode = regexp.MustCompile(`code = (\w+)`)

// errClass names an error for the report: its gRPC code when it carries
// one, else the client's class; a deadline that ran out names the last
// error seen before it.
func errClass(err error) string {
	if st, ok := status.FromError(err); ok && st.Code() != codes.Unknown {
		return st.Code().String()
	}
	switch {
	case errors.Is(err, client.ErrNotFound):
		return "NotFound"
	case errors.Is(err, client.ErrInvalidArgument):
		return "InvalidArgument"
	case errors.Is(err, context.DeadlineExceeded):
		if m := lastCode.FindAllStringSubmatch(err.Error(), -1); len(m) > 0 {
			return "DeadlineExceeded (last: " + m[len(m)-1][1] + ")"
		}
		return "DeadlineExceeded"
	case errors.Is(err, client.ErrUnavailable):
		return "Unavailable"
	case errors.Is(err, client.ErrClosed), errors.Is(err, context.Canceled):
		return "Canceled"
	}
	return "Unknown"
}

// showProgress prints a line to w every second until the returned stop
// is called.
func (r *benchRun) showProgress(w io.Writer, start time.Time) (stop func()) {
	quit := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		prev, prevT := int64(0), start
		for {
			select {
			case <-quit:
				return
			case now := <-t.C:
				done := r.done.Load()
				rate := float64(done-prev) / now.Sub(prevT).Seconds()
				fmt.Fprintf(w, "bench: %5.0fs  %d ops  %.0f ops/s  %d errors\n",
					now.Sub(start).Seconds(), done, rate, r.errs.Load())
				prev, prevT = done, now
			}
		}
	})
	return func() { close(quit); wg.Wait() }
}

// benchReport is the result of a run; -o json prints it as is.
type benchReport struct {
	Workload      string           `json:"workload"`
	Mode          string           `json:"mode"` // closed or open loop
	Rate          float64          `json:"rate,omitempty"`
	Clients       int              `json:"clients"`
	Conns         int              `json:"conns"`            // connections opened: client instances × members
	Instances     int              `json:"client_instances"` // the workers share them round-robin
	KeySize       int              `json:"key_size"`
	ValSize       int              `json:"val_size"`
	KeySpace      int64            `json:"key_space"`
	ReadRatio     *float64         `json:"read_ratio,omitempty"`
	Consistency   string           `json:"consistency"`
	Seed          uint64           `json:"seed"`
	Prefilled     int64            `json:"prefilled"`
	Ops           int64            `json:"ops"` // finished: succeeded + failed
	Errors        int64            `json:"errors"`
	ErrorsByClass map[string]int64 `json:"errors_by_class"`
	OpsByType     map[string]int64 `json:"ok_by_type"`
	CompareFailed int64            `json:"txn_compare_failed,omitempty"`
	ElapsedSec    float64          `json:"elapsed_s"`
	OpsPerSec     float64          `json:"ops_per_sec"` // successful operations
	Latency       benchLatency     `json:"latency_ms"`
	Histogram     []benchHistRow   `json:"histogram"`
	Interrupted   bool             `json:"interrupted,omitempty"`
}

type benchLatency struct {
	Min  float64 `json:"min"`
	Mean float64 `json:"mean"`
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p99_9"`
	Max  float64 `json:"max"`
}

type benchHistRow struct {
	LTms  float64 `json:"lt_ms"` // the row holds latencies in [lt_ms/2, lt_ms)
	Count uint64  `json:"count"`
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func (r *benchRun) report(workers []*benchWorker, elapsed time.Duration, prefilled int64, interrupted bool) *benchReport {
	o := r.o
	h := newHistogram()
	rep := &benchReport{
		Workload: o.workload, Mode: "closed", Rate: o.rate, Clients: o.clients,
		Conns: len(r.clients) * r.members, Instances: len(r.clients),
		KeySize: o.keySize, ValSize: o.valSize, KeySpace: o.keySpace, Consistency: o.consistency,
		Seed: o.seed, Prefilled: prefilled, ErrorsByClass: map[string]int64{}, OpsByType: map[string]int64{},
		ElapsedSec: elapsed.Seconds(), Interrupted: interrupted, Histogram: []benchHistRow{},
	}
	if o.rate > 0 {
		rep.Mode = "open"
	}
	if o.workload == "mixed" {
		rep.ReadRatio = &o.readRatio
	}
	var ok int64
	for _, w := range workers {
		h.merge(w.hist)
		for c, n := range w.errs {
			rep.ErrorsByClass[c] += n
			rep.Errors += n
		}
		for k, n := range w.okByType {
			rep.OpsByType[k] += n
			ok += n
		}
		rep.CompareFailed += w.compareFailed
	}
	rep.Ops = ok + rep.Errors
	if elapsed > 0 {
		rep.OpsPerSec = float64(ok) / elapsed.Seconds()
	}
	if h.n > 0 {
		rep.Latency = benchLatency{
			Min: ms(time.Duration(h.min)), Mean: ms(h.mean()), P50: ms(h.quantile(0.5)), P90: ms(h.quantile(0.9)),
			P99: ms(h.quantile(0.99)), P999: ms(h.quantile(0.999)), Max: ms(time.Duration(h.max)),
		}
	}
	for _, row := range h.rows() {
		rep.Histogram = append(rep.Histogram, benchHistRow{LTms: ms(row.LT), Count: row.Count})
	}
	return rep
}

// fmtMs prints milliseconds with three significant digits.
func fmtMs(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0fms", v)
	case v >= 10:
		return fmt.Sprintf("%.1fms", v)
	case v >= 1:
		return fmt.Sprintf("%.2fms", v)
	}
	return fmt.Sprintf("%.3fms", v)
}

func (a *app) printBench(rep *benchReport) error {
	if a.output == "json" {
		return writeJSON(a.stdout, rep)
	}
	var b strings.Builder
	loop := "closed loop"
	if rep.Mode == "open" {
		loop = fmt.Sprintf("open loop at %g ops/s", rep.Rate)
	}
	fmt.Fprintf(&b, "bench %s: %d ops in %.2fs, %s, %d client(s) over %d connection(s) (%d client instance(s), each connected to every member)",
		rep.Workload, rep.Ops, rep.ElapsedSec, loop, rep.Clients, rep.Conns, rep.Instances)
	if rep.Interrupted {
		b.WriteString(" (interrupted)")
	}
	b.WriteString("\n")
	fmt.Fprintf(&b, "  keys %d bytes × %d, values %d bytes", rep.KeySize, rep.KeySpace, rep.ValSize)
	if rep.Workload == "get" || rep.Workload == "mixed" {
		fmt.Fprintf(&b, ", %s reads", rep.Consistency)
	}
	if rep.ReadRatio != nil {
		fmt.Fprintf(&b, ", read ratio %g", *rep.ReadRatio)
	}
	if rep.Prefilled > 0 {
		fmt.Fprintf(&b, "; %d keys prefilled before the run (not measured)", rep.Prefilled)
	}
	b.WriteString("\n")
	fmt.Fprintf(&b, "throughput  %.1f ops/s (successful)\n", rep.OpsPerSec)
	if len(rep.OpsByType) > 1 {
		var parts []string
		for _, k := range []string{"get", "put", "txn"} {
			if n, ok := rep.OpsByType[k]; ok {
				parts = append(parts, fmt.Sprintf("%s %d", k, n))
			}
		}
		fmt.Fprintf(&b, "ops         %s\n", strings.Join(parts, ", "))
	}
	if rep.CompareFailed > 0 {
		fmt.Fprintf(&b, "txn         %d compares failed (first write of a key; the failure branch wrote it)\n", rep.CompareFailed)
	}
	fmt.Fprintf(&b, "errors      %d", rep.Errors)
	if rep.Errors > 0 {
		var classes []string
		for c, n := range rep.ErrorsByClass {
			classes = append(classes, fmt.Sprintf("%s %d", c, n))
		}
		slices.Sort(classes)
		fmt.Fprintf(&b, " (%s)", strings.Join(classes, ", "))
	}
	b.WriteString("\n")
	l := rep.Latency
	fmt.Fprintf(&b, "latency     min %s  mean %s  p50 %s  p90 %s  p99 %s  p99.9 %s  max %s\n",
		fmtMs(l.Min), fmtMs(l.Mean), fmtMs(l.P50), fmtMs(l.P90), fmtMs(l.P99), fmtMs(l.P999), fmtMs(l.Max))
	if len(rep.Histogram) > 0 {
		b.WriteString("histogram   (successful ops; each row: latency below its bound, above the previous row's)\n")
		var most uint64
		for _, row := range rep.Histogram {
			most = max(most, row.Count)
		}
		const width = 40
		for _, row := range rep.Histogram {
			bar := int((row.Count*width + most - 1) / most)
			fmt.Fprintf(&b, "  < %9s %9d |%s\n", fmtMs(row.LTms), row.Count, strings.Repeat("#", bar))
		}
	}
	_, err := io.WriteString(a.stdout, b.String())
	return err
}

// startCPUProfile profiles this process into f until the returned
// function is called; with no file it does nothing. The client's own cost
// is part of every figure the bench reports, so it needs a profile as
// much as a node's /debug/pprof/profile does.
func startCPUProfile(f *os.File) (stop func() error, err error) {
	if f == nil {
		return func() error { return nil }, nil
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		return nil, fmt.Errorf("--cpuprofile: %w", err)
	}
	return func() error {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			return fmt.Errorf("--cpuprofile: %w", err)
		}
		return nil
	}, nil
}

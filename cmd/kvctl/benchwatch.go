package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"

	"github.com/kvd/kvd/client"
)

// watchesPerInstance is how many watches one client instance carries in
// bench watch: a Client's watches share one Watch stream per node, and a
// stream holds at most --max-watches-per-stream (1000) watches, so half
// of that leaves room for every shard's leader to sit on one node.
const watchesPerInstance = 500

// benchWatchOpts are the flags of kvctl bench watch.
type benchWatchOpts struct {
	watchers, keys, writers, conns int
	total                          int64
	duration                       time.Duration
	keySize, valSize               int
	drain                          time.Duration
	seed                           uint64
}

func (a *app) benchWatchCmd() *cobra.Command {
	o := &benchWatchOpts{}
	cmd := &cobra.Command{
		Annotations: map[string]string{outputsKey: "simple,json"},
		Use:         "watch",
		Short:       "Deliver puts to many watchers: events/s and apply-to-delivery latency",
		Long: `Watch --keys keys with --watchers watches (watcher i watches key i mod
--keys, each key alike), while --writers workers put them (operation i puts
key i mod --keys) for --total puts or --duration. Every put's value starts
with its operation number, so a watcher tells which put an event is.

Before the run each key is written once and every watch starts at that
revision, so the run begins only when every watcher has seen it; after the
run each key is written once more and the bench waits (--drain) until every
watcher has seen that too. Then every acknowledged put must have reached
every watcher of its key exactly once: the report counts the events
expected, delivered, missing and duplicated, and a failed put (it may or
may not have applied) is allowed either way. Exit 3 when an event is
missing or duplicated.

Latency is apply to delivery, approximated from the client side: from the
moment the writer's put was acknowledged (the leader applies a put before
it answers) to the moment a watcher received the event, both on this
process's clock. An event can arrive before its put's answer does; such
events count as 0 and the report says how many there were. Throughput is
the events delivered between the first put and the last delivery, per
second. The writers' own put latency is reported too.

Writers share round(--conns / members) client instances, as in the other
workloads; watchers share one instance per 500 watches (a node's Watch
stream holds at most 1000).`,
		Example: `  kvctl bench watch
  kvctl bench watch --watchers 1000 --keys 100 --writers 100 --total 20000 -o json
  kvctl bench watch --watchers 100 --keys 1 --writers 10 --duration 30s`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			f := cmd.Flags()
			if err := o.check(f.Changed("total"), f.Changed("duration")); err != nil {
				return err
			}
			return a.runBenchWatch(o)
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.watchers, "watchers", 1000, "watches, each on one key")
	f.IntVar(&o.keys, "keys", 100, "keys watched and written")
	f.IntVar(&o.writers, "writers", 100, "concurrent writers (closed loop)")
	f.IntVar(&o.conns, "conns", 1, "gRPC connections of the writers in all (round(conns/members) client instances, at least 1)")
	f.Int64Var(&o.total, "total", defaultBenchTotal, "puts to make (not with --duration)")
	f.DurationVar(&o.duration, "duration", 0, "put for this long instead of --total puts")
	f.IntVar(&o.keySize, "key-size", 8, "key size in bytes")
	f.IntVar(&o.valSize, "val-size", 256, "value size in bytes (at least 8: the operation number)")
	f.DurationVar(&o.drain, "drain", 30*time.Second, "how long to wait for every watcher to see the start and the end marker")
	f.Uint64Var(&o.seed, "seed", 1, "seed of the value bytes")
	return cmd
}

func (o *benchWatchOpts) check(totalSet, durationSet bool) error {
	switch {
	case totalSet && durationSet:
		return usageErrorf("give --total or --duration, not both")
	case o.watchers < 1 || o.keys < 1 || o.writers < 1:
		return usageErrorf("--watchers, --keys and --writers must be ≥ 1, got %d, %d, %d", o.watchers, o.keys, o.writers)
	case o.conns < 1 || o.conns > o.writers:
		return usageErrorf("--conns must be between 1 and --writers (%d), got %d", o.writers, o.conns)
	case durationSet && o.duration <= 0:
		return usageErrorf("--duration must be positive, got %v", o.duration)
	case !durationSet && o.total < 1:
		return usageErrorf("--total must be ≥ 1, got %d", o.total)
	case o.valSize < 8:
		return usageErrorf("--val-size must be ≥ 8 (the value carries the operation number), got %d", o.valSize)
	case o.keySize < 1 || (o.keySize < 19 && int64(o.keys) > pow10(o.keySize)):
		return usageErrorf("--key-size %d cannot hold %d distinct keys", o.keySize, o.keys)
	case o.drain <= 0:
		return usageErrorf("--drain must be positive, got %v", o.drain)
	}
	if durationSet {
		o.total = 0
	}
	return nil
}

func pow10(n int) int64 {
	p := int64(1)
	for range n {
		p *= 10
	}
	return p
}

// Markers: a value shorter than 8 bytes is not a put of the run. Each run
// draws its own, so a watcher never takes an older run's for its own.
const markerLen = 7

// watchBench is the shared state of one bench watch run.
type watchBench struct {
	o       *benchWatchOpts
	timeout time.Duration
	// origin is the clock's zero, set before any watch starts; start is
	// when the measured phase began, ns since origin.
	origin time.Time
	start  int64
	keys   [][]byte
	value  []byte

	next atomic.Int64 // next operation number

	// acked[i]: when put i was acknowledged, ns since origin; 0 if not
	// (yet), -1 if it failed. Written once by its writer, read after
	// the writers are done.
	mu    sync.Mutex
	acked []int64
}

// benchWatcher is one watch's record; only its goroutine writes it until
// the watch ends.
type benchWatcher struct {
	key      int
	recv     []watchRecv
	err      error
	markers  map[string]bool
	arrived  chan struct{} // closed, and replaced, when a marker arrives
	markerMu sync.Mutex
}

type watchRecv struct {
	op int64 // operation number
	at int64 // ns since origin
}

func (w *benchWatcher) sawMarker(m string) (bool, chan struct{}) {
	w.markerMu.Lock()
	defer w.markerMu.Unlock()
	return w.markers[m], w.arrived
}

func (w *benchWatcher) noteMarker(m string) {
	w.markerMu.Lock()
	defer w.markerMu.Unlock()
	w.markers[m] = true
	close(w.arrived)
	w.arrived = make(chan struct{})
}

// waitMarker waits until every watcher saw marker m (one per key) or the
// deadline passes.
func waitMarker(ctx context.Context, ws []*benchWatcher, m string, deadline time.Time) error {
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	for i, w := range ws {
		for {
			seen, arrived := w.sawMarker(m)
			if seen {
				break
			}
			select {
			case <-arrived:
			case <-t.C:
				return fmt.Errorf("watcher %d (key %d) has not seen the marker put by the deadline (--drain); watchers before it have", i, w.key)
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	return nil
}

func (a *app) runBenchWatch(o *benchWatchOpts) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	b := &watchBench{o: o, timeout: a.timeout, value: make([]byte, o.valSize)}
	rng := rand.New(rand.NewPCG(o.seed, 0x6b7664))
	for i := range b.value {
		b.value[i] = 'a' + byte(rng.IntN(26))
	}
	for i := range o.keys {
		b.keys = append(b.keys, benchKey(make([]byte, o.keySize), int64(i)))
	}
	var clients []*client.Client
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	connect := func() (*client.Client, error) {
		c, err := a.connectWith(func(cfg *client.Config) {
			cfg.MaxInFlightPerNode = max(client.DefaultMaxInFlightPerNode, o.writers)
		})
		if err == nil {
			clients = append(clients, c)
		}
		return c, err
	}
	first, err := connect()
	if err != nil {
		return err
	}
	mctx, cancel := a.ctx()
	m, err := first.Map(mctx)
	cancel()
	if err != nil {
		return fmt.Errorf("bench: cluster map: %w", err)
	}
	members := max(len(m.GetMembers()), 1)
	writerClients := []*client.Client{first}
	for len(writerClients) < min(max((o.conns+members/2)/members, 1), o.writers) {
		c, err := connect()
		if err != nil {
			return err
		}
		writerClients = append(writerClients, c)
	}
	var watchClients []*client.Client
	for range (o.watchers + watchesPerInstance - 1) / watchesPerInstance {
		c, err := connect()
		if err != nil {
			return err
		}
		watchClients = append(watchClients, c)
	}

	// The start marker: each key written once, every watch started at
	// that revision, the run begins when every watcher has seen it.
	nonce := fmt.Sprintf("%06d", rand.N(1000000))
	startMarker, endMarker := "s"+nonce, "e"+nonce
	startRevs := make([]int64, o.keys)
	for i, k := range b.keys {
		pctx, cancel := context.WithTimeout(ctx, a.timeout)
		resp, err := first.Put(pctx, k, []byte(startMarker))
		cancel()
		if err != nil {
			return fmt.Errorf("bench: start marker: %w", err)
		}
		startRevs[i] = resp.GetHeader().GetRevision()
	}
	b.origin = time.Now()
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	ws := make([]*benchWatcher, o.watchers)
	var wwg sync.WaitGroup
	for i := range ws {
		w := &benchWatcher{key: i % o.keys, markers: map[string]bool{}, arrived: make(chan struct{})}
		ws[i] = w
		ch := watchClients[i/watchesPerInstance].Watch(wctx, b.keys[w.key], client.WithRevision(startRevs[w.key]))
		wwg.Go(func() { b.watch(wctx, w, ch) })
	}
	stopWatchers := func() { wcancel(); wwg.Wait() }
	defer stopWatchers()
	if err := waitMarker(ctx, ws, startMarker, time.Now().Add(o.drain)); err != nil {
		return fmt.Errorf("bench: watches not started: %w", err)
	}

	// The measured phase.
	if o.total > 0 {
		b.acked = make([]int64, o.total)
	}
	writers := make([]*benchWorker, o.writers)
	b.start = int64(time.Since(b.origin))
	var wg sync.WaitGroup
	for i := range writers {
		writers[i] = &benchWorker{hist: newHistogram(), errs: map[string]int64{}, okByType: map[string]int64{}}
		c := writerClients[i%len(writerClients)]
		wg.Go(func() { b.write(ctx, c, writers[i]) })
	}
	wg.Wait()
	putElapsed := time.Since(b.origin) - time.Duration(b.start)

	// The end marker, then every watcher must have seen everything.
	for _, k := range b.keys {
		pctx, cancel := context.WithTimeout(ctx, a.timeout)
		_, err := first.Put(pctx, k, []byte(endMarker))
		cancel()
		if err != nil {
			return fmt.Errorf("bench: end marker: %w", err)
		}
	}
	drainErr := waitMarker(ctx, ws, endMarker, time.Now().Add(o.drain))
	stopWatchers()

	rep := b.report(ws, writers, putElapsed, ctx.Err() != nil)
	rep.Conns = len(clients) * members
	if drainErr != nil {
		rep.DrainError = drainErr.Error()
	}
	if err := a.printBenchWatch(rep); err != nil {
		return err
	}
	switch {
	case rep.Missing > 0 || rep.Duplicated > 0 || rep.Unexpected > 0:
		return &exitError{code: exitUnavailable, msg: fmt.Sprintf("bench watch: %d events missing, %d duplicated, %d not of a put of this run", rep.Missing, rep.Duplicated, rep.Unexpected)}
	case rep.WatchErrors > 0:
		return &exitError{code: exitUnavailable, msg: fmt.Sprintf("bench watch: %d watches ended early: %s", rep.WatchErrors, rep.FirstWatchError)}
	case drainErr != nil:
		return &exitError{code: exitUnavailable, msg: "bench watch: " + drainErr.Error()}
	case rep.Puts > 0 && rep.PutErrors == rep.Puts:
		return &exitError{code: exitUnavailable, msg: fmt.Sprintf("every one of %d puts failed; check the cluster with 'kvctl cluster status'", rep.Puts)}
	}
	return nil
}

// write puts until the total is reached, the duration is over or ctx
// ends: put i writes key i mod --keys, its number in the value's first 8
// bytes.
func (b *watchBench) write(ctx context.Context, c *client.Client, w *benchWorker) {
	o := b.o
	value := append([]byte(nil), b.value...)
	end := b.origin.Add(time.Duration(b.start) + o.duration)
	for ctx.Err() == nil {
		i := b.next.Add(1) - 1
		if o.total > 0 && i >= o.total {
			return
		}
		began := time.Now()
		if o.duration > 0 && !began.Before(end) {
			return
		}
		binary.BigEndian.PutUint64(value, uint64(i))
		octx, cancel := context.WithTimeout(ctx, b.timeout)
		_, err := c.Put(octx, b.keys[i%int64(o.keys)], value)
		cancel()
		now := time.Now()
		if ctx.Err() != nil {
			return
		}
		at := int64(-1)
		if err != nil {
			w.errs[errClass(err)]++
		} else {
			at = int64(now.Sub(b.origin))
			w.okByType["put"]++
			w.hist.record(now.Sub(began))
		}
		b.setAcked(i, at)
	}
}

func (b *watchBench) setAcked(i, at int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for int64(len(b.acked)) <= i {
		b.acked = append(b.acked, 0)
	}
	b.acked[i] = at
}

// watch records w's events until ctx ends.
func (b *watchBench) watch(ctx context.Context, w *benchWatcher, ch <-chan client.WatchResponse) {
	for resp := range ch {
		if resp.Err != nil {
			if ctx.Err() == nil {
				w.err = resp.Err
			}
			continue
		}
		at := int64(time.Since(b.origin))
		for _, ev := range resp.Events {
			v := ev.GetKv().GetValue()
			if len(v) < 8 {
				w.noteMarker(string(v))
				continue
			}
			w.recv = append(w.recv, watchRecv{op: int64(binary.BigEndian.Uint64(v)), at: at})
		}
	}
}

// benchWatchReport is the result of a bench watch run; -o json prints it
// as is.
type benchWatchReport struct {
	Workload        string       `json:"workload"` // "watch"
	Watchers        int          `json:"watchers"`
	Keys            int          `json:"keys"`
	Writers         int          `json:"writers"`
	Conns           int          `json:"conns"` // connections opened: client instances (writers' and watchers') × members
	ValSize         int          `json:"val_size"`
	Puts            int64        `json:"puts"` // finished: acknowledged + failed
	PutErrors       int64        `json:"put_errors"`
	PutsPerSec      float64      `json:"puts_per_sec"`
	Expected        int64        `json:"events_expected"` // acknowledged puts × watchers of their key
	Delivered       int64        `json:"events_delivered"`
	Missing         int64        `json:"events_missing"`
	Duplicated      int64        `json:"events_duplicated"`
	Unexpected      int64        `json:"events_unexpected"` // of a put never made or not of this run
	OfFailed        int64        `json:"events_of_failed_puts"`
	Early           int64        `json:"events_before_ack"` // counted as 0 latency
	ElapsedSec      float64      `json:"elapsed_s"`         // first put to last delivery
	EventsPerS      float64      `json:"events_per_sec"`
	LatencyNote     string       `json:"latency_basis"`
	Delivery        benchLatency `json:"delivery_latency_ms"`
	Put             benchLatency `json:"put_latency_ms"`
	WatchErrors     int          `json:"watch_errors"`
	FirstWatchError string       `json:"first_watch_error,omitempty"`
	DrainError      string       `json:"drain_error,omitempty"`
	Interrupted     bool         `json:"interrupted,omitempty"`
}

func latencyOf(h *histogram) benchLatency {
	if h.n == 0 {
		return benchLatency{}
	}
	return benchLatency{
		Min: ms(time.Duration(h.min)), Mean: ms(h.mean()), P50: ms(h.quantile(0.5)), P90: ms(h.quantile(0.9)),
		P99: ms(h.quantile(0.99)), P999: ms(h.quantile(0.999)), Max: ms(time.Duration(h.max)),
	}
}

func (b *watchBench) report(ws []*benchWatcher, writers []*benchWorker, putElapsed time.Duration, interrupted bool) *benchWatchReport {
	o := b.o
	rep := &benchWatchReport{
		Workload: "watch", Watchers: o.watchers, Keys: o.keys, Writers: o.writers, ValSize: o.valSize,
		LatencyNote: "writer's put acknowledged to watcher's receipt, on this process's clock",
		Interrupted: interrupted,
	}
	put := newHistogram()
	for _, w := range writers {
		put.merge(w.hist)
		for _, n := range w.errs {
			rep.PutErrors += n
		}
		rep.Puts += w.okByType["put"]
	}
	rep.Puts += rep.PutErrors
	rep.Put = latencyOf(put)
	if putElapsed > 0 {
		rep.PutsPerSec = float64(rep.Puts-rep.PutErrors) / putElapsed.Seconds()
	}
	// Acknowledged puts per key, and so the events each watcher owes.
	b.mu.Lock()
	acked := b.acked
	b.mu.Unlock()
	ackedPerKey := make([]int64, o.keys)
	for i, at := range acked {
		if at > 0 {
			ackedPerKey[i%o.keys]++
		}
	}
	delivery := newHistogram()
	var last int64
	seen := make([]bool, len(acked))
	for _, w := range ws {
		if w.err != nil {
			rep.WatchErrors++
			if rep.FirstWatchError == "" {
				rep.FirstWatchError = w.err.Error()
			}
		}
		rep.Expected += ackedPerKey[w.key]
		clear(seen)
		var got int64
		for _, r := range w.recv {
			rep.Delivered++
			last = max(last, r.at)
			if r.op < 0 || r.op >= int64(len(acked)) || acked[r.op] == 0 || int(r.op%int64(o.keys)) != w.key {
				rep.Unexpected++
				continue
			}
			if seen[r.op] {
				rep.Duplicated++
				continue
			}
			seen[r.op] = true
			if acked[r.op] < 0 {
				rep.OfFailed++
				continue
			}
			got++
			d := r.at - acked[r.op]
			if d < 0 {
				rep.Early++
				d = 0
			}
			delivery.record(time.Duration(d))
		}
		rep.Missing += ackedPerKey[w.key] - got
	}
	rep.Delivery = latencyOf(delivery)
	rep.ElapsedSec = time.Duration(last - b.start).Seconds()
	if last > b.start {
		rep.EventsPerS = float64(rep.Delivered) / rep.ElapsedSec
	}
	return rep
}

func (a *app) printBenchWatch(rep *benchWatchReport) error {
	if a.output == "json" {
		return writeJSON(a.stdout, rep)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "bench watch: %d watchers on %d keys, %d writers, %d puts (%d failed), values %d bytes",
		rep.Watchers, rep.Keys, rep.Writers, rep.Puts, rep.PutErrors, rep.ValSize)
	if rep.Interrupted {
		b.WriteString(" (interrupted)")
	}
	b.WriteString("\n")
	fmt.Fprintf(&b, "events      %d delivered of %d expected: %d missing, %d duplicated, %d unexpected, %d of failed puts\n",
		rep.Delivered, rep.Expected, rep.Missing, rep.Duplicated, rep.Unexpected, rep.OfFailed)
	fmt.Fprintf(&b, "throughput  %.0f events/s delivered (first put to last delivery, %.2fs); %.0f puts/s\n",
		rep.EventsPerS, rep.ElapsedSec, rep.PutsPerSec)
	l := rep.Delivery
	fmt.Fprintf(&b, "delivery    min %s  mean %s  p50 %s  p90 %s  p99 %s  p99.9 %s  max %s (%s; %d events arrived before the ack, counted as 0)\n",
		fmtMs(l.Min), fmtMs(l.Mean), fmtMs(l.P50), fmtMs(l.P90), fmtMs(l.P99), fmtMs(l.P999), fmtMs(l.Max), rep.LatencyNote, rep.Early)
	l = rep.Put
	fmt.Fprintf(&b, "put         min %s  mean %s  p50 %s  p90 %s  p99 %s  p99.9 %s  max %s\n",
		fmtMs(l.Min), fmtMs(l.Mean), fmtMs(l.P50), fmtMs(l.P90), fmtMs(l.P99), fmtMs(l.P999), fmtMs(l.Max))
	if rep.WatchErrors > 0 {
		fmt.Fprintf(&b, "watches     %d ended early: %s\n", rep.WatchErrors, rep.FirstWatchError)
	}
	if rep.DrainError != "" {
		fmt.Fprintf(&b, "drain       %s\n", rep.DrainError)
	}
	_, err := io.WriteString(a.stdout, b.String())
	return err
}

package flood

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/hashring"
	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/proto/kvpb"
)

// Budget is what every flood must leave true.
type Budget struct {
	// MaxRSS: every node's peak anonymous resident memory (RssAnon: what
	// kvd allocates, the Go heap, stacks and buffers) stays below it.
	// VmRSS adds the resident pages of the bbolt file, which track the
	// data written and are clean page cache the kernel reclaims under
	// pressure (docs/memory.md); it is reported, not asserted.
	MaxRSS        int64
	MinVictimRate float64 // fraction of the victim's gets that succeed
}

// DefaultBudget is the documented budget of a node at its defaults
// (docs/memory.md).
var DefaultBudget = Budget{MaxRSS: 640 << 20, MinVictimRate: 0.99}

// Plan sizes a run: how long each flood lasts and how many large values
// the scan flood reads.
type Plan struct {
	Duration   time.Duration
	ScanValues int
	Only       string // when set, run only the floods whose name contains it
}

const mib = 1 << 20

// result is what one flood measured.
type result struct {
	name      string
	peakRSS   []int64 // per node: the largest VmRSS sampled, or VmHWM since the flood began
	peakAnon  []int64 // per node: the largest RssAnon sampled: what kvd allocated
	startAnon []int64 // per node: RssAnon when the flood began
	cutOff    float64 // Batch streams the nodes cut off for not reading
	exhausted int64   // ResourceExhausted answers the flood's clients got
	ok, other int64   // the flood's other answers: successes, other errors
	victimOK  int
	victimErr int
	p99       time.Duration
	firstErr  error // the victim's first failure

	mu         sync.Mutex
	firstOther error // the flood's first other error
	alive      []bool
}

func (r *result) victimRate() float64 {
	if r.victimOK+r.victimErr == 0 {
		return 0
	}
	return float64(r.victimOK) / float64(r.victimOK+r.victimErr)
}

// env is the running cluster and what the floods share.
type env struct {
	t    *testing.T
	c    *proccluster.Cluster
	plan Plan
	big  []byte // a 1 MiB value
}

// run starts a 3-node cluster at its defaults, runs every flood in turn,
// prints the table and checks the budget.
func run(t *testing.T, plan Plan, b Budget) {
	c := proccluster.Start(t, 3, proccluster.Options{})
	e := &env{t: t, c: c, plan: plan, big: bytes.Repeat([]byte("b"), mib)}
	floods := []struct {
		name  string
		setup func(ctx context.Context)
		flood func(ctx context.Context, r *result)
	}{
		{"batch puts: 24 streams of 1 MiB puts", nil, e.batchPuts},
		{"batch, never reading: 8 streams of 1 MiB gets", e.writeBig, e.neverReading},
		{fmt.Sprintf("range over %d values of 1 MiB", plan.ScanValues), e.writeScanValues, e.ranges},
		{"range, never reading: 4 connections of 256 unread pages", e.writeScanValues, e.neverReadingRanges},
		{"txn of 128 gets of 1 MiB, no session", e.writeBig, func(ctx context.Context, r *result) { e.txnGets(ctx, r, false) }},
		{"txn of 128 gets of 1 MiB, session", e.writeBig, func(ctx context.Context, r *result) { e.txnGets(ctx, r, true) }},
	}
	var results []*result
	for _, f := range floods {
		if !strings.Contains(f.name, plan.Only) {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		if f.setup != nil {
			f.setup(ctx)
		}
		r := e.measure(ctx, f.name, f.flood)
		cancel()
		results = append(results, r)
		t.Logf("%s: RssAnon at start %v MiB, peak RssAnon %v MiB, VmRSS %v MiB, ResourceExhausted %d, ok %d, other errors %d (first: %v); victim %d/%d (%.2f%%) p99 %v",
			r.name, mibs(r.startAnon), mibs(r.peakAnon), mibs(r.peakRSS), r.exhausted, r.ok, r.other, r.firstOther, r.victimOK, r.victimOK+r.victimErr, 100*r.victimRate(), r.p99)
		if !slices.Contains(r.alive, false) {
			continue
		}
		t.Errorf("%s: a node died (alive: %v)", r.name, r.alive)
		break
	}
	fmt.Print(table(results, b))
	for _, r := range results {
		for i, p := range r.peakAnon {
			if p >= b.MaxRSS {
				t.Errorf("%s: node %d peak RssAnon %d MiB; the budget is below %d MiB", r.name, i+1, p/mib, b.MaxRSS/mib)
			}
		}
		if r.victimRate() < b.MinVictimRate {
			t.Errorf("%s: the victim's gets succeeded %.2f%% (%d of %d, first error: %v); the budget is %.0f%%",
				r.name, 100*r.victimRate(), r.victimOK, r.victimOK+r.victimErr, r.firstErr, 100*b.MinVictimRate)
		}
	}
}

func mibs(v []int64) []int64 {
	out := make([]int64, len(v))
	for i, x := range v {
		out[i] = x / mib
	}
	return out
}

func table(results []*result, b Budget) string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "\nflood results (budget: every node's RssAnon below %d MiB, victim success >= %.0f%%, every node alive):\n\n", b.MaxRSS/mib, 100*b.MinVictimRate)
	sb.WriteString("| flood | RssAnon at start MiB (nodes 1/2/3) | peak RssAnon MiB | peak VmRSS MiB | ResourceExhausted | streams cut off | flood ok | other errors | victim gets | victim success | victim p99 | alive |\n")
	sb.WriteString("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n")
	join := func(v []int64) string {
		var out []string
		for _, p := range v {
			out = append(out, strconv.FormatInt(p/mib, 10))
		}
		return strings.Join(out, " / ")
	}
	for _, r := range results {
		alive := "yes"
		if slices.Contains(r.alive, false) {
			alive = "NO"
		}
		fmt.Fprintf(&sb, "| %s | %s | %s | %s | %d | %.0f | %d | %d | %d | %.2f%% | %v | %s |\n", r.name, join(r.startAnon), join(r.peakAnon), join(r.peakRSS),
			r.exhausted, r.cutOff, r.ok, r.other, r.victimOK+r.victimErr, 100*r.victimRate(), r.p99.Round(time.Millisecond), alive)
	}
	return sb.String()
}

// measure runs flood for the plan's duration while the victim reads and
// the sampler watches every node's memory.
func (e *env) measure(ctx context.Context, name string, flood func(context.Context, *result)) *result {
	r := &result{name: name, peakRSS: make([]int64, len(e.c.Nodes)), peakAnon: make([]int64, len(e.c.Nodes))}
	pids := make([]int, len(e.c.Nodes))
	for i, nd := range e.c.Nodes {
		pids[i] = nd.Pid()
		r.startAnon = append(r.startAnon, procStatus(pids[i], "RssAnon:"))
		// Reset VmHWM, so it says the peak of this flood alone.
		_ = os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pids[i]), []byte("5"), 0)
	}
	cutBefore := e.metricSum("kvd_batch_streams_cut_off_total")
	fctx, cancel := context.WithTimeout(ctx, e.plan.Duration)
	defer cancel()
	var wg sync.WaitGroup
	stopSampling := make(chan struct{})
	wg.Go(func() {
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			for i, pid := range pids {
				r.peakRSS[i] = max(r.peakRSS[i], procStatus(pid, "VmRSS:"))
				r.peakAnon[i] = max(r.peakAnon[i], procStatus(pid, "RssAnon:"))
			}
			select {
			case <-stopSampling:
				return
			case <-t.C:
			}
		}
	})
	victimDone := make(chan struct{})
	go func() {
		defer close(victimDone)
		e.victim(fctx, r)
	}()
	flood(fctx, r)
	<-victimDone
	close(stopSampling)
	wg.Wait()
	r.cutOff = e.metricSum("kvd_batch_streams_cut_off_total") - cutBefore
	for i, pid := range pids {
		r.peakRSS[i] = max(r.peakRSS[i], procStatus(pid, "VmHWM:"))
		r.alive = append(r.alive, e.alive(pid, e.c.Nodes[i].MetricsAddr))
	}
	return r
}

// metricSum adds up an unlabelled counter over every node's /metrics.
func (e *env) metricSum(name string) float64 {
	hc := &http.Client{Timeout: 2 * time.Second}
	sum := 0.0
	for _, nd := range e.c.Nodes {
		resp, err := hc.Get("http://" + nd.MetricsAddr + "/metrics")
		if err != nil {
			continue
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, name+" "); ok {
				f, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
				sum += f
			}
		}
	}
	return sum
}

// procStatus reads a field of /proc/PID/status in bytes; 0 if unreadable.
func procStatus(pid int, field string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == field {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

// alive reports whether the process still runs and answers /readyz
// within 20 s of the flood's end.
func (e *env) alive(pid int, metrics string) bool {
	hc := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if syscall.Kill(pid, 0) != nil {
			return false
		}
		resp, err := hc.Get("http://" + metrics + "/readyz")
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return true
			}
		}
		time.Sleep(100 * time.Millisecond) // poll interval, not synchronisation
	}
	return false
}

// victim does linearizable gets with the kvd client, one at a time, each
// with a 5 s deadline, until ctx ends.
func (e *env) victim(ctx context.Context, r *result) {
	cl := e.client(ctx)
	defer cl.Close()
	key := []byte("victim/key")
	var lat []time.Duration
	for ctx.Err() == nil {
		gctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		start := time.Now()
		_, err := cl.Get(gctx, key)
		cancel()
		lat = append(lat, time.Since(start))
		if err != nil && !errors.Is(err, client.ErrNotFound) {
			r.victimErr++
			if r.firstErr == nil {
				r.firstErr = err
			}
			continue
		}
		r.victimOK++
	}
	if len(lat) > 0 {
		slices.Sort(lat)
		r.p99 = lat[(len(lat)*99)/100]
	}
}

func (e *env) client(ctx context.Context) *client.Client {
	e.t.Helper()
	cctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cl, err := client.New(cctx, client.Config{Endpoints: strings.Split(e.c.Endpoints(), ",")})
	if err != nil {
		e.t.Fatalf("client: %v", err)
	}
	return cl
}

// router finds the node that leads a key's shard, for the floods that
// speak gRPC directly.
type router struct {
	ring    *hashring.Ring
	leaders map[uint64]*proccluster.Node
}

func (e *env) router(ctx context.Context) *router {
	e.t.Helper()
	conn := e.dial(e.c.Nodes[0].ClientAddr)
	defer conn.Close()
	m, err := kvpb.NewClusterClient(conn).Map(ctx, &kvpb.MapRequest{})
	if err != nil {
		e.t.Fatalf("cluster map: %v", err)
	}
	var shards []uint64
	for _, s := range m.GetShards() {
		if s.GetId() != 0 {
			shards = append(shards, s.GetId())
		}
	}
	ring, err := hashring.New(shards, int(m.GetVnodes()))
	if err != nil {
		e.t.Fatal(err)
	}
	rt := &router{ring: ring, leaders: map[uint64]*proccluster.Node{}}
	for _, sh := range shards {
		var l *proccluster.Node
		proccluster.WaitFor(e.t, 20*time.Second, fmt.Sprintf("a leader of shard %d", sh), func() bool {
			l = e.c.LeaderOf(ctx, sh)
			return l != nil
		})
		rt.leaders[sh] = l
	}
	return rt
}

func (rt *router) leader(key []byte) *proccluster.Node { return rt.leaders[rt.ring.Shard(key)] }

// keysLedBy returns n keys with prefix whose shards nd leads.
func (rt *router) keysLedBy(nd *proccluster.Node, prefix string, n int) [][]byte {
	var keys [][]byte
	for i := 0; len(keys) < n && i < 100000; i++ {
		k := []byte(fmt.Sprintf("%s%d", prefix, i))
		if rt.leader(k) == nd {
			keys = append(keys, k)
		}
	}
	return keys
}

func (e *env) dial(addr string) *grpc.ClientConn {
	e.t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		e.t.Fatal(err)
	}
	return conn
}

// count files an answer's error under the flood's outcomes.
func (r *result) count(err error) {
	switch status.Code(err) {
	case codes.OK:
		atomic.AddInt64(&r.ok, 1)
	case codes.ResourceExhausted:
		atomic.AddInt64(&r.exhausted, 1)
	default:
		if atomic.AddInt64(&r.other, 1) == 1 {
			r.mu.Lock()
			r.firstOther = err
			r.mu.Unlock()
		}
	}
}

// batchPuts: 24 Batch streams, each on a connection of its own to a
// shard leader, send 1 MiB puts as fast as the node takes them and read
// the answers.
func (e *env) batchPuts(ctx context.Context, r *result) {
	rt := e.router(ctx)
	var wg sync.WaitGroup
	for s := range 24 {
		nd := e.c.Nodes[s%len(e.c.Nodes)]
		keys := rt.keysLedBy(nd, fmt.Sprintf("flood/put/%d/", s), 8)
		if len(keys) == 0 {
			continue // the node leads no shard
		}
		wg.Go(func() {
			conn := e.dial(nd.ClientAddr)
			defer conn.Close()
			// The stream outlives ctx by a grace period to read the
			// answers of what it sent.
			sctx, cancel := context.WithTimeout(context.Background(), e.plan.Duration+15*time.Second)
			defer cancel()
			stream, err := kvpb.NewKVClient(conn).Batch(sctx)
			if err != nil {
				r.count(err)
				return
			}
			go func() {
				for id := uint64(1); ctx.Err() == nil; id++ {
					put := &kvpb.PutRequest{Key: keys[int(id)%len(keys)], Value: e.big}
					item := &kvpb.BatchRequestItem{Id: id, Request: &kvpb.BatchRequestItem_Put{Put: put}}
					if stream.Send(&kvpb.BatchRequest{Items: []*kvpb.BatchRequestItem{item}}) != nil {
						return
					}
				}
				_ = stream.CloseSend()
			}()
			for {
				resp, err := stream.Recv()
				if err != nil {
					if !errors.Is(err, io.EOF) {
						r.count(err)
					}
					return
				}
				for _, it := range resp.GetItems() {
					var err error
					if it.GetError() != nil {
						err = it.GetError().Err()
					}
					r.count(err)
				}
			}
		})
	}
	wg.Wait()
}

const bigKey = "{flood}big"

// writeBig writes the 1 MiB value the get floods read.
func (e *env) writeBig(ctx context.Context) {
	e.t.Helper()
	cl := e.client(ctx)
	defer cl.Close()
	if _, err := cl.Put(ctx, []byte(bigKey), e.big); err != nil {
		e.t.Fatalf("put %s: %v", bigKey, err)
	}
}

// neverReading: 8 Batch streams to the leader of the 1 MiB key send gets
// of it and never read an answer. A stream that breaks (cut off by the
// node) is read to its end for its status and opened again.
func (e *env) neverReading(ctx context.Context, r *result) {
	rt := e.router(ctx)
	nd := rt.leader([]byte(bigKey))
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			conn := e.dial(nd.ClientAddr)
			defer conn.Close()
			for ctx.Err() == nil {
				e.neverReadingStream(ctx, conn, r)
			}
		})
	}
	wg.Wait()
}

func (e *env) neverReadingStream(ctx context.Context, conn *grpc.ClientConn, r *result) {
	sctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := kvpb.NewKVClient(conn).Batch(sctx)
	if err != nil {
		r.count(err)
		return
	}
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		id := uint64(0)
		for {
			req := &kvpb.BatchRequest{}
			for range 16 {
				id++
				req.Items = append(req.Items, &kvpb.BatchRequestItem{Id: id,
					Request: &kvpb.BatchRequestItem_Get{Get: &kvpb.GetRequest{Key: []byte(bigKey)}}})
			}
			if stream.Send(req) != nil {
				return // the node ended the stream
			}
		}
	}()
	select {
	case <-sent:
	case <-ctx.Done():
		cancel() // the flood is over: drop the stream
		<-sent
		return
	}
	// Cut off: read what the node sent before, then its status.
	for {
		if _, err := stream.Recv(); err != nil {
			r.count(err)
			return
		}
	}
}

// txnGets: 8 clients send transactions of 128 gets of the 1 MiB key to
// its leader, with a session (exactly-once header) or without.
func (e *env) txnGets(ctx context.Context, r *result, session bool) {
	rt := e.router(ctx)
	nd := rt.leader([]byte(bigKey))
	ops := make([]*kvpb.RequestOp, 128)
	for i := range ops {
		ops[i] = &kvpb.RequestOp{Op: &kvpb.RequestOp_Get{Get: &kvpb.GetRequest{Key: []byte(bigKey)}}}
	}
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			conn := e.dial(nd.ClientAddr)
			defer conn.Close()
			kv := kvpb.NewKVClient(conn)
			sess := rand.Uint64() | 1
			for seq := uint64(1); ctx.Err() == nil; seq++ {
				h := &kvpb.RequestHeader{}
				if session {
					h.Session, h.Seq, h.AckBelow = sess+uint64(w), seq, seq
				}
				tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				_, err := kv.Txn(tctx, &kvpb.TxnRequest{Header: h, Success: ops})
				cancel()
				if ctx.Err() != nil {
					return
				}
				r.count(err)
			}
		})
	}
	wg.Wait()
}

// writeScanValues writes the plan's 1 MiB values under scan/.
func (e *env) writeScanValues(ctx context.Context) {
	e.t.Helper()
	cl := e.client(ctx)
	defer cl.Close()
	var wg sync.WaitGroup
	errs := make(chan error, e.plan.ScanValues)
	for w := range 4 {
		wg.Go(func() {
			for i := w; i < e.plan.ScanValues; i += 4 {
				if _, err := cl.Put(ctx, []byte(fmt.Sprintf("scan/%04d", i)), e.big); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		e.t.Fatalf("write scan values: %v", err)
	}
}

// ranges: 8 clients page through each shard's part of scan/ with
// serializable Ranges of the largest key limit (10,000), spread over the
// nodes, and 2 page through all of it with the client's Scan.
func (e *env) ranges(ctx context.Context, r *result) {
	rt := e.router(ctx)
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			conns := map[*proccluster.Node]kvpb.KVClient{}
			for _, nd := range e.c.Nodes {
				conn := e.dial(nd.ClientAddr)
				defer conn.Close()
				conns[nd] = kvpb.NewKVClient(conn)
			}
			shards := rt.ring.Shards()
			for i := w; ctx.Err() == nil; i++ {
				sh := shards[i%len(shards)]
				start := []byte("scan/")
				for ctx.Err() == nil {
					resp, err := conns[e.c.Nodes[i%len(e.c.Nodes)]].Range(ctx, &kvpb.RangeRequest{Shard: sh, Start: start, End: []byte("scan0"), Limit: 10000, Consistency: kvpb.Consistency_SERIALIZABLE})
					if ctx.Err() != nil {
						return
					}
					r.count(err)
					if err != nil || !resp.GetMore() || len(resp.GetKvs()) == 0 {
						break
					}
					start = append(bytes.Clone(resp.GetKvs()[len(resp.GetKvs())-1].GetKey()), 0)
				}
			}
		})
	}
	for range 2 {
		wg.Go(func() {
			cl := e.client(ctx)
			defer cl.Close()
			for ctx.Err() == nil {
				tok := ""
				for ctx.Err() == nil {
					page, err := cl.Scan(ctx, []byte("scan/"), []byte("scan0"), client.ScanOptions{Token: tok})
					if ctx.Err() != nil {
						return
					}
					r.count(err)
					if err != nil || page.Next == "" {
						break
					}
					tok = page.Next
				}
			}
		})
	}
	wg.Wait()
}

// neverReadingRanges: 4 connections, each with its receive window at
// gRPC's 64 KiB minimum, send 256 serializable Ranges of scan/ (pages of
// up to 4 MiB) to every node and never read an answer; when the node cuts
// a connection off, the client dials again and repeats.
func (e *env) neverReadingRanges(ctx context.Context, r *result) {
	var wg sync.WaitGroup
	for w := range 4 {
		nd := e.c.Nodes[w%len(e.c.Nodes)]
		wg.Go(func() {
			for ctx.Err() == nil {
				conn, err := grpc.NewClient(nd.ClientAddr, grpc.WithTransportCredentials(insecure.NewCredentials()),
					grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
				if err != nil {
					e.t.Error(err)
					return
				}
				var streams []grpc.ClientStream
				for range 256 {
					st, err := conn.NewStream(ctx, &grpc.StreamDesc{StreamName: "Range"}, "/"+kvpb.KV_ServiceDesc.ServiceName+"/Range")
					if err != nil {
						break
					}
					if st.SendMsg(&kvpb.RangeRequest{Shard: uint64(1 + len(streams)%8), Start: []byte("scan/"), End: []byte("scan0"), Limit: 10000, Consistency: kvpb.Consistency_SERIALIZABLE}) != nil {
						break
					}
					streams = append(streams, st)
				}
				// Wait, unread, for the node to cut the connection off
				// (or the flood to end): then count how each call ended.
				for ctx.Err() == nil && conn.GetState() == connectivity.Ready {
					conn.WaitForStateChange(ctx, connectivity.Ready)
				}
				for _, st := range streams {
					_, err := st.Header()
					if err == nil {
						err = st.RecvMsg(&kvpb.RangeResponse{})
					}
					r.count(err)
				}
				conn.Close()
			}
		})
	}
	wg.Wait()
}

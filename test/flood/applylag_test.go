//go:build flood

package flood

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/proto/kvpb"
)

var lagArgs = flag.String("lag.kvd-args", "", "extra kvd flags for TestLargeTxnLag's nodes")

// TestLargeTxnLag is make apply-lag: how much transactions of 128 puts of
// 8 KiB (1 MiB each) on one shard delay small puts on the node's other
// shards. Every shard of a storage partition is applied on its writer
// and saved by its Raft loop, so with one partition (the default) a large
// apply or commit holds back the log appends and fsyncs of the rest;
// -lag.kvd-args="--storage-partitions 4" measures the alternative. The
// small puts run at a fixed rate, first alone and then beside the large
// transactions; the test prints their latency in both phases.
func TestLargeTxnLag(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Args: strings.Fields(*lagArgs)})
	e := &env{t: t, c: c}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	rt := e.router(ctx)

	// The large transactions' keys all map to the shard of "lag/big/0";
	// the small puts' keys to every other shard. The small puts are
	// reported apart by whether their shard shares the big one's file.
	bigShard := rt.ring.Shard([]byte("lag/big/0"))
	// The files a node made tell the partitions, however they were asked
	// for (flag or KVD_STORAGE_PARTITIONS).
	dbs, _ := filepath.Glob(filepath.Join(c.Nodes[0].DataDir, "kvd*.db"))
	parts := uint64(max(len(dbs), 1))
	sharesFile := func(k []byte) bool { return rt.ring.Shard(k)%parts == bigShard%parts }
	var bigKeys, smallKeys [][]byte
	for i := 0; len(bigKeys) < 128 || len(smallKeys) < 1000; i++ {
		if k := []byte(fmt.Sprintf("lag/big/%d", i)); rt.ring.Shard(k) == bigShard && len(bigKeys) < 128 {
			bigKeys = append(bigKeys, k)
		}
		if k := []byte(fmt.Sprintf("lag/small/%d", i)); rt.ring.Shard(k) != bigShard && len(smallKeys) < 1000 {
			smallKeys = append(smallKeys, k)
		}
	}
	ops := make([]*kvpb.RequestOp, len(bigKeys))
	val := bytes.Repeat([]byte("t"), 8<<10)
	for i, k := range bigKeys {
		ops[i] = &kvpb.RequestOp{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: k, Value: val}}}
	}

	const phase = 20 * time.Second
	// Each phase also reports how long the nodes' storage writers spent in
	// bbolt commits (they hold up every shard's appends meanwhile), and
	// how much each commit wrote.
	type commitStats struct{ secs, n, bytes float64 }
	commits := func() commitStats {
		return commitStats{e.metricSum("kvd_storage_commit_duration_seconds_sum"), e.metricSum("kvd_storage_commit_duration_seconds_count"), e.metricSum("kvd_storage_commit_bytes_total")}
	}
	report := func(from, to commitStats) string {
		n := max(to.n-from.n, 1)
		return fmt.Sprintf("bbolt commits %.0f, %.1f ms and %.2f MiB each", to.n-from.n, 1000*(to.secs-from.secs)/n, (to.bytes-from.bytes)/n/(1<<20))
	}
	c0 := commits()
	base := e.smallPuts(ctx, smallKeys, sharesFile, phase, nil)
	c1 := commits()
	var (
		txns      atomic.Int64
		txnErrs   sync.Mutex
		errCodes  = map[codes.Code]int{}
		firstErrs = map[codes.Code]string{}
	)
	loaded := e.smallPuts(ctx, smallKeys, sharesFile, phase, func(lctx context.Context, wg *sync.WaitGroup) {
		conn := e.dial(rt.leaders[bigShard].ClientAddr)
		kv := kvpb.NewKVClient(conn)
		for range 4 {
			wg.Go(func() {
				for lctx.Err() == nil {
					tctx, cancel := context.WithTimeout(lctx, 10*time.Second)
					_, err := kv.Txn(tctx, &kvpb.TxnRequest{Success: ops})
					cancel()
					if lctx.Err() != nil {
						return
					}
					if err != nil {
						c := status.Code(err)
						txnErrs.Lock()
						errCodes[c]++
						if firstErrs[c] == "" {
							firstErrs[c] = err.Error()
						}
						txnErrs.Unlock()
						continue
					}
					txns.Add(1)
				}
			})
		}
		context.AfterFunc(lctx, func() { wg.Wait(); conn.Close() })
	})
	c2 := commits()
	fmt.Printf("small puts alone:          %s; %s\n", base.all, report(c0, c1))
	// The wait above ended every transaction writer: errCodes is final.
	failed := 0
	var byCode []string
	for c, n := range errCodes {
		failed += n
		byCode = append(byCode, fmt.Sprintf("%v %d (first: %s)", c, n, firstErrs[c]))
	}
	slices.Sort(byCode)
	fmt.Printf("beside 1 MiB transactions: %s; %s; transactions %d (%.1f/s), failed %d%s\n",
		loaded.all, report(c1, c2), txns.Load(), float64(txns.Load())/phase.Seconds(), failed, strings.Join(append([]string{""}, byCode...), "; "))
	var sizes []string
	for _, nd := range c.Nodes {
		files, _ := filepath.Glob(filepath.Join(nd.DataDir, "kvd*.db"))
		var total int64
		for _, f := range files {
			if fi, err := os.Stat(f); err == nil {
				total += fi.Size()
			}
		}
		sizes = append(sizes, fmt.Sprintf("%d MiB", total>>20))
	}
	fmt.Printf("bbolt files per node after both phases: %s\n", strings.Join(sizes, ", "))
	if parts > 1 {
		fmt.Printf("beside them, by file (%d files): the big shard's file: %s; the other files: %s\n", parts, loaded.same, loaded.other)
	}
	for _, s := range []lagStats{base.all, loaded.all} {
		if s.ok == 0 || s.errs > 0 {
			t.Errorf("small puts: %d ok, %d failed (first: %v)", s.ok, s.errs, s.firstErr)
		}
	}
	if txns.Load() == 0 {
		t.Errorf("no large transaction succeeded (%d failed)", failed)
	}
}

type lagStats struct {
	ok, errs       int
	firstErr       error
	p50, p99, pmax time.Duration
}

// lagPhase is a phase's small puts: all of them, and apart, those whose
// shard shares the big shard's file and the others.
type lagPhase struct{ all, same, other lagStats }

// summarize sorts lat and sets s's percentiles from it.
func (s *lagStats) summarize(lat []time.Duration) {
	s.ok = len(lat)
	if len(lat) > 0 {
		slices.Sort(lat)
		s.p50, s.p99, s.pmax = lat[len(lat)/2], lat[len(lat)*99/100], lat[len(lat)-1]
	}
}

func (s lagStats) String() string {
	return fmt.Sprintf("%d puts, p50 %v, p99 %v, max %v", s.ok, s.p50.Round(10*time.Microsecond), s.p99.Round(10*time.Microsecond), s.pmax.Round(10*time.Microsecond))
}

// smallPuts writes 64-byte values to keys, open loop at 200 puts/s (each
// put's latency counts from when it was due, so a stall shows in every put
// it delayed), for d; load, when given, runs beside it until d ends.
// sharesFile tells the keys whose puts the phase also reports as same.
func (e *env) smallPuts(ctx context.Context, keys [][]byte, sharesFile func([]byte) bool, d time.Duration, load func(context.Context, *sync.WaitGroup)) lagPhase {
	cl := e.client(ctx)
	defer cl.Close()
	pctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var loadWG sync.WaitGroup
	if load != nil {
		load(pctx, &loadWG)
	}
	const rate = 200
	val := bytes.Repeat([]byte("s"), 64)
	var (
		mu                   sync.Mutex
		s                    lagStats
		lat, same, otherFile []time.Duration
		wg                   sync.WaitGroup
	)
	start := time.Now()
	for i := 0; ; i++ {
		due := start.Add(time.Duration(i) * time.Second / rate)
		if due.Sub(start) >= d {
			break
		}
		if w := time.Until(due); w > 0 {
			t := time.NewTimer(w)
			select {
			case <-pctx.Done():
			case <-t.C:
			}
			t.Stop()
		}
		if pctx.Err() != nil {
			break
		}
		wg.Go(func() {
			octx, ocancel := context.WithTimeout(ctx, 10*time.Second)
			defer ocancel()
			_, err := cl.Put(octx, keys[i%len(keys)], val)
			l := time.Since(due)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				s.errs++
				if s.firstErr == nil {
					s.firstErr = err
				}
				return
			}
			lat = append(lat, l)
			if sharesFile(keys[i%len(keys)]) {
				same = append(same, l)
			} else {
				otherFile = append(otherFile, l)
			}
		})
	}
	wg.Wait()
	cancel()
	loadWG.Wait()
	s.summarize(lat)
	p := lagPhase{all: s}
	p.same.summarize(same)
	p.other.summarize(otherFile)
	return p
}

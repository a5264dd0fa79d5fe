package jepsenlite

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/proto/kvpb"
)

// Watch event types as recorded.
const (
	evPut = "put"
	evDel = "delete"
)

// Keys under sentinelPrefix are the harness's own: readiness markers, and
// the value endValue that every used key gets after the final reads, which
// tells a watcher it has seen everything before it. The checker leaves
// them out.
const (
	sentinelPrefix = "jl/w/"
	endValue       = "jl-end"
)

// WatchEvent is one event a watcher received. Time is when it arrived, on
// the history's clock.
type WatchEvent struct {
	Watcher int    `json:"watcher"`
	Type    string `json:"type"`
	Key     string `json:"key"`
	Value   string `json:"value,omitempty"`
	Rev     int64  `json:"rev"`
	Shard   uint64 `json:"shard"`
	Time    int64  `json:"time"`
}

// watcher is one Watch through the Go client, on a key or a prefix,
// recording every event. Now and then it cancels its watch and continues
// with the last response's resume token (for a prefix: a revision per
// shard), so that tokens are tested under the same faults as the
// client's own reconnects.
type watcher struct {
	id     int
	key    string
	prefix bool

	h   *History
	cl  *client.Client
	rng *rand.Rand // resume choices; owned by run

	mu struct {
		sync.Mutex
		events  []WatchEvent
		ended   error // why the watch ended before stop
		ends    map[string]bool
		resumes int
		// arrived is closed (and replaced) when events arrive.
		arrived chan struct{}
	}
}

func newWatcher(id int, key string, prefix bool, h *History, cl *client.Client, rng *rand.Rand) *watcher {
	w := &watcher{id: id, key: key, prefix: prefix, h: h, cl: cl, rng: rng}
	w.mu.ends = map[string]bool{}
	w.mu.arrived = make(chan struct{})
	return w
}

func (w *watcher) String() string {
	if w.prefix {
		return fmt.Sprintf("watcher %d (prefix %s)", w.id, w.key)
	}
	return fmt.Sprintf("watcher %d (key %s)", w.id, w.key)
}

// covers says whether the watcher watches key.
func (w *watcher) covers(key string) bool {
	if w.prefix {
		return strings.HasPrefix(key, w.key)
	}
	return key == w.key
}

// run watches until stop is closed. A key watch starts at revision 1, so
// it misses nothing of a fresh cluster; a prefix watch, which spans every
// shard and cannot start at one revision, starts from now, and the
// harness waits (ready) until it has seen each shard before the workload
// starts. A watch that ends by itself is recorded as the failure it is:
// the client reconnects across faults, and the nodes keep far more
// history than the run makes, so not even ErrCompacted is legitimate.
func (w *watcher) run(stop <-chan struct{}) {
	opts := []client.WatchOption{client.WithRevision(1)}
	if w.prefix {
		opts = []client.WatchOption{client.WithPrefix()}
	}
	for {
		ctx, cancel := context.WithCancel(context.Background())
		ch := w.cl.Watch(ctx, []byte(w.key), opts...)
		resume, err := w.consume(ch, stop)
		cancel()
		for range ch { // drained, not recorded: the token resumes after the last recorded
		}
		switch {
		case err != nil:
			w.mu.Lock()
			w.mu.ended = err
			w.mu.Unlock()
			return
		case resume == "":
			return // stopped
		}
		// The token holds revisions, not what is watched.
		opts = []client.WatchOption{client.WithResume(resume)}
		if w.prefix {
			opts = append(opts, client.WithPrefix())
		}
		w.mu.Lock()
		w.mu.resumes++
		w.mu.Unlock()
	}
}

// consume records ch's events until stop (""), until it decides to resume
// elsewhere (the token to resume with), or until the watch ends (its
// error).
func (w *watcher) consume(ch <-chan client.WatchResponse, stop <-chan struct{}) (string, error) {
	for {
		select {
		case <-stop:
			return "", nil
		case resp, ok := <-ch:
			if !ok {
				return "", fmt.Errorf("%v: channel closed without an error", w)
			}
			if resp.Err != nil {
				return "", fmt.Errorf("%v ended: %w", w, resp.Err)
			}
			w.record(resp.Events)
			if w.rng.IntN(40) == 0 {
				return resp.Resume, nil
			}
		}
	}
}

func (w *watcher) record(evs []*kvpb.Event) {
	now := w.h.now()
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, ev := range evs {
		e := WatchEvent{Watcher: w.id, Type: evPut, Key: string(ev.GetKv().GetKey()), Value: string(ev.GetKv().GetValue()),
			Rev: ev.GetKv().GetModRevision(), Shard: ev.GetShard(), Time: now}
		if ev.GetType() == kvpb.Event_DELETE {
			e.Type, e.Value = evDel, ""
		}
		w.mu.events = append(w.mu.events, e)
		if e.Value == endValue {
			w.mu.ends[e.Key] = true
		}
	}
	close(w.mu.arrived)
	w.mu.arrived = make(chan struct{})
}

// waitEnd waits until the watcher has seen the end marker on key (true)
// or deadline passes.
func (w *watcher) waitEnd(key string, deadline time.Time) bool {
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	for {
		w.mu.Lock()
		done, arrived := w.mu.ends[key], w.mu.arrived
		w.mu.Unlock()
		if done {
			return true
		}
		select {
		case <-arrived:
		case <-t.C:
			return false
		}
	}
}

// shardsSeen lists the distinct shards the watcher has had events from,
// in order, and why its watch ended (nil: it has not).
func (w *watcher) shardsSeen() ([]uint64, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	var shards []uint64
	for _, e := range w.mu.events {
		if !slices.Contains(shards, e.Shard) {
			shards = append(shards, e.Shard)
		}
	}
	slices.Sort(shards)
	return shards, w.mu.ended
}

// log returns what the watcher recorded.
func (w *watcher) log() watchLog {
	w.mu.Lock()
	defer w.mu.Unlock()
	l := watchLog{Name: w.String(), Key: w.key, Prefix: w.prefix, Events: append([]WatchEvent(nil), w.mu.events...), Resumes: w.mu.resumes}
	if w.mu.ended != nil {
		l.Err = w.mu.ended.Error()
	}
	return l
}

// watchLog is one watcher's record, what the checker reads.
type watchLog struct {
	Name    string
	Key     string
	Prefix  bool
	Events  []WatchEvent
	Err     string // the watch ended by itself
	Resumes int
}

func (l watchLog) covers(key string) bool {
	if l.Prefix {
		return strings.HasPrefix(key, l.Key)
	}
	return key == l.Key
}

// writeWatchLogs stores every watcher's events as JSON lines.
func writeWatchLogs(path string, logs []watchLog) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	enc := json.NewEncoder(f)
	for _, l := range logs {
		for _, e := range l.Events {
			if err := enc.Encode(e); err != nil {
				f.Close()
				return err
			}
		}
	}
	return f.Close()
}

// watchResult is the outcome of the watch check.
type watchResult struct {
	watchers, keys, events int
	// Anomalies by kind. dropped: an acknowledged write (or delete that
	// deleted) never delivered; duplicated: a write delivered twice;
	// phantom: an event no applied or indeterminate write explains (a
	// failed write, a cas that did not swap, a value never written, a
	// delete beyond the deletes made, an acknowledged write at another
	// revision); misordered: a key's revisions not ascending, or a
	// shard's going back; final: the last event before the end marker
	// disagrees with the final read; ended: a watch that stopped by
	// itself.
	dropped, duplicated, phantom, misordered, final, ended int
	examples                                               []string
}

func (r watchResult) anomalies() int {
	return r.dropped + r.duplicated + r.phantom + r.misordered + r.final + r.ended
}

// checkWatches checks every watcher's events against the history, key by
// key: each acknowledged write appears exactly once, at the revision it
// was answered with and with its value; an indeterminate write at most
// once; a failed one never; each key's events ascend in revision and each
// shard's never go back; and the last event before the end marker is the
// key's final value. Events after the end marker are not looked at; a
// watcher that never saw it on a key is reported (the harness waits for
// it).
func checkWatches(ops []Op, logs []watchLog) watchResult {
	res := watchResult{watchers: len(logs)}
	flag := func(n *int, format string, args ...any) {
		*n++
		if len(res.examples) < 10 {
			res.examples = append(res.examples, fmt.Sprintf(format, args...))
		}
	}
	type keyOps struct {
		byValue     map[string][]Op // puts and cas, by value written
		acked       []Op            // applied and acknowledged: must each appear
		infoDeletes int             // deletes that may have applied
		ackedDels   map[int64]bool  // revisions of acknowledged deletes that deleted
		final       *Op
	}
	keys := map[string]*keyOps{}
	get := func(k string) *keyOps {
		if keys[k] == nil {
			keys[k] = &keyOps{byValue: map[string][]Op{}, ackedDels: map[int64]bool{}}
		}
		return keys[k]
	}
	for i := range ops {
		op := &ops[i]
		k := get(op.Key)
		switch {
		case op.Final:
			if op.Status == statusOK {
				k.final = op
			}
		case op.Kind == kindGet:
		case op.Kind == kindDel:
			switch {
			case op.Status == statusInfo:
				k.infoDeletes++
			case op.Status == statusOK && op.Deleted:
				k.ackedDels[op.Rev] = true
				k.acked = append(k.acked, *op)
			}
		default:
			k.byValue[op.Value] = append(k.byValue[op.Value], *op)
			if op.Status == statusOK && (op.Kind == kindPut || op.Swapped) {
				k.acked = append(k.acked, *op)
			}
		}
	}
	names := make([]string, 0, len(keys))
	for n := range keys {
		names = append(names, n)
	}
	sort.Strings(names)
	res.keys = len(names)

	for _, l := range logs {
		if l.Err != "" {
			flag(&res.ended, "%s: %s", l.Name, l.Err)
		}
		// Split the watcher's events by key, checking each shard's order
		// on the way: one shard's events never go back in revision (a
		// transaction's share one).
		byKey := map[string][]WatchEvent{}
		shardRev := map[uint64]int64{}
		keyShard := map[string]uint64{}
		for _, e := range l.Events {
			if strings.HasPrefix(e.Key, sentinelPrefix) {
				continue
			}
			if e.Rev < shardRev[e.Shard] {
				flag(&res.misordered, "%s: shard %d went back from revision %d to %d (key %s)", l.Name, e.Shard, shardRev[e.Shard], e.Rev, e.Key)
			}
			shardRev[e.Shard] = max(shardRev[e.Shard], e.Rev)
			if sh, ok := keyShard[e.Key]; ok && sh != e.Shard {
				flag(&res.misordered, "%s: key %s delivered from shard %d and from shard %d", l.Name, e.Key, sh, e.Shard)
			}
			keyShard[e.Key] = e.Shard
			byKey[e.Key] = append(byKey[e.Key], e)
		}
		for key := range byKey {
			if keys[key] == nil {
				flag(&res.phantom, "%s: events for key %s, which no operation touched", l.Name, key)
			}
		}
		for _, name := range names {
			if !l.covers(name) {
				continue
			}
			k := keys[name]
			evs := byKey[name]
			end := -1
			for i, e := range evs {
				if e.Type == evPut && e.Value == endValue {
					end = i
					break
				}
			}
			if end < 0 {
				flag(&res.dropped, "%s: key %s: never saw the end marker (%d events)", l.Name, name, len(evs))
				end = len(evs)
			}
			evs = evs[:end]
			res.events += len(evs)

			seen := map[string]int{}      // value → times delivered
			seenRev := map[int64]string{} // revision → value delivered
			var lastRev int64
			present, unmatchedDels := false, 0
			for _, e := range evs {
				if e.Rev <= lastRev {
					flag(&res.misordered, "%s: key %s: revision %d after %d (%s %q)", l.Name, name, e.Rev, lastRev, e.Type, e.Value)
				}
				lastRev = max(lastRev, e.Rev)
				if e.Type == evDel {
					if !k.ackedDels[e.Rev] {
						unmatchedDels++
					}
					switch {
					case !present:
						flag(&res.phantom, "%s: key %s: delete at revision %d of an absent key", l.Name, name, e.Rev)
					case unmatchedDels > k.infoDeletes && !k.ackedDels[e.Rev]:
						flag(&res.phantom, "%s: key %s: delete at revision %d, which no acknowledged delete answered with, and more of those than indeterminate deletes", l.Name, name, e.Rev)
					}
					seenRev[e.Rev] = ""
					present = false
					continue
				}
				present = true
				seenRev[e.Rev] = e.Value
				if seen[e.Value]++; seen[e.Value] > 1 {
					flag(&res.duplicated, "%s: key %s: value %q delivered again at revision %d", l.Name, name, e.Value, e.Rev)
					continue
				}
				explained, why := false, "never written"
				for _, w := range k.byValue[e.Value] {
					switch {
					case w.Status == statusInfo:
						explained = true
					case w.Status == statusFail:
						why = "written by a failed " + w.Kind
					case w.Kind == kindCas && !w.Swapped:
						why = "written by a cas that did not swap"
					case w.Rev != e.Rev:
						why = fmt.Sprintf("acknowledged at revision %d", w.Rev)
					default:
						explained = true
					}
				}
				if !explained {
					flag(&res.phantom, "%s: key %s: put %q at revision %d: %s", l.Name, name, e.Value, e.Rev, why)
				}
			}
			for _, w := range k.acked {
				v, ok := seenRev[w.Rev]
				if !ok || v != w.Value {
					flag(&res.dropped, "%s: key %s: acknowledged %s %q at revision %d not delivered", l.Name, name, w.Kind, w.Value, w.Rev)
				}
			}
			if k.final != nil {
				got := ""
				if n := len(evs); n > 0 {
					got = evs[n-1].Value
				}
				if got != k.final.Read {
					flag(&res.final, "%s: key %s: last event before the end says %q, the final read %q", l.Name, name, got, k.final.Read)
				}
			}
		}
	}
	return res
}

// startWatchers starts the run's watchers on their own clients: a prefix
// watch of every key (every shard), a second one on a different client,
// and a key watch of every counter and of each register slot's first key.
// It returns once each prefix watch has seen an event from every shard
// (markers written under sentinelPrefix), so that the workload's first
// write is watched.
func startWatchers(e *env, h *History, seed uint64, counters, slots, shards int, stop <-chan struct{}, wg *sync.WaitGroup) ([]*watcher, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var cls []*client.Client
	for range 2 {
		cl, err := e.newClient(ctx)
		if err != nil {
			return nil, err
		}
		cls = append(cls, cl)
	}
	type spec struct {
		key    string
		prefix bool
	}
	specs := []spec{{"jl/", true}, {"jl/", true}}
	for i := range counters {
		specs = append(specs, spec{counterKey(i), false})
	}
	for s := range slots {
		specs = append(specs, spec{keyName(s, 0), false})
	}
	var ws []*watcher
	for i, sp := range specs {
		rng := rand.New(rand.NewPCG(seed, uint64(1000+i)))
		w := newWatcher(i, sp.key, sp.prefix, h, cls[i%len(cls)], rng)
		ws = append(ws, w)
		wg.Go(func() { w.run(stop) })
	}
	prefixes := slices.DeleteFunc(slices.Clone(ws), func(w *watcher) bool { return !w.prefix })
	var failed int
	var lastErr error
	for n := 0; ; n++ {
		if !slices.ContainsFunc(prefixes, func(w *watcher) bool { got, _ := w.shardsSeen(); return len(got) < shards }) {
			return ws, nil
		}
		if ctx.Err() != nil {
			// Everything that tells a watch that never started from
			// markers that never landed, and from a cluster that lost
			// its leaders.
			var seen strings.Builder
			for _, w := range prefixes {
				got, ended := w.shardsSeen()
				fmt.Fprintf(&seen, "; %v saw shards %v", w, got)
				if ended != nil {
					fmt.Fprintf(&seen, " and ended: %v", ended)
				}
			}
			return ws, fmt.Errorf("prefix watchers did not see every shard within 30s (%d markers put, %d failed, the last with %v%s); nodes: %s",
				n, failed, lastErr, seen.String(), shardViews(context.Background(), e.c))
		}
		pctx, pcancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := cls[0].Put(pctx, fmt.Appendf(nil, "%sready.%d", sentinelPrefix, n), []byte("ready"))
		pcancel()
		if err != nil && ctx.Err() == nil { // not the put the deadline cut short
			failed, lastErr = failed+1, err
			h.event("watch readiness marker %d: %v", n, err)
		}
	}
}

// endWatchers puts the end marker on every key and waits until each
// watcher has seen it on each key it watches.
func endWatchers(cl *client.Client, ws []*watcher, keys []string, deadline time.Time) error {
	for _, k := range keys {
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err := cl.Put(ctx, []byte(k), []byte(endValue))
			cancel()
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("end marker on %s: %w", k, err)
			}
		}
	}
	for _, w := range ws {
		for _, k := range keys {
			if !w.covers(k) {
				continue
			}
			if !w.waitEnd(k, deadline) {
				return fmt.Errorf("%v has not seen the end marker on %s", w, k)
			}
		}
	}
	return nil
}

// shardViews asks every node directly for its view of each shard (leader
// as its raftnode reports it, raft role, term, applied index), for
// failure messages.
func shardViews(ctx context.Context, c *proccluster.Cluster) string {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var b strings.Builder
	for _, nd := range c.Nodes {
		fmt.Fprintf(&b, "[node %d:", nd.ID)
		st, err := c.Status(ctx, nd)
		if err != nil {
			fmt.Fprintf(&b, " %v", err)
		}
		for _, sh := range st.GetShards() {
			fmt.Fprintf(&b, " shard %d leader %d role %s term %d applied %d;", sh.GetShard(), sh.GetLeader(), sh.GetRole(), sh.GetTerm(), sh.GetApplied())
		}
		b.WriteString("]")
	}
	return b.String()
}

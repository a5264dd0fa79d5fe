package server

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/fsm"
	"github.com/kvd/kvd/internal/keys"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/raftnode"
	"github.com/kvd/kvd/storage"
)

// Watches are served by a shard's leader only: a leader cut off from its
// quorum steps down within an election timeout (CheckQuorum), and its
// watches then end with NotLeader, so a watcher moves to the new leader
// instead of waiting on a replica that no longer learns of changes.
//
// Each watch is a cursor over its shard's history (fsm/history.go): the
// revision it has sent everything before. One hub per watched shard
// wakes when the shard's applied index moves (storage.Shard.AppliedChanged),
// reads the new events once from storage for all its cursors, and hands
// each cursor the ones it matches. There is no separate event feed that
// could diverge from what is stored: a snapshot install or a restart
// changes what the next read finds, nothing else.

// watchReadEvents and payloadBytes bound what a hub reads at a time
// (events counted with their keys, values, prev values and encoding,
// fsm.ReadEvents), whichever is reached first, and so every events
// response; a revision larger than that goes in fragments, and a cursor
// far behind catches up over several reads.
const watchReadEvents = 512

// errNotReadingEvents ends a watch stream whose client has not read its
// events for BatchSendTimeout.
var errNotReadingEvents = status.Error(codes.ResourceExhausted, "client is not reading its events: watch stream cut off")

// watchRegistry holds the node's watch hubs and counts its streams.
type watchRegistry struct {
	streams atomic.Int64
	// mu guards hubs and stopped; taken before a hub's mu.
	mu      sync.Mutex
	hubs    map[uint64]*watchHub
	stopped bool // no hub starts after Stop began waiting for them
}

// stop keeps hubs from starting, before Stop waits for its goroutines.
func (r *watchRegistry) stop() {
	r.mu.Lock()
	r.stopped = true
	r.mu.Unlock()
}

// watcher is one watch: the cursor of a stream over one shard's history.
type watcher struct {
	id     int64
	st     *watchStream
	shard  uint64
	key    []byte
	end    []byte // with !single: [key, end); empty end: to the last key
	single bool
	prevKV bool

	// Guarded by the hub's mu.
	next     fsm.EventPos // first event not yet sent
	lastSent time.Time
	done     bool
}

func (w *watcher) match(k []byte) bool {
	if w.single {
		return bytes.Equal(k, w.key)
	}
	return bytes.Compare(k, w.key) >= 0 && (len(w.end) == 0 || bytes.Compare(k, w.end) < 0)
}

// watchHub serves the watches of one shard on this node.
type watchHub struct {
	s     *Server
	shard uint64
	n     *raftnode.Node
	sh    *storage.Shard
	kick  chan struct{} // cap 1: a watcher was added or a stream drained

	mu       sync.Mutex
	watchers map[*watcher]struct{}
}

// addWatcher hands w to its shard's hub, starting the hub if need be. It
// reports false when the node is stopping.
func (s *Server) addWatcher(w *watcher, n *raftnode.Node, sh *storage.Shard) bool {
	r := &s.watch
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.stopped {
		return false
	}
	h := r.hubs[w.shard]
	if h == nil {
		if r.hubs == nil {
			r.hubs = map[uint64]*watchHub{}
		}
		h = &watchHub{s: s, shard: w.shard, n: n, sh: sh, kick: make(chan struct{}, 1), watchers: map[*watcher]struct{}{}}
		r.hubs[w.shard] = h
		s.wg.Add(1)
		go h.run()
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if w.done {
		return true // its stream closed and ended it already
	}
	h.watchers[w] = struct{}{}
	s.metrics.watchers.Inc()
	h.wake()
	return true
}

func (s *Server) hubOf(shard uint64) *watchHub {
	s.watch.mu.Lock()
	defer s.watch.mu.Unlock()
	return s.watch.hubs[shard]
}

func (h *watchHub) wake() {
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// end removes w and, unless resp is nil, sends resp as its last response.
// Called with h.mu held.
func (h *watchHub) endLocked(w *watcher, resp *kvpb.WatchResponse) {
	if w.done {
		return
	}
	w.done = true
	if _, ok := h.watchers[w]; ok {
		delete(h.watchers, w)
		h.s.metrics.watchers.Dec()
	}
	w.st.forget(w)
	if resp != nil {
		w.st.push(resp, time.Time{})
	}
}

func (h *watchHub) end(w *watcher, resp *kvpb.WatchResponse) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.endLocked(w, resp)
}

// exitIfIdle removes the hub when it has no watchers left.
func (h *watchHub) exitIfIdle() bool {
	r := &h.s.watch
	r.mu.Lock()
	defer r.mu.Unlock()
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.watchers) > 0 {
		return false
	}
	delete(r.hubs, h.shard)
	return true
}

// endAll ends every watch with err, and the hub.
func (h *watchHub) endAll(err error) {
	r := &h.s.watch
	r.mu.Lock()
	defer r.mu.Unlock()
	h.mu.Lock()
	defer h.mu.Unlock()
	for w := range h.watchers {
		h.endLocked(w, canceled(w, err))
	}
	delete(r.hubs, h.shard)
}

func (h *watchHub) run() {
	s := h.s
	defer s.wg.Done()
	// Leadership is an atomic load: checking it every tick notices a
	// step-down a tick after raft does.
	check := time.NewTicker(s.cfg.TickInterval)
	defer check.Stop()
	lastProgress := time.Now()
	for {
		changed := h.sh.AppliedChanged()
		if !h.n.IsLeader() {
			h.endAll(&raftnode.NotLeaderError{Shard: h.shard, Leader: h.n.Leader()})
			return
		}
		if err := s.corruptErr(h.shard); err != nil {
			h.endAll(err)
			return
		}
		woke := time.Now()
		more, err := h.serve(woke)
		if err != nil {
			s.log.Error("watch read", "shard", h.shard, "err", err)
			h.endAll(err)
			return
		}
		if h.exitIfIdle() {
			return
		}
		if more {
			select {
			case <-s.stopc:
				return
			default:
				continue
			}
		}
		select {
		case <-s.stopc:
			return
		case <-h.n.Done():
			h.endAll(&raftnode.NotLeaderError{Shard: h.shard})
			return
		case <-changed:
		case <-h.kick:
		case <-check.C:
			// Applied writes become readable when the open bbolt
			// transaction commits (--commit-interval); a watched shard
			// asks for the commit rather than hold its events that long.
			// The raft node's Applied is what readers see, the same as
			// the shard's; its commit index is what will be applied.
			if idx, _ := h.sh.Applied(); h.n.Commit() > idx {
				h.sh.Flush()
			}
			if time.Since(lastProgress) >= s.cfg.WatchProgressInterval/2 {
				h.progress(time.Now())
				lastProgress = time.Now()
			}
		}
	}
}

// serve reads the events the hub's watchers have not been sent, once for
// all of them, and queues each its own. more says there are further
// events to read at once.
func (h *watchHub) serve(now time.Time) (more bool, err error) {
	h.mu.Lock()
	var active []*watcher
	var from fsm.EventPos
	for w := range h.watchers {
		// A stream with half its budget unsent waits: its cursor stays
		// where it is, and the hub reads for it again once it drains.
		if w.st.full() {
			continue
		}
		if len(active) == 0 || w.next.Before(from) {
			from = w.next
		}
		active = append(active, w)
	}
	h.mu.Unlock()
	if len(active) == 0 {
		return false, nil
	}
	var (
		evs         []*kvpb.Event
		index       []uint32
		oldest, rev int64
		next        fsm.EventPos // where the read ended
	)
	err = h.sh.View(func(r *storage.Reader) error {
		oldest, rev = fsm.HistoryBounds(r)
		if from.Rev > rev {
			next = fsm.EventPos{Rev: rev + 1}
			return nil
		}
		if from.Rev < oldest {
			from = fsm.EventPos{Rev: oldest}
		}
		var err error
		evs, index, next, err = fsm.ReadEvents(r, from, func([]byte) bool { return true }, watchReadEvents, int64(h.s.payloadBytes()))
		return err
	})
	if err != nil {
		return false, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, w := range active {
		if w.done || !w.next.Before(next) {
			continue
		}
		if w.next.Rev < oldest {
			h.endLocked(w, canceled(w, &fsm.CompactedError{Revision: w.next.Rev, Oldest: oldest}))
			continue
		}
		var sel []*kvpb.Event
		for i, ev := range evs {
			at := fsm.EventPos{Rev: ev.GetKv().GetModRevision(), Index: index[i]}
			if at.Before(w.next) || !w.match(ev.GetKv().GetKey()) {
				continue
			}
			e := &kvpb.Event{Type: ev.GetType(), Kv: ev.GetKv(), Shard: h.shard}
			if w.prevKV {
				e.PrevKv = ev.GetPrevKv()
			}
			sel = append(sel, e)
		}
		w.next = next
		if len(sel) > 0 {
			// A read that ended within a revision sends its part of it
			// as a fragment; the watch's next events go on with it.
			w.st.push(&kvpb.WatchResponse{Header: h.s.header(h.shard, next.Rev-1), WatchId: w.id, Events: sel, Fragment: next.Index > 0}, now)
			w.lastSent = now
			h.s.metrics.watchEvents.Add(float64(len(sel)))
		}
	}
	return next.Rev <= rev, nil
}

// progress tells each watcher idle for WatchProgressInterval how far it
// has seen.
func (h *watchHub) progress(now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for w := range h.watchers {
		if now.Sub(w.lastSent) < h.s.cfg.WatchProgressInterval || w.st.full() {
			continue
		}
		w.st.push(&kvpb.WatchResponse{Header: h.s.header(h.shard, w.next.Rev-1), WatchId: w.id, Progress: true}, time.Time{})
		w.lastSent = now
	}
}

// canceled is the last response of a watch ended by err.
func canceled(w *watcher, err error) *kvpb.WatchResponse {
	resp := &kvpb.WatchResponse{WatchId: w.id, Canceled: true, Header: &kvpb.ResponseHeader{Shard: w.shard}}
	var ce *fsm.CompactedError
	if errors.As(err, &ce) {
		resp.CompactRevision = ce.Oldest
	}
	resp.Error = w.st.s.statusOf(err, w.shard)
	return resp
}

// statusOf is err's gRPC status (toStatus) as a kvpb.Status.
func (s *Server) statusOf(err error, shard uint64) *kvpb.Status {
	b, merr := proto.Marshal(status.Convert(s.toStatus(err, shard)).Proto())
	st := &kvpb.Status{}
	if merr != nil || proto.Unmarshal(b, st) != nil {
		return &kvpb.Status{Code: int32(codes.Internal), Message: err.Error()}
	}
	return st
}

// watchStream is one Watch stream: its watches and its queue of
// responses not yet sent.
type watchStream struct {
	s     *Server
	limit int64 // bytes the queue may hold before its cursors wait
	wake  chan struct{}
	// room gets a value (never blocking, buffered 1) when the queue
	// shrinks or the stream closes: the receiver waits for it while
	// the queue holds more than limit (admit).
	room chan struct{}

	mu      sync.Mutex
	queue   []queued
	bytes   int64
	closed  bool
	watches map[int64]*watcher
}

// queued is a response waiting to be sent: its size, and for events the
// time the hub woke to read them (for the lag metric).
type queued struct {
	resp *kvpb.WatchResponse
	size int64
	woke time.Time
}

// queuedResponseBytes is what a queued response takes in memory beyond
// its encoded size: a WatchResponse and its slot in the queue (144 bytes,
// rounded up). A cancel's answer is 6 bytes encoded; counted by that
// alone, a stream's 4 MiB held 114 MiB of them.
const queuedResponseBytes = 192

// push queues resp; woke is when the hub woke to read its events (zero
// for other responses). It never blocks: hubs call it holding their lock.
func (ws *watchStream) push(resp *kvpb.WatchResponse, woke time.Time) {
	n := int64(proto.Size(resp)) + queuedResponseBytes
	ws.mu.Lock()
	if ws.closed {
		ws.mu.Unlock()
		return
	}
	ws.queue = append(ws.queue, queued{resp, n, woke})
	ws.bytes += n
	ws.mu.Unlock()
	// Unsent events count against the node's in-flight budget, like a
	// Batch stream's unsent answers.
	ws.s.adm.hold(n)
	select {
	case ws.wake <- struct{}{}:
	default:
	}
}

// admit waits, before the stream takes its next request, until the
// queue holds at most limit bytes: events stop at half of it (full), and
// answers to creates and cancels may use the rest. A client that sends
// requests and reads nothing is then held by gRPC's flow control, as a
// Batch stream's is, rather than growing the queue; the stall cut-off
// ends it. It returns false when ctx ends first.
func (ws *watchStream) admit(ctx context.Context) bool {
	for {
		ws.mu.Lock()
		ok := ws.closed || ws.bytes <= ws.limit
		ws.mu.Unlock()
		if ok {
			return true
		}
		select {
		case <-ws.room:
		case <-ctx.Done():
			return false
		}
	}
}

func (ws *watchStream) signalRoom() {
	select {
	case ws.room <- struct{}{}:
	default:
	}
}

// full says the stream holds half its budget of unsent responses.
func (ws *watchStream) full() bool {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	return ws.bytes > ws.limit/2
}

func (ws *watchStream) forget(w *watcher) {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	if ws.watches[w.id] == w {
		delete(ws.watches, w.id)
	}
}

// sendAll sends what is queued until the stream closes. A Send blocked
// for BatchSendTimeout signals stalled.
func (ws *watchStream) sendAll(stream kvpb.Watch_WatchServer, stalled chan<- struct{}, done <-chan struct{}) {
	var sending atomic.Bool
	watchdog := time.AfterFunc(time.Hour, func() {
		if sending.Load() {
			select {
			case stalled <- struct{}{}:
			default:
			}
		}
	})
	watchdog.Stop()
	defer watchdog.Stop()
	for {
		select {
		case <-done:
			return
		case <-ws.wake:
		}
		ws.mu.Lock()
		queue := ws.queue
		ws.queue = nil
		ws.mu.Unlock()
		for i, q := range queue {
			sending.Store(true)
			watchdog.Reset(ws.s.cfg.BatchSendTimeout)
			err := stream.Send(q.resp)
			sending.Store(false)
			watchdog.Stop()
			if !q.woke.IsZero() {
				ws.s.metrics.watchLag.Observe(time.Since(q.woke).Seconds())
			}
			ws.sent(q.size)
			if err != nil {
				for _, q := range queue[i+1:] {
					ws.sent(q.size)
				}
				return
			}
		}
	}
}

// sent releases the bytes of a response sent or dropped, and wakes the
// hubs of a stream that drained below half its budget.
func (ws *watchStream) sent(n int64) {
	ws.mu.Lock()
	if ws.closed {
		// close released every byte the stream held.
		ws.mu.Unlock()
		return
	}
	wasFull := ws.bytes > ws.limit/2
	ws.bytes -= n
	drained := wasFull && ws.bytes <= ws.limit/2
	var shards []uint64
	if drained {
		for _, w := range ws.watches {
			shards = append(shards, w.shard)
		}
	}
	ws.mu.Unlock()
	ws.s.adm.hold(-n)
	ws.signalRoom()
	for _, sh := range shards {
		if h := ws.s.hubOf(sh); h != nil {
			h.wake()
		}
	}
}

// close ends the stream's watches and drops what it has not sent.
func (ws *watchStream) close() {
	ws.mu.Lock()
	ws.closed = true
	watches := make([]*watcher, 0, len(ws.watches))
	for _, w := range ws.watches {
		watches = append(watches, w)
	}
	dropped := ws.bytes
	ws.bytes, ws.queue = 0, nil
	ws.mu.Unlock()
	ws.s.adm.hold(-dropped)
	ws.signalRoom()
	for _, w := range watches {
		if h := ws.s.hubOf(w.shard); h != nil {
			h.end(w, nil)
		}
	}
}

// Watch implements kvpb.Watch (see the top of this file and
// docs/design.md, Watch).
func (s *Server) Watch(stream kvpb.Watch_WatchServer) error {
	if s.watch.streams.Add(1) > int64(s.cfg.Limits.MaxWatchStreams) {
		s.watch.streams.Add(-1)
		return status.Errorf(codes.ResourceExhausted, "node %d serves %d watch streams already (--max-watch-streams); use another node or fewer streams", s.cfg.NodeID, s.cfg.Limits.MaxWatchStreams)
	}
	defer s.watch.streams.Add(-1)
	ws := &watchStream{s: s, limit: int64(s.cfg.Limits.MaxBatchStreamBytes), wake: make(chan struct{}, 1),
		room: make(chan struct{}, 1), watches: map[int64]*watcher{}}
	// The sender and receiver goroutines are not waited for: one blocked
	// in Send or Recv ends when gRPC closes the stream, after Watch
	// returns (as with Batch streams).
	done := make(chan struct{})
	stalled := make(chan struct{}, 1)
	go ws.sendAll(stream, stalled, done)
	received := make(chan error, 1)
	go func() {
		for {
			if !ws.admit(stream.Context()) {
				received <- stream.Context().Err()
				return
			}
			req, err := stream.Recv()
			if err == nil {
				err = ws.serve(stream.Context(), req)
			}
			if err != nil {
				received <- err
				return
			}
		}
	}()
	defer func() {
		ws.close()
		close(done)
	}()
	select {
	case err := <-received:
		if errors.Is(err, io.EOF) {
			return nil
		}
		return err
	case <-stalled:
		s.metrics.watchCutOff.Inc()
		return errNotReadingEvents
	case <-s.stopc:
		return status.Error(codes.Unavailable, "node stopping")
	}
}

// serve serves one request of the stream. It runs on the stream's
// receiving goroutine, which the stream interceptor's recovery does not
// cover: a panic serving it ends the stream with Internal, not the node.
func (ws *watchStream) serve(ctx context.Context, req *kvpb.WatchRequest) (err error) {
	defer ws.s.recovered(kvpb.Watch_Watch_FullMethodName, &err)
	switch r := req.GetRequest().(type) {
	case *kvpb.WatchRequest_Create:
		ws.create(ctx, r.Create)
	case *kvpb.WatchRequest_Cancel:
		ws.cancel(r.Cancel.GetWatchId())
	}
	return nil
}

func (ws *watchStream) create(ctx context.Context, c *kvpb.WatchCreateRequest) {
	s := ws.s
	w := &watcher{id: c.GetWatchId(), st: ws, key: c.GetKey(), prevKV: c.GetPrevKv()}
	fail := func(err error) { ws.push(canceled(w, err), time.Time{}) }
	// A watch keeps its key and range end for as long as it lives, and a
	// node carries up to a million watches: neither may be longer than
	// a key can be.
	if n := max(len(c.GetKey()), len(c.GetRangeEnd())); n > s.cfg.Limits.MaxKeyBytes {
		fail(invalid("watch key or range end is %d bytes; the limit is %d", n, s.cfg.Limits.MaxKeyBytes))
		return
	}
	switch {
	case c.GetPrefix():
		w.end = keys.PrefixEnd(c.GetKey())
	case len(c.GetRangeEnd()) > 0:
		if bytes.Compare(c.GetKey(), c.GetRangeEnd()) >= 0 {
			fail(invalid("watch range [%s, %s) is empty", keys.Quote(c.GetKey()), keys.Quote(c.GetRangeEnd())))
			return
		}
		w.end = c.GetRangeEnd()
	default:
		w.single = true
		if err := s.checkKey(c.GetKey()); err != nil {
			fail(err)
			return
		}
	}
	if err := s.authorizeKV(ctx, c); err != nil {
		fail(err)
		return
	}
	w.shard = c.GetShard()
	if w.shard == 0 {
		if !w.single {
			fail(invalid("a prefix or range watch names its shard: revisions are per shard, so a watch over several shards is one watch per shard"))
			return
		}
		var err error
		if w.shard, err = s.route(c.GetHeader(), c.GetKey()); err != nil {
			fail(err)
			return
		}
	} else if err := s.checkEpoch(c.GetHeader()); err != nil {
		fail(err)
		return
	}
	if w.shard == MetaShard || replicasOf(s.clusterMap(), w.shard) == nil {
		fail(invalid("unknown data shard %d; shards are listed by `kvctl cluster status`", w.shard))
		return
	}
	n := s.host.Node(w.shard)
	if n == nil {
		fail(ErrNoReplica)
		return
	}
	if !n.IsLeader() {
		fail(&raftnode.NotLeaderError{Shard: w.shard, Leader: n.Leader()})
		return
	}
	sh, err := s.engine.OpenShard(w.shard)
	if err != nil {
		fail(err)
		return
	}
	// "Now" is the shard's revision as a linearizable read sees it: every
	// write acknowledged before the watch was created is before it.
	var oldest, rev int64
	err = s.read(ctx, w.shard, kvpb.Consistency_LINEARIZABLE, func(r *storage.Reader) error {
		oldest, rev = fsm.HistoryBounds(r)
		return nil
	})
	if err != nil {
		fail(err)
		return
	}
	w.next = fsm.EventPos{Rev: c.GetStartRevision()}
	if w.next.Rev <= 0 {
		w.next.Rev = rev + 1
	}
	if w.next.Rev < oldest {
		fail(&fsm.CompactedError{Revision: w.next.Rev, Oldest: oldest})
		return
	}
	ws.mu.Lock()
	if ws.closed {
		// The stream ended while this create waited for its read: a
		// watch added now would be ended by nobody.
		ws.mu.Unlock()
		return
	}
	_, dup := ws.watches[w.id]
	tooMany := len(ws.watches) >= s.cfg.Limits.MaxWatchesPerStream
	if !dup && !tooMany {
		ws.watches[w.id] = w
	}
	ws.mu.Unlock()
	switch {
	case dup:
		fail(invalid("watch id %d is in use on this stream", w.id))
		return
	case tooMany:
		fail(status.Errorf(codes.ResourceExhausted, "a watch stream carries at most %d watches; open another stream", s.cfg.Limits.MaxWatchesPerStream))
		return
	}
	w.lastSent = time.Now()
	// created goes out before the hub can queue an event for w.
	ws.push(&kvpb.WatchResponse{Header: s.header(w.shard, w.next.Rev-1), WatchId: w.id, Created: true}, time.Time{})
	if !s.addWatcher(w, n, sh) {
		ws.forget(w)
		fail(status.Error(codes.Unavailable, "node stopping"))
		return
	}
	// close may have run since w went into ws.watches, before its hub
	// held it: end it here, as close would have.
	ws.mu.Lock()
	closed := ws.closed
	ws.mu.Unlock()
	if h := s.hubOf(w.shard); closed && h != nil {
		h.end(w, nil)
	}
}

func (ws *watchStream) cancel(id int64) {
	ws.mu.Lock()
	w := ws.watches[id]
	ws.mu.Unlock()
	resp := &kvpb.WatchResponse{WatchId: id, Canceled: true}
	if w == nil {
		ws.push(resp, time.Time{})
		return
	}
	resp.Header = &kvpb.ResponseHeader{Shard: w.shard}
	if h := ws.s.hubOf(w.shard); h != nil {
		h.end(w, resp)
		return
	}
	ws.forget(w)
	ws.push(resp, time.Time{})
}

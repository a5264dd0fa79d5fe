package client

import (
	"context"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/proto/kvpb"
)

// A Client keeps one Watch stream per node (node.watch), shared by all its
// watches of shards that node leads (the server multiplexes watches by
// id). A stream that breaks, or whose last watch ends, is dropped, and the
// next watch opens a new one.

// errMuxBroken: the node's watch stream ended under a watch; the
// watch opens again, elsewhere if need be.
var errMuxBroken = status.Error(codes.Unavailable, "watch stream broken")

// watchMux is one Watch stream to a node.
type watchMux struct {
	n      *node
	stream kvpb.Watch_WatchClient
	cancel context.CancelFunc
	sendMu sync.Mutex // gRPC allows one Send at a time

	// mu guards subs, nextID and broken.
	mu     sync.Mutex
	subs   map[int64]*watchSub
	nextID int64
	broken bool
}

// watchSub is one watch on a mux: its responses, and gone, closed when
// the watch no longer reads them.
type watchSub struct {
	m    *watchMux
	id   int64
	ch   chan *kvpb.WatchResponse
	gone chan struct{}
	once sync.Once
}

// watchSubBuffer is how many responses a watch may have unread before
// the stream's other watches wait for it: a slow watch slows its node's
// stream, which gRPC flow control passes on to the server.
const watchSubBuffer = 64

// subscribe registers a new watch on n's stream (opening the stream if
// need be) and returns its id and its responses; the channel is closed
// when the stream breaks. base bounds the stream's life (the Client's).
func subscribe(base context.Context, n *node) (*watchSub, error) {
	n.watch.Lock()
	defer n.watch.Unlock()
	m := n.watch.mux
	if m != nil {
		m.mu.Lock()
		if !m.broken {
			sub := m.addLocked()
			m.mu.Unlock()
			return sub, nil
		}
		m.mu.Unlock()
	}
	ctx, cancel := context.WithCancel(base)
	stream, err := kvpb.NewWatchClient(n.conn).Watch(ctx)
	if err != nil {
		cancel()
		return nil, err
	}
	m = &watchMux{n: n, stream: stream, cancel: cancel, subs: map[int64]*watchSub{}}
	n.watch.mux = m
	m.mu.Lock()
	sub := m.addLocked()
	m.mu.Unlock()
	go m.dispatch()
	return sub, nil
}

func (m *watchMux) addLocked() *watchSub {
	m.nextID++
	sub := &watchSub{m: m, id: m.nextID, ch: make(chan *kvpb.WatchResponse, watchSubBuffer), gone: make(chan struct{})}
	m.subs[sub.id] = sub
	return sub
}

func (m *watchMux) send(req *kvpb.WatchRequest) error {
	m.sendMu.Lock()
	defer m.sendMu.Unlock()
	return m.stream.Send(req)
}

// unsubscribe ends the watch: it reads no more, the server is told to
// cancel it, and the stream closes when it was the last. Idempotent.
func (sub *watchSub) unsubscribe() {
	sub.once.Do(func() { close(sub.gone) })
	m := sub.m
	m.mu.Lock()
	_, ok := m.subs[sub.id]
	delete(m.subs, sub.id)
	last := ok && len(m.subs) == 0
	if last {
		m.broken = true // no new watch joins a stream being closed
	}
	m.mu.Unlock()
	switch {
	case last:
		m.close()
	case ok:
		_ = m.send(&kvpb.WatchRequest{Request: &kvpb.WatchRequest_Cancel{Cancel: &kvpb.WatchCancelRequest{WatchId: sub.id}}})
	}
}

// close drops the stream from its node and ends it.
func (m *watchMux) close() {
	m.n.watch.Lock()
	if m.n.watch.mux == m {
		m.n.watch.mux = nil
	}
	m.n.watch.Unlock()
	m.cancel()
}

// dispatch hands each response to its watch until the stream ends, then
// closes every watch's channel.
func (m *watchMux) dispatch() {
	for {
		resp, err := m.stream.Recv()
		if err != nil {
			break
		}
		m.mu.Lock()
		sub := m.subs[resp.GetWatchId()]
		if resp.GetCanceled() {
			delete(m.subs, resp.GetWatchId())
		}
		m.mu.Unlock()
		if sub == nil {
			continue
		}
		// Blocks while the watch's buffer is full: see watchSubBuffer.
		// A watch that stops reading unsubscribes, which lets this go.
		select {
		case sub.ch <- resp:
		case <-sub.gone:
		case <-m.stream.Context().Done():
		}
		if resp.GetCanceled() {
			close(sub.ch)
		}
	}
	m.mu.Lock()
	m.broken = true
	subs := m.subs
	m.subs = nil
	m.mu.Unlock()
	m.close()
	for _, sub := range subs {
		close(sub.ch)
	}
}

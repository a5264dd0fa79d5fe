package client

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"maps"
	"math"
	"slices"
	"sync"

	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/kvpb"
)

// ErrCompacted: a watch or a read at a revision needs history a shard no
// longer keeps. The error is a *CompactedError naming the oldest revision.
var ErrCompacted = errors.New("client: revision compacted")

// CompactedError says which shard dropped the history needed, and the
// oldest revision it keeps.
type CompactedError struct {
	Shard  uint64
	Oldest int64
}

func (e *CompactedError) Error() string {
	return fmt.Sprintf("%v: shard %d keeps history from revision %d", ErrCompacted, e.Shard, e.Oldest)
}

func (e *CompactedError) Unwrap() error { return ErrCompacted }

// WatchOption tunes Watch.
type WatchOption func(*watchOptions)

type watchOptions struct {
	prefix bool
	rev    int64
	resume string
	prevKV bool
}

// WithPrefix watches every key starting with the given key, on every
// shard.
func WithPrefix() WatchOption { return func(o *watchOptions) { o.prefix = true } }

// WithRevision starts the watch at a revision, replaying the changes from
// it on. Revisions are per shard, so it applies only to a watch on one
// shard: a key, or a prefix on a cluster of one data shard. Use
// WithResume to continue a prefix watch.
func WithRevision(rev int64) WatchOption { return func(o *watchOptions) { o.rev = rev } }

// WithResume continues a watch after the events of the response whose
// Resume this is: nothing before them again, nothing after them missed.
// A shard of a watch from now whose watch had not started yet (its
// leader unreachable since) starts from now again.
func WithResume(token string) WatchOption { return func(o *watchOptions) { o.resume = token } }

// WithPrevKV has events carry the key's value before the change.
func WithPrevKV() WatchOption { return func(o *watchOptions) { o.prevKV = true } }

// WatchResponse is what a watch delivers: events of one shard, in order,
// or its end.
type WatchResponse struct {
	Events []*kvpb.Event
	// Resume continues the watch after these events (WithResume). After
	// part of a revision too large for one response, it replays that
	// revision.
	Resume string

	// Err, on the last response, says why the watch ended: a
	// *CompactedError, ErrInvalidArgument, ErrInvalidToken, or the
	// context's error.
	Err error

	// before is every shard's next revision before these events.
	before map[uint64]int64
}

// ResumeAfter is a token that continues the watch after Events[i]: after
// the last revision that ends at or before it (a transaction's events
// share a revision, and a watch resumes at a revision boundary, so
// resuming in the middle of one replays its events).
func (r WatchResponse) ResumeAfter(i int) string {
	if i >= len(r.Events)-1 {
		return r.Resume
	}
	ev := r.Events[i]
	next := maps.Clone(r.before)
	rev := ev.GetKv().GetModRevision()
	if r.Events[i+1].GetKv().GetModRevision() == rev {
		rev-- // the revision goes on after Events[i]
	}
	if rev+1 > next[ev.GetShard()] {
		next[ev.GetShard()] = rev + 1
	}
	return encodeWatchToken(next)
}

// Watch watches key (or, WithPrefix, every key with that prefix) and
// delivers every change from now (or the start WithRevision / WithResume
// gives) in order: each shard's events in revision order, each once. The
// channel is closed after a response with Err; read it until then, or
// cancel ctx.
//
// A watch follows each shard's leader (only leaders serve watches): on a
// leader change, a node's death or a broken connection it reconnects by
// itself and continues from the last revision delivered, with no gap and
// no duplicate. It ends with a *CompactedError only when a shard no longer
// holds the history it needs. The Client's watches share one stream per
// node.
func (c *Client) Watch(ctx context.Context, key []byte, opts ...WatchOption) <-chan WatchResponse {
	var o watchOptions
	for _, f := range opts {
		f(&o)
	}
	ch := make(chan WatchResponse, 16)
	w := &watch{c: c, ch: ch, opts: o, key: key, next: map[uint64]int64{}, sent: map[uint64]int{}}
	fail := func(err error) <-chan WatchResponse {
		ch <- WatchResponse{Err: err}
		close(ch)
		return ch
	}
	if c.isClosed() {
		return fail(ErrClosed)
	}
	var shards []uint64
	switch {
	case o.resume != "":
		next, err := decodeWatchToken(o.resume)
		if err != nil {
			return fail(err)
		}
		for sh, rev := range next {
			shards, w.next[sh] = append(shards, sh), rev
		}
		slices.Sort(shards)
	case o.prefix:
		shards = c.dataShards()
		if o.rev > 0 && len(shards) > 1 {
			return fail(fmt.Errorf("%w: a prefix watch spans %d shards and revisions are per shard; start it at a revision of one key, or resume it with a token", ErrInvalidArgument, len(shards)))
		}
	default:
		if len(key) == 0 {
			return fail(fmt.Errorf("%w: empty key", ErrInvalidArgument))
		}
		sh, err := c.shardOf(key)
		if err != nil {
			return fail(err)
		}
		shards = []uint64{sh}
	}
	if o.resume == "" {
		for _, sh := range shards {
			w.next[sh] = o.rev // 0: from now
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	w.cancel = cancel
	var wg sync.WaitGroup
	for _, sh := range shards {
		wg.Go(func() { w.follow(ctx, sh) })
	}
	go func() {
		wg.Wait()
		w.mu.Lock()
		err := w.err
		w.mu.Unlock()
		if err == nil {
			// The caller's ctx ended; it may not read any more.
			err = ctx.Err()
			select {
			case ch <- WatchResponse{Err: err}:
			default:
			}
		} else {
			ch <- WatchResponse{Err: err}
		}
		cancel()
		close(ch)
	}()
	return ch
}

// watch is one Watch call: a follower goroutine per shard, delivering
// through ch.
type watch struct {
	c      *Client
	ch     chan WatchResponse
	opts   watchOptions
	key    []byte
	cancel context.CancelFunc

	// mu is held across a delivery, so that Resume tokens are handed out
	// in the order of the responses that carry them.
	mu   sync.Mutex
	next map[uint64]int64 // per shard: first revision not yet delivered (0: now)
	// sent is, per shard, how many events of revision next it has
	// delivered: the first fragments of a revision too large for one
	// response (kvpb.WatchResponse.fragment). A watch opened again starts
	// at that revision and leaves those out.
	sent map[uint64]int
	err  error // why the watch ended, first cause
}

// end stops the watch with err.
func (w *watch) end(err error) {
	w.mu.Lock()
	if w.err == nil {
		w.err = err
	}
	w.mu.Unlock()
	w.cancel()
}

// follow runs shard's part of the watch until ctx ends or it fails for
// good.
func (w *watch) follow(ctx context.Context, shard uint64) {
	for ctx.Err() == nil {
		st, err := w.open(ctx, shard)
		if err != nil {
			// open retries what can succeed later until ctx ends; any
			// other error (compacted, invalid, permission denied, the
			// client closed) is the watch's end.
			if ctx.Err() == nil {
				w.end(err)
			}
			return
		}
		err = w.receive(ctx, shard, st)
		st.unsubscribe()
		if err != nil {
			w.end(err)
			return
		}
	}
}

// open creates shard's watch on its leader, from the first revision not
// yet delivered, retrying like any request (leader hints, failover,
// backoff) until ctx ends. It shares the node's watch stream with the
// Client's other watches there (watchmux.go).
func (w *watch) open(ctx context.Context, shard uint64) (*watchSub, error) {
	var sub *watchSub
	err := w.c.invoke(ctx, route{shard: shard}, func(actx context.Context, n *node, epoch uint64) error {
		w.mu.Lock()
		next := w.next[shard]
		w.mu.Unlock()
		s, err := subscribe(w.c.base, n)
		if err != nil {
			return err
		}
		req := &kvpb.WatchCreateRequest{WatchId: s.id, Shard: shard, Key: w.key, Prefix: w.opts.prefix, StartRevision: next,
			PrevKv: w.opts.prevKV, Header: &kvpb.RequestHeader{Epoch: epoch}}
		if err := s.m.send(&kvpb.WatchRequest{Request: &kvpb.WatchRequest_Create{Create: req}}); err != nil {
			s.unsubscribe()
			return errMuxBroken
		}
		// Only the creation is bounded by the attempt's context; the
		// watch lives on.
		var resp *kvpb.WatchResponse
		select {
		case r, ok := <-s.ch:
			if !ok {
				err = errMuxBroken
			} else if r.GetCanceled() {
				err = canceledErr(r)
			}
			resp = r
		case <-actx.Done():
			err = status.FromContextError(actx.Err()).Err()
		}
		if err != nil {
			s.unsubscribe()
			return err
		}
		if next == 0 {
			w.mu.Lock()
			w.next[shard] = resp.GetHeader().GetRevision() + 1
			w.mu.Unlock()
		}
		sub = s
		return nil
	})
	return sub, err
}

// canceledErr is the error a canceled watch response carries.
func canceledErr(resp *kvpb.WatchResponse) error {
	if oldest := resp.GetCompactRevision(); oldest > 0 {
		return &CompactedError{Shard: resp.GetHeader().GetShard(), Oldest: oldest}
	}
	b, err := proto.Marshal(resp.GetError())
	if err != nil {
		return status.Error(codes.Internal, "watch canceled")
	}
	sp := new(spb.Status)
	if err := proto.Unmarshal(b, sp); err != nil {
		return status.Error(codes.Internal, "watch canceled")
	}
	return status.ErrorProto(sp)
}

// receive delivers shard's events until the stream breaks or its watch
// is canceled (nil then: follow opens it again) or fails for good.
func (w *watch) receive(ctx context.Context, shard uint64, sub *watchSub) error {
	seen := 0 // events of revision w.next[shard] this subscription received
	for {
		var resp *kvpb.WatchResponse
		select {
		case r, ok := <-sub.ch:
			if !ok {
				return nil
			}
			resp = r
		case <-ctx.Done():
			return nil
		}
		if resp.GetCanceled() {
			err := canceledErr(resp)
			var ce *CompactedError
			if errors.As(err, &ce) {
				return err
			}
			if nl := notLeader(status.Convert(err)); nl != nil && nl.GetLeaderId() != 0 {
				w.c.setLeader(ctx, shard, nl.GetLeaderId())
			}
			return nil
		}
		// Every revision before upTo is complete with this response.
		upTo := resp.GetHeader().GetRevision() + 1
		w.mu.Lock()
		next := w.next[shard]
		if upTo < next || upTo == next && !resp.GetFragment() {
			// Nothing new: a created or progress response.
			w.mu.Unlock()
			continue
		}
		// Leave out the events of revision next that were delivered
		// before this subscription.
		var evs []*kvpb.Event
		for _, ev := range resp.GetEvents() {
			if ev.GetKv().GetModRevision() == next {
				if seen++; seen <= w.sent[shard] {
					continue
				}
			}
			evs = append(evs, ev)
		}
		if upTo > next {
			w.sent[shard], seen = 0, 0
		}
		if resp.GetFragment() {
			for _, ev := range evs {
				if ev.GetKv().GetModRevision() == upTo {
					w.sent[shard]++
					if upTo > next {
						seen++
					}
				}
			}
		}
		var before map[uint64]int64
		if len(evs) > 0 {
			before = maps.Clone(w.next)
		}
		w.next[shard] = upTo
		if len(evs) == 0 {
			w.mu.Unlock()
			continue
		}
		out := WatchResponse{Events: evs, Resume: encodeWatchToken(w.next), before: before}
		select {
		case w.ch <- out:
		case <-ctx.Done():
		}
		w.mu.Unlock()
	}
}

// Watch resume tokens: base64url(version | (uvarint shard | uvarint next)*
// | crc32(all before)), shards ascending.
const watchTokenVersion = 1

func encodeWatchToken(next map[uint64]int64) string {
	shards := make([]uint64, 0, len(next))
	for sh := range next {
		shards = append(shards, sh)
	}
	slices.Sort(shards)
	b := []byte{watchTokenVersion}
	for _, sh := range shards {
		b = binary.AppendUvarint(b, sh)
		b = binary.AppendUvarint(b, uint64(next[sh]))
	}
	b = binary.BigEndian.AppendUint32(b, crc32.ChecksumIEEE(b))
	return base64.RawURLEncoding.EncodeToString(b)
}

func decodeWatchToken(tok string) (map[uint64]int64, error) {
	b, err := decodeTokenBytes(tok)
	if err != nil || len(b) < 1+4 {
		return nil, fmt.Errorf("%w: not a watch resume token", ErrInvalidToken)
	}
	body, sum := b[:len(b)-4], binary.BigEndian.Uint32(b[len(b)-4:])
	if crc32.ChecksumIEEE(body) != sum || body[0] != watchTokenVersion {
		return nil, fmt.Errorf("%w: not a watch resume token of this version", ErrInvalidToken)
	}
	next := map[uint64]int64{}
	r := bytes.NewReader(body[1:])
	var prev uint64
	for r.Len() > 0 {
		sh, err1 := binary.ReadUvarint(r)
		rev, err2 := binary.ReadUvarint(r)
		// Shards ascend, each once, and revisions are int64s that are not
		// negative: the one encoding encodeWatchToken makes. 0 is a shard
		// of a watch "from now" whose watch had not started when the token
		// was taken: resumed, it starts from the resume's now, as the first
		// watch would have started from its own.
		if err1 != nil || err2 != nil || rev > math.MaxInt64 || (len(next) > 0 && sh <= prev) {
			return nil, fmt.Errorf("%w: bad watch resume token", ErrInvalidToken)
		}
		next[sh], prev = int64(rev), sh
	}
	if len(next) == 0 {
		return nil, fmt.Errorf("%w: empty watch resume token", ErrInvalidToken)
	}
	return next, nil
}

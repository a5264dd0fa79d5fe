package transport

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"strconv"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	grpcpeer "google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// Every peer stream (Stream and Snapshot) opens with the dialer's identity
// in its request metadata, and the acceptor answers with its own in the
// response header, before any raft message flows. The acceptor refuses a
// stream of another cluster, one meant for another node id (the dialer has
// a wrong address for its peer), one from a node id that already has a
// live stream from another process (a second process started with the same
// id), and one whose data dir the cluster does not know under that id (it
// was wiped or replaced). The dialer checks the answer the same way, so a
// wrong address is noticed on both sides and the link is never used.
const (
	mdCluster     = MetadataCluster
	mdFrom        = MetadataFrom
	mdTo          = "kvd-to"
	mdNode        = "kvd-node-id" // the acceptor's own id, in its header
	mdNonce       = "kvd-nonce"
	mdIncarnation = "kvd-incarnation"
	// mdExpect is the incarnation the dialer recorded for the node it
	// dials, 0 when none: an acceptor whose own differs is the new one.
	mdExpect = "kvd-expect-incarnation"
	// mdRefusal, in the trailer of a refused stream, says which side must
	// act: refusalNewDataDir means the dialer's data dir is new.
	mdRefusal         = "kvd-refusal"
	refusalNewDataDir = "new-data-dir"
)

// The metadata keys of the caller's cluster and node id, both in hex. The
// server tags its own node-to-node calls with them, so a peer checks them
// whatever the call.
const (
	MetadataCluster = "kvd-cluster-id"
	MetadataFrom    = "kvd-from"
)

// Identity errors; toStatus answers them with FailedPrecondition.
var (
	// ErrDuplicateNode: a stream arrived from a node id that already has
	// a live stream from another process.
	ErrDuplicateNode = errors.New("transport: node id already connected from another process")
	// ErrNewDataDir: a node id came with a data dir (incarnation) other
	// than the one its peers first knew it by. Its log and votes are gone:
	// letting it take part would break raft's guarantees, so it must join
	// again as a new member.
	ErrNewDataDir = errors.New("transport: data dir is not the one the cluster knew for this node id")
)

// Incarnations remembers, persistently, the incarnation each peer had when
// this node first heard from it.
type Incarnations interface {
	// PeerIncarnation returns the incarnation recorded for peer id, or 0.
	PeerIncarnation(id uint64) (uint64, error)
	// RecordPeerIncarnation records inc for peer id; called when none is.
	RecordPeerIncarnation(id, inc uint64) error
}

// codeRefused is the status code of an identity refusal.
const codeRefused = codes.FailedPrecondition

// identity is what one side of a stream says about itself.
type identity struct {
	cluster, node, nonce, incarnation uint64
	to, expect                        uint64 // dialer only
	// protocol is the peer protocol version both sides speak on the
	// stream: the newest they share (version.go).
	protocol uint32
}

func mdUint(md metadata.MD, key string) uint64 {
	v := md.Get(key)
	if len(v) == 0 {
		return 0
	}
	n, _ := strconv.ParseUint(v[0], 16, 64)
	return n
}

func hex(n uint64) string { return strconv.FormatUint(n, 16) }

// outgoing adds this node's identity, for a stream to peer to, to ctx.
func (t *Transport) outgoing(ctx context.Context, to uint64) (context.Context, error) {
	expect, err := t.knownIncarnation(to)
	if err != nil {
		return nil, err
	}
	ctx = metadata.AppendToOutgoingContext(ctx,
		mdCluster, hex(t.cfg.ClusterID), mdFrom, hex(t.id), mdTo, hex(to),
		mdNonce, hex(t.nonce), mdIncarnation, hex(t.cfg.Incarnation), mdExpect, hex(expect))
	if t.versioned() {
		ctx = metadata.AppendToOutgoingContext(ctx, t.protocols.Pairs()...)
	}
	return ctx, nil
}

// header is the acceptor's answer: its own identity.
func (t *Transport) header() metadata.MD {
	md := metadata.Pairs(mdCluster, hex(t.cfg.ClusterID), mdNode, hex(t.id),
		mdNonce, hex(t.nonce), mdIncarnation, hex(t.cfg.Incarnation))
	if t.versioned() {
		md = metadata.Join(md, metadata.Pairs(t.protocols.Pairs()...))
	}
	return md
}

// versioned is false only for a transport that plays a build from before
// versions (Config.protocols).
func (t *Transport) versioned() bool { return t.protocols != Protocols{} }

// checkProtocols checks the peer protocol versions a peer announced in md
// (the dialer's request metadata, or the acceptor's header), and returns
// the version the stream speaks. Once per stream: messages carry none.
func (t *Transport) checkProtocols(md metadata.MD, peer uint64, addr string) (uint32, error) {
	if !t.versioned() {
		return 1, nil
	}
	return CheckProtocols(md, t.protocols, t.id, fmt.Sprintf("node %d at %s", peer, addr))
}

func (t *Transport) knownIncarnation(id uint64) (uint64, error) {
	if t.cfg.Incarnations == nil {
		return 0, nil
	}
	return t.cfg.Incarnations.PeerIncarnation(id)
}

// checkIncarnation compares inc with what this node recorded for peer id,
// recording it if nothing is.
func (t *Transport) checkIncarnation(id, inc uint64, addr string) error {
	if t.cfg.Incarnations == nil || inc == 0 {
		return nil
	}
	t.incMu.Lock()
	defer t.incMu.Unlock()
	known, err := t.cfg.Incarnations.PeerIncarnation(id)
	if err != nil {
		return fmt.Errorf("transport: look up the incarnation of peer %d: %w", id, err)
	}
	switch {
	case known == 0:
		return t.cfg.Incarnations.RecordPeerIncarnation(id, inc)
	case known != inc:
		return fmt.Errorf("%w: node %d at %s has data dir incarnation %s, but node %d knew it as %s: its data dir is new (wiped or replaced), or another process runs with --id %d; it must rejoin the cluster as a new member with a new --id",
			ErrNewDataDir, id, addr, hex(inc), t.id, hex(known), id)
	}
	return nil
}

// admit checks the identity a dialer sent on an inbound stream of kind
// ("stream" or "snapshot"), and answers with this node's in the header. A
// refusal is logged and returned; when the dialer's data dir is the
// problem, the trailer tells it so.
func (t *Transport) admit(stream grpc.ServerStream, kind string) (identity, error) {
	ctx := stream.Context()
	md, _ := metadata.FromIncomingContext(ctx)
	id := identity{
		cluster: mdUint(md, mdCluster), node: mdUint(md, mdFrom), to: mdUint(md, mdTo),
		nonce: mdUint(md, mdNonce), incarnation: mdUint(md, mdIncarnation), expect: mdUint(md, mdExpect),
	}
	addr := "unknown address"
	if p, ok := grpcpeer.FromContext(ctx); ok {
		addr = p.Addr.String()
	}
	refuse := func(err error, dialerMustRejoin bool) (identity, error) {
		if dialerMustRejoin {
			stream.SetTrailer(metadata.Pairs(mdRefusal, refusalNewDataDir))
		}
		// The reason is part of the key: one dialer can be refused first
		// for one reason (its old stream still live) and then another (its
		// data dir), and the second must be logged too.
		reason := err
		if u := errors.Unwrap(err); u != nil {
			reason = u
		}
		t.logRefusal(fmt.Sprint(kind, id.node, id.to, id.cluster, id.nonce, id.incarnation, reason), "transport: refused a peer's "+kind,
			"from", id.node, "to", id.to, "addr", addr, "err", err)
		return id, err
	}
	if err := t.checkCert(ctx, id.node); err != nil {
		return refuse(err, false)
	}
	// The version first: the rest of the identity means what it says
	// only between nodes that speak one protocol.
	var err error
	if id.protocol, err = t.checkProtocols(md, id.node, addr); err != nil {
		return refuse(err, false)
	}
	switch {
	case id.cluster != t.cfg.ClusterID:
		return refuse(fmt.Errorf("%w: node %d at %s is of cluster %s, but node %d is of cluster %s",
			ErrPeerMismatch, id.node, addr, hex(id.cluster), t.id, hex(t.cfg.ClusterID)), false)
	case id.to != t.id:
		return refuse(fmt.Errorf("%w: node %d at %s dialed node %d, but reached node %d: its address for node %d is wrong",
			ErrPeerMismatch, id.node, addr, id.to, t.id, id.to), false)
	case id.node == 0 || id.node == t.id:
		return refuse(fmt.Errorf("%w: a node at %s calls itself node %d", ErrPeerMismatch, addr, id.node), false)
	}
	if l := t.link(id.node); l != nil && l.live() && l.remoteNonce != id.nonce {
		return refuse(fmt.Errorf("%w: node %d at %s, but node %d has a live stream from another process with that id: a second process running with --id %d (or node %d restarted and its old stream has not timed out yet)",
			ErrDuplicateNode, id.node, addr, t.id, id.node, id.node), false)
	}
	if id.expect != 0 && t.cfg.Incarnation != 0 && id.expect != t.cfg.Incarnation {
		err := fmt.Errorf("%w: node %d at %s knew node %d with data dir incarnation %s, but its data dir is %s: this data dir is new (wiped or replaced); it must rejoin the cluster as a new member with a new --id",
			ErrNewDataDir, id.node, addr, t.id, hex(id.expect), hex(t.cfg.Incarnation))
		t.evict(err)
		return refuse(err, false)
	}
	if err := t.checkIncarnation(id.node, id.incarnation, addr); err != nil {
		return refuse(err, errors.Is(err, ErrNewDataDir))
	}
	if err := stream.SendHeader(t.header()); err != nil {
		return id, fmt.Errorf("transport: answer %s of peer %d: %w", kind, id.node, err)
	}
	return id, nil
}

// checkAnswer checks the acceptor's header on a stream this node opened to
// peer want at addr.
func (t *Transport) checkAnswer(md metadata.MD, want uint64, addr string) (identity, error) {
	id := identity{cluster: mdUint(md, mdCluster), node: mdUint(md, mdNode),
		nonce: mdUint(md, mdNonce), incarnation: mdUint(md, mdIncarnation)}
	var err error
	if id.protocol, err = t.checkProtocols(md, want, addr); err != nil {
		return id, err
	}
	switch {
	case id.node != want:
		return id, fmt.Errorf("%w: %s answered as node %d, want node %d: the address of node %d is wrong",
			ErrPeerMismatch, addr, id.node, want, want)
	case id.cluster != t.cfg.ClusterID:
		return id, fmt.Errorf("%w: node %d at %s is of cluster %s, but node %d is of cluster %s",
			ErrPeerMismatch, want, addr, hex(id.cluster), t.id, hex(t.cfg.ClusterID))
	}
	if err := t.checkIncarnation(want, id.incarnation, addr); err != nil {
		return id, err
	}
	return id, nil
}

// refused handles an error that ended a stream this node opened to peer
// to at addr before it was up: an identity refusal is logged at ERROR, and
// one that says this node's data dir is new evicts it. trailer is the
// stream's trailer, if any.
func (t *Transport) refused(err error, trailer metadata.MD, to uint64, addr, kind string) {
	if len(trailer.Get(mdRefusal)) > 0 && trailer.Get(mdRefusal)[0] == refusalNewDataDir {
		t.evict(fmt.Errorf("%w: refused by node %d: %s", ErrNewDataDir, to, status.Convert(err).Message()))
	}
	if isRefusal(err) {
		t.logRefusal(fmt.Sprint("dial", kind, to, addr), "transport: peer "+kind+" refused", "peer", to, "addr", addr, "err", err)
	}
}

// isRefusal reports whether err is an identity check's verdict, ours or
// the acceptor's.
func isRefusal(err error) bool {
	if errors.Is(err, ErrPeerMismatch) || errors.Is(err, ErrDuplicateNode) || errors.Is(err, ErrNewDataDir) || errors.Is(err, ErrProtocolVersion) {
		return true
	}
	s, ok := status.FromError(err)
	return ok && s.Code() == codeRefused
}

// evict reports, once, that peers refuse this node for good.
func (t *Transport) evict(err error) {
	t.evictOnce.Do(func() {
		t.log.Error("transport: this node's data dir is not the one the cluster knew; it must rejoin as a new member", "err", err)
		if t.cfg.Evicted != nil {
			t.cfg.Evicted(err)
		}
	})
}

// refusalLogEvery bounds how often the same refusal is logged: the dialer
// retries every few seconds for as long as the misconfiguration lasts.
const refusalLogEvery = 30 * time.Second

// maxRefusalKeys bounds the keys refusalLog remembers, and so the
// distinct refusals it logs in refusalLogEvery.
const maxRefusalKeys = 1024

// refusalLog throttles refusal logs by key. Keys are hashed: they are
// built from what a caller sent, which can be large.
type refusalLog struct {
	mu   sync.Mutex
	seed maphash.Seed
	last map[uint64]time.Time
	// unlogged counts the refusals dropped since summarized because
	// the map was full of keys logged within refusalLogEvery: a flood of
	// distinct callers gets a summary line, not a line each.
	unlogged   int
	summarized time.Time
}

// LogRefusal logs msg at ERROR, at most once per 30 s for each key: the
// server logs its refusals of peer calls with it, as the transport does
// those of streams, since a refused peer retries for as long as the
// cause lasts.
func (t *Transport) LogRefusal(key, msg string, args ...any) { t.logRefusal(key, msg, args...) }

func (t *Transport) logRefusal(key, msg string, args ...any) {
	r := &t.refusals
	r.mu.Lock()
	now := time.Now()
	if r.last == nil {
		r.seed = maphash.MakeSeed()
		r.last = make(map[uint64]time.Time)
	}
	h := maphash.String(r.seed, key)
	if last, ok := r.last[h]; ok && now.Sub(last) < refusalLogEvery {
		r.mu.Unlock()
		return
	}
	if len(r.last) >= maxRefusalKeys {
		// Keys carry the dialer's nonce, so a peer that keeps
		// restarting, or a hostile one, would otherwise grow the map
		// for ever. Forgetting a key only means logging it once more.
		for k, last := range r.last {
			if now.Sub(last) >= refusalLogEvery {
				delete(r.last, k)
			}
		}
	}
	if len(r.last) >= maxRefusalKeys {
		r.unlogged++
		var n int
		if now.Sub(r.summarized) >= refusalLogEvery {
			n, r.unlogged, r.summarized = r.unlogged, 0, now
		}
		r.mu.Unlock()
		if n > 0 {
			t.log.Error("transport: refusing more peers than it logs; refusals not logged", "count", n, "last", msg)
		}
		return
	}
	r.last[h] = now
	r.mu.Unlock()
	t.log.Error(msg, args...)
}

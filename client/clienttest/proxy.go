package clienttest

import (
	"context"
	"errors"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/protoadapt"

	"github.com/kvd/kvd/proto/kvpb"
)

// Mode is what a node's proxy does with the calls it receives.
type Mode int

const (
	// Up forwards every call.
	Up Mode = iota
	// Down answers every call, health checks included, with Unavailable.
	Down
	// Hang holds every call, health checks included, until the mode
	// changes or the caller gives up.
	Hang
)

// frame is one gRPC message as bytes: the proxy forwards messages without
// knowing their type, and decodes only those it looks into.
type frame struct{ b []byte }

// rawCodec passes frames through untouched.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return v.(*frame).b, nil }
func (rawCodec) Unmarshal(b []byte, v any) error {
	v.(*frame).b = b
	return nil
}
func (rawCodec) Name() string { return "proto" } // what the peers negotiated

// proxy stands in front of a node's client listener, as etcd's
// integration bridge does: the cluster map advertises the proxy, so every
// call a client makes to the node, leader hints followed included, passes
// through it, and a test makes it fail, hang or look into calls.
type proxy struct {
	lis net.Listener
	srv *grpc.Server
	cc  *grpc.ClientConn // to the node's own client listener
	wg  sync.WaitGroup

	mu struct {
		sync.Mutex
		mode    Mode
		release chan struct{} // closed when the proxy leaves Hang
		// answers are what the next KV calls get instead of being
		// forwarded, one each, in order.
		answers []error
		// failAfter is how many writes are forwarded and then answered
		// Unavailable, as a leader that commits but times out replying.
		failAfter   int
		hideHint    bool
		delay       time.Duration
		calls       map[string]int
		notLeader   map[uint64]int // NotLeader answers by shard
		headers     []*kvpb.RequestHeader
		inFlight    int
		maxInFlight int
	}
}

var kvService = "/" + kvpb.KV_ServiceDesc.ServiceName + "/"

func newProxy(lis net.Listener, backend string) (*proxy, error) {
	cc, err := grpc.NewClient(backend, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	p := &proxy{lis: lis, cc: cc}
	p.mu.release = make(chan struct{})
	p.mu.calls = map[string]int{}
	p.mu.notLeader = map[uint64]int{}
	p.srv = grpc.NewServer(grpc.ForceServerCodec(rawCodec{}), grpc.UnknownServiceHandler(p.handle))
	p.wg.Go(func() { _ = p.srv.Serve(lis) })
	return p, nil
}

// close stops the proxy; held calls are released first.
func (p *proxy) close() {
	p.setMode(Up)
	p.srv.Stop()
	p.wg.Wait()
	p.cc.Close()
}

func (p *proxy) setMode(m Mode) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.mode == Hang && m != Hang {
		close(p.mu.release)
		p.mu.release = make(chan struct{})
	}
	p.mu.mode = m
}

// enter counts a call and applies the mode, the delay and the next queued
// answer. A non-nil error is the call's answer; done must be called when
// the call ends.
func (p *proxy) enter(ctx context.Context, method string, kv bool) (done func(), err error) {
	p.mu.Lock()
	p.mu.calls[method]++
	mode, release, delay := p.mu.mode, p.mu.release, p.mu.delay
	if kv {
		p.mu.inFlight++
		p.mu.maxInFlight = max(p.mu.maxInFlight, p.mu.inFlight)
	}
	p.mu.Unlock()
	done = func() {
		if kv {
			p.mu.Lock()
			p.mu.inFlight--
			p.mu.Unlock()
		}
	}
	switch mode {
	case Down:
		return done, errDown
	case Hang:
		select {
		case <-release:
		case <-ctx.Done():
			return done, status.FromContextError(ctx.Err()).Err()
		}
	}
	if delay > 0 {
		t := time.NewTimer(delay)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return done, status.FromContextError(ctx.Err()).Err()
		}
	}
	if !kv {
		return done, nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.mu.answers) > 0 {
		err, p.mu.answers = p.mu.answers[0], p.mu.answers[1:]
		return done, err
	}
	return done, nil
}

// handle forwards one call of any method to the node, message by
// message in both directions, with its metadata. Unary KV calls get the
// queued answers and FailAfterApply as a whole; a Batch stream's items get
// them one by one, as the node's unary methods would.
func (p *proxy) handle(_ any, ss grpc.ServerStream) (err error) {
	full, _ := grpc.MethodFromServerStream(ss)
	method := full[strings.LastIndex(full, "/")+1:]
	kv := strings.HasPrefix(full, kvService)
	var done func()
	if method == "Batch" {
		// The stream is always let through; its items meet the mode and
		// the queued answers one by one.
		p.mu.Lock()
		p.mu.calls[method]++
		p.mu.Unlock()
		done = func() {}
	} else if done, err = p.enter(ss.Context(), method, kv); err != nil {
		done()
		return err
	}
	defer done()
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		ctx = metadata.NewOutgoingContext(ctx, md.Copy())
	}
	cs, err := p.cc.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, full, grpc.ForceCodec(rawCodec{}))
	if err != nil {
		return err
	}
	c := &call{p: p, ctx: ctx, ss: ss, cs: cs, method: method, kv: kv, failAfter: map[uint64]bool{}}
	go c.up()
	err = c.down()
	cancel()
	c.held.Wait()
	return err
}

// call is one forwarded call.
type call struct {
	p      *proxy
	ctx    context.Context // ends with the call
	ss     grpc.ServerStream
	method string
	kv     bool

	cs grpc.ClientStream

	sendMu sync.Mutex     // ss.SendMsg is called from both directions
	fwdMu  sync.Mutex     // cs.SendMsg is called by up and by held items
	held   sync.WaitGroup // Batch items held by Hang

	mu        sync.Mutex
	failAfter map[uint64]bool // Batch items to answer Unavailable once applied
}

func (c *call) send(b []byte) error {
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	return c.ss.SendMsg(&frame{b: b})
}

func (c *call) forward(b []byte) error {
	c.fwdMu.Lock()
	defer c.fwdMu.Unlock()
	return c.cs.SendMsg(&frame{b: b})
}

// up forwards the client's messages to the node until the client
// half-closes or the call ends.
func (c *call) up() {
	for {
		f := new(frame)
		if err := c.ss.RecvMsg(f); err != nil {
			c.held.Wait() // held items go first
			c.fwdMu.Lock()
			_ = c.cs.CloseSend()
			c.fwdMu.Unlock()
			return
		}
		if c.kv {
			c.p.look(c.method, f.b)
		}
		if c.method == "Batch" {
			b, ok := c.batchUp(f.b)
			if !ok {
				continue
			}
			f.b = b
		}
		if err := c.forward(f.b); err != nil {
			return // the node's answer tells why
		}
	}
}

// batchUp answers the items of a Batch message that a queued answer is
// for, and returns the message of the others to forward (ok false: none).
func (c *call) batchUp(b []byte) (fwd []byte, ok bool) {
	var req kvpb.BatchRequest
	if proto.Unmarshal(b, &req) != nil {
		return b, true
	}
	var keep []*kvpb.BatchRequestItem
	var answered []*kvpb.BatchResponseItem
	c.p.mu.Lock()
	mode, release := c.p.mu.mode, c.p.mu.release
	for _, it := range req.GetItems() {
		switch mode {
		case Down:
			answered = append(answered, &kvpb.BatchResponseItem{Id: it.GetId(), Error: kvpb.StatusOf(errDown)})
			continue
		case Hang:
			c.held.Go(func() { c.hold(it, release) })
			continue
		}
		if len(c.p.mu.answers) > 0 {
			var err error
			err, c.p.mu.answers = c.p.mu.answers[0], c.p.mu.answers[1:]
			answered = append(answered, &kvpb.BatchResponseItem{Id: it.GetId(), Error: kvpb.StatusOf(err)})
			continue
		}
		if it.GetGet() == nil && c.p.mu.failAfter > 0 {
			c.p.mu.failAfter--
			c.mu.Lock()
			c.failAfter[it.GetId()] = true
			c.mu.Unlock()
		}
		keep = append(keep, it)
	}
	c.p.mu.Unlock()
	if len(answered) > 0 {
		if out, err := proto.Marshal(&kvpb.BatchResponse{Items: answered}); err == nil {
			_ = c.send(out)
		}
	}
	if len(keep) == 0 {
		return nil, false
	}
	if len(answered) == 0 {
		return b, true
	}
	out, err := proto.Marshal(&kvpb.BatchRequest{Items: keep})
	return out, err == nil
}

// batchDown applies FailAfterApply and HideLeaderHint to the items of a
// Batch answer.
func (c *call) batchDown(b []byte) []byte {
	var res kvpb.BatchResponse
	if proto.Unmarshal(b, &res) != nil {
		return b
	}
	changed := false
	for i, it := range res.GetItems() {
		c.mu.Lock()
		fail := c.failAfter[it.GetId()]
		delete(c.failAfter, it.GetId())
		c.mu.Unlock()
		switch {
		case fail:
			res.Items[i] = &kvpb.BatchResponseItem{Id: it.GetId(), Error: kvpb.StatusOf(errAppliedTimedOut)}
			changed = true
		case it.GetError() != nil:
			if err := c.p.rewrite(it.GetError().Err()); err != it.GetError().Err() {
				it.Error = kvpb.StatusOf(err)
				changed = true
			}
		}
	}
	if !changed {
		return b
	}
	out, err := proto.Marshal(&res)
	if err != nil {
		return b
	}
	return out
}

// hold keeps a Batch item of a hanging node until the node stops hanging,
// then forwards it, or until its deadline or the stream's end.
func (c *call) hold(it *kvpb.BatchRequestItem, release <-chan struct{}) {
	c.p.mu.Lock()
	c.p.mu.inFlight++
	c.p.mu.maxInFlight = max(c.p.mu.maxInFlight, c.p.mu.inFlight)
	c.p.mu.Unlock()
	defer func() {
		c.p.mu.Lock()
		c.p.mu.inFlight--
		c.p.mu.Unlock()
	}()
	ctx := c.ctx
	if t := it.GetTimeoutUs(); t > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(t)*time.Microsecond)
		defer cancel()
	}
	select {
	case <-release:
		if b, err := proto.Marshal(&kvpb.BatchRequest{Items: []*kvpb.BatchRequestItem{it}}); err == nil {
			_ = c.forward(b)
		}
	case <-ctx.Done():
		res := &kvpb.BatchResponseItem{Id: it.GetId(), Error: kvpb.StatusOf(status.FromContextError(ctx.Err()).Err())}
		if b, err := proto.Marshal(&kvpb.BatchResponse{Items: []*kvpb.BatchResponseItem{res}}); err == nil {
			_ = c.send(b)
		}
	}
}

var errDown = status.Error(codes.Unavailable, "clienttest: node down")

var errAppliedTimedOut = status.Error(codes.Unavailable, "clienttest: applied, then timed out")

// down forwards the node's answers to the client, and the call's status.
func (c *call) down() error {
	cs := c.cs
	write := c.kv && (c.method == "Put" || c.method == "Delete" || c.method == "Txn")
	for first := true; ; first = false {
		f := new(frame)
		err := cs.RecvMsg(f)
		if first {
			if md, herr := cs.Header(); herr == nil {
				_ = c.ss.SendHeader(md)
			}
		}
		if err != nil {
			c.ss.SetTrailer(cs.Trailer())
			if errors.Is(err, io.EOF) {
				return nil
			}
			return c.p.rewrite(err)
		}
		if write && c.p.failAfterApply() {
			return errAppliedTimedOut
		}
		if c.method == "Batch" {
			f.b = c.batchDown(f.b)
		}
		if err := c.send(f.b); err != nil {
			return err
		}
	}
}

func (p *proxy) failAfterApply() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.failAfter > 0 {
		p.mu.failAfter--
		return true
	}
	return false
}

// rewrite drops the leader hint from a NotLeader answer when asked to.
// It counts NotLeader answers too.
func (p *proxy) rewrite(err error) error {
	st := status.Convert(err)
	i := slices.IndexFunc(st.Details(), func(d any) bool { _, ok := d.(*kvpb.NotLeader); return ok })
	notLeader := i >= 0
	p.mu.Lock()
	hide := p.mu.hideHint
	if notLeader {
		p.mu.notLeader[st.Details()[i].(*kvpb.NotLeader).GetShard()]++
	}
	p.mu.Unlock()
	if !hide || !notLeader {
		return err
	}
	var details []protoadapt.MessageV1
	changed := false
	for _, d := range st.Details() {
		if nl, ok := d.(*kvpb.NotLeader); ok {
			nl = proto.CloneOf(nl)
			nl.LeaderId, nl.LeaderAddr = 0, ""
			d, changed = nl, true
		}
		if m, ok := d.(proto.Message); ok {
			details = append(details, protoadapt.MessageV1Of(m))
		}
	}
	if !changed {
		return err
	}
	out, derr := status.New(st.Code(), st.Message()).WithDetails(details...)
	if derr != nil {
		return err
	}
	return out.Err()
}

func (p *proxy) snapshotHeaders() []*kvpb.RequestHeader {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.mu.headers)
}

// look records what a KV request tells: the headers of writes, and the
// methods of a batch's items, counted like unary calls.
func (p *proxy) look(method string, b []byte) {
	var hs []*kvpb.RequestHeader
	var items []string
	switch method {
	case "Put":
		var r kvpb.PutRequest
		if proto.Unmarshal(b, &r) == nil {
			hs = append(hs, r.GetHeader())
		}
	case "Delete":
		var r kvpb.DeleteRequest
		if proto.Unmarshal(b, &r) == nil {
			hs = append(hs, r.GetHeader())
		}
	case "Txn":
		var r kvpb.TxnRequest
		if proto.Unmarshal(b, &r) == nil {
			hs = append(hs, r.GetHeader())
		}
	case "Batch":
		var r kvpb.BatchRequest
		if proto.Unmarshal(b, &r) != nil {
			return
		}
		for _, it := range r.GetItems() {
			items = append(items, it.Method())
			switch q := it.GetRequest().(type) {
			case *kvpb.BatchRequestItem_Put:
				hs = append(hs, q.Put.GetHeader())
			case *kvpb.BatchRequestItem_Delete:
				hs = append(hs, q.Delete.GetHeader())
			case *kvpb.BatchRequestItem_Txn:
				hs = append(hs, q.Txn.GetHeader())
			}
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, h := range hs {
		if h != nil {
			p.mu.headers = append(p.mu.headers, h)
		}
	}
	for _, m := range items {
		p.mu.calls[m]++
	}
}

package server

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/fsm"
	"github.com/kvd/kvd/internal/keys"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/raftnode"
	"github.com/kvd/kvd/storage"
)

// Range page sizes: the default when the request sets no limit, and the cap.
const (
	defaultRangeLimit = 1000
	maxRangeLimit     = 10000
)

// Put implements kvpb.KV.
func (s *Server) Put(ctx context.Context, req *kvpb.PutRequest) (*kvpb.PutResponse, error) {
	if err := s.checkKey(req.GetKey()); err != nil {
		return nil, s.toStatus(err, 0)
	}
	if len(req.GetValue()) > s.cfg.Limits.MaxValueBytes {
		return nil, s.toStatus(invalid("value is %d bytes; the limit is %d", len(req.GetValue()), s.cfg.Limits.MaxValueBytes), 0)
	}
	shard, err := s.route(req.GetHeader(), req.GetKey())
	if err != nil {
		return nil, s.toStatus(err, shard)
	}
	if l := req.GetLease(); l != 0 {
		if err := s.checkLeases(ctx, l); err != nil {
			return nil, err
		}
	}
	op := &kvpb.PutRequest{Key: req.GetKey(), Value: req.GetValue(), PrevKv: req.GetPrevKv(), Lease: req.GetLease()}
	resp, err := proposeOp(ctx, s, shard, req.GetHeader(), &peerpb.Command{Op: &peerpb.Command_Put{Put: op}}, "put", (*peerpb.Result).GetPut)
	if err != nil {
		if fr, ferr, ok := forward(ctx, s, err, shard, func(ctx context.Context, c kvpb.KVClient, o ...grpc.CallOption) (*kvpb.PutResponse, error) {
			return c.Put(ctx, req, o...)
		}); ok {
			return fr, ferr
		}
		return nil, s.toStatus(err, shard)
	}
	resp.Header = s.header(shard, resp.GetHeader().GetRevision())
	return resp, nil
}

// Delete implements kvpb.KV.
func (s *Server) Delete(ctx context.Context, req *kvpb.DeleteRequest) (*kvpb.DeleteResponse, error) {
	if err := s.checkKey(req.GetKey()); err != nil {
		return nil, s.toStatus(err, 0)
	}
	shard, err := s.route(req.GetHeader(), req.GetKey())
	if err != nil {
		return nil, s.toStatus(err, shard)
	}
	op := &kvpb.DeleteRequest{Key: req.GetKey(), PrevKv: req.GetPrevKv()}
	resp, err := proposeOp(ctx, s, shard, req.GetHeader(), &peerpb.Command{Op: &peerpb.Command_Delete{Delete: op}}, "delete", (*peerpb.Result).GetDelete)
	if err != nil {
		if fr, ferr, ok := forward(ctx, s, err, shard, func(ctx context.Context, c kvpb.KVClient, o ...grpc.CallOption) (*kvpb.DeleteResponse, error) {
			return c.Delete(ctx, req, o...)
		}); ok {
			return fr, ferr
		}
		return nil, s.toStatus(err, shard)
	}
	resp.Header = s.header(shard, resp.GetHeader().GetRevision())
	return resp, nil
}

// Txn implements kvpb.KV. All keys must fall in one shard.
func (s *Server) Txn(ctx context.Context, req *kvpb.TxnRequest) (*kvpb.TxnResponse, error) {
	keys, err := s.checkTxn(req)
	if err != nil {
		return nil, s.toStatus(err, 0)
	}
	shard, err := s.route(req.GetHeader(), keys[0])
	if err != nil {
		return nil, s.toStatus(err, shard)
	}
	if err := s.sameShard(keys); err != nil {
		return nil, s.toStatus(err, shard)
	}
	if err := s.checkLeases(ctx, txnLeases(req)...); err != nil {
		return nil, err
	}
	// The header travels in the Command; the ops are shared, not copied.
	op := &kvpb.TxnRequest{Compare: req.GetCompare(), Success: req.GetSuccess(), Failure: req.GetFailure()}
	resp, err := proposeOp(ctx, s, shard, req.GetHeader(), &peerpb.Command{Op: &peerpb.Command_Txn{Txn: op}}, "txn", (*peerpb.Result).GetTxn)
	if err != nil {
		if fr, ferr, ok := forward(ctx, s, err, shard, func(ctx context.Context, c kvpb.KVClient, o ...grpc.CallOption) (*kvpb.TxnResponse, error) {
			return c.Txn(ctx, req, o...)
		}); ok {
			return fr, ferr
		}
		return nil, s.toStatus(err, shard)
	}
	resp.Header = s.header(shard, resp.GetHeader().GetRevision())
	return resp, nil
}

// Get implements kvpb.KV.
func (s *Server) Get(ctx context.Context, req *kvpb.GetRequest) (*kvpb.GetResponse, error) {
	if err := s.checkKey(req.GetKey()); err != nil {
		return nil, s.toStatus(err, 0)
	}
	shard, err := s.route(req.GetHeader(), req.GetKey())
	if err != nil {
		return nil, s.toStatus(err, shard)
	}
	resp := &kvpb.GetResponse{}
	err = s.read(ctx, shard, req.GetConsistency(), func(r *storage.Reader) error {
		var kv *kvpb.KeyValue
		var err error
		if rev := req.GetRevision(); rev > 0 {
			kv, err = fsm.GetAt(r, req.GetKey(), rev)
		} else {
			kv, err = fsm.Get(r, req.GetKey())
		}
		resp.Kv = kv
		resp.Header = s.header(shard, fsm.Revision(r))
		return err
	})
	if err != nil {
		if fr, ferr, ok := forward(ctx, s, err, shard, func(ctx context.Context, c kvpb.KVClient, o ...grpc.CallOption) (*kvpb.GetResponse, error) {
			return c.Get(ctx, req, o...)
		}); ok {
			return fr, ferr
		}
		return nil, s.toStatus(err, shard)
	}
	return resp, nil
}

// Batch implements kvpb.KV: each item is admitted, served and counted as
// its unary method would be (the metrics carry that method's name). Its
// answers count against the in-flight budget until they are sent: a Get's
// answer is refused with ResourceExhausted when the budget has no room
// for it, any other answer (a write's, which must reach the client) is
// charged regardless. The stream holds at most MaxBatchStreamBytes (see
// batchOptions).
func (s *Server) Batch(stream kvpb.KV_BatchServer) error {
	adm := s.adm
	opts := batchOptions{
		MaxHeldBytes: s.cfg.Limits.MaxBatchStreamBytes,
		SendTimeout:  s.cfg.BatchSendTimeout,
		Charge: func(it *kvpb.BatchRequestItem, n int64) bool {
			if it.GetGet() != nil {
				return adm.acquire(n)
			}
			adm.hold(n)
			return true
		},
		Release:       adm.release,
		ChargeMessage: adm.acquire,
		CutOff:        s.metrics.batchCutOff.Inc,
	}
	return serveBatch(countedStream{stream, s.metrics}, opts, s.recoverItems(func(ctx context.Context, it *kvpb.BatchRequestItem) (*kvpb.BatchResponseItem, error) {
		var res *kvpb.BatchResponseItem
		if err := s.authorizeKV(ctx, it.Inner()); err != nil {
			return nil, err
		}
		_, err := s.metrics.observe(it.Method(), func() (any, error) {
			return adm.serve(requestCharge(it.Inner(), sizedBefore), func() (any, error) {
				var err error
				res, err = it.Call(ctx, s)
				return res, err
			})
		})
		return res, err
	}))
}

// countedStream counts the messages and items a Batch stream receives.
type countedStream struct {
	kvpb.KV_BatchServer
	m *metrics
}

func (c countedStream) Recv() (*kvpb.BatchRequest, error) {
	req, err := c.KV_BatchServer.Recv()
	if err == nil {
		c.m.batches.Inc()
		c.m.batchItems.Add(float64(len(req.GetItems())))
	}
	return req, err
}

// responseHeaderBytes is what a response keeps of MaxResponseBytes for
// the rest of it (header, count, framing), so a full one still fits a
// client receive limit of MaxResponseBytes.
const responseHeaderBytes = 1 << 10

// payloadBytes is what the listed part of a response may take: the kvs of
// a Range page, the events of a Watch response, the keys of a TimeToLive
// answer. Each still holds at least one, whatever its size.
func (s *Server) payloadBytes() int {
	return max(s.cfg.Limits.MaxResponseBytes-responseHeaderBytes, 1)
}

// rangeKvTag is the size of the field tag each kv of a RangeResponse
// carries (kvs is field 2): a page of thousands of small kvs has more of
// them than responseHeaderBytes could absorb.
var rangeKvTag = protowire.SizeTag(2)

// Range implements kvpb.KV: one shard's keys in [start, end). A page ends
// (with More set) at the key limit or when the next kv would take it past
// MaxResponseBytes, whichever comes first, and holds at least one kv.
func (s *Server) Range(ctx context.Context, req *kvpb.RangeRequest) (*kvpb.RangeResponse, error) {
	shard := req.GetShard()
	if shard == MetaShard || replicasOf(s.clusterMap(), shard) == nil {
		return nil, s.toStatus(invalid("unknown data shard %d; shards are listed by `kvctl cluster status`", shard), shard)
	}
	if err := s.checkEpoch(req.GetHeader()); err != nil {
		return nil, s.toStatus(err, shard)
	}
	if len(req.GetEnd()) > 0 && bytes.Compare(req.GetStart(), req.GetEnd()) >= 0 {
		return &kvpb.RangeResponse{Header: s.header(shard, 0)}, nil
	}
	limit := int(req.GetLimit())
	if limit <= 0 {
		limit = defaultRangeLimit
	}
	limit = min(limit, maxRangeLimit)
	if req.GetLimit() < 0 {
		return nil, s.toStatus(invalid("limit must not be negative"), shard)
	}
	maxBytes := s.payloadBytes()
	size := 0
	resp := &kvpb.RangeResponse{}
	// The page is charged to the in-flight budget as it grows; where the
	// budget runs out the page ends early (more set), or, with nothing in
	// it yet, the call is refused, so pages are never built to be thrown
	// away.
	hold := holdOf(ctx)
	if hold != nil {
		hold.growing = true
	}
	var refused error
	err := s.read(ctx, shard, req.GetConsistency(), func(r *storage.Reader) error {
		resp.Header = s.header(shard, fsm.Revision(r))
		scan := func(fn func(*kvpb.KeyValue) bool) error { return fsm.Range(r, req.GetStart(), req.GetEnd(), fn) }
		if rev := req.GetRevision(); rev > 0 {
			scan = func(fn func(*kvpb.KeyValue) bool) error { return fsm.RangeAt(r, req.GetStart(), req.GetEnd(), rev, fn) }
		}
		return scan(func(kv *kvpb.KeyValue) bool {
			if req.GetCountOnly() {
				resp.Count++
				return true
			}
			if len(resp.Kvs) == limit {
				resp.More = true
				return false
			}
			if req.GetKeysOnly() {
				kv.Value = nil
			}
			n := rangeKvTag + protowire.SizeBytes(proto.Size(kv))
			if len(resp.Kvs) > 0 && size+n > maxBytes {
				resp.More = true
				return false
			}
			if !s.adm.grow(hold, n) {
				if len(resp.Kvs) > 0 {
					resp.More = true
				} else {
					refused = errAnswerOverloaded(n)
				}
				return false
			}
			size += n
			resp.Kvs = append(resp.Kvs, kv)
			return true
		})
	})
	if err != nil {
		if fr, ferr, ok := forward(ctx, s, err, shard, func(ctx context.Context, c kvpb.KVClient, o ...grpc.CallOption) (*kvpb.RangeResponse, error) {
			return c.Range(ctx, req, o...)
		}); ok {
			if hold != nil {
				hold.growing = false // the leader's page is charged whole
			}
			return fr, ferr
		}
		return nil, s.toStatus(err, shard)
	}
	if refused != nil {
		return nil, refused
	}
	if !req.GetCountOnly() {
		resp.Count = int64(len(resp.Kvs))
	}
	return resp, nil
}

// propose replicates cmd on shard and returns its applied result.
func (s *Server) propose(ctx context.Context, shard uint64, h *kvpb.RequestHeader, cmd *peerpb.Command) (*peerpb.Result, error) {
	n := s.host.Node(shard)
	if n == nil {
		return nil, ErrNoReplica
	}
	if !n.IsLeader() {
		return nil, &raftnode.NotLeaderError{Shard: shard, Leader: n.Leader()}
	}
	if err := s.corruptErr(shard); err != nil {
		return nil, err
	}
	ctx, cancel := s.withTimeout(ctx)
	defer cancel()
	cmd.Session, cmd.Seq, cmd.AckBelow = h.GetSession(), h.GetSeq(), h.GetAckBelow()
	cmd.TimeUnixMs = time.Now().UnixMilli()
	data, err := proto.Marshal(cmd)
	if err != nil {
		return nil, invalid("encode: %v", err)
	}
	out, err := n.Propose(ctx, data)
	if err != nil {
		return nil, err
	}
	// A deterministic rejection at apply time keeps its fsm sentinel for
	// toStatus: most are bad requests that validation did not catch, some
	// (a result not kept for a retry) are not.
	return fsm.Outcome(out)
}

// proposeOp proposes cmd and returns the response of the operation it
// holds, the part of its result get picks. A result without one (the
// state machine answered with another operation's) is logged and is
// ErrWrongResult.
func proposeOp[T any](ctx context.Context, s *Server, shard uint64, h *kvpb.RequestHeader, cmd *peerpb.Command, want string, get func(*peerpb.Result) *T) (*T, error) {
	res, err := s.propose(ctx, shard, h, cmd)
	if err != nil {
		return nil, err
	}
	if resp := get(res); resp != nil {
		return resp, nil
	}
	s.log.Error("state machine answered with the result of another operation", "shard", shard, "want", want, "got", fmt.Sprintf("%T", res.GetOp()))
	return nil, fmt.Errorf("%w: want a %s result, got %T", ErrWrongResult, want, res.GetOp())
}

// read runs fn against shard's local state: after a ReadIndex round for
// linearizable reads (leader only), directly for serializable ones.
func (s *Server) read(ctx context.Context, shard uint64, c kvpb.Consistency, fn func(*storage.Reader) error) error {
	n := s.host.Node(shard)
	if n == nil {
		return ErrNoReplica
	}
	if c == kvpb.Consistency_LINEARIZABLE {
		if !n.IsLeader() {
			return &raftnode.NotLeaderError{Shard: shard, Leader: n.Leader()}
		}
		ctx, cancel := s.withTimeout(ctx)
		defer cancel()
		if err := n.ReadIndex(ctx); err != nil {
			return err
		}
	} else if n.Applied() == 0 {
		// A replica just added to a running shard holds nothing until the
		// leader's snapshot arrives: send the reader to the leader rather
		// than answer "not found" for every key.
		return &raftnode.NotLeaderError{Shard: shard, Leader: n.Leader()}
	}
	if err := s.corruptErr(shard); err != nil {
		return err
	}
	sh, err := s.engine.OpenShard(shard)
	if err != nil {
		return err
	}
	return s.noteCorrupt(shard, sh.View(fn))
}

// withTimeout bounds a request that came without a deadline by
// --request-timeout. One that has a deadline keeps its ctx as it is:
// nothing started under it outlives the request, so a derived context
// would only cost its allocation and registration with the parent, which
// showed in the node's CPU profile of linearizable gets (9393794).
func (s *Server) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, s.cfg.RequestTimeout)
}

func (s *Server) header(shard uint64, rev int64) *kvpb.ResponseHeader {
	h := &kvpb.ResponseHeader{Shard: shard, Revision: rev, Epoch: s.epoch(), Node: s.cfg.NodeID}
	if n := s.host.Node(shard); n != nil {
		h.RaftTerm = n.Term()
	}
	return h
}

// route checks the client's map epoch and returns the key's shard.
func (s *Server) route(h *kvpb.RequestHeader, key []byte) (uint64, error) {
	if err := s.checkEpoch(h); err != nil {
		return 0, err
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.mu.ring.Shard(key), nil
}

// checkEpoch refuses a request routed with an older map than ours: the
// client must refresh its map before it can trust its routing.
func (s *Server) checkEpoch(h *kvpb.RequestHeader) error {
	if e := h.GetEpoch(); e != 0 && e < s.epoch() {
		return fmt.Errorf("%w: request used epoch %d, the cluster is at %d; refresh the cluster map", ErrStaleEpoch, e, s.epoch())
	}
	return nil
}

func (s *Server) checkKey(key []byte) error {
	if len(key) == 0 {
		return invalid("empty key")
	}
	if len(key) > s.cfg.Limits.MaxKeyBytes {
		return invalid("key is %d bytes; the limit is %d", len(key), s.cfg.Limits.MaxKeyBytes)
	}
	return nil
}

// checkTxn validates a transaction and returns every key it touches.
func (s *Server) checkTxn(req *kvpb.TxnRequest) ([][]byte, error) {
	nops := len(req.GetCompare()) + len(req.GetSuccess()) + len(req.GetFailure())
	if nops > s.cfg.Limits.MaxTxnOps {
		return nil, invalid("transaction has %d compares and operations; the limit is %d", nops, s.cfg.Limits.MaxTxnOps)
	}
	var touched [][]byte
	for _, c := range req.GetCompare() {
		touched = append(touched, c.GetKey())
	}
	size := 0
	for _, op := range slices.Concat(req.GetSuccess(), req.GetFailure()) {
		switch o := op.GetOp().(type) {
		case *kvpb.RequestOp_Put:
			touched = append(touched, o.Put.GetKey())
			if len(o.Put.GetValue()) > s.cfg.Limits.MaxValueBytes {
				return nil, invalid("value of %s is %d bytes; the limit is %d", keys.Quote(o.Put.GetKey()), len(o.Put.GetValue()), s.cfg.Limits.MaxValueBytes)
			}
			size += len(o.Put.GetValue())
		case *kvpb.RequestOp_Delete:
			touched = append(touched, o.Delete.GetKey())
		case *kvpb.RequestOp_Get:
			touched = append(touched, o.Get.GetKey())
		default:
			return nil, invalid("transaction operation without put, get or delete")
		}
	}
	if len(touched) == 0 {
		return nil, invalid("empty transaction")
	}
	for _, k := range touched {
		if err := s.checkKey(k); err != nil {
			return nil, err
		}
	}
	if size > s.cfg.Limits.MaxRequestBytes {
		return nil, invalid("transaction carries %d bytes; the limit is %d", size, s.cfg.Limits.MaxRequestBytes)
	}
	return touched, nil
}

// sameShard rejects keys spread over several shards: a transaction is
// atomic only within one Raft group.
func (s *Server) sameShard(txnKeys [][]byte) error {
	s.mu.RLock()
	ring := s.mu.ring
	s.mu.RUnlock()
	byShard := map[uint64][]string{}
	var order []uint64
	for _, k := range txnKeys {
		sh := ring.Shard(k)
		if _, ok := byShard[sh]; !ok {
			order = append(order, sh)
		}
		byShard[sh] = append(byShard[sh], keys.Quote(k))
	}
	if len(order) == 1 {
		return nil
	}
	// A few keys per shard tell which go together; all of them could be
	// 128 keys of 4 KiB.
	const shown = 3
	var parts []string
	for _, sh := range order {
		ks := byShard[sh]
		more := ""
		if len(ks) > shown {
			ks, more = ks[:shown], fmt.Sprintf(" and %d more", len(ks)-shown)
		}
		parts = append(parts, fmt.Sprintf("shard %d: [%s]%s", sh, strings.Join(ks, " "), more))
	}
	return invalid("transaction spans %d shards (%s); put related keys in one shard with a hash tag such as {user1}.a and {user1}.b",
		len(order), strings.Join(parts, "; "))
}

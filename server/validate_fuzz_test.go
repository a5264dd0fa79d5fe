package server

import (
	"slices"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/kvpb"
)

// FuzzCheckTxn feeds arbitrary TxnRequests to the transaction validation:
// it must not panic, and what it accepts is what the state machine
// assumes validation caught: at most MaxTxnOps compares and operations,
// every one of a known kind, every key non-empty and within MaxKeyBytes,
// every value within MaxValueBytes.
func FuzzCheckTxn(f *testing.F) {
	f.Add(mustEncode(f, &kvpb.TxnRequest{Success: []*kvpb.RequestOp{put("k")}}))
	f.Add(mustEncode(f, &kvpb.TxnRequest{
		Compare: []*kvpb.Compare{{Key: []byte("k"), Target: kvpb.Compare_VALUE, Value: []byte("v")}},
		Success: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Get{Get: &kvpb.GetRequest{Key: []byte("k")}}}},
		Failure: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Delete{Delete: &kvpb.DeleteRequest{Key: []byte("k"), PrevKv: true}}}},
	}))
	f.Add(mustEncode(f, &kvpb.TxnRequest{Success: []*kvpb.RequestOp{{}}}))
	f.Add([]byte{})
	s := &Server{}
	s.cfg.setDefaults()
	// Small limits, so that the fuzzer reaches them.
	s.cfg.Limits.MaxKeyBytes, s.cfg.Limits.MaxValueBytes, s.cfg.Limits.MaxTxnOps = 8, 16, 6
	f.Fuzz(func(t *testing.T, data []byte) {
		var req kvpb.TxnRequest
		if proto.Unmarshal(data, &req) != nil {
			return
		}
		keys, err := s.checkTxn(&req)
		if err != nil {
			return
		}
		lim := s.cfg.Limits
		if n := len(req.GetCompare()) + len(req.GetSuccess()) + len(req.GetFailure()); n > lim.MaxTxnOps {
			t.Fatalf("accepted %d compares and operations; the limit is %d", n, lim.MaxTxnOps)
		}
		if len(keys) == 0 {
			t.Fatal("accepted a transaction without keys")
		}
		for _, k := range keys {
			if len(k) == 0 || len(k) > lim.MaxKeyBytes {
				t.Fatalf("accepted key %q", k)
			}
		}
		for _, op := range slices.Concat(req.GetSuccess(), req.GetFailure()) {
			switch o := op.GetOp().(type) {
			case *kvpb.RequestOp_Put:
				if len(o.Put.GetValue()) > lim.MaxValueBytes {
					t.Fatalf("accepted a %d-byte value", len(o.Put.GetValue()))
				}
			case *kvpb.RequestOp_Get, *kvpb.RequestOp_Delete:
			default:
				t.Fatalf("accepted an operation of unknown kind %T", o)
			}
		}
	})
}

func mustEncode(tb testing.TB, m proto.Message) []byte {
	tb.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

package fsm

import (
	"bytes"
	"math"
	"math/rand/v2"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
)

// The hand encoders must write exactly what encode writes, or replicas
// running either would hold different bytes and state hashes.
func TestHandEncodersMatchProto(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 20_000 {
		sv := randStored(r)
		check(t, i, "StoredValue", sv, encodeStored(sv))

		ev := &peerpb.HistoryEvent{
			Delete: r.IntN(2) == 0, Key: randBytes(r), CreateRevision: randInt(r), Version: randInt(r),
			TimeUnixMs: randInt(r), ValueSize: randInt(r),
		}
		if r.IntN(3) > 0 {
			ev.Prev = randStored(r)
		}
		check(t, i, "HistoryEvent", ev, encodeEvent(ev))

		st := &peerpb.SessionState{AckBelow: uint64(randInt(r)), LastSeenUnixMs: randInt(r)}
		check(t, i, "SessionState", st, encodeSession(st))

		res := &peerpb.Result{Fingerprint: randBytes(r)}
		switch r.IntN(6) {
		case 0:
			res.Op = &peerpb.Result_Put{Put: &kvpb.PutResponse{}}
		case 1:
			res.Op = &peerpb.Result_Put{Put: &kvpb.PutResponse{Header: &kvpb.ResponseHeader{Revision: randInt(r), Shard: uint64(r.IntN(2))}}}
		case 2:
			res.Op = &peerpb.Result_Put{Put: &kvpb.PutResponse{Header: &kvpb.ResponseHeader{Revision: randInt(r)},
				PrevKv: &kvpb.KeyValue{Key: randBytes(r), Value: randBytes(r)}}}
		case 3:
			res.Op = &peerpb.Result_Delete{Delete: &kvpb.DeleteResponse{Deleted: 1}}
		case 4:
			res.Error, res.Code = "fsm: x", peerpb.ResultCode(r.IntN(3))
		default:
			res.Op = &peerpb.Result_Put{Put: &kvpb.PutResponse{Header: &kvpb.ResponseHeader{Revision: randInt(r)}}}
		}
		check(t, i, "Result", res, encodeResult(res))
	}
}

// A record written by a release that knows more fields keeps them: the
// hand encoders hand such a message to proto.Marshal, which writes its
// unknown fields back.
func TestHandEncodersKeepUnknownFields(t *testing.T) {
	unknown := protowire.AppendTag(nil, 99, protowire.VarintType)
	unknown = protowire.AppendVarint(unknown, 7)
	sv := &peerpb.StoredValue{Value: []byte("v"), Version: 3}
	sv.ProtoReflect().SetUnknown(unknown)
	check(t, 0, "StoredValue with unknown fields", sv, encodeStored(sv))
	check(t, 0, "HistoryEvent whose prev has unknown fields", &peerpb.HistoryEvent{Key: []byte("k"), Prev: sv}, encodeEvent(&peerpb.HistoryEvent{Key: []byte("k"), Prev: sv}))
	if !bytes.Contains(encodeStored(sv), unknown) {
		t.Fatal("encodeStored dropped an unknown field")
	}
}

func check(t *testing.T, i int, what string, m proto.Message, got []byte) {
	t.Helper()
	if want := encode(m); !bytes.Equal(got, want) {
		t.Fatalf("case %d: %s %v:\nhand  %x\nproto %x", i, what, m, got, want)
	}
}

func randStored(r *rand.Rand) *peerpb.StoredValue {
	return &peerpb.StoredValue{Value: randBytes(r), CreateRevision: randInt(r), ModRevision: randInt(r), Version: randInt(r), Lease: randInt(r)}
}

// randInt is often zero (a field left out), often small, sometimes at
// the ends of int64 (negative values take ten bytes).
func randInt(r *rand.Rand) int64 {
	switch r.IntN(6) {
	case 0:
		return 0
	case 1:
		return math.MaxInt64
	case 2:
		return -r.Int64N(1 << 40)
	case 3:
		return math.MinInt64
	default:
		return r.Int64N(1 << (r.IntN(62) + 1))
	}
}

func randBytes(r *rand.Rand) []byte {
	switch r.IntN(4) {
	case 0:
		return nil
	case 1:
		return []byte{}
	default:
		b := make([]byte, r.IntN(300))
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		return b
	}
}

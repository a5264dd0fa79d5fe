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

// decodeCommand must decode every input as proto.Unmarshal does: the
// same command, or an error where it gives one. Encodings of random
// commands, then the same with bytes flipped, cut off, or fields
// repeated or added.
func TestDecodeCommandMatchesProto(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for i := range 20_000 {
		c := &peerpb.Command{Session: uint64(randInt(r)), Seq: uint64(randInt(r)), AckBelow: uint64(randInt(r)), TimeUnixMs: randInt(r)}
		switch r.IntN(5) {
		case 0:
			c.Op = &peerpb.Command_Delete{Delete: &kvpb.DeleteRequest{Key: randBytes(r)}}
		case 1:
		default:
			c.Op = &peerpb.Command_Put{Put: &kvpb.PutRequest{Key: randBytes(r), Value: randBytes(r), PrevKv: r.IntN(2) == 0, Lease: randInt(r)}}
		}
		data := encode(c)
		compareDecoders(t, i, data)
		for range 4 {
			compareDecoders(t, i, mutate(r, data))
		}
	}
}

func compareDecoders(t *testing.T, i int, data []byte) {
	t.Helper()
	var got, want peerpb.Command
	gotErr, wantErr := decodeCommand(data, &got), proto.Unmarshal(data, &want)
	if (gotErr != nil) != (wantErr != nil) || (wantErr == nil && !proto.Equal(&got, &want)) {
		t.Fatalf("case %d: %x:\ndecodeCommand %v, %v\nproto.Unmarshal %v, %v", i, data, &got, gotErr, &want, wantErr)
	}
}

func mutate(r *rand.Rand, data []byte) []byte {
	b := bytes.Clone(data)
	switch r.IntN(4) {
	case 0:
		if len(b) > 0 {
			b[r.IntN(len(b))] ^= byte(1 << r.IntN(8))
		}
	case 1:
		b = b[:r.IntN(len(b)+1)]
	case 2:
		b = append(b, data...) // every field twice
	default:
		b = protowire.AppendTag(b, protowire.Number(r.IntN(20)+1), protowire.Type(r.IntN(6)))
		b = append(b, byte(r.Uint32()), byte(r.Uint32()))
	}
	return b
}

// decodeStored, viewStored and decodeSession, likewise, on records and
// mutations.
func TestDecodeRecordsMatchesProto(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	for i := range 20_000 {
		data := encode(randStored(r))
		for j := range 5 {
			if j > 0 {
				data = mutate(r, data)
			}
			got, gotErr := decodeStored(data)
			var want peerpb.StoredValue
			wantErr := proto.Unmarshal(data, &want)
			if (gotErr != nil) != (wantErr != nil) || (wantErr == nil && !proto.Equal(got, &want)) {
				t.Fatalf("case %d: %x:\ndecodeStored %v, %v\nproto.Unmarshal %v, %v", i, data, got, gotErr, &want, wantErr)
			}
			v, viewErr := viewStored(data)
			if (viewErr != nil) != (wantErr != nil) || (wantErr == nil && (!bytes.Equal(v.value, want.GetValue()) ||
				v.create != want.GetCreateRevision() || v.mod != want.GetModRevision() || v.ver != want.GetVersion() || v.lease != want.GetLease())) {
				t.Fatalf("case %d: %x:\nviewStored %+v, %v\nproto.Unmarshal %v, %v", i, data, v, viewErr, &want, wantErr)
			}
		}
		data = encode(&peerpb.SessionState{AckBelow: uint64(randInt(r)), LastSeenUnixMs: randInt(r)})
		for j := range 5 {
			if j > 0 {
				data = mutate(r, data)
			}
			var got, want peerpb.SessionState
			gotErr, wantErr := decodeSession(data, &got), proto.Unmarshal(data, &want)
			if (gotErr != nil) != (wantErr != nil) || (wantErr == nil && !proto.Equal(&got, &want)) {
				t.Fatalf("case %d: %x:\ndecodeSession %v, %v\nproto.Unmarshal %v, %v", i, data, &got, gotErr, &want, wantErr)
			}
		}
	}
}

// The value decodeStored returns is a copy: callers keep it after the
// stored bytes (bbolt's memory) are gone.
func TestDecodeStoredCopiesTheValue(t *testing.T) {
	data := encode(&peerpb.StoredValue{Value: []byte("value"), Version: 1})
	sv, err := decodeStored(data)
	if err != nil {
		t.Fatal(err)
	}
	clear(data)
	if string(sv.GetValue()) != "value" {
		t.Fatalf("value %q after the record's bytes were cleared", sv.GetValue())
	}
}

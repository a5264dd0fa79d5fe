package storage

import (
	"bytes"
	"math"
	"math/rand/v2"
	"testing"

	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// marshalEntry and entrySize must agree with proto.Marshal and proto.Size
// on every entry: set and unset fields, zero values that are set, empty
// and absent data, an out-of-range type, unknown fields.
func TestEntryEncodingMatchesProto(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	u64 := func() *uint64 {
		switch r.IntN(4) {
		case 0:
			return nil
		case 1:
			return proto.Uint64(0)
		case 2:
			return proto.Uint64(math.MaxUint64)
		default:
			return proto.Uint64(r.Uint64N(1 << (r.IntN(63) + 1)))
		}
	}
	for i := range 20_000 {
		e := &pb.Entry{Term: u64(), Index: u64()}
		switch r.IntN(4) {
		case 0:
		case 1:
			e.Type = pb.EntryType(-1 - r.Int32N(5)).Enum()
		default:
			e.Type = pb.EntryType(r.Int32N(3)).Enum()
		}
		switch r.IntN(3) {
		case 0:
		case 1:
			e.Data = []byte{}
		default:
			e.Data = make([]byte, r.IntN(2000))
			for j := range e.Data {
				e.Data[j] = byte(r.Uint32())
			}
		}
		if r.IntN(20) == 0 {
			unknown := protowire.AppendTag(nil, 9, protowire.VarintType)
			e.ProtoReflect().SetUnknown(protowire.AppendVarint(unknown, r.Uint64()))
		}
		want, err := proto.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		got, err := marshalEntry(e)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("case %d: %v:\nmarshalEntry %x, %v\nproto.Marshal %x", i, e, got, err, want)
		}
		if n := entrySize(e); n != proto.Size(e) {
			t.Fatalf("case %d: %v: entrySize %d, proto.Size %d", i, e, n, proto.Size(e))
		}
	}
}

package storage

import (
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// Every Raft entry is encoded once as it is saved (for the WAL and the
// log) and sized several times (the log cache's bytes, Entries' maxSize).
// These do it by hand, without proto's reflection: the same bytes and
// the same size as proto.Marshal and proto.Size (entry_test.go compares
// them), which an entry with unknown fields is left to.

// entrySize returns proto.Size(e).
func entrySize(e *pb.Entry) int {
	if hasUnknown(e) {
		return proto.Size(e)
	}
	n := 0
	if e.Type != nil {
		n += 1 + protowire.SizeVarint(uint64(*e.Type))
	}
	if e.Term != nil {
		n += 1 + protowire.SizeVarint(*e.Term)
	}
	if e.Index != nil {
		n += 1 + protowire.SizeVarint(*e.Index)
	}
	if e.Data != nil {
		n += 1 + protowire.SizeBytes(len(e.Data))
	}
	return n
}

// marshalEntry returns proto.Marshal(e): fields in number order, each
// one that is set (these are proto2 fields, with presence).
func marshalEntry(e *pb.Entry) ([]byte, error) {
	if hasUnknown(e) {
		return proto.Marshal(e)
	}
	b := make([]byte, 0, entrySize(e))
	if e.Type != nil {
		b = protowire.AppendTag(b, 1, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(*e.Type))
	}
	if e.Term != nil {
		b = protowire.AppendTag(b, 2, protowire.VarintType)
		b = protowire.AppendVarint(b, *e.Term)
	}
	if e.Index != nil {
		b = protowire.AppendTag(b, 3, protowire.VarintType)
		b = protowire.AppendVarint(b, *e.Index)
	}
	if e.Data != nil {
		b = protowire.AppendTag(b, 4, protowire.BytesType)
		b = protowire.AppendBytes(b, e.Data)
	}
	return b, nil
}

func hasUnknown(m proto.Message) bool { return len(m.ProtoReflect().GetUnknown()) > 0 }

package fsm

import (
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/peerpb"
)

// Every put writes the same four records: the key's StoredValue, its
// HistoryEvent, the session's SessionState and the recorded Result. Apply
// encodes them here by hand, which costs a fraction of proto.Marshal's
// reflection-driven size and marshal passes. The bytes must be exactly
// encode's (deterministic proto.Marshal): replicas on either code hash the
// same state (wire_test.go checks it on random messages). A message with
// unknown fields, or a Result of another shape, goes to encode.

// encodeStored encodes sv as encode(sv) does.
func encodeStored(sv *peerpb.StoredValue) []byte {
	if hasUnknown(sv) {
		return encode(sv)
	}
	return appendStored(make([]byte, 0, sizeStored(sv)), sv)
}

func sizeStored(sv *peerpb.StoredValue) int {
	return sizeBytesField(sv.GetValue()) + sizeVarintField(uint64(sv.GetCreateRevision())) +
		sizeVarintField(uint64(sv.GetModRevision())) + sizeVarintField(uint64(sv.GetVersion())) +
		sizeVarintField(uint64(sv.GetLease()))
}

func appendStored(b []byte, sv *peerpb.StoredValue) []byte {
	b = appendBytesField(b, 1, sv.GetValue())
	b = appendVarintField(b, 2, uint64(sv.GetCreateRevision()))
	b = appendVarintField(b, 3, uint64(sv.GetModRevision()))
	b = appendVarintField(b, 4, uint64(sv.GetVersion()))
	return appendVarintField(b, 5, uint64(sv.GetLease()))
}

// encodeEvent encodes ev as encode(ev) does.
func encodeEvent(ev *peerpb.HistoryEvent) []byte {
	prev := ev.GetPrev()
	if hasUnknown(ev) || (prev != nil && hasUnknown(prev)) {
		return encode(ev)
	}
	n := sizeBool(ev.GetDelete()) + sizeBytesField(ev.GetKey()) +
		sizeVarintField(uint64(ev.GetCreateRevision())) + sizeVarintField(uint64(ev.GetVersion())) +
		sizeVarintField(uint64(ev.GetTimeUnixMs())) + sizeVarintField(uint64(ev.GetValueSize()))
	prevSize := 0
	if prev != nil {
		prevSize = sizeStored(prev)
		n += 1 + protowire.SizeBytes(prevSize)
	}
	b := make([]byte, 0, n)
	if ev.GetDelete() {
		b = appendVarintField(b, 1, 1)
	}
	b = appendBytesField(b, 2, ev.GetKey())
	b = appendVarintField(b, 4, uint64(ev.GetCreateRevision()))
	b = appendVarintField(b, 5, uint64(ev.GetVersion()))
	if prev != nil {
		b = protowire.AppendTag(b, 6, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(prevSize))
		b = appendStored(b, prev)
	}
	b = appendVarintField(b, 7, uint64(ev.GetTimeUnixMs()))
	return appendVarintField(b, 8, uint64(ev.GetValueSize()))
}

// encodeSession encodes st as encode(st) does.
func encodeSession(st *peerpb.SessionState) []byte {
	if hasUnknown(st) {
		return encode(st)
	}
	b := make([]byte, 0, sizeVarintField(st.GetAckBelow())+sizeVarintField(uint64(st.GetLastSeenUnixMs())))
	b = appendVarintField(b, 1, st.GetAckBelow())
	return appendVarintField(b, 2, uint64(st.GetLastSeenUnixMs()))
}

// encodeResult encodes res as encode(res) does. By hand it encodes a
// put's result without prev_kv, the one every plain put records; any
// other goes to encode.
func encodeResult(res *peerpb.Result) []byte {
	put := res.GetPut()
	h := put.GetHeader()
	if put == nil || put.GetPrevKv() != nil || res.GetError() != "" || res.GetCode() != 0 ||
		h.GetShard() != 0 || h.GetEpoch() != 0 || h.GetNode() != 0 || h.GetRaftTerm() != 0 ||
		hasUnknown(res) || hasUnknown(put) || (h != nil && hasUnknown(h)) {
		return encode(res)
	}
	hdrSize := sizeVarintField(uint64(h.GetRevision()))
	putSize := 0
	if h != nil {
		putSize = 1 + protowire.SizeBytes(hdrSize)
	}
	// proto.Marshal writes a oneof after the other fields.
	b := make([]byte, 0, sizeBytesField(res.GetFingerprint())+1+protowire.SizeBytes(putSize))
	b = appendBytesField(b, 6, res.GetFingerprint())
	b = protowire.AppendTag(b, 1, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(putSize))
	if h != nil {
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(hdrSize))
		b = appendVarintField(b, 2, uint64(h.GetRevision()))
	}
	return b
}

func hasUnknown(m proto.Message) bool { return len(m.ProtoReflect().GetUnknown()) > 0 }

// proto3 fields without presence: a zero value is not encoded. Every
// field number here is below 16, so a tag is one byte.

func sizeVarintField(v uint64) int {
	if v == 0 {
		return 0
	}
	return 1 + protowire.SizeVarint(v)
}

func sizeBytesField(v []byte) int {
	if len(v) == 0 {
		return 0
	}
	return 1 + protowire.SizeBytes(len(v))
}

func sizeBool(v bool) int {
	if !v {
		return 0
	}
	return 2
}

func appendVarintField(b []byte, num protowire.Number, v uint64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

func appendBytesField(b []byte, num protowire.Number, v []byte) []byte {
	if len(v) == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendBytes(b, v)
}

package fsm

import (
	"bytes"
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
)

// decodeCommand decodes data into c as proto.Unmarshal does. It decodes
// a put, which nearly every entry carries, by hand: one pass, no
// reflection, and the key and value alias data (apply copies what it
// stores, and the entry's data does not change). Anything else (another
// op, a field of another number or wire type, a field given twice, a
// malformed field) goes to proto.Unmarshal, whose answer it then is.
func decodeCommand(data []byte, c *peerpb.Command) error {
	if decodePut(data, c) {
		return nil
	}
	return proto.Unmarshal(data, c)
}

// decodePut decodes a put command into c and reports true, or reports
// false and leaves c alone.
func decodePut(b []byte, c *peerpb.Command) bool {
	var (
		session, seq, ackBelow, millis uint64
		op                             []byte
	)
	ok := fields(b, func(num protowire.Number, typ protowire.Type, v uint64, p []byte) bool {
		switch {
		case num == 3 && typ == protowire.BytesType:
			op = p
		case num == 1 && typ == protowire.VarintType:
			session = v
		case num == 2 && typ == protowire.VarintType:
			seq = v
		case num == 8 && typ == protowire.VarintType:
			ackBelow = v
		case num == 9 && typ == protowire.VarintType:
			millis = v
		default:
			return false
		}
		return true
	})
	if !ok || op == nil {
		return false
	}
	put := &kvpb.PutRequest{}
	ok = fields(op, func(num protowire.Number, typ protowire.Type, v uint64, p []byte) bool {
		switch {
		case num == 2 && typ == protowire.BytesType:
			put.Key = p
		case num == 3 && typ == protowire.BytesType:
			put.Value = p
		case num == 4 && typ == protowire.VarintType:
			put.PrevKv = protowire.DecodeBool(v)
		case num == 5 && typ == protowire.VarintType:
			put.Lease = int64(v)
		default:
			return false
		}
		return true
	})
	if !ok {
		return false
	}
	c.Session, c.Seq, c.AckBelow, c.TimeUnixMs = session, seq, ackBelow, int64(millis)
	c.Op = &peerpb.Command_Put{Put: put}
	return true
}

// parseStored reads an encoded StoredValue by hand, its value aliasing
// b. It reports false for what fields leaves to proto.Unmarshal.
func parseStored(b []byte) (v storedView, ok bool) {
	ok = fields(b, func(num protowire.Number, typ protowire.Type, x uint64, p []byte) bool {
		switch {
		case num == 1 && typ == protowire.BytesType:
			v.value = p
		case num == 2 && typ == protowire.VarintType:
			v.create = int64(x)
		case num == 3 && typ == protowire.VarintType:
			v.mod = int64(x)
		case num == 4 && typ == protowire.VarintType:
			v.ver = int64(x)
		case num == 5 && typ == protowire.VarintType:
			v.lease = int64(x)
		default:
			return false
		}
		return true
	})
	return v, ok
}

// viewStored reads an encoded StoredValue without copying its value, for
// compares and sizes: what proto.Unmarshal would decode, unknown fields
// left out.
func viewStored(b []byte) (storedView, error) {
	if v, ok := parseStored(b); ok {
		return v, nil
	}
	sv, err := unmarshalStored(b)
	if err != nil {
		return storedView{}, err
	}
	return storedView{value: sv.GetValue(), create: sv.GetCreateRevision(), mod: sv.GetModRevision(), ver: sv.GetVersion(), lease: sv.GetLease()}, nil
}

// decodeStored decodes a stored record as proto.Unmarshal does; the value
// is a copy.
func decodeStored(b []byte) (*peerpb.StoredValue, error) {
	if v, ok := parseStored(b); ok {
		return &peerpb.StoredValue{Value: bytes.Clone(v.value), CreateRevision: v.create, ModRevision: v.mod, Version: v.ver, Lease: v.lease}, nil
	}
	return unmarshalStored(b)
}

func unmarshalStored(b []byte) (*peerpb.StoredValue, error) {
	sv := &peerpb.StoredValue{}
	if err := proto.Unmarshal(b, sv); err != nil {
		return nil, fmt.Errorf("%w: stored value: %v", ErrCorrupt, err)
	}
	return sv, nil
}

// decodeSession decodes a session record as proto.Unmarshal does.
func decodeSession(b []byte, st *peerpb.SessionState) error {
	ok := fields(b, func(num protowire.Number, typ protowire.Type, v uint64, _ []byte) bool {
		switch {
		case num == 1 && typ == protowire.VarintType:
			st.AckBelow = v
		case num == 2 && typ == protowire.VarintType:
			st.LastSeenUnixMs = int64(v)
		default:
			return false
		}
		return true
	})
	if ok {
		return nil
	}
	return proto.Unmarshal(b, st)
}

// fields calls fn with each field of the message encoded in b: its number,
// its wire type, and its value (a varint's in v, a length-delimited
// field's bytes in p, nil when empty, as proto.Unmarshal leaves an empty
// bytes field). It reports false as soon as fn does (a field the caller
// does not decode by hand), or for a malformed field, a field number
// above 31 or given twice, and a fixed-width or group field: the caller
// then decodes with proto.Unmarshal, which resets what fn set.
func fields(b []byte, fn func(num protowire.Number, typ protowire.Type, v uint64, p []byte) bool) bool {
	var seen uint32
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 || num >= 32 || seen&(1<<num) != 0 {
			return false
		}
		seen |= 1 << num
		b = b[n:]
		var v uint64
		var p []byte
		switch typ {
		case protowire.VarintType:
			v, n = protowire.ConsumeVarint(b)
		case protowire.BytesType:
			p, n = protowire.ConsumeBytes(b)
			if len(p) == 0 {
				p = nil
			}
		default:
			return false
		}
		if n < 0 || !fn(num, typ, v, p) {
			return false
		}
		b = b[n:]
	}
	return true
}

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

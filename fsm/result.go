package fsm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"github.com/cespare/xxhash/v2"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
)

// Size bounds of what a command returns and of what is kept of it. They are
// constants, not configuration: every replica must reach the same decision.
const (
	// MaxTxnReadBytes bounds a transaction's read payload (keys and values
	// of its Gets and prev_kvs). A larger one is rejected before it changes
	// anything: its response would not fit the 4 MiB a gRPC client
	// receives by default, and every replica would build it in memory. The
	// 64 KiB left below 4 MiB covers the response's framing.
	MaxTxnReadBytes = 4<<20 - 64<<10
	// MaxRecordedReadBytes bounds the read payload kept in a transaction's
	// exactly-once record. Larger read results are dropped from the record
	// (it keeps the revision and the branch taken), so a session cannot
	// make every replica store megabytes per write for the session's TTL.
	MaxRecordedReadBytes = 64 << 10
)

// sentinels maps each ResultCode to the error it stands for, both ways.
var sentinels = []struct {
	code peerpb.ResultCode
	err  error
}{
	{peerpb.ResultCode_RESULT_CODE_MALFORMED, ErrMalformed},
	{peerpb.ResultCode_RESULT_CODE_STALE_SEQ, ErrStaleSeq},
	{peerpb.ResultCode_RESULT_CODE_EPOCH, ErrEpoch},
	{peerpb.ResultCode_RESULT_CODE_NOT_META, ErrNotMeta},
	{peerpb.ResultCode_RESULT_CODE_EMPTY_KEY, ErrEmptyKey},
	{peerpb.ResultCode_RESULT_CODE_UNKNOWN_CMD, ErrUnknownCmd},
	{peerpb.ResultCode_RESULT_CODE_SEQ_REUSED, ErrSeqReused},
	{peerpb.ResultCode_RESULT_CODE_TXN_TOO_LARGE, ErrTxnTooLarge},
	{peerpb.ResultCode_RESULT_CODE_RESULT_NOT_KEPT, ErrResultNotKept},
	{peerpb.ResultCode_RESULT_CODE_MEMBER_CONFLICT, ErrMemberConflict},
	{peerpb.ResultCode_RESULT_CODE_CORRUPT, ErrCorrupt},
	{peerpb.ResultCode_RESULT_CODE_LEASE_NOT_FOUND, ErrLeaseNotFound},
	{peerpb.ResultCode_RESULT_CODE_LEASE_LIMIT, ErrLeaseLimit},
}

// reject builds the Result of a deterministic rejection, with the code of
// the sentinel err wraps (unspecified when none does). The message is made
// valid UTF-8: a proto string that is not fails to encode, and encode
// panics, so a message quoting a client's key with %s must not take the
// node down.
func reject(err error) *peerpb.Result {
	r := &peerpb.Result{Error: strings.ToValidUTF8(err.Error(), "\uFFFD")}
	for _, s := range sentinels {
		if errors.Is(err, s.err) {
			r.Code = s.code
			break
		}
	}
	return r
}

// rejection is a recorded rejection decoded back: its message as recorded,
// matching its sentinel with errors.Is.
type rejection struct {
	msg string
	err error
}

func (r *rejection) Error() string { return r.msg }
func (r *rejection) Unwrap() error { return r.err }

// rejectionOf returns r's rejection, or nil when r is a success.
func rejectionOf(r *peerpb.Result) error {
	if r.GetError() == "" && r.GetCode() == peerpb.ResultCode_RESULT_CODE_UNSPECIFIED {
		return nil
	}
	sentinel := ErrRejected
	for _, s := range sentinels {
		if s.code == r.GetCode() {
			sentinel = s.err
			break
		}
	}
	msg := r.GetError()
	if msg == "" {
		msg = sentinel.Error()
	}
	return &rejection{msg: msg, err: sentinel}
}

// fingerprint identifies a command's request: a 64-bit xxhash of the
// encoded fields of data, the command as proposed, other than session,
// seq, ack_below and the proposer's time, in which a retry may differ. It
// hashes the bytes as they came rather than a re-encoding of the decoded
// op: apply pays for it on every session write on every replica, and a
// retry's op is encoded by the same code from the same request, so it
// arrives as the same bytes. A collision could only make a client's own
// reused seq look like a retry, which is what every record did before it
// had a fingerprint.
func fingerprint(data []byte) []byte {
	var d xxhash.Digest
	d.Reset()
	for len(data) > 0 {
		num, typ, n := protowire.ConsumeTag(data)
		if n < 0 {
			break // Unmarshal accepted data, so this does not happen
		}
		m := protowire.ConsumeFieldValue(num, typ, data[n:])
		if m < 0 {
			break
		}
		switch num {
		case fieldSession, fieldSeq, fieldAckBelow, fieldTime:
		default:
			_, _ = d.Write(data[:n+m])
		}
		data = data[n+m:]
	}
	return binary.BigEndian.AppendUint64(nil, d.Sum64())
}

// The peerpb.Command fields a retry may change (peer.proto).
const (
	fieldSession  = 1
	fieldSeq      = 2
	fieldAckBelow = 8
	fieldTime     = 9
)

// recorded returns the copy of res kept for retries of (session, seq),
// stamped with the request's fingerprint. Read results (a transaction's
// gets and prev_kvs, a put's or delete's prev_kv) above
// MaxRecordedReadBytes are replaced by a RESULT_NOT_KEPT rejection that
// still tells a retry the revision (and a transaction's branch) it got.
func recorded(res *peerpb.Result, fp []byte) []byte {
	if n := resultReadBytes(res); n > MaxRecordedReadBytes {
		rec := reject(fmt.Errorf("%w: %s; its read results (%d bytes) were too large to keep for a retry; read the keys again",
			ErrResultNotKept, appliedAt(res), n))
		rec.Fingerprint = fp
		return encode(rec)
	}
	// res goes on to the proposer: stamp it only for the encoding.
	res.Fingerprint = fp
	b := encodeResult(res)
	res.Fingerprint = nil
	return b
}

// resultReadBytes is the read payload of a result: the keys and values it
// returns from storage.
func resultReadBytes(res *peerpb.Result) int {
	switch {
	case res.GetTxn() != nil:
		return txnReadBytes(res.GetTxn())
	case res.GetPut() != nil:
		return kvBytes(res.GetPut().GetPrevKv())
	case res.GetDelete() != nil:
		return kvBytes(res.GetDelete().GetPrevKv())
	}
	return 0
}

// appliedAt says, for a retry, what a result whose reads were not kept did.
func appliedAt(res *peerpb.Result) string {
	switch {
	case res.GetTxn() != nil:
		return fmt.Sprintf("the transaction was applied at revision %d (succeeded=%t)", res.GetTxn().GetHeader().GetRevision(), res.GetTxn().GetSucceeded())
	case res.GetPut() != nil:
		return fmt.Sprintf("the put was applied at revision %d", res.GetPut().GetHeader().GetRevision())
	default:
		return fmt.Sprintf("the delete was applied at revision %d (deleted %d)", res.GetDelete().GetHeader().GetRevision(), res.GetDelete().GetDeleted())
	}
}

func kvBytes(kv *kvpb.KeyValue) int {
	if kv == nil {
		return 0
	}
	return len(kv.GetKey()) + len(kv.GetValue())
}

// txnReadBytes is the read payload of a transaction's response: the keys
// and values of its Gets and prev_kvs.
func txnReadBytes(t *kvpb.TxnResponse) int {
	n := 0
	for _, r := range t.GetResponses() {
		switch o := r.GetOp().(type) {
		case *kvpb.ResponseOp_Get:
			n += kvBytes(o.Get.GetKv())
		case *kvpb.ResponseOp_Put:
			n += kvBytes(o.Put.GetPrevKv())
		case *kvpb.ResponseOp_Delete:
			n += kvBytes(o.Delete.GetPrevKv())
		}
	}
	return n
}

// checkTxnOps validates the branch a transaction takes and returns the read
// payload it would return, reading only sizes and changing nothing, so
// that a rejection leaves no partial change behind. Earlier operations of
// the branch are accounted for: a Get after a Put of the same key sees the
// put's value. stored holds, by op index, the encoded value each Get of a
// key the branch has not written before it found in storage (nil when it
// found none), so that txn decodes it instead of looking the key up and
// verifying its checksum again.
func checkTxnOps(tx State, ops []*kvpb.RequestOp) (total int, stored [][]byte, err error) {
	// Only ops before the branch's last read can change what a read sees:
	// a branch that reads nothing (Puts and Deletes without prev_kv) keeps
	// no record of its writes.
	lastRead := -1
	for i, op := range ops {
		if opReads(op) {
			lastRead = i
		}
	}
	// pending: the value length of keys the branch wrote so far; -1 for
	// deleted.
	var pending map[string]int
	write := func(i int, key []byte, n int) {
		if i >= lastRead {
			return
		}
		if pending == nil {
			pending = map[string]int{}
		}
		pending[string(key)] = n
	}
	// read adds what reading key returns to total, and returns the
	// encoded value it found in storage, if any.
	read := func(key []byte) ([]byte, error) {
		if n, ok := pending[string(key)]; ok {
			if n >= 0 {
				total += len(key) + n
			}
			return nil, nil
		}
		v := tx.Get(key)
		if v == nil {
			return nil, nil
		}
		sv, err := viewStored(v)
		if err != nil {
			return nil, err
		}
		total += len(key) + len(sv.value)
		return v, nil
	}
	for i, op := range ops {
		switch o := op.GetOp().(type) {
		case *kvpb.RequestOp_Put:
			if len(o.Put.GetKey()) == 0 {
				return 0, nil, ErrEmptyKey
			}
			if o.Put.GetPrevKv() {
				_, err = read(o.Put.GetKey())
			}
			write(i, o.Put.GetKey(), len(o.Put.GetValue()))
		case *kvpb.RequestOp_Delete:
			if len(o.Delete.GetKey()) == 0 {
				return 0, nil, ErrEmptyKey
			}
			if o.Delete.GetPrevKv() {
				_, err = read(o.Delete.GetKey())
			}
			write(i, o.Delete.GetKey(), -1)
		case *kvpb.RequestOp_Get:
			var v []byte
			if v, err = read(o.Get.GetKey()); v != nil {
				if stored == nil {
					stored = make([][]byte, len(ops))
				}
				stored[i] = v
			}
		default:
			return 0, nil, ErrUnknownCmd
		}
		if err != nil {
			return 0, nil, err
		}
	}
	return total, stored, nil
}

// opReads reports whether op returns a stored value: a Get, or a Put or
// Delete with prev_kv.
func opReads(op *kvpb.RequestOp) bool {
	switch o := op.GetOp().(type) {
	case *kvpb.RequestOp_Get:
		return true
	case *kvpb.RequestOp_Put:
		return o.Put.GetPrevKv()
	case *kvpb.RequestOp_Delete:
		return o.Delete.GetPrevKv()
	}
	return false
}

// storedView is an encoded StoredValue read in place: value aliases the
// encoding, so a compare against a 1 MiB value copies nothing.
type storedView struct {
	value                   []byte
	create, mod, ver, lease int64
}

// The revisions and version of a view, 0 for an absent key (nil), as the
// generated getters of an absent StoredValue give.
func (v *storedView) createRev() int64 {
	if v == nil {
		return 0
	}
	return v.create
}

func (v *storedView) modRev() int64 {
	if v == nil {
		return 0
	}
	return v.mod
}

func (v *storedView) version() int64 {
	if v == nil {
		return 0
	}
	return v.ver
}

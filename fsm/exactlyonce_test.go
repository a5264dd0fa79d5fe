package fsm

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
)

func opDel(k string, prev bool) *kvpb.RequestOp {
	return &kvpb.RequestOp{Op: &kvpb.RequestOp_Delete{Delete: &kvpb.DeleteRequest{Key: []byte(k), PrevKv: prev}}}
}

// record reads the stored exactly-once record of (session, seq).
func (sh *shard) record(session, seq uint64) []byte {
	var b []byte
	sh.view(func(r View) {
		b = bytes.Clone(r.GetMeta(resultKey(session, seq)))
	})
	return b
}

// putRecord writes a (session, seq) record directly, as an older version
// would have written it.
func (sh *shard) putRecord(session, seq uint64, res *peerpb.Result) {
	sh.t.Helper()
	sh.update([]byte("record"), func(st State) {
		if err := st.PutMeta(resultKey(session, seq), encode(res)); err != nil {
			sh.t.Fatal(err)
		}
	})
}

func TestSeqReusedForAnotherRequestIsRejected(t *testing.T) {
	sh := newShard(t)
	const session = 5
	first, err := sh.apply(withSession(cmdPut("a", "1"), session, 1, 0, 1))
	if err != nil {
		t.Fatal(err)
	}
	rev := sh.revision()
	for name, c := range map[string]*peerpb.Command{
		"delete":      cmdDel("a"),
		"txn":         cmdTxn(nil, []*kvpb.RequestOp{opPut("a", "2")}, nil),
		"another put": cmdPut("a", "2"),
		"other key":   cmdPut("b", "1"),
	} {
		_, err := sh.apply(withSession(c, session, 1, 0, 2))
		if !errors.Is(err, ErrSeqReused) {
			t.Errorf("%s reusing (session, seq): err %v, want ErrSeqReused", name, err)
		}
		if err != nil && !strings.Contains(err.Error(), "reused for a different request") {
			t.Errorf("%s: message %q does not say the seq was reused", name, err)
		}
	}
	if sh.revision() != rev || string(sh.get("a").GetValue()) != "1" || sh.get("b") != nil {
		t.Fatalf("a rejected reuse changed state: rev %d→%d, a=%v b=%v", rev, sh.revision(), sh.get("a"), sh.get("b"))
	}
	// The real retry, with a later ack_below and time, still gets the
	// first result.
	again, err := sh.apply(withSession(cmdPut("a", "1"), session, 1, 1, 3))
	if err != nil || !proto.Equal(again, first) {
		t.Fatalf("retry: %v, %v; want %v", again, err, first)
	}
	if len(again.GetFingerprint()) != 0 {
		t.Fatal("a retry's answer carries the record's fingerprint")
	}
}

func TestRecordWithoutFingerprintMatchesAnyRetry(t *testing.T) {
	sh := newShard(t)
	old := &peerpb.Result{Op: &peerpb.Result_Put{Put: &kvpb.PutResponse{Header: &kvpb.ResponseHeader{Revision: 7}}}}
	sh.putRecord(9, 1, old)
	got, err := sh.apply(withSession(cmdDel("x"), 9, 1, 0, 1))
	if err != nil || !proto.Equal(got, old) {
		t.Fatalf("retry against a record without fingerprint: %v, %v; want the record %v", got, err, old)
	}
}

func TestRejectionsKeepTheirType(t *testing.T) {
	sh := newShard(t)
	if _, err := sh.apply(withSession(cmdPut("a", "1"), 3, 5, 5, 1)); err != nil {
		t.Fatal(err)
	}
	setMap := func(epoch uint64) *peerpb.Command {
		return &peerpb.Command{Op: &peerpb.Command_SetClusterMap{SetClusterMap: &peerpb.SetClusterMap{Map: &kvpb.ClusterMap{
			Epoch: epoch, Members: []*kvpb.Member{{Id: 1, PeerAddr: "p1"}}}}}}
	}
	if _, err := sh.apply(setMap(1)); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		data []byte
		want error
	}{
		{"garbage", []byte("\xff\xff\xff"), ErrMalformed},
		{"no op", mustMarshal(&peerpb.Command{Seq: 7}), ErrUnknownCmd},
		{"empty key", mustMarshal(cmdPut("", "v")), ErrEmptyKey},
		{"empty key in txn", mustMarshal(cmdTxn(nil, []*kvpb.RequestOp{opPut("", "v")}, nil)), ErrEmptyKey},
		{"stale seq", mustMarshal(withSession(cmdPut("a", "1"), 3, 4, 0, 2)), ErrStaleSeq},
		{"epoch", mustMarshal(setMap(5)), ErrEpoch},
		{"member conflict", mustMarshal(&peerpb.Command{Op: &peerpb.Command_UpdateMember{UpdateMember: &peerpb.UpdateMember{
			Member: &kvpb.Member{Id: 2, PeerAddr: "p1"}, Add: true}}}), ErrMemberConflict},
	} {
		_, err := DecodeResult(sh.applyRaw(tc.data))
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: err %v, want errors.Is %v", tc.name, err, tc.want)
		}
	}
	// A rejection recorded before codes existed is a rejection of no
	// particular kind, with its message.
	_, err := DecodeResult(mustMarshal(&peerpb.Result{Error: "fsm: something old"}))
	if !errors.Is(err, ErrRejected) || err.Error() != "fsm: something old" {
		t.Fatalf("uncoded rejection: %v", err)
	}
}

// A transaction that would return more than MaxTxnReadBytes is rejected
// before any of its changes, counting values its own puts wrote.
func TestTxnReadPayloadIsCapped(t *testing.T) {
	sh := newShard(t)
	big := strings.Repeat("v", 1<<20)
	for _, k := range []string{"a", "b", "c", "d", "e"} {
		if _, err := sh.apply(cmdPut(k, big)); err != nil {
			t.Fatal(err)
		}
	}
	rev := sh.revision()
	reads := []*kvpb.RequestOp{opPut("z", "new"), opGet("a"), opGet("b"), opGet("c"), opGet("d"), opGet("e")}
	_, err := sh.apply(cmdTxn(nil, reads, nil))
	if !errors.Is(err, ErrTxnTooLarge) || !strings.Contains(err.Error(), "read fewer or smaller keys") {
		t.Fatalf("txn of 5 MiB of gets: err %v, want ErrTxnTooLarge", err)
	}
	if sh.revision() != rev || sh.get("z") != nil {
		t.Fatalf("rejected txn changed state: rev %d→%d, z=%v", rev, sh.revision(), sh.get("z"))
	}
	// Overwriting the keys with small values first brings it under.
	small := []*kvpb.RequestOp{opPut("a", "1"), opPut("b", "1"), opGet("a"), opGet("b"), opGet("c"), opGet("d")}
	if _, err := sh.apply(cmdTxn(nil, small, nil)); err != nil {
		t.Fatalf("txn reading its own small puts: %v", err)
	}
	// A put of a large value read back by the same txn counts.
	grow := []*kvpb.RequestOp{opPut("c", big+big), opGet("c"), opGet("d"), opGet("e")}
	if _, err := sh.apply(cmdTxn(nil, grow, nil)); !errors.Is(err, ErrTxnTooLarge) {
		t.Fatalf("txn reading back its own 2 MiB put: err %v, want ErrTxnTooLarge", err)
	}
	// Deleted keys return nothing; the failure branch is the one sized.
	del := []*kvpb.RequestOp{opDel("c", true), opGet("c"), opGet("c"), opGet("c"), opGet("d"), opGet("e")}
	never := []*kvpb.Compare{{Key: []byte("a"), Target: kvpb.Compare_VALUE, Value: []byte("no")}}
	if _, err := sh.apply(cmdTxn(never, reads, del)); err != nil {
		t.Fatalf("failure branch of 3 MiB: %v", err)
	}
}

// A transaction's exactly-once record keeps small read results for a retry
// and drops large ones, answering a retry with ErrResultNotKept.
func TestRecordedTxnReadsStaySmall(t *testing.T) {
	sh := newShard(t)
	big := strings.Repeat("v", 1<<20)
	for _, k := range []string{"a", "b", "c"} {
		if _, err := sh.apply(cmdPut(k, big)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := sh.apply(cmdPut("s", "small")); err != nil {
		t.Fatal(err)
	}
	gets := cmdTxn(nil, []*kvpb.RequestOp{opGet("a"), opGet("b"), opGet("c")}, nil)
	first, err := sh.apply(withSession(proto.CloneOf(gets), 1, 1, 0, 1))
	if err != nil || len(first.GetTxn().GetResponses()) != 3 || len(first.GetTxn().GetResponses()[2].GetGet().GetKv().GetValue()) != 1<<20 {
		t.Fatalf("first attempt: %v", err)
	}
	if n := len(sh.record(1, 1)); n == 0 || n > MaxRecordedReadBytes {
		t.Fatalf("record of a 3 MiB read is %d bytes; want at most %d", n, MaxRecordedReadBytes)
	}
	_, err = sh.apply(withSession(proto.CloneOf(gets), 1, 1, 0, 2))
	if !errors.Is(err, ErrResultNotKept) || !strings.Contains(err.Error(), "applied at revision 4 (succeeded=true)") {
		t.Fatalf("retry of a large read: err %v, want ErrResultNotKept naming revision 4", err)
	}
	// A small read is kept whole and the retry gets it.
	smallTxn := cmdTxn(nil, []*kvpb.RequestOp{opPut("t", "1"), opGet("s")}, nil)
	first, err = sh.apply(withSession(proto.CloneOf(smallTxn), 1, 2, 0, 3))
	if err != nil {
		t.Fatal(err)
	}
	again, err := sh.apply(withSession(proto.CloneOf(smallTxn), 1, 2, 0, 4))
	if err != nil || !proto.Equal(first, again) {
		t.Fatalf("retry of a small txn: %v, %v; want %v", again, err, first)
	}
}

// A put's or delete's exactly-once record keeps a small prev_kv for a
// retry and drops a large one, answering a retry with ErrResultNotKept.
func TestRecordedPrevKvStaysSmall(t *testing.T) {
	sh := newShard(t)
	big := strings.Repeat("v", 1<<20)
	if _, err := sh.apply(cmdPut("a", big)); err != nil {
		t.Fatal(err)
	}
	over := withSession(cmdPut("a", "small"), 1, 1, 0, 1) // prev_kv: the 1 MiB value
	first, err := sh.apply(proto.CloneOf(over))
	if err != nil || len(first.GetPut().GetPrevKv().GetValue()) != 1<<20 {
		t.Fatalf("first attempt: %v", err)
	}
	if n := len(sh.record(1, 1)); n == 0 || n > MaxRecordedReadBytes {
		t.Fatalf("record of a put with a 1 MiB prev_kv is %d bytes; want at most %d", n, MaxRecordedReadBytes)
	}
	if _, err := sh.apply(proto.CloneOf(over)); !errors.Is(err, ErrResultNotKept) || !strings.Contains(err.Error(), "put was applied at revision 2") {
		t.Fatalf("retry of a put with a large prev_kv: %v, want ErrResultNotKept naming revision 2", err)
	}
	// A small prev_kv is kept whole.
	small := withSession(cmdPut("a", "again"), 1, 2, 0, 2)
	first, err = sh.apply(proto.CloneOf(small))
	if err != nil {
		t.Fatal(err)
	}
	if again, err := sh.apply(proto.CloneOf(small)); err != nil || !proto.Equal(first, again) {
		t.Fatalf("retry of a put with a small prev_kv: %v, %v; want %v", again, err, first)
	}
	// A delete's large prev_kv likewise.
	if _, err := sh.apply(cmdPut("d", big)); err != nil {
		t.Fatal(err)
	}
	del := withSession(&peerpb.Command{Op: &peerpb.Command_Delete{Delete: &kvpb.DeleteRequest{Key: []byte("d"), PrevKv: true}}}, 1, 3, 0, 3)
	if _, err := sh.apply(proto.CloneOf(del)); err != nil {
		t.Fatal(err)
	}
	if n := len(sh.record(1, 3)); n == 0 || n > MaxRecordedReadBytes {
		t.Fatalf("record of a delete with a 1 MiB prev_kv is %d bytes", n)
	}
	if _, err := sh.apply(proto.CloneOf(del)); !errors.Is(err, ErrResultNotKept) || !strings.Contains(err.Error(), "delete was applied at revision 5 (deleted 1)") {
		t.Fatalf("retry of a delete with a large prev_kv: %v, want ErrResultNotKept naming revision 5", err)
	}
}

// A rejection whose message is not valid UTF-8 still encodes.
func TestRejectionMessageIsValidUTF8(t *testing.T) {
	r := reject(fmt.Errorf("%w: key %s", ErrEmptyKey, "\xff\xfe"))
	if _, err := DecodeResult(encode(r)); !errors.Is(err, ErrEmptyKey) {
		t.Fatalf("decoded %v, want ErrEmptyKey", err)
	}
}

// A transaction's Gets see the stored value, or what an earlier op of the
// same branch wrote to the key.
func TestTxnGetsSeeEarlierOps(t *testing.T) {
	sh := newShard(t)
	for _, k := range []string{"a", "b"} {
		if _, err := sh.apply(cmdPut(k, "old")); err != nil {
			t.Fatal(err)
		}
	}
	ops := []*kvpb.RequestOp{opGet("a"), opGet("b"), opPut("a", "new"), opGet("a"), opDel("b", false), opGet("b"), opGet("c"), opPut("c", "c1"), opGet("c")}
	r, err := sh.apply(cmdTxn(nil, ops, nil))
	if err != nil {
		t.Fatal(err)
	}
	got := []string{}
	for _, o := range r.GetTxn().GetResponses() {
		if g := o.GetGet(); g != nil {
			if g.GetKv() == nil {
				got = append(got, "-")
			} else {
				got = append(got, string(g.GetKv().GetKey())+"="+string(g.GetKv().GetValue()))
			}
		}
	}
	if want := "a=old b=old a=new - - c=c1"; strings.Join(got, " ") != want {
		t.Fatalf("gets = %q, want %q", strings.Join(got, " "), want)
	}
}

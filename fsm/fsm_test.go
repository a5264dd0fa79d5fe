package fsm

import (
	"bytes"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/fsm/memstate"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/storage"
)

// shard is one shard's state that commands are applied to, as the Raft
// node would, one committed entry at a time: in memory (memstate), or in a
// real storage shard, one Save per entry.
type shard struct {
	t     testing.TB
	s     *storage.Shard  // nil when in memory
	mem   *memstate.State // nil on storage
	index uint64
}

// newShard is a shard in memory: the state machine's own tests need no
// storage engine.
func newShard(t testing.TB) *shard {
	return &shard{t: t, mem: memstate.New()}
}

// newStoredShard is a shard of a real storage engine.
func newStoredShard(t testing.TB) *shard {
	t.Helper()
	return newShardOn(t, openEngine(t), 1)
}

func openEngine(tb testing.TB) *storage.Engine {
	tb.Helper()
	e, err := storage.Open(filepath.Join(tb.TempDir(), "kvd.db"), storage.Options{NoSync: true})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { e.Close() })
	return e
}

// newShardOn creates shard id in e.
func newShardOn(t testing.TB, e *storage.Engine, id uint64) *shard {
	t.Helper()
	s, err := e.CreateShard(id, &pb.ConfState{Voters: []uint64{1}})
	if err != nil {
		t.Fatal(err)
	}
	idx, _ := s.Applied()
	return &shard{t: t, s: s, index: idx}
}

// update runs fn as the next committed entry, data.
func (sh *shard) update(data []byte, fn func(State)) {
	sh.t.Helper()
	sh.index++
	if sh.mem != nil {
		sh.mem.Index = sh.index
		fn(sh.mem)
		return
	}
	e := &pb.Entry{Index: proto.Uint64(sh.index), Term: proto.Uint64(1), Data: data}
	err := sh.s.Save(&storage.Update{
		Entries:   []*pb.Entry{e},
		Committed: []*pb.Entry{e},
		Apply:     func(tx *storage.Txn, _ *pb.Entry) { fn(tx) },
	})
	if err != nil {
		sh.t.Fatal(err)
	}
}

// view runs fn with a read-only view of the shard's state.
func (sh *shard) view(fn func(View)) {
	sh.t.Helper()
	if sh.mem != nil {
		fn(sh.mem)
		return
	}
	if err := sh.s.View(func(r *storage.Reader) error { fn(r); return nil }); err != nil {
		sh.t.Fatal(err)
	}
}

func (sh *shard) applyRaw(data []byte) []byte {
	sh.t.Helper()
	var res []byte
	sh.update(data, func(st State) { res = encode(apply(st, data)) })
	return res
}

func (sh *shard) apply(c *peerpb.Command) (*peerpb.Result, error) {
	sh.t.Helper()
	b, err := proto.Marshal(c)
	if err != nil {
		sh.t.Fatal(err)
	}
	return DecodeResult(sh.applyRaw(b))
}

func (sh *shard) get(key string) *kvpb.KeyValue {
	sh.t.Helper()
	var kv *kvpb.KeyValue
	var err error
	sh.view(func(r View) { kv, err = Get(r, []byte(key)) })
	if err != nil {
		sh.t.Fatal(err)
	}
	return kv
}

func (sh *shard) revision() int64 {
	var rev int64
	sh.view(func(r View) { rev = Revision(r) })
	return rev
}

func cmdPut(k, v string) *peerpb.Command {
	return &peerpb.Command{Op: &peerpb.Command_Put{Put: &kvpb.PutRequest{Key: []byte(k), Value: []byte(v), PrevKv: true}}}
}

func cmdDel(k string) *peerpb.Command {
	return &peerpb.Command{Op: &peerpb.Command_Delete{Delete: &kvpb.DeleteRequest{Key: []byte(k)}}}
}

func withSession(c *peerpb.Command, session, seq, ack uint64, now int64) *peerpb.Command {
	c.Session, c.Seq, c.AckBelow, c.TimeUnixMs = session, seq, ack, now
	return c
}

func TestRevisionsAndVersions(t *testing.T) {
	sh := newShard(t)
	r, err := sh.apply(cmdPut("a", "1"))
	if err != nil {
		t.Fatal(err)
	}
	if r.GetPut().GetHeader().GetRevision() != 1 || r.GetPut().GetPrevKv() != nil {
		t.Fatalf("first put: %v", r)
	}
	sh.apply(cmdPut("b", "1"))
	r, _ = sh.apply(cmdPut("a", "2"))
	if r.GetPut().GetPrevKv().GetVersion() != 1 || string(r.GetPut().GetPrevKv().GetValue()) != "1" {
		t.Fatalf("prev kv of second put: %v", r.GetPut().GetPrevKv())
	}
	kv := sh.get("a")
	if kv.GetCreateRevision() != 1 || kv.GetModRevision() != 3 || kv.GetVersion() != 2 || string(kv.GetValue()) != "2" {
		t.Fatalf("a = %v, want create 1 mod 3 version 2", kv)
	}
	// Deleting a missing key changes nothing, not even the revision.
	r, _ = sh.apply(cmdDel("missing"))
	if r.GetDelete().GetDeleted() != 0 || sh.revision() != 3 {
		t.Fatalf("delete missing: %v, rev %d", r, sh.revision())
	}
	sh.apply(cmdDel("a"))
	if sh.get("a") != nil || sh.revision() != 4 {
		t.Fatalf("after delete: %v rev %d", sh.get("a"), sh.revision())
	}
	// Recreated: version restarts at 1, create revision is new.
	sh.apply(cmdPut("a", "3"))
	if kv := sh.get("a"); kv.GetVersion() != 1 || kv.GetCreateRevision() != 5 {
		t.Fatalf("recreated a = %v", kv)
	}
}

func cmdTxn(cmp []*kvpb.Compare, then, els []*kvpb.RequestOp) *peerpb.Command {
	return &peerpb.Command{Op: &peerpb.Command_Txn{Txn: &kvpb.TxnRequest{Compare: cmp, Success: then, Failure: els}}}
}

func opPut(k, v string) *kvpb.RequestOp {
	return &kvpb.RequestOp{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: []byte(k), Value: []byte(v)}}}
}

func opGet(k string) *kvpb.RequestOp {
	return &kvpb.RequestOp{Op: &kvpb.RequestOp_Get{Get: &kvpb.GetRequest{Key: []byte(k)}}}
}

func TestTxnCompares(t *testing.T) {
	sh := newShard(t)
	sh.apply(cmdPut("k", "v1"))
	for _, tc := range []struct {
		name string
		cmp  *kvpb.Compare
		want bool
	}{
		{"value equal", &kvpb.Compare{Key: []byte("k"), Target: kvpb.Compare_VALUE, Value: []byte("v1")}, true},
		{"value not equal", &kvpb.Compare{Key: []byte("k"), Target: kvpb.Compare_VALUE, Result: kvpb.Compare_NOT_EQUAL, Value: []byte("v1")}, false},
		{"value greater", &kvpb.Compare{Key: []byte("k"), Target: kvpb.Compare_VALUE, Result: kvpb.Compare_GREATER, Value: []byte("v0")}, true},
		{"value of missing key", &kvpb.Compare{Key: []byte("nope"), Target: kvpb.Compare_VALUE, Value: []byte("")}, false},
		{"version equal", &kvpb.Compare{Key: []byte("k"), Target: kvpb.Compare_VERSION, Version: 1}, true},
		{"version less", &kvpb.Compare{Key: []byte("k"), Target: kvpb.Compare_VERSION, Result: kvpb.Compare_LESS, Version: 1}, false},
		{"mod revision", &kvpb.Compare{Key: []byte("k"), Target: kvpb.Compare_MOD, ModRevision: 1}, true},
		{"create revision", &kvpb.Compare{Key: []byte("k"), Target: kvpb.Compare_CREATE, CreateRevision: 1}, true},
		{"missing key version 0", &kvpb.Compare{Key: []byte("nope"), Target: kvpb.Compare_VERSION, Version: 0}, true},
		{"exists", &kvpb.Compare{Key: []byte("k"), Target: kvpb.Compare_EXISTS, Exists: true}, true},
		{"not exists", &kvpb.Compare{Key: []byte("nope"), Target: kvpb.Compare_EXISTS, Exists: false}, true},
		{"exists on missing", &kvpb.Compare{Key: []byte("nope"), Target: kvpb.Compare_EXISTS, Exists: true}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := sh.apply(cmdTxn([]*kvpb.Compare{tc.cmp}, []*kvpb.RequestOp{opGet("k")}, nil))
			if err != nil {
				t.Fatal(err)
			}
			if r.GetTxn().GetSucceeded() != tc.want {
				t.Fatalf("succeeded = %v, want %v", r.GetTxn().GetSucceeded(), tc.want)
			}
		})
	}
}

func TestTxnBranchesShareOneRevision(t *testing.T) {
	sh := newShard(t)
	sh.apply(cmdPut("x", "0"))
	cas := func(old, new string) bool {
		r, err := sh.apply(cmdTxn(
			[]*kvpb.Compare{{Key: []byte("x"), Target: kvpb.Compare_VALUE, Value: []byte(old)}},
			[]*kvpb.RequestOp{opPut("x", new), opPut("y", new)},
			[]*kvpb.RequestOp{opGet("x")},
		))
		if err != nil {
			t.Fatal(err)
		}
		return r.GetTxn().GetSucceeded()
	}
	if !cas("0", "1") {
		t.Fatal("cas 0→1 failed")
	}
	if sh.get("x").GetModRevision() != 2 || sh.get("y").GetModRevision() != 2 {
		t.Fatalf("txn puts should share revision 2: x %v y %v", sh.get("x"), sh.get("y"))
	}
	if cas("0", "2") {
		t.Fatal("cas with a stale compare succeeded")
	}
	if sh.revision() != 2 {
		t.Fatalf("a failed read-only txn moved the revision to %d", sh.revision())
	}
}

func TestRetriedWriteReturnsFirstResultAndChangesNothing(t *testing.T) {
	sh := newShard(t)
	const session = 42
	first, err := sh.apply(withSession(cmdPut("c", "1"), session, 1, 1, 1000))
	if err != nil {
		t.Fatal(err)
	}
	sh.apply(withSession(cmdPut("c", "2"), session, 2, 1, 1001))
	rev := sh.revision()
	// The retry of seq 1 (its first attempt did commit) gets the first
	// result back and must not overwrite "2".
	again, err := sh.apply(withSession(cmdPut("c", "1"), session, 1, 1, 1002))
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(first, again) {
		t.Fatalf("retry result %v, want the recorded %v", again, first)
	}
	if string(sh.get("c").GetValue()) != "2" || sh.revision() != rev {
		t.Fatalf("retry changed state: c=%q rev %d→%d", sh.get("c").GetValue(), rev, sh.revision())
	}
	// Out-of-order seqs from concurrent writes of one session both apply.
	sh.apply(withSession(cmdPut("d", "4"), session, 4, 1, 1003))
	sh.apply(withSession(cmdPut("e", "3"), session, 3, 1, 1004))
	if sh.get("d") == nil || sh.get("e") == nil {
		t.Fatal("concurrent seqs of one session were not both applied")
	}
	// ack_below drops old records; a retry below it is refused, not
	// reapplied.
	sh.apply(withSession(cmdPut("f", "5"), session, 5, 5, 1005))
	_, err = sh.apply(withSession(cmdPut("c", "1"), session, 1, 5, 1006))
	if err == nil || err.Error() != ErrStaleSeq.Error() {
		t.Fatalf("retry below ack_below: err %v, want %v", err, ErrStaleSeq)
	}
	var records int
	sh.view(func(r View) {
		for seq := uint64(1); seq < 5; seq++ {
			if r.GetMeta(resultKey(session, seq)) != nil {
				records++
			}
		}
	})
	if records != 0 {
		t.Fatalf("%d results below ack_below were kept", records)
	}
}

func TestExpireSessionsIsDeterministic(t *testing.T) {
	sh := newShard(t)
	sh.apply(withSession(cmdPut("a", "1"), 1, 1, 1, 1_000))
	sh.apply(withSession(cmdPut("b", "1"), 2, 1, 1, 9_000))
	sh.apply(&peerpb.Command{Op: &peerpb.Command_ExpireSessions{ExpireSessions: &peerpb.ExpireSessions{NowUnixMs: 10_000, IdleMs: 5_000}}})
	sh.view(func(r View) {
		if r.GetMeta(sessionKey(1)) != nil || r.GetMeta(resultKey(1, 1)) != nil {
			t.Error("session 1 (idle 9 s > 5 s) was not expired")
		}
		if r.GetMeta(sessionKey(2)) == nil || r.GetMeta(resultKey(2, 1)) == nil {
			t.Error("session 2 (idle 1 s) was expired")
		}
	})
}

// ExpiryCutoff picks a cutoff before which about max idle sessions lie,
// oldest first, and says when it lowered it; the commands it bounds
// expire every idle session in turn, and no other.
func TestExpiryCutoffBoundsEachExpiry(t *testing.T) {
	sh := newShard(t)
	const max, idle = 100, 105
	for s := uint64(1); s <= idle; s++ {
		sh.apply(withSession(cmdPut("k", "v"), s, 1, 1, int64(s))) // last seen at s ms
	}
	sh.apply(withSession(cmdPut("k", "v"), idle+1, 1, 1, 9_000)) // not idle
	const cutoff = 5_000
	var c int64
	var more bool
	sh.view(func(r View) { c, more = ExpiryCutoff(r, cutoff, max) })
	if c != max+1 || !more {
		t.Fatalf("ExpiryCutoff = %d, %v; want %d (sessions seen before it: %d), true", c, more, max+1, max)
	}
	expire := func(c int64) {
		sh.apply(&peerpb.Command{Op: &peerpb.Command_ExpireSessions{ExpireSessions: &peerpb.ExpireSessions{NowUnixMs: c + 1_000, IdleMs: 1_000}}})
	}
	expire(c)
	sh.view(func(r View) {
		for s := uint64(1); s <= idle; s++ {
			if gone := r.GetMeta(sessionKey(s)) == nil; gone != (s <= max) {
				t.Errorf("session %d (last seen %d ms): expired %v, want %v", s, s, gone, s <= max)
			}
		}
		c, more = ExpiryCutoff(r, cutoff, max)
	})
	if c != cutoff || more {
		t.Fatalf("ExpiryCutoff with %d idle left = %d, %v; want %d, false", idle-max, c, more, cutoff)
	}
	expire(c)
	sh.view(func(r View) {
		for s := uint64(1); s <= idle; s++ {
			if r.GetMeta(sessionKey(s)) != nil {
				t.Errorf("idle session %d kept", s)
			}
		}
		if r.GetMeta(sessionKey(idle+1)) == nil {
			t.Error("the session that was not idle was expired")
		}
	})

	// Sessions all seen in one millisecond go together.
	same := newShard(t)
	for s := uint64(1); s <= max+5; s++ {
		same.apply(withSession(cmdPut("k", "v"), s, 1, 1, 42))
	}
	same.view(func(r View) { c, more = ExpiryCutoff(r, cutoff, max) })
	if c != 43 || !more {
		t.Fatalf("ExpiryCutoff of %d sessions seen at 42 ms = %d, %v; want 43, true", max+5, c, more)
	}
}

func TestClusterMapEpochs(t *testing.T) {
	sh := newShard(t)
	set := func(epoch uint64) error {
		_, err := sh.apply(&peerpb.Command{Op: &peerpb.Command_SetClusterMap{SetClusterMap: &peerpb.SetClusterMap{Map: &kvpb.ClusterMap{
			Epoch: epoch, Members: []*kvpb.Member{{Id: 1, PeerAddr: "p1"}},
		}}}})
		return err
	}
	if err := set(1); err != nil {
		t.Fatal(err)
	}
	if err := set(1); err == nil {
		t.Fatal("setting the same epoch again succeeded")
	}
	update := func(client string) error {
		_, err := sh.apply(&peerpb.Command{Op: &peerpb.Command_UpdateMember{UpdateMember: &peerpb.UpdateMember{Member: &kvpb.Member{Id: 1, PeerAddr: "p1", ClientAddr: client}}}})
		return err
	}
	epoch := func() uint64 {
		var m *kvpb.ClusterMap
		sh.view(func(r View) { m, _ = ClusterMap(r) })
		return m.GetEpoch()
	}
	if err := update("c1"); err != nil || epoch() != 2 {
		t.Fatalf("update member: %v, epoch %d", err, epoch())
	}
	if err := update("c1"); err != nil || epoch() != 2 {
		t.Fatalf("unchanged update moved the epoch to %d (%v)", epoch(), err)
	}
	if _, err := sh.apply(&peerpb.Command{Op: &peerpb.Command_UpdateMember{UpdateMember: &peerpb.UpdateMember{Member: &kvpb.Member{Id: 9}}}}); err == nil {
		t.Fatal("updating an unknown member succeeded")
	}
}

func TestAddMember(t *testing.T) {
	sh := newShard(t)
	if _, err := sh.apply(&peerpb.Command{Op: &peerpb.Command_SetClusterMap{SetClusterMap: &peerpb.SetClusterMap{Map: &kvpb.ClusterMap{
		Epoch: 1, Members: []*kvpb.Member{{Id: 1, PeerAddr: "p1"}, {Id: 3, PeerAddr: "p3"}},
	}}}}); err != nil {
		t.Fatal(err)
	}
	add := func(id uint64, peer string) error {
		_, err := sh.apply(&peerpb.Command{Op: &peerpb.Command_UpdateMember{UpdateMember: &peerpb.UpdateMember{
			Member: &kvpb.Member{Id: id, PeerAddr: peer, ClientAddr: "c" + peer}, Add: true}}})
		return err
	}
	cmap := func() *kvpb.ClusterMap {
		var m *kvpb.ClusterMap
		sh.view(func(r View) { m, _ = ClusterMap(r) })
		return m
	}
	if err := add(2, "p2"); err != nil {
		t.Fatal(err)
	}
	m := cmap()
	if m.GetEpoch() != 2 || len(m.GetMembers()) != 3 || m.GetMembers()[1].GetId() != 2 || m.GetMembers()[1].GetClientAddr() != "cp2" {
		t.Fatalf("after adding member 2: %v", m)
	}
	if err := add(2, "p2"); err != nil || cmap().GetEpoch() != 2 {
		t.Fatalf("repeating the add: %v, epoch %d (want no error, epoch 2)", err, cmap().GetEpoch())
	}
	for _, tc := range []struct {
		id   uint64
		peer string
		want string
	}{
		{2, "other", "already exists"},
		{4, "p1", "belongs to member 1"},
		{0, "p9", "needs an id"},
		{5, "", "needs an id"},
	} {
		if err := add(tc.id, tc.peer); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("add(%d, %q) = %v, want an error containing %q", tc.id, tc.peer, err, tc.want)
		}
	}
	if cmap().GetEpoch() != 2 {
		t.Fatalf("a refused add moved the epoch to %d", cmap().GetEpoch())
	}
}

func TestRejectsBadCommands(t *testing.T) {
	sh := newShard(t)
	for name, data := range map[string][]byte{
		"garbage":   []byte("\xff\xff\xff"),
		"no op":     mustMarshal(&peerpb.Command{Seq: 7}),
		"empty key": mustMarshal(cmdPut("", "v")),
	} {
		if _, err := DecodeResult(sh.applyRaw(data)); err == nil {
			t.Errorf("%s: applied without error", name)
		}
	}
	if sh.revision() != 0 {
		t.Fatalf("rejected commands moved the revision to %d", sh.revision())
	}
}

func mustMarshal(m proto.Message) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		panic(err)
	}
	return b
}

// FuzzApply feeds arbitrary bytes to Apply: it must never panic, always
// return a decodable Result, and be deterministic (two fresh shards that
// apply the same input end in the same state).
func FuzzApply(f *testing.F) {
	f.Add(mustMarshal(cmdPut("k", "v")))
	f.Add(mustMarshal(withSession(cmdPut("k", "v"), 1, 1, 0, 5)))
	f.Add(mustMarshal(cmdTxn([]*kvpb.Compare{{Key: []byte("k")}}, []*kvpb.RequestOp{opPut("k", "v")}, nil)))
	f.Add([]byte{})
	f.Add([]byte("\x1a\x00"))
	f.Fuzz(func(t *testing.T, data []byte) {
		a, b := newShard(t), newShard(t)
		ra, rb := a.applyRaw(data), b.applyRaw(data)
		if !bytes.Equal(ra, rb) {
			t.Fatalf("nondeterministic result: %x vs %x", ra, rb)
		}
		var r peerpb.Result
		if err := proto.Unmarshal(ra, &r); err != nil {
			t.Fatalf("undecodable result: %v", err)
		}
	})
}

// FuzzStoredDecoders feeds arbitrary bytes to the decoders of stored
// state (a key's record, the cluster map): they must return an error or a
// value, never panic.
func FuzzStoredDecoders(f *testing.F) {
	f.Add(mustMarshal(&peerpb.StoredValue{Value: []byte("v"), CreateRevision: 1, ModRevision: 2, Version: 2}))
	f.Add(mustMarshal(&kvpb.ClusterMap{Epoch: 3, Members: []*kvpb.Member{{Id: 1}}}))
	f.Add([]byte{0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		sv, err := decodeStored(b)
		if err == nil {
			_ = toKV([]byte("k"), sv)
		}
		// Compares and the size pre-pass of transactions read a value
		// in place; they must agree with the decoder.
		v, verr := viewStored(b)
		if err == nil && (verr != nil || !bytes.Equal(v.value, sv.GetValue()) || v.create != sv.GetCreateRevision() || v.mod != sv.GetModRevision() || v.ver != sv.GetVersion() || v.lease != sv.GetLease()) {
			t.Fatalf("viewStored = %+v, %v; the decoder gives %v", v, verr, sv)
		}
		_, _ = ClusterMapFrom(b)
	})
}

// BenchmarkApplyPut measures the state machine's hot path: decode a put
// command, read the old record, encode and write the new one, record the
// session result, encode the response. Storage commits are excluded: all
// entries apply in one Save.
func BenchmarkApplyPut(b *testing.B) {
	b.Run("overwrite", func(b *testing.B) { benchApplyPut(b, 1000) })
	b.Run("distinct", func(b *testing.B) { benchApplyPut(b, 0) })
	b.Run("distinct-round-each", func(b *testing.B) { benchApplyPutRounds(b) })
}

// benchApplyPutRounds applies b.N puts to distinct keys, one Save (one
// writer round) each, as a node under light load does: the state machine
// and storage pay their per-round costs once per put. NoWait, as raftnode
// saves: a round writes the WAL, and bbolt commits on its own schedule.
func benchApplyPutRounds(b *testing.B) {
	s, ents := benchPuts(b, 0)
	apply := func(tx *storage.Txn, e *pb.Entry) { apply(tx, e.GetData()) }
	b.ResetTimer()
	for i := range ents {
		one := ents[i : i+1]
		if err := s.Save(&storage.Update{Entries: one, Committed: one, Apply: apply, NoWait: true}); err != nil {
			b.Fatal(err)
		}
	}
}

// benchApplyPut applies b.N puts of 256-byte values to keys cycling
// through keys distinct ones (0: every key new).
func benchApplyPut(b *testing.B, keys int) {
	s, ents := benchPuts(b, keys)
	b.ResetTimer()
	if err := s.Save(&storage.Update{Entries: ents, Committed: ents, Apply: func(tx *storage.Txn, e *pb.Entry) { apply(tx, e.GetData()) }}); err != nil {
		b.Fatal(err)
	}
}

// benchPuts opens a shard in a new engine (closed when b ends) and
// builds b.N put entries of 256-byte values on one session, to keys
// cycling through keys distinct ones (0: every key new).
func benchPuts(b *testing.B, keys int) (*storage.Shard, []*pb.Entry) {
	e, err := storage.Open(filepath.Join(b.TempDir(), "kvd.db"), storage.Options{NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { e.Close() })
	s, err := e.CreateShard(1, &pb.ConfState{Voters: []uint64{1}})
	if err != nil {
		b.Fatal(err)
	}
	value := bytes.Repeat([]byte("v"), 256)
	ents := make([]*pb.Entry, b.N)
	for i := range ents {
		c := withSession(&peerpb.Command{Op: &peerpb.Command_Put{Put: &kvpb.PutRequest{Key: []byte(fmt.Sprintf("key%08d", keyIndex(i, keys))), Value: value}}}, 7, uint64(i+1), uint64(i), 1)
		ents[i] = &pb.Entry{Index: proto.Uint64(uint64(i + 2)), Term: proto.Uint64(1), Data: mustMarshal(c)}
	}
	return s, ents
}

func keyIndex(i, keys int) int {
	if keys == 0 {
		return i
	}
	return i % keys
}

// A watermark that moves, by a little or a lot, leaves only the results
// at or above it, and never another session's. (Deleting each seq below it
// key by key instead of scanning measured 2-6% fewer puts: a session's
// seqs spread over every shard, so most of those keys are not there.)
func TestAckBelowDropsResultsNearAndFar(t *testing.T) {
	sh := newShard(t)
	const session, other = 7, 8
	const far = 77
	seqs := []uint64{1, 2, 3, 5, 40, far - 1, far, far + 1}
	for i, seq := range seqs {
		sh.apply(withSession(cmdPut(fmt.Sprint("k", seq), "v"), session, seq, 1, int64(1000+i)))
	}
	sh.apply(withSession(cmdPut("o", "v"), other, 1, 1, 999))
	left := func() (got []uint64) {
		sh.view(func(r View) {
			for _, seq := range seqs {
				if r.GetMeta(resultKey(session, seq)) != nil {
					got = append(got, seq)
				}
			}
			if r.GetMeta(resultKey(other, 1)) == nil {
				t.Error("another session's result was dropped")
			}
		})
		return got
	}
	// Near: ack_below 1 → 3 drops seqs 1 and 2.
	sh.apply(withSession(cmdPut("n", "v"), session, far+2, 3, 2000))
	if got, want := left(), []uint64{3, 5, 40, far - 1, far, far + 1}; !slices.Equal(got, want) {
		t.Fatalf("after ack 3: results %v, want %v", got, want)
	}
	// Far: 3 → far drops 3, 5, 40 and far-1, gaps included.
	sh.apply(withSession(cmdPut("m", "v"), session, far+3, far, 2001))
	if got, want := left(), []uint64{far, far + 1}; !slices.Equal(got, want) {
		t.Fatalf("after ack %d: results %v, want %v", uint64(far), got, want)
	}
}

// BenchmarkTxnComparesOfLargeValue: a transaction of 128 value compares
// against a 1 MiB value. Compares read the stored value in place, so
// its bytes are not copied once per compare.
func BenchmarkTxnComparesOfLargeValue(b *testing.B) {
	sh := newShard(b)
	big := strings.Repeat("v", 1<<20)
	if _, err := sh.apply(cmdPut("a", big)); err != nil {
		b.Fatal(err)
	}
	cmps := make([]*kvpb.Compare, 128)
	for i := range cmps {
		cmps[i] = &kvpb.Compare{Key: []byte("a"), Target: kvpb.Compare_VALUE, Result: kvpb.Compare_NOT_EQUAL, Value: []byte("x")}
	}
	c := cmdTxn(cmps, nil, nil)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if _, err := sh.apply(proto.CloneOf(c)); err != nil {
			b.Fatal(err)
		}
	}
}

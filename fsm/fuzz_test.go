package fsm

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/storage"
)

// fuzzInput turns fuzz bytes into requests; it reads zeros once they run out.
type fuzzInput struct{ b []byte }

func (in *fuzzInput) next() byte {
	if len(in.b) == 0 {
		return 0
	}
	c := in.b[0]
	in.b = in.b[1:]
	return c
}

var (
	fuzzKeys   = []string{"a", "b", "c", "{x}d", ""}
	fuzzSizes  = []int{0, 3, 70 << 10, 1 << 20}
	fuzzValues = bytes.Repeat([]byte("0123456789abcdef"), (1<<20)/16)
)

func (in *fuzzInput) key() []byte { return []byte(fuzzKeys[int(in.next())%len(fuzzKeys)]) }

func (in *fuzzInput) value() []byte {
	b := in.next()
	n := fuzzSizes[int(b)%len(fuzzSizes)]
	v := bytes.Clone(fuzzValues[:n])
	if n > 0 {
		v[0] = b // values of one size differ too
	}
	return v
}

func (in *fuzzInput) put() *kvpb.PutRequest {
	return &kvpb.PutRequest{Key: in.key(), Value: in.value(), PrevKv: in.next()&1 == 1}
}

func (in *fuzzInput) del() *kvpb.DeleteRequest {
	return &kvpb.DeleteRequest{Key: in.key(), PrevKv: in.next()&1 == 1}
}

func (in *fuzzInput) ops(max int) []*kvpb.RequestOp {
	ops := make([]*kvpb.RequestOp, int(in.next())%(max+1))
	for i := range ops {
		switch in.next() % 3 {
		case 0:
			ops[i] = &kvpb.RequestOp{Op: &kvpb.RequestOp_Put{Put: in.put()}}
		case 1:
			ops[i] = &kvpb.RequestOp{Op: &kvpb.RequestOp_Delete{Delete: in.del()}}
		default:
			ops[i] = &kvpb.RequestOp{Op: &kvpb.RequestOp_Get{Get: &kvpb.GetRequest{Key: in.key()}}}
		}
	}
	return ops
}

func (in *fuzzInput) command() *peerpb.Command {
	c := &peerpb.Command{}
	switch in.next() % 3 {
	case 0:
		c.Op = &peerpb.Command_Put{Put: in.put()}
	case 1:
		c.Op = &peerpb.Command_Delete{Delete: in.del()}
	default:
		t := &kvpb.TxnRequest{}
		for range int(in.next()) % 3 {
			k, target, result, v := in.key(), in.next(), in.next(), in.value()
			t.Compare = append(t.Compare, &kvpb.Compare{
				Key:    k,
				Target: kvpb.Compare_Target(target % 6),
				Result: kvpb.Compare_Result(result % 5),
				Value:  v[:min(3, len(v))],
				Exists: in.next()&1 == 1,
			})
		}
		t.Success, t.Failure = in.ops(8), in.ops(3)
		c.Op = &peerpb.Command_Txn{Txn: t}
	}
	// Sessions 0 (no exactly-once), 7 and 9; a few seqs, so retries and
	// reuses are frequent; ack_below now and then.
	c.Session = []uint64{0, 7, 9}[int(in.next())%3]
	c.Seq = uint64(in.next() % 6)
	if a := in.next(); a&0x80 != 0 {
		c.AckBelow = uint64(a % 6)
	}
	c.TimeUnixMs = int64(in.next())
	return c
}

// fuzzRecord is the model of one (session, seq) record.
type fuzzRecord struct {
	op     []byte // the deterministic encoding of the request's op
	result *peerpb.Result
	err    error
}

// FuzzApplySequences applies sequences of puts, deletes and transactions,
// with sessions, seqs and ack_below values that retry, reuse and drop
// records, through Apply on a real storage shard and on memstate, which must
// answer byte for byte alike, and checks against a model: no panic; every result decodes, with a typed error if any; a
// retry gets the first answer (or ErrResultNotKept for large reads); a
// different request with the same (session, seq) gets ErrSeqReused; a seq
// below ack_below gets ErrStaleSeq; results and records stay bounded.
func FuzzApplySequences(f *testing.F) {
	// Put, then a delete and a txn reusing its (session, seq): this once
	// crashed the server, which took the recorded put for their result.
	f.Add([]byte{0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0, 1, 2, 0, 1, 0, 0, 1, 0, 0, 1, 1, 0, 2})
	// A different put reusing (session, seq).
	f.Add([]byte{0, 1, 1, 0, 1, 1, 0, 0, 0, 1, 2, 0, 1, 1, 0, 0})
	// Large values, then transactions of many gets of them, retried.
	f.Add([]byte{
		0, 0, 3, 0, 0, 0, 0, 0, // put a 1 MiB
		0, 1, 3, 0, 0, 0, 0, 0, // put b 1 MiB
		0, 2, 3, 0, 0, 0, 0, 0, // put c 1 MiB
		0, 3, 7, 0, 0, 0, 0, 0, // put {x}d 1 MiB
		2, 0, 6, 2, 0, 2, 1, 2, 2, 2, 3, 2, 0, 2, 1, 0, 1, 1, 0, 0, // txn: 6 gets, session 7 seq 1
		2, 0, 6, 2, 0, 2, 1, 2, 2, 2, 3, 2, 0, 2, 1, 0, 1, 1, 0, 0, // the same again: a retry
		2, 0, 2, 2, 0, 2, 1, 0, 1, 2, 0, 0, // txn: 2 gets (2 MiB), session 7 seq 2
		2, 0, 2, 2, 0, 2, 1, 0, 1, 2, 0, 0, // retry: the reads were not kept
	})
	// Opening an engine costs far more than an input's commands: inputs
	// get fresh shards of one engine, replaced every 64 inputs so that a
	// long run does not grow one file without bound.
	engines := &fuzzEngines{dir: f.TempDir()}
	f.Cleanup(engines.close)
	f.Fuzz(func(t *testing.T, data []byte) {
		sh, mem := engines.shard(t), newShard(t)
		in := &fuzzInput{b: data}
		records := map[[2]uint64]*fuzzRecord{}
		ackBelow := map[uint64]uint64{}
		for step := 0; step < 24 && len(in.b) > 0; step++ {
			c := in.command()
			op := encode(&peerpb.Command{Op: c.GetOp()})
			b, err := proto.Marshal(c)
			if err != nil {
				t.Fatal(err)
			}
			raw := sh.applyRaw(b)
			// The state machine in memory must answer what it answers on
			// storage, byte for byte, or its tests would prove nothing.
			if m := mem.applyRaw(b); !bytes.Equal(raw, m) {
				t.Fatalf("step %d: storage answered %x, memory %x", step, raw, m)
			}
			got, err := DecodeResult(raw)
			if err != nil && errors.Is(err, ErrRejected) {
				t.Fatalf("step %d: rejection without a code: %v", step, err)
			}
			if txn := got.GetTxn(); txn != nil && txnReadBytes(txn) > MaxTxnReadBytes {
				t.Fatalf("step %d: txn returned %d bytes of reads, over %d", step, txnReadBytes(txn), MaxTxnReadBytes)
			}
			if c.GetSession() == 0 {
				continue
			}
			key := [2]uint64{c.GetSession(), c.GetSeq()}
			rec := records[key]
			switch {
			case c.GetSeq() < ackBelow[c.GetSession()]:
				if !errors.Is(err, ErrStaleSeq) {
					t.Fatalf("step %d: seq %d below ack_below %d: err %v, want ErrStaleSeq", step, c.GetSeq(), ackBelow[c.GetSession()], err)
				}
				continue
			case rec != nil && !bytes.Equal(rec.op, op):
				if !errors.Is(err, ErrSeqReused) {
					t.Fatalf("step %d: reuse of %v by another request: %v, %v; want ErrSeqReused", step, key, got, err)
				}
				continue
			case rec != nil:
				if resultReadBytes(rec.result) > MaxRecordedReadBytes {
					if !errors.Is(err, ErrResultNotKept) {
						t.Fatalf("step %d: retry of a large read: %v, %v; want ErrResultNotKept", step, got, err)
					}
					continue
				}
				if (err == nil) != (rec.err == nil) || (err != nil && err.Error() != rec.err.Error()) || (err == nil && !proto.Equal(got, rec.result)) {
					t.Fatalf("step %d: retry of %v got %v, %v; the first attempt got %v, %v", step, key, got, err, rec.result, rec.err)
				}
				continue
			}
			records[key] = &fuzzRecord{op: op, result: got, err: err}
			if b := sh.record(key[0], key[1]); got.GetTxn() != nil && len(b) > MaxRecordedReadBytes+16<<10 {
				t.Fatalf("step %d: the record of a txn is %d bytes", step, len(b))
			}
			if a := c.GetAckBelow(); a > ackBelow[c.GetSession()] {
				for k := range records {
					if k[0] == c.GetSession() && k[1] >= ackBelow[c.GetSession()] && k[1] < a {
						delete(records, k)
					}
				}
				ackBelow[c.GetSession()] = a
			}
		}
		var onDisk, inMemory []*kvpb.KeyValue
		collect := func(kvs *[]*kvpb.KeyValue) func(View) {
			return func(r View) {
				if err := Range(r, nil, nil, func(kv *kvpb.KeyValue) bool { *kvs = append(*kvs, kv); return true }); err != nil {
					t.Fatal(err)
				}
			}
		}
		sh.view(collect(&onDisk))
		mem.view(collect(&inMemory))
		if !slices.EqualFunc(onDisk, inMemory, func(a, b *kvpb.KeyValue) bool { return proto.Equal(a, b) }) {
			t.Fatalf("storage holds %v, memory %v", onDisk, inMemory)
		}
		// The state hash the Txn moved put by put must be the sum of what
		// is stored, or replicas would raise false corruption alarms.
		sh.s.Flush()
		if err := sh.s.Scrub(func(int) bool { return true }); err != nil {
			t.Fatalf("scrub after the sequence: %v", err)
		}
	})
}

// fuzzEngines hands out fresh shards of a storage engine it replaces now
// and then. Inputs run one at a time.
type fuzzEngines struct {
	dir    string
	e      *storage.Engine
	edir   string
	shards uint64
}

func (fe *fuzzEngines) shard(t *testing.T) *shard {
	t.Helper()
	if fe.e == nil || fe.shards == 64 {
		fe.close()
		dir, err := os.MkdirTemp(fe.dir, "engine")
		if err != nil {
			t.Fatal(err)
		}
		e, err := storage.Open(filepath.Join(dir, "kvd.db"), storage.Options{NoSync: true})
		if err != nil {
			t.Fatal(err)
		}
		fe.e, fe.edir, fe.shards = e, dir, 0
	}
	fe.shards++
	return newShardOn(t, fe.e, fe.shards)
}

func (fe *fuzzEngines) close() {
	if fe.e != nil {
		fe.e.Close()
		os.RemoveAll(fe.edir)
		fe.e = nil
	}
}

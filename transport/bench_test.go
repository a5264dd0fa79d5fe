package transport_test

import (
	"bytes"
	"testing"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/peerpb"
)

// BenchmarkBatchCodec is the hot path of the peer stream: encode a batch of
// 64 appends (4 entries of 256 bytes each, from 16 shards), as the sender
// does, and decode it and every message in it, as the receiver does.
func BenchmarkBatchCodec(b *testing.B) {
	value := bytes.Repeat([]byte("v"), 256)
	var msgs []*raftpb.Message
	for i := range 64 {
		m := &raftpb.Message{
			Type: raftpb.MsgApp.Enum(), To: proto.Uint64(2), From: proto.Uint64(1),
			Term: proto.Uint64(3), LogTerm: proto.Uint64(3), Index: proto.Uint64(uint64(100 + i)),
			Commit: proto.Uint64(uint64(99 + i)),
		}
		for j := range 4 {
			m.Entries = append(m.Entries, &raftpb.Entry{
				Term: proto.Uint64(3), Index: proto.Uint64(uint64(101 + i + j)), Data: value,
			})
		}
		msgs = append(msgs, m)
	}
	var size int
	b.ReportAllocs()
	for b.Loop() {
		batch := &peerpb.Batch{From: 1, To: 2}
		for i, m := range msgs {
			wire, err := proto.Marshal(m)
			if err != nil {
				b.Fatal(err)
			}
			batch.Msgs = append(batch.Msgs, &peerpb.ShardMessage{Shard: uint64(i%16 + 1), Msg: wire})
		}
		out, err := proto.Marshal(batch)
		if err != nil {
			b.Fatal(err)
		}
		size = len(out)
		var in peerpb.Batch
		if err := proto.Unmarshal(out, &in); err != nil {
			b.Fatal(err)
		}
		for _, sm := range in.GetMsgs() {
			var m raftpb.Message
			if err := proto.Unmarshal(sm.GetMsg(), &m); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.SetBytes(int64(size))
	b.ReportMetric(float64(len(msgs)*b.N)/b.Elapsed().Seconds(), "msgs/s")
}

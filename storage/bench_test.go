package storage

import (
	"bytes"
	"fmt"
	"sync"
	"testing"

	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// BenchmarkGroupCommit saves one 256-byte entry (appended and applied) per
// Save from one goroutine per shard, with fsync on, and reports how many
// entries and shard updates each bbolt commit carried. With group commit,
// 8 shards cost about one commit per round, not eight.
func BenchmarkGroupCommit(b *testing.B) {
	for _, shards := range []int{1, 8} {
		b.Run(fmt.Sprintf("shards=%d", shards), func(b *testing.B) {
			e, _ := openTest(b, Options{})
			var shs []*Shard
			for s := 1; s <= shards; s++ {
				sh, err := e.CreateShard(uint64(s), voters)
				if err != nil {
					b.Fatal(err)
				}
				shs = append(shs, sh)
			}
			value := bytes.Repeat([]byte("v"), 256)
			before := e.Stats()
			b.ResetTimer()
			var wg sync.WaitGroup
			for _, sh := range shs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := uint64(2); i < uint64(2+b.N); i++ {
						en := &pb.Entry{Index: proto.Uint64(i), Term: proto.Uint64(1), Data: append([]byte("k="), value...)}
						if err := sh.Save(&Update{Entries: []*pb.Entry{en}, Committed: []*pb.Entry{en}, Apply: applyPut, Sync: true, NoWait: true}); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			b.StopTimer()
			st := e.Stats()
			syncs := float64(st.Syncs - before.Syncs)
			b.ReportMetric(float64(st.Entries-before.Entries)/syncs, "entries/sync")
			b.ReportMetric(float64(st.Updates-before.Updates)/syncs, "updates/sync")
			b.ReportMetric(float64(st.Entries-before.Entries)/b.Elapsed().Seconds(), "entries/s")
		})
	}
}

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
// shard per round, with fsync on, and reports how many entries and shard
// updates each sync carried. "goroutines": one goroutine per shard calls
// Save, as raft groups with a goroutine each did; "saveall": one goroutine
// saves every shard's update with one SaveAll, as raftnode's host loop
// does. With group commit, 8 shards cost about one sync per round, not
// eight, either way.
func BenchmarkGroupCommit(b *testing.B) {
	for _, bc := range []struct {
		shards  int
		saveAll bool
	}{{1, false}, {8, false}, {8, true}} {
		mode := "goroutines"
		if bc.saveAll {
			mode = "saveall"
		}
		b.Run(fmt.Sprintf("shards=%d/%s", bc.shards, mode), func(b *testing.B) {
			e, _ := openTest(b, Options{})
			var shs []*Shard
			for s := 1; s <= bc.shards; s++ {
				sh, err := e.CreateShard(uint64(s), voters)
				if err != nil {
					b.Fatal(err)
				}
				shs = append(shs, sh)
			}
			value := bytes.Repeat([]byte("v"), 256)
			update := func(i uint64) *Update {
				en := &pb.Entry{Index: proto.Uint64(i), Term: proto.Uint64(1), Data: append([]byte("k="), value...)}
				return &Update{Entries: []*pb.Entry{en}, Committed: []*pb.Entry{en}, Apply: applyPut, Sync: true, NoWait: true}
			}
			before := e.Stats()
			b.ResetTimer()
			if bc.saveAll {
				us := make([]ShardUpdate, len(shs))
				for i := uint64(2); i < uint64(2+b.N); i++ {
					for j, sh := range shs {
						us[j] = ShardUpdate{sh, update(i)}
					}
					for _, err := range e.SaveAll(us) {
						if err != nil {
							b.Fatal(err)
						}
					}
				}
			} else {
				var wg sync.WaitGroup
				for _, sh := range shs {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for i := uint64(2); i < uint64(2+b.N); i++ {
							if err := sh.Save(update(i)); err != nil {
								b.Error(err)
								return
							}
						}
					}()
				}
				wg.Wait()
			}
			b.StopTimer()
			st := e.Stats()
			syncs := float64(st.Syncs - before.Syncs)
			b.ReportMetric(float64(st.Entries-before.Entries)/syncs, "entries/sync")
			b.ReportMetric(float64(st.Updates-before.Updates)/syncs, "updates/sync")
			b.ReportMetric(float64(st.Entries-before.Entries)/b.Elapsed().Seconds(), "entries/s")
		})
	}
}

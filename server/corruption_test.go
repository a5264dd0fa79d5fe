package server

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cespare/xxhash/v2"
	bolt "go.etcd.io/bbolt"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/proto/kvpb"
)

// editShardKV changes the kv bucket of shard in stopped node i's kvd.db
// directly with bbolt, as a bad disk or a stray writer would. fn gets the
// shard's kv and raft buckets.
func editShardKV(t *testing.T, c *testCluster, i int, shard uint64, fn func(kv, raft *bolt.Bucket) error) {
	t.Helper()
	db, err := bolt.Open(filepath.Join(c.cfgs[i].DataDir, "kvd.db"), 0o600, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("shards")).Bucket(binary.BigEndian.AppendUint64(nil, shard))
		return fn(b.Bucket([]byte("kv")), b.Bucket([]byte("raft")))
	})
	if err != nil {
		t.Fatal(err)
	}
}

// sealed is the stored form of a value in the storage layout: an xxhash64
// of key length, key and value, then the value. A test that writes it
// plays a writer that knows the format, whose change no checksum can see.
func sealed(key, value []byte) (stored []byte, sum uint64) {
	d := xxhash.New()
	_, _ = d.Write(binary.BigEndian.AppendUint32(nil, uint32(len(key))))
	_, _ = d.Write(key)
	_, _ = d.Write(value)
	sum = d.Sum64()
	return append(binary.BigEndian.AppendUint64(nil, sum), value...), sum
}

func getFrom(t *testing.T, s *Server, key []byte, c kvpb.Consistency) (*kvpb.GetResponse, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return kvClient(t, s).Get(ctx, &kvpb.GetRequest{Key: key, Consistency: c})
}

// TestChangedValueIsNotServed: a byte of a value changed inside kvd.db
// while the node was down is never served, by a linearizable read on the
// leader nor by a serializable one or a range.
func TestChangedValueIsNotServed(t *testing.T) {
	c := newTestCluster(t, 1, 1, nil)
	s := c.servers[0]
	key := keysIn(s, 1, 1)[0]
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.client().Put(ctx, key, []byte("original-value")); err != nil {
		t.Fatal(err)
	}
	c.stop(0)
	editShardKV(t, c, 0, 1, func(kv, _ *bolt.Bucket) error {
		v := bytes.Clone(kv.Get(key))
		i := bytes.Index(v, []byte("original"))
		if i < 0 {
			return fmt.Errorf("value %q not found in %x", "original", v)
		}
		v[i+5] = 'N' // "origiNal"
		return kv.Put(key, v)
	})
	c.start(0)
	c.waitReady()
	s = c.servers[0]
	var resp *kvpb.GetResponse
	var err error
	waitFor(t, 10*time.Second, "a leader to answer", func() bool {
		resp, err = getFrom(t, s, key, kvpb.Consistency_LINEARIZABLE)
		return status.Code(err) != codes.Unavailable
	})
	if resp.GetKv() != nil {
		t.Fatalf("linearizable read served %q", resp.GetKv().GetValue())
	}
	if code := status.Code(err); code != codes.DataLoss {
		t.Fatalf("linearizable read: %v, want DataLoss", err)
	}
	// The read raised the alarm: the replica now refuses the shard.
	resp, err = getFrom(t, s, key, kvpb.Consistency_SERIALIZABLE)
	if resp.GetKv() != nil || !isCorruptRefusal(err) {
		t.Fatalf("serializable read: %v, %v; want a corrupt-replica refusal", resp, err)
	}
	rr, err := kvClient(t, s).Range(ctx, &kvpb.RangeRequest{Shard: 1, Consistency: kvpb.Consistency_SERIALIZABLE})
	if len(rr.GetKvs()) > 0 || !isCorruptRefusal(err) {
		t.Fatalf("range: %v, %v; want a corrupt-replica refusal", rr, err)
	}
	if al := alarmsOf(t, s); len(al) != 1 || al[0].GetNode() != 1 || al[0].GetShard() != 1 {
		t.Fatalf("alarms %v", al)
	}
}

// isCorruptRefusal reports whether err is a replica's refusal to serve a
// shard it holds corrupt.
func isCorruptRefusal(err error) bool {
	return status.Code(err) == codes.Unavailable && strings.Contains(err.Error(), "corrupt and must be rebuilt")
}

func alarmsOf(t *testing.T, s *Server) []*kvpb.CorruptionAlarm {
	t.Helper()
	st, err := s.Status(context.Background(), &kvpb.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return st.GetAlarms()
}

// TestHashCheckFindsDivergedReplica: one replica's state is changed on
// disk in a way its checksums cannot see (a pair added with a valid
// checksum and its state hash moved to match, as a nondeterministic apply
// would leave it); the hash check names that replica, which then refuses
// to serve the shard.
func TestHashCheckFindsDivergedReplica(t *testing.T) {
	t.Run("follower", func(t *testing.T) { testHashCheck(t, false) })
	// The changed replica leads the shard when the check runs: it finds
	// itself in the minority, and hands leadership away.
	t.Run("leader", func(t *testing.T) { testHashCheck(t, true) })
}

func testHashCheck(t *testing.T, badLeads bool) {
	c := newTestCluster(t, 3, 1, func(cfg *Config) { cfg.CorruptionCheckInterval = 100 * time.Millisecond })
	leader, _ := leaderAndFollower(t, c)
	cl := c.client()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	keys := keysIn(leader, 1, 20)
	for _, k := range keys {
		if _, err := cl.Put(ctx, k, []byte("v")); err != nil {
			t.Fatal(err)
		}
	}
	// Healthy replicas agree: checks have run and raised nothing.
	waitFor(t, 10*time.Second, "hash checks every voter answered", func() bool {
		v, _ := metricSum(scrape(t, leader), `kvd_corruption_checks_total{result="agree"}`)
		return v >= 4 // a few rounds
	})
	for i, s := range c.servers {
		if al := alarmsOf(t, s); len(al) > 0 {
			t.Fatalf("node %d raised alarms on healthy replicas: %v", i+1, al)
		}
	}
	var bad int
	for i, s := range c.servers {
		if s != leader {
			bad = i
		}
	}
	badID := uint64(bad + 1)
	c.stop(bad)
	editShardKV(t, c, bad, 1, func(kv, raft *bolt.Bucket) error {
		k := []byte("key/diverged")
		v, sum := sealed(k, []byte("not in the log"))
		h := binary.BigEndian.Uint64(raft.Get([]byte("state-hash")))
		if err := raft.Put([]byte("state-hash"), binary.BigEndian.AppendUint64(nil, h+sum)); err != nil {
			return err
		}
		return kv.Put(k, v)
	})
	if badLeads {
		// Only the changed replica checks, once it leads.
		c.stopAll()
		for i := range c.cfgs {
			c.cfgs[i].CorruptionCheckInterval = 0
		}
		c.cfgs[bad].CorruptionCheckInterval = 100 * time.Millisecond
		for i := range c.cfgs {
			c.start(i)
		}
	} else {
		c.start(bad)
	}
	c.waitReady()
	if badLeads {
		waitFor(t, 20*time.Second, "the changed replica to lead shard 1", func() bool {
			l := c.leaderOf(1)
			if l == c.servers[bad] {
				return true
			}
			if l != nil {
				tctx, tcancel := context.WithTimeout(ctx, time.Second)
				_ = l.host.Node(1).TransferLeadership(tctx, badID)
				tcancel()
			}
			return c.leaderOf(1) == c.servers[bad] || len(alarmsOf(t, c.servers[bad])) > 0
		})
	}

	waitFor(t, 20*time.Second, "the alarm naming the changed replica", func() bool {
		for _, al := range alarmsOf(t, c.servers[bad]) {
			if al.GetShard() == 1 && al.GetNode() == badID {
				return true
			}
		}
		return false
	})
	for i, s := range c.servers {
		for _, al := range alarmsOf(t, s) {
			if al.GetNode() != badID || al.GetShard() != 1 {
				t.Fatalf("node %d raised an alarm on a healthy replica: %v", i+1, al)
			}
		}
	}
	// The node that compared raised it too, with the gauge.
	reporter := c.servers[bad]
	for _, s := range c.servers {
		if s != c.servers[bad] && len(alarmsOf(t, s)) > 0 {
			reporter = s
		}
	}
	if badLeads != (reporter == c.servers[bad]) {
		t.Fatalf("the alarm was raised by node %d", reporter.cfg.NodeID)
	}
	if reporter == nil {
		t.Fatal("no healthy node reports the alarm")
	}
	if want := fmt.Sprintf(`kvd_corruption_alarm{node="%d",shard="1"} 1`, badID); !strings.Contains(scrape(t, reporter), want) {
		t.Fatalf("/metrics lacks %s", want)
	}
	resp, err := getFrom(t, c.servers[bad], keys[0], kvpb.Consistency_SERIALIZABLE)
	if resp.GetKv() != nil || !isCorruptRefusal(err) {
		t.Fatalf("read from the corrupt replica: %v, %v; want a refusal saying it must be rebuilt", resp, err)
	}
	// The healthy replicas still serve, and lead.
	if _, err := cl.Put(ctx, keys[1], []byte("after")); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Get(ctx, keys[0]); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "leadership away from the corrupt replica", func() bool {
		l := c.leaderOf(1)
		return l != nil && l != c.servers[bad]
	})
}

// TestScrubFindsCorruptReplica: the scrubber finds a pair the state hash
// does not account for, raises the alarm, and the replica refuses reads,
// also after a restart.
func TestScrubFindsCorruptReplica(t *testing.T) {
	c := newTestCluster(t, 1, 1, nil)
	key := keysIn(c.servers[0], 1, 1)[0]
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.client().Put(ctx, key, []byte("v")); err != nil {
		t.Fatal(err)
	}
	c.stop(0)
	editShardKV(t, c, 0, 1, func(kv, _ *bolt.Bucket) error {
		v, _ := sealed(key, []byte("rewritten"))
		return kv.Put(key, v)
	})
	c.cfgs[0].ScrubInterval = 50 * time.Millisecond
	c.start(0)
	c.waitReady()
	waitFor(t, 10*time.Second, "the scrub alarm", func() bool {
		al := alarmsOf(t, c.servers[0])
		return len(al) == 1 && al[0].GetShard() == 1 && al[0].GetNode() == 1 && strings.Contains(al[0].GetReason(), "scrub")
	})
	c.stop(0)
	c.cfgs[0].ScrubInterval = 0
	c.start(0)
	c.waitReady()
	resp, err := getFrom(t, c.servers[0], key, kvpb.Consistency_SERIALIZABLE)
	if resp.GetKv() != nil || !isCorruptRefusal(err) {
		t.Fatalf("read after restart: %v, %v; want a corrupt-replica refusal", resp, err)
	}
}

// TestHashCheckAgreesAfterSnapshots: replicas that caught up by snapshot
// (user data, revisions and session records alike) and then applied the
// same log compare equal: no false alarm.
func TestHashCheckAgreesAfterSnapshots(t *testing.T) {
	const shards = 2
	c := newTestCluster(t, 1, shards, func(cfg *Config) {
		cfg.Replicas = 3
		cfg.CorruptionCheckInterval = 50 * time.Millisecond
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cl := c.client()
	put := func(prefix string) {
		for i := range 50 {
			if _, err := cl.Put(ctx, []byte(fmt.Sprintf("%s/%02d", prefix, i)), []byte("v")); err != nil {
				t.Fatal(err)
			}
		}
	}
	put("before")
	c.joinNode(2, 0)
	c.joinNode(3, 0)
	waitFor(t, 90*time.Second, "three voters on every shard", func() bool {
		for shard := uint64(0); shard <= shards; shard++ {
			voters, learners := c.shardVoters(shard)
			if len(voters) != 3 || len(learners) > 0 {
				return false
			}
		}
		return true
	})
	put("after")
	agreed := func() float64 {
		var sum float64
		for _, s := range c.servers {
			v, _ := metricSum(scrape(t, s), `kvd_corruption_checks_total{result="agree"}`)
			sum += v
		}
		return sum
	}
	base := agreed()
	waitFor(t, 30*time.Second, "hash checks that every voter answered", func() bool {
		return agreed() >= base+3*(shards+1)
	})
	for i, s := range c.servers {
		if al := alarmsOf(t, s); len(al) > 0 {
			t.Fatalf("node %d raised alarms on healthy replicas: %v", i+1, al)
		}
		if text := scrape(t, s); strings.Contains(text, `result="mismatch"`) {
			t.Fatalf("node %d counted mismatches", i+1)
		}
	}
	if c.servers[2].host.SnapshotsReceived() == 0 {
		t.Fatal("node 3 received no snapshot")
	}
}

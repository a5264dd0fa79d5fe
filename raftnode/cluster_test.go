package raftnode_test

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/fsm"
	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/raftnode"
	"github.com/kvd/kvd/storage"
	"github.com/kvd/kvd/transport"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// testNode is one in-process kvd node: engine, gRPC server, transport, host.
type testNode struct {
	id   uint64
	dir  string
	addr string

	engine *storage.Store
	srv    *grpc.Server
	tr     *transport.Transport
	host   *raftnode.Host
}

type testCluster struct {
	t             *testing.T
	nodes         map[uint64]*testNode
	shards        []uint64
	snapshot      uint64 // SnapshotEntries
	snapshotBytes uint64 // SnapshotBytes
	// commitInterval is storage.Options.CommitInterval.
	commitInterval time.Duration
	// mute: the hosts send no leadership checks, as if every peer ran a
	// kvd that predates them (their questions are lost, and so are the
	// answers).
	mute bool
}

// muteChecks is a transport that loses every leadership check.
type muteChecks struct{ *transport.Transport }

func (muteChecks) SendLeaderCheck(uint64, *peerpb.LeaderCheck) {}

func logger(t *testing.T) *slog.Logger {
	if os.Getenv("KVD_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).With("test", t.Name())
	}
	return slog.New(slog.DiscardHandler)
}

type snapSource struct{ e *storage.Store }

func (s snapSource) OpenSnapshot(shard uint64) (transport.SnapshotReader, error) {
	sh, err := s.e.OpenShard(shard)
	if err != nil {
		return nil, err
	}
	return sh.OpenSnapshot()
}

func newCluster(t *testing.T, n int, shards int, snapshotEntries uint64) *testCluster {
	t.Helper()
	return newClusterFrom(&testCluster{t: t, snapshot: snapshotEntries}, n, shards)
}

// newClusterFrom starts the cluster c describes.
func newClusterFrom(c *testCluster, n int, shards int) *testCluster {
	t := c.t
	t.Helper()
	c.nodes = map[uint64]*testNode{}
	for s := 1; s <= shards; s++ {
		c.shards = append(c.shards, uint64(s))
	}
	// Reserve every address first: each node must know its peers'.
	lis := map[uint64]net.Listener{}
	for id := uint64(1); id <= uint64(n); id++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lis[id] = l
		c.nodes[id] = &testNode{id: id, dir: filepath.Join(t.TempDir(), fmt.Sprint(id)), addr: l.Addr().String()}
	}
	for id := range c.nodes {
		c.start(id, lis[id])
	}
	t.Cleanup(c.stopAll)
	return c
}

func (c *testCluster) voters() []uint64 {
	var v []uint64
	for id := range c.nodes {
		v = append(v, id)
	}
	return v
}

// start runs node id on lis (or on its old address when lis is nil).
func (c *testCluster) start(id uint64, lis net.Listener) {
	t := c.t
	t.Helper()
	n := c.nodes[id]
	if lis == nil {
		var err error
		lis, err = net.Listen("tcp", n.addr)
		if err != nil {
			t.Fatalf("relisten node %d on %s: %v", id, n.addr, err)
		}
	}
	eng, err := storage.OpenStore(n.dir, 2, storage.Options{Logger: logger(t), CommitInterval: c.commitInterval})
	if err != nil {
		t.Fatal(err)
	}
	host := raftnode.NewHost(raftnode.HostConfig{
		NodeID:              id,
		Store:               eng,
		Apply:               fsm.Apply,
		Logger:              logger(t).With("node", id),
		TickInterval:        20 * time.Millisecond,
		ElectionTick:        10,
		HeartbeatTick:       1,
		SnapshotEntries:     cmp.Or(c.snapshot, 10_000),
		SnapshotBytes:       cmp.Or(c.snapshotBytes, 64<<20),
		MaxPendingProposals: 4096,
	})
	tr := transport.New(transport.Config{NodeID: id, Handler: host, Snapshots: snapSource{eng}, Logger: logger(t)})
	var sender raftnode.Sender = tr
	if c.mute {
		sender = muteChecks{tr}
	}
	host.Start(sender)
	srv := grpc.NewServer(transport.ServerOptions()...)
	tr.Register(srv)
	go func() { _ = srv.Serve(lis) }()
	for pid, p := range c.nodes {
		if pid != id {
			tr.SetPeer(pid, p.addr)
		}
	}
	for _, s := range c.shards {
		if _, err := host.AddShard(s, c.voters()); err != nil {
			t.Fatal(err)
		}
	}
	n.engine, n.srv, n.tr, n.host = eng, srv, tr, host
}

// stop shuts node id down in reverse order of start.
func (c *testCluster) stop(id uint64) {
	n := c.nodes[id]
	if n.host == nil {
		return
	}
	n.host.Stop()
	n.tr.Stop()
	n.srv.Stop()
	if err := n.engine.Close(); err != nil {
		c.t.Errorf("close engine of node %d: %v", id, err)
	}
	n.engine, n.srv, n.tr, n.host = nil, nil, nil, nil
}

func (c *testCluster) stopAll() {
	for id := range c.nodes {
		c.stop(id)
	}
}

// waitFor polls a condition with a deadline.
var waitFor = proccluster.WaitFor

// leader returns the running node that leads shard, or nil.
func (c *testCluster) leader(shard uint64) *raftnode.Node {
	for _, n := range c.nodes {
		if n.host == nil {
			continue
		}
		if r := n.host.Node(shard); r != nil && r.IsLeader() {
			return r
		}
	}
	return nil
}

func (c *testCluster) waitLeaders() {
	waitFor(c.t, 10*time.Second, "a leader on every shard", func() bool {
		for _, s := range c.shards {
			if c.leader(s) == nil {
				return false
			}
		}
		return true
	})
}

func putCmd(key, value string) []byte {
	b, _ := proto.Marshal(&peerpb.Command{Op: &peerpb.Command_Put{Put: &kvpb.PutRequest{Key: []byte(key), Value: []byte(value)}}})
	return b
}

// put writes through the shard's current leader, retrying through
// elections, and returns once the write has applied on the leader.
func (c *testCluster) put(ctx context.Context, shard uint64, key, value string) error {
	for {
		l := c.leader(shard)
		if l != nil {
			res, err := l.Propose(ctx, putCmd(key, value))
			if err == nil {
				_, err = fsm.Outcome(res)
				return err
			}
			if !errors.Is(err, raftnode.ErrNotLeader) && !errors.Is(err, raftnode.ErrLeadershipLost) &&
				!errors.Is(err, raftnode.ErrStopped) && !errors.Is(err, raftnode.ErrBusy) {
				return err
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("put %s on shard %d: %w", key, shard, ctx.Err())
		case <-time.After(10 * time.Millisecond): // back off before retrying
		}
	}
}

// writeAll writes perShard keys to every shard concurrently (workers per
// shard), with prefix in the keys.
func (c *testCluster) writeAll(prefix string, perShard, workers int) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	var failed atomic.Value
	for _, s := range c.shards {
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < perShard; i += workers {
					if err := c.put(ctx, s, fmt.Sprintf("%s/%d/%05d", prefix, s, i), fmt.Sprintf("v%d", i)); err != nil {
						failed.Store(err)
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		c.t.Fatal(err)
	}
}

// dump returns a shard's whole state (kv and meta buckets) on node id.
func (c *testCluster) dump(id, shard uint64) (applied uint64, data []byte) {
	sh, err := c.nodes[id].engine.OpenShard(shard)
	if err != nil {
		c.t.Fatal(err)
	}
	var buf bytes.Buffer
	err = sh.View(func(r *storage.Reader) error {
		applied, _ = r.Applied()
		r.Range(nil, nil, func(k, v []byte) bool {
			fmt.Fprintf(&buf, "kv %q=%x\n", k, v)
			return true
		})
		fmt.Fprintf(&buf, "rev %d\n", fsm.Revision(r))
		return nil
	})
	if err != nil {
		c.t.Fatal(err)
	}
	return applied, buf.Bytes()
}

// waitConverged waits until every running replica of every shard has
// applied the same index, then checks their states are byte-identical.
func (c *testCluster) waitConverged() {
	c.t.Helper()
	for _, s := range c.shards {
		// A proposer is answered as soon as its entry applies on the
		// leader, inside the write round, so when the writers return even
		// the leader's committed state may lack their last entries, and a
		// follower may be a round behind. So: wait until every replica
		// has applied what the leader had committed, then compare states
		// read at the same applied index. Equal indexes with different
		// data is divergence and fails at once; unequal ones are waited
		// out.
		var target uint64
		for _, n := range c.nodes {
			if n.host != nil {
				target = max(target, n.host.Node(s).Commit())
			}
		}
		waitFor(c.t, 30*time.Second, fmt.Sprintf("replicas of shard %d to converge at index %d or later", s, target), func() bool {
			var (
				ref        []byte
				refID, idx uint64
			)
			for id, n := range c.nodes {
				if n.host == nil {
					continue
				}
				applied, d := c.dump(id, s)
				if applied < target {
					return false
				}
				if ref == nil {
					ref, refID, idx = d, id, applied
					continue
				}
				if applied != idx {
					return false
				}
				if !bytes.Equal(ref, d) {
					c.t.Fatalf("shard %d: node %d and node %d differ at applied index %d:\n%s\n---\n%s", s, refID, id, idx, ref, d)
				}
			}
			return true
		})
	}
}

func (c *testCluster) countKeys(id, shard uint64, prefix string) int {
	_, d := c.dump(id, shard)
	return bytes.Count(d, []byte("kv \""+prefix))
}

func TestClusterReplicatesAllShards(t *testing.T) {
	c := newCluster(t, 3, 8, 10000)
	c.waitLeaders()
	c.writeAll("a", 60, 4)
	c.waitConverged()
	for _, s := range c.shards {
		for id := range c.nodes {
			if got := c.countKeys(id, s, "a/"); got != 60 {
				t.Fatalf("node %d shard %d has %d keys, want 60", id, s, got)
			}
		}
	}
}

func TestClusterSurvivesNodeLossAndCatchesUpByLog(t *testing.T) {
	c := newCluster(t, 3, 8, 10000)
	c.waitLeaders()
	c.writeAll("a", 10, 2)

	c.stop(3)
	c.waitLeaders() // shards led by node 3 elect a new leader
	c.writeAll("b", 30, 3)

	c.start(3, nil)
	c.waitConverged()
	if got := c.nodes[3].host.SnapshotsReceived(); got != 0 {
		t.Fatalf("node 3 received %d snapshots; the log was not compacted, so it should catch up by log", got)
	}
	for _, s := range c.shards {
		if got := c.countKeys(3, s, "b/"); got != 30 {
			t.Fatalf("restarted node 3 has %d keys of shard %d, want 30", got, s)
		}
	}
	t.Logf("catch-up path: log (snapshots received: 0)")
}

func TestClusterCatchesUpBySnapshotAfterCompaction(t *testing.T) {
	const snapEvery = 50
	c := newCluster(t, 3, 4, snapEvery)
	c.waitLeaders()
	c.writeAll("a", 10, 2)

	c.stop(3)
	c.waitLeaders()
	// Far more entries than the compaction threshold: the leaders drop the
	// log node 3 would need.
	c.writeAll("b", 4*snapEvery, 4)
	// A replica compacts once its storage has committed what it applied,
	// which may be up to a commit interval after the writes returned.
	for _, s := range c.shards {
		waitFor(t, 10*time.Second, fmt.Sprintf("shard %d's leader to compact its log", s), func() bool {
			l := c.leader(s)
			return l != nil && l.Stats().Compactions.Load() > 0
		})
	}

	c.start(3, nil)
	c.waitConverged()
	got := c.nodes[3].host.SnapshotsReceived()
	if got == 0 {
		t.Fatal("node 3 caught up without a snapshot, but the log it needed was compacted")
	}
	for _, s := range c.shards {
		if n := c.countKeys(3, s, "b/"); n != 4*snapEvery {
			t.Fatalf("node 3 shard %d has %d keys after snapshot, want %d", s, n, 4*snapEvery)
		}
	}
	t.Logf("catch-up path: snapshot (snapshots received by node 3: %d)", got)

	// After installing snapshots the node keeps replicating by log.
	c.writeAll("c", 20, 2)
	c.waitConverged()
}

// TestLogCompactedByBytes: a shard whose entries are large compacts its
// log once they add up to SnapshotBytes, long before SnapshotEntries.
func TestLogCompactedByBytes(t *testing.T) {
	c := newClusterFrom(&testCluster{t: t, snapshot: 10000, snapshotBytes: 256 << 10}, 1, 1)
	c.waitLeaders()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	big := strings.Repeat("v", 64<<10)
	for i := range 8 { // 512 KiB of commands in 8 entries
		if err := c.put(ctx, 1, fmt.Sprintf("k%d", i), big); err != nil {
			t.Fatal(err)
		}
	}
	l := c.leader(1)
	waitFor(t, 10*time.Second, "the log to be compacted by bytes", func() bool { return l.Stats().Compactions.Load() > 0 })
}

func TestReadIndexBatchesConcurrentReads(t *testing.T) {
	c := newCluster(t, 3, 1, 10000)
	c.waitLeaders()
	c.writeAll("a", 5, 1)
	l := c.leader(1)
	var host *raftnode.Host
	for _, n := range c.nodes {
		if n.host.Node(1) == l {
			host = n.host
		}
	}
	rounds := func() uint64 { return l.Stats().ReadRounds.Load() + host.LeaderCheckRounds() }
	before := rounds()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); errs <- l.ReadIndex(ctx) }()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	n := rounds() - before
	t.Logf("100 concurrent linearizable reads cost %d rounds (leadership checks and raft's own)", n)
	if n >= 100 {
		t.Fatalf("reads were not batched: %d rounds for 100 reads", n)
	}
}

// Applying a write does not wait for its commit (storage.Update.NoWait):
// readers see it when the storage next commits, here after a minute
// (CommitInterval). A linearizable read of the write must not wait for
// that: the read makes the storage commit.
func TestReadIndexDoesNotWaitForTheCommitInterval(t *testing.T) {
	c := &testCluster{t: t, commitInterval: time.Minute}
	c = newClusterFrom(c, 3, 1)
	c.waitLeaders()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.put(ctx, 1, "k", "v"); err != nil {
		t.Fatal(err)
	}
	l := c.leader(1)
	if err := l.ReadIndex(ctx); err != nil {
		t.Fatalf("ReadIndex after a write: %v", err)
	}
	for id, n := range c.nodes {
		if n.host.Node(1) == l && c.countKeys(id, 1, "k") != 1 {
			t.Fatal("the leader's state lacks the write after ReadIndex returned")
		}
	}
}

// Reads whose leadership checks go unanswered (peers running a kvd that
// predates them) take raft's own ReadIndex round: slower, not stuck.
func TestReadIndexWithoutLeaderCheckAnswers(t *testing.T) {
	c := newClusterFrom(&testCluster{t: t, mute: true, snapshot: 10000}, 3, 2)
	c.waitLeaders()
	c.writeAll("a", 5, 1)
	for _, shard := range c.shards {
		l := c.leader(shard)
		before := l.Stats().ReadRounds.Load()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := l.ReadIndex(ctx)
		cancel()
		if err != nil {
			t.Fatalf("shard %d: ReadIndex with unanswered checks: %v", shard, err)
		}
		if l.Stats().ReadRounds.Load() == before {
			t.Fatalf("shard %d: the read was not served by raft's own round", shard)
		}
	}
}

func TestFollowerRefusesProposalsWithHint(t *testing.T) {
	c := newCluster(t, 3, 1, 10000)
	c.waitLeaders()
	l := c.leader(1)
	var follower *raftnode.Node
	for _, n := range c.nodes {
		if r := n.host.Node(1); !r.IsLeader() {
			follower = r
			break
		}
	}
	waitFor(t, 5*time.Second, "follower to learn the leader", func() bool { return follower.Leader() != 0 })
	_, err := follower.Propose(context.Background(), putCmd("k", "v"))
	var nl *raftnode.NotLeaderError
	if !errors.As(err, &nl) {
		t.Fatalf("propose on follower: got %v, want NotLeaderError", err)
	}
	if nl.Leader != l.Leader() {
		t.Fatalf("hint names node %d, leader is %d", nl.Leader, l.Leader())
	}
}

// One replica stopped on its own leaves its host's loop running the
// others: the host's other shards keep serving, and the stopped shard
// elects a leader among its remaining replicas.
func TestStoppedReplicaLeavesTheHostRunning(t *testing.T) {
	c := newCluster(t, 3, 2, 10000)
	c.waitLeaders()
	l := c.leader(1)
	var host uint64 // the node whose replica of shard 1 is stopped
	for id, n := range c.nodes {
		if n.host.Node(1) == l {
			host = id
		}
	}
	l.Stop()
	select {
	case <-l.Done():
	default:
		t.Fatal("Done not closed after Stop returned")
	}
	if l.IsLeader() || l.Leader() != 0 {
		t.Fatalf("a stopped replica reports leader %d", l.Leader())
	}
	if err := l.Err(); err != nil {
		t.Fatalf("Err after Stop = %v, want nil (stopped, not failed)", err)
	}
	if _, err := l.Propose(context.Background(), putCmd("k", "v")); !errors.Is(err, raftnode.ErrStopped) {
		t.Fatalf("propose on a stopped replica: got %v, want ErrStopped", err)
	}
	if err := l.ReadIndex(context.Background()); !errors.Is(err, raftnode.ErrStopped) {
		t.Fatalf("read on a stopped replica: got %v, want ErrStopped", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, s := range c.shards {
		if err := c.put(ctx, s, fmt.Sprintf("after/%d", s), "v"); err != nil {
			t.Fatalf("shard %d after stopping a replica of shard 1: %v", s, err)
		}
	}
	if nl := c.leader(1); nl == l {
		t.Fatal("the stopped replica still leads shard 1")
	}
	// The write to shard 2 had a quorum without the stopped replica's
	// host; only that host's own replica applying it shows its loop
	// still runs.
	waitFor(t, 10*time.Second, fmt.Sprintf("node %d's replica of shard 2 to apply the write", host), func() bool {
		return c.countKeys(host, 2, "after/") == 1
	})
}

func TestAddShardOnAStoppedHost(t *testing.T) {
	c := newCluster(t, 1, 1, 10000)
	h := c.nodes[1].host
	h.Stop()
	if _, err := h.AddShard(2, []uint64{1}); !errors.Is(err, raftnode.ErrStopped) {
		t.Fatalf("AddShard after Stop: got %v, want ErrStopped", err)
	}
}

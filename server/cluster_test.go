package server

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/internal/proccluster"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// testCluster is n in-process kvd servers on loopback ports.
type testCluster struct {
	t       testing.TB
	servers []*Server
	cfgs    []Config
}

func listenLocal(t testing.TB) net.Listener {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func testLogger() *slog.Logger {
	if os.Getenv("KVD_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	return slog.New(slog.DiscardHandler)
}

func newTestCluster(t testing.TB, n, shards int, tweak func(*Config)) *testCluster {
	t.Helper()
	c := &testCluster{t: t}
	initial := map[uint64]string{}
	var clientLis, peerLis []net.Listener
	for i := 1; i <= n; i++ {
		cl, pl := listenLocal(t), listenLocal(t)
		clientLis, peerLis = append(clientLis, cl), append(peerLis, pl)
		initial[uint64(i)] = pl.Addr().String()
	}
	dir := t.TempDir()
	for i := 1; i <= n; i++ {
		cfg := Config{
			NodeID:         uint64(i),
			DataDir:        filepath.Join(dir, fmt.Sprint(i)),
			ClientListener: clientLis[i-1],
			PeerListener:   peerLis[i-1],
			ListenMetrics:  "127.0.0.1:0",
			InitialCluster: initial,
			Shards:         shards,
			TickInterval:   20 * time.Millisecond,
			Logger:         testLogger().With("node", i),
		}
		if tweak != nil {
			tweak(&cfg)
		}
		c.cfgs = append(c.cfgs, cfg)
	}
	c.servers = make([]*Server, n)
	t.Cleanup(c.stopAll)
	for i := range c.cfgs {
		c.start(i)
	}
	c.waitReady()
	return c
}

func (c *testCluster) start(i int) {
	c.t.Helper()
	cfg := c.cfgs[i]
	if cfg.ClientListener == nil {
		// A restart listens again on the addresses it had.
		cfg.ListenClient, cfg.ListenPeer = c.cfgs[i].ListenClient, c.cfgs[i].ListenPeer
	}
	s, err := New(cfg)
	if err != nil {
		c.t.Fatalf("start node %d: %v", i+1, err)
	}
	c.servers[i] = s
	// Later restarts must bind the same addresses themselves.
	c.cfgs[i].ClientListener, c.cfgs[i].PeerListener = nil, nil
	c.cfgs[i].ListenClient, c.cfgs[i].ListenPeer = s.ClientAddr(), s.PeerAddr()
}

func (c *testCluster) stop(i int) {
	if s := c.servers[i]; s != nil {
		if err := s.Stop(); err != nil {
			c.t.Errorf("stop node %d: %v", i+1, err)
		}
		c.servers[i] = nil
	}
}

func (c *testCluster) stopAll() {
	for i := range c.servers {
		c.stop(i)
	}
}

func (c *testCluster) endpoints() []string {
	var eps []string
	for i, s := range c.servers {
		if s != nil {
			eps = append(eps, s.ClientAddr())
		} else {
			eps = append(eps, c.cfgs[i].ListenClient)
		}
	}
	return eps
}

func (c *testCluster) waitReady() {
	c.t.Helper()
	for _, s := range c.servers {
		if s == nil {
			continue
		}
		waitFor(c.t, 20*time.Second, "node ready", func() bool {
			if len(s.shardsWithoutLeader()) > 0 {
				return false
			}
			for _, m := range s.clusterMap().GetMembers() {
				if m.GetClientAddr() == "" {
					return false
				}
			}
			return len(s.clusterMap().GetMembers()) == len(c.servers)
		})
	}
}

func (c *testCluster) client() *client.Client {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := client.New(ctx, client.Config{Endpoints: c.endpoints()})
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { cl.Close() })
	return cl
}

// waitFor polls a condition with a deadline.
var waitFor = proccluster.WaitFor

// scrape returns the /metrics text of server s.
func scrape(t *testing.T, s *Server) string {
	t.Helper()
	resp, err := http.Get("http://" + s.MetricsAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// metricSum adds the values of every sample of a metric family whose line
// matches name{...} or name.
func metricSum(text, name string) (float64, bool) {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `(\{[^}]*\})? ([0-9.e+-]+)$`)
	var sum float64
	found := false
	for _, m := range re.FindAllStringSubmatch(text, -1) {
		v, err := strconv.ParseFloat(m[2], 64)
		if err == nil {
			sum += v
			found = true
		}
	}
	return sum, found
}

func TestMetricsExistAndMove(t *testing.T) {
	c := newTestCluster(t, 3, 4, nil)
	series := []string{
		"kvd_requests_total", "kvd_request_duration_seconds_count", "kvd_request_batches_total", "kvd_request_batch_items_total",
		"kvd_raft_term", "kvd_raft_commit_index", "kvd_raft_applied_index", "kvd_raft_is_leader",
		"kvd_raft_leader_changes_total", "kvd_raft_pending_proposals", "kvd_raft_proposals_total",
		"kvd_raft_proposal_batches_total", "kvd_raft_linearizable_reads_total", "kvd_raft_read_index_rounds_total",
		"kvd_raft_leader_check_rounds_total",
		"kvd_storage_commits_total", "kvd_storage_commit_bytes_total", "kvd_storage_fsyncs_total", "kvd_storage_entries_total",
		"kvd_storage_updates_total", "kvd_storage_commit_duration_seconds_count", "kvd_storage_sync_duration_seconds_count",
		"kvd_transport_batches_sent_total", "kvd_transport_messages_sent_total", "kvd_transport_bytes_sent_total",
		"kvd_transport_send_failures_total", "kvd_transport_peer_connected",
		"kvd_snapshots_sent_total", "kvd_snapshots_received_total", "kvd_cluster_map_epoch",
		"kvd_watchers", "kvd_watch_events_sent_total", "kvd_watch_event_lag_seconds_count", "kvd_watch_streams_cut_off_total",
		"kvd_history_compactions_total",
		"go_goroutines", "process_resident_memory_bytes",
	}
	cl := c.client()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// One request first so the per-method request series exist.
	if _, err := cl.Put(ctx, []byte("warm"), []byte("up")); err != nil {
		t.Fatal(err)
	}
	before := make([]string, len(c.servers))
	for i, s := range c.servers {
		before[i] = scrape(t, s)
	}
	for _, name := range series {
		perRequest := strings.HasPrefix(name, "kvd_request")
		found := 0
		for i := range c.servers {
			if _, ok := metricSum(before[i], name); ok {
				found++
			} else if !perRequest {
				t.Errorf("node %d: /metrics lacks %s", i+1, name)
			}
		}
		// Request series appear on the nodes that served requests.
		if perRequest && found == 0 {
			t.Errorf("no node exports %s", name)
		}
	}
	for i := 0; i < 100; i++ {
		k := []byte(fmt.Sprintf("m/%d", i))
		if _, err := cl.Put(ctx, k, []byte("v")); err != nil {
			t.Fatal(err)
		}
		if _, err := cl.Get(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	moved := map[string]bool{}
	for i, s := range c.servers {
		after := scrape(t, s)
		for _, name := range []string{"kvd_requests_total", "kvd_storage_commits_total", "kvd_storage_commit_bytes_total", "kvd_storage_entries_total",
			"kvd_transport_messages_sent_total", "kvd_raft_applied_index", "kvd_raft_proposals_total",
			"kvd_raft_linearizable_reads_total", "kvd_request_batch_items_total", "kvd_raft_leader_check_rounds_total"} {
			b, _ := metricSum(before[i], name)
			a, _ := metricSum(after, name)
			if a > b {
				moved[name] = true
			}
		}
	}
	for _, name := range []string{"kvd_requests_total", "kvd_storage_commits_total", "kvd_storage_commit_bytes_total", "kvd_storage_entries_total",
		"kvd_transport_messages_sent_total", "kvd_raft_applied_index", "kvd_raft_proposals_total",
		"kvd_raft_linearizable_reads_total", "kvd_request_batch_items_total", "kvd_raft_leader_check_rounds_total"} {
		if !moved[name] {
			t.Errorf("%s did not move under traffic", name)
		}
	}
	if !strings.Contains(scrape(t, c.servers[0]), `method="Put"`) {
		t.Error("request metrics are not labelled by method")
	}
	for path, want := range map[string]int{"/healthz": http.StatusOK, "/readyz": http.StatusOK, "/debug/pprof/": http.StatusNotFound} {
		resp, err := http.Get("http://" + c.servers[0].MetricsAddr() + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("%s: status %d, want %d", path, resp.StatusCode, want)
		}
	}
}

// TestPprofOnlyWhenEnabled: /debug/pprof/ is served with EnablePprof
// alone (the metrics test above shows it absent by default).
func TestPprofOnlyWhenEnabled(t *testing.T) {
	s := &Server{cfg: Config{EnablePprof: true}, metrics: &metrics{reg: prometheus.NewRegistry()}}
	srv := httptest.NewServer(s.httpHandler())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/debug/pprof/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/debug/pprof/ with EnablePprof: status %d", resp.StatusCode)
	}
}

// leaderOf returns the server leading shard, or nil.
func (c *testCluster) leaderOf(shard uint64) *Server {
	for _, s := range c.servers {
		if s == nil {
			continue
		}
		if n := s.host.Node(shard); n != nil && n.IsLeader() {
			return s
		}
	}
	return nil
}

// keysIn returns n keys that the ring maps to shard.
func keysIn(s *Server, shard uint64, n int) [][]byte {
	var keys [][]byte
	for i := 0; len(keys) < n; i++ {
		k := []byte(fmt.Sprintf("key/%d", i))
		if got, _ := s.route(nil, k); got == shard {
			keys = append(keys, k)
		}
	}
	return keys
}

// newBenchCluster is a 3-node, 4-shard cluster with production timing.
func newBenchCluster(b *testing.B) *testCluster {
	return newTestCluster(b, 3, 4, func(cfg *Config) { cfg.TickInterval = 0 })
}

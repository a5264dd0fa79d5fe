// Package proccluster runs real kvd processes for tests: it builds the
// binaries from the tree, starts an N-node cluster on free loopback ports,
// and kills, pauses, resumes and restarts nodes. Every process it starts is
// tracked and killed when the test ends, pass or fail.
package proccluster

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kvd/kvd/proto/kvpb"
)

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// Binaries builds kvd and kvctl once per test process and returns their
// paths.
func Binaries(t testing.TB) (kvd, kvctl string) {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "kvd-bin-")
		if buildErr != nil {
			return
		}
		root := moduleRoot()
		for _, c := range []string{"kvd", "kvctl"} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(buildDir, c), "./cmd/"+c)
			cmd.Dir = root
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("go build %s: %v\n%s", c, err, out)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(buildDir, "kvd"), filepath.Join(buildDir, "kvctl")
}

// Main runs a test binary's tests, from its TestMain, and then removes the
// binaries Binaries built for it: 40 MB in the temporary directory per
// test process, left behind by every run before this existed.
//
//	func TestMain(m *testing.M) { os.Exit(proccluster.Main(m)) }
func Main(m *testing.M) int {
	code := m.Run()
	if buildDir != "" {
		_ = os.RemoveAll(buildDir)
	}
	return code
}

func moduleRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// Node is one kvd process of a Cluster.
type Node struct {
	ID                                uint64
	ClientAddr, PeerAddr, MetricsAddr string
	DataDir                           string
	LogPath                           string
	// AdvertiseClient and AdvertisePeer, when set (by Options.Advertise),
	// are the addresses clients and other nodes are told to dial instead
	// of ClientAddr and PeerAddr: a proxy in front of the node, say.
	AdvertiseClient, AdvertisePeer string
	// Join, when set, starts the node with --join Join instead of the
	// cluster's bootstrap flags (see AddNode).
	Join string

	mu  sync.Mutex
	cmd *exec.Cmd
	// exited is closed when the current process has been reaped.
	exited chan struct{}
}

// Cluster is a set of kvd processes started by a test.
type Cluster struct {
	t       testing.TB
	Dir     string
	KVD     string
	KVCTL   string
	Nodes   []*Node
	initial string
	extra   []string
	env     []string
	opts    Options
}

// Options tune a cluster.
type Options struct {
	Shards int      // default 8
	Args   []string // extra kvd flags for every node
	Env    []string // extra environment (NAME=value) for every node
	// Advertise, when set, is called for every node once its listen
	// addresses are chosen and before any node starts. It returns the
	// client and peer addresses the node advertises (--advertise-client,
	// --advertise-peer) and that --initial-cluster lists; "" keeps the
	// listen address. Tests put fault-injecting proxies there.
	Advertise func(nd *Node) (client, peer string)
	// NodeArgs, when set, gives each node flags of its own (its
	// certificates), after Args.
	NodeArgs func(nd *Node) []string
	// ClientTLS dials the nodes' client ports (Status, LeaderOf) with
	// TLS; KvctlArgs go before every Kvctl call's own (--cacert ...).
	ClientTLS *tls.Config
	KvctlArgs []string
}

// Start builds the binaries and starts an n-node cluster; it waits until
// every node reports ready.
func Start(t testing.TB, n int, opts Options) *Cluster {
	t.Helper()
	kvd, kvctl := Binaries(t)
	if opts.Shards == 0 {
		opts.Shards = 8
	}
	c := &Cluster{t: t, Dir: t.TempDir(), KVD: kvd, KVCTL: kvctl}
	var parts []string
	for i := 1; i <= n; i++ {
		nd := &Node{
			ID:          uint64(i),
			ClientAddr:  freeAddr(t),
			PeerAddr:    freeAddr(t),
			MetricsAddr: freeAddr(t),
			DataDir:     filepath.Join(c.Dir, fmt.Sprintf("node%d", i)),
			LogPath:     filepath.Join(c.Dir, fmt.Sprintf("node%d.log", i)),
		}
		peer := nd.PeerAddr
		if opts.Advertise != nil {
			nd.AdvertiseClient, nd.AdvertisePeer = opts.Advertise(nd)
			if nd.AdvertisePeer != "" {
				peer = nd.AdvertisePeer
			}
		}
		c.Nodes = append(c.Nodes, nd)
		parts = append(parts, fmt.Sprintf("%d=%s", i, peer))
	}
	c.initial = strings.Join(parts, ",")
	c.extra = append([]string{fmt.Sprintf("--shards=%d", opts.Shards)}, opts.Args...)
	c.env = opts.Env
	c.opts = opts
	t.Cleanup(c.killAll)
	for _, nd := range c.Nodes {
		c.StartNode(nd)
	}
	c.WaitReady(30 * time.Second)
	return c
}

// AddNode starts a new node that joins the cluster through the client
// addresses in join (kvd --join) and returns it.
func (c *Cluster) AddNode(join string) *Node {
	c.t.Helper()
	id := uint64(len(c.Nodes) + 1)
	nd := &Node{
		ID:          id,
		ClientAddr:  freeAddr(c.t),
		PeerAddr:    freeAddr(c.t),
		MetricsAddr: freeAddr(c.t),
		DataDir:     filepath.Join(c.Dir, fmt.Sprintf("node%d", id)),
		LogPath:     filepath.Join(c.Dir, fmt.Sprintf("node%d.log", id)),
		Join:        join,
	}
	c.Nodes = append(c.Nodes, nd)
	c.StartNode(nd)
	return nd
}

// Ports for kvd processes come from below Linux's ephemeral range
// (32768-60999): a port taken from the ephemeral range and released for
// kvd to bind can meanwhile become the local end of any outgoing
// connection on the machine (kvd's own peer dials, a client), and a node
// restarted on its old port then finds it taken. Each test process works
// in its own block of portBlock ports, chosen by pid, and never hands out
// a port twice, so concurrent test binaries rarely meet; a port found in
// use is skipped.
const (
	portBase   = 15000 // 15000-21999: clear of make cluster and make bench
	portBlock  = 200
	portBlocks = 35
)

var nextPort atomic.Int64

// freeAddr returns a loopback address with a port that was free just now
// and that this process has not handed out before.
func freeAddr(t testing.TB) string {
	block := portBase + (os.Getpid()%portBlocks)*portBlock
	for range portBlock {
		port := block + int(nextPort.Add(1)-1)%portBlock
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue
		}
		addr := l.Addr().String()
		l.Close()
		return addr
	}
	t.Fatalf("no free port in 127.0.0.1:%d-%d", block, block+portBlock-1)
	return ""
}

// Endpoints is the comma-separated client addresses of every node.
func (c *Cluster) Endpoints() string {
	var eps []string
	for _, nd := range c.Nodes {
		eps = append(eps, nd.ClientAddr)
	}
	return strings.Join(eps, ",")
}

// Node returns the node with the given id.
func (c *Cluster) Node(id uint64) *Node { return c.Nodes[id-1] }

// StartNode starts (or restarts) nd's process on its data dir.
func (c *Cluster) StartNode(nd *Node) {
	c.t.Helper()
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if nd.cmd != nil {
		c.t.Fatalf("node %d is already running", nd.ID)
	}
	logf, err := os.OpenFile(nd.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		c.t.Fatal(err)
	}
	args := []string{
		"--id", fmt.Sprint(nd.ID),
		"--data-dir", nd.DataDir,
		"--listen-client", nd.ClientAddr,
		"--listen-peer", nd.PeerAddr,
		"--listen-metrics", nd.MetricsAddr,
	}
	if nd.Join != "" {
		args = append(args, "--join", nd.Join)
	} else {
		args = append(append(args, "--initial-cluster", c.initial), c.extra...)
	}
	if nd.AdvertiseClient != "" {
		args = append(args, "--advertise-client", nd.AdvertiseClient)
	}
	if nd.AdvertisePeer != "" {
		args = append(args, "--advertise-peer", nd.AdvertisePeer)
	}
	if c.opts.NodeArgs != nil {
		args = append(args, c.opts.NodeArgs(nd)...)
	}
	cmd := exec.Command(c.KVD, args...)
	if len(c.env) > 0 {
		cmd.Env = append(os.Environ(), c.env...)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	// Own process group: a pause or kill reaches kvd alone, and nothing
	// of the test's terminal signals reach it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		c.t.Fatalf("start node %d: %v", nd.ID, err)
	}
	nd.cmd = cmd
	nd.exited = make(chan struct{})
	exited := nd.exited
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(exited)
	}()
}

// Pid returns the running process id of nd, or 0.
func (nd *Node) Pid() int {
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if nd.cmd == nil {
		return 0
	}
	return nd.cmd.Process.Pid
}

// Running reports whether nd was started and not stopped by the test.
// A process that exited by itself still counts: WaitReady reports it.
func (nd *Node) Running() bool { return nd.Pid() != 0 }

// hasExited reports whether nd's process has exited.
func (nd *Node) hasExited() bool {
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if nd.cmd == nil {
		return false
	}
	select {
	case <-nd.exited:
		return true
	default:
		return false
	}
}

// Kill sends SIGKILL to nd and waits until it is reaped.
func (c *Cluster) Kill(nd *Node) { c.signalAndWait(nd, syscall.SIGKILL) }

// Stop sends SIGTERM to nd and waits until it exits (a clean shutdown).
func (c *Cluster) Stop(nd *Node) { c.signalAndWait(nd, syscall.SIGTERM) }

func (c *Cluster) signalAndWait(nd *Node, sig syscall.Signal) {
	c.t.Helper()
	nd.mu.Lock()
	cmd, exited := nd.cmd, nd.exited
	nd.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGCONT) // a paused process cannot act on SIGTERM
	_ = cmd.Process.Signal(sig)
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
		c.t.Errorf("node %d did not exit within 30s of %v; killed", nd.ID, sig)
	}
	nd.mu.Lock()
	nd.cmd = nil
	nd.mu.Unlock()
}

// Pause stops nd with SIGSTOP (hung, not dead); Resume continues it.
func (c *Cluster) Pause(nd *Node)  { c.signal(nd, syscall.SIGSTOP) }
func (c *Cluster) Resume(nd *Node) { c.signal(nd, syscall.SIGCONT) }

func (c *Cluster) signal(nd *Node, sig syscall.Signal) {
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if nd.cmd != nil {
		_ = nd.cmd.Process.Signal(sig)
	}
}

func (c *Cluster) killAll() {
	failed := c.t.Failed()
	for _, nd := range c.Nodes {
		if failed {
			// SIGQUIT: the Go runtime writes every goroutine's stack to
			// the node's log before exiting, the evidence a stall needs.
			c.signalAndWait(nd, syscall.SIGQUIT)
		}
		c.Kill(nd)
	}
	if failed {
		c.keepLogs()
	}
}

// keepLogs copies the node logs out of the test's temporary directory,
// which is removed when the test ends, so a failure can be diagnosed.
func (c *Cluster) keepLogs() {
	dir, err := os.MkdirTemp("", "kvd-failed-logs-")
	if err != nil {
		c.t.Logf("cannot keep node logs: %v", err)
		return
	}
	for _, nd := range c.Nodes {
		if b, err := os.ReadFile(nd.LogPath); err == nil {
			_ = os.WriteFile(filepath.Join(dir, filepath.Base(nd.LogPath)), b, 0o644)
		}
	}
	c.t.Logf("node logs kept in %s", dir)
}

var readyClient = &http.Client{Timeout: 2 * time.Second}

// WaitReady waits until every running node answers /readyz with 200.
func (c *Cluster) WaitReady(d time.Duration) {
	c.t.Helper()
	for _, nd := range c.Nodes {
		if !nd.Running() {
			continue
		}
		var last string
		deadline := time.Now().Add(d)
		for {
			resp, err := readyClient.Get("http://" + nd.MetricsAddr + "/readyz")
			if err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					break
				}
				last = strings.TrimSpace(string(b))
			} else {
				last = err.Error()
			}
			if exited := nd.hasExited(); exited || time.Now().After(deadline) {
				logs := nd.Logs()
				if len(logs) > 4000 {
					logs = logs[len(logs)-4000:]
				}
				c.t.Fatalf("node %d not ready (process exited: %v): last /readyz answer: %s\nlog tail:\n%s",
					nd.ID, exited, last, logs)
			}
			time.Sleep(20 * time.Millisecond) // poll interval, not synchronisation
		}
	}
}

// Status asks nd for its shard status.
func (c *Cluster) Status(ctx context.Context, nd *Node) (*kvpb.StatusResponse, error) {
	creds := insecure.NewCredentials()
	if c.opts.ClientTLS != nil {
		creds = credentials.NewTLS(c.opts.ClientTLS)
	}
	conn, err := grpc.NewClient(nd.ClientAddr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	return kvpb.NewClusterClient(conn).Status(ctx, &kvpb.StatusRequest{})
}

// LeaderCounts returns, per node id, how many shards it leads, as reported
// by the shards' leaders themselves.
func (c *Cluster) LeaderCounts(ctx context.Context) map[uint64]int {
	out := map[uint64]int{}
	for _, nd := range c.Nodes {
		if !nd.Running() {
			continue
		}
		st, err := c.Status(ctx, nd)
		if err != nil {
			continue
		}
		for _, s := range st.GetShards() {
			if s.GetRole() == "leader" {
				out[nd.ID]++
			}
		}
	}
	return out
}

// MostLeader returns the running node that leads the most shards.
func (c *Cluster) MostLeader(ctx context.Context) *Node {
	counts := c.LeaderCounts(ctx)
	var best *Node
	for _, nd := range c.Nodes {
		if best == nil || counts[nd.ID] > counts[best.ID] {
			best = nd
		}
	}
	return best
}

// Kvctl runs kvctl against the cluster and returns stdout, stderr and the
// exit code.
func (c *Cluster) Kvctl(stdin string, args ...string) (stdout, stderr string, code int) {
	c.t.Helper()
	pre := append([]string{"--endpoints", c.Endpoints()}, c.opts.KvctlArgs...)
	cmd := exec.Command(c.KVCTL, append(pre, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code = 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			c.t.Fatalf("kvctl %v: %v", args, err)
		}
		code = ee.ExitCode()
	}
	return out.String(), errb.String(), code
}

// Logs returns node nd's log so far (for failure messages).
func (nd *Node) Logs() string {
	b, _ := os.ReadFile(nd.LogPath)
	return string(b)
}

// WaitFor polls cond until it holds or d passes.
func WaitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	if !poll(d, cond) {
		t.Fatalf("timed out after %v waiting for %s", d, what)
	}
}

// poll reports whether cond held before d passed.
func poll(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond) // poll interval, not synchronisation
	}
	return true
}

// LeaderOf returns the running node that reports itself leader of shard,
// or nil.
func (c *Cluster) LeaderOf(ctx context.Context, shard uint64) *Node {
	for _, nd := range c.Nodes {
		if !nd.Running() {
			continue
		}
		st, err := c.Status(ctx, nd)
		if err != nil {
			continue
		}
		for _, s := range st.GetShards() {
			if s.GetShard() == shard && s.GetRole() == "leader" {
				return nd
			}
		}
	}
	return nil
}

// LocalGet asks the node at addr (a client address) for its local,
// serializable value of key, bypassing the client library; a nil KeyValue
// when the key is absent.
func LocalGet(ctx context.Context, addr, key string) (*kvpb.KeyValue, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	resp, err := kvpb.NewKVClient(conn).Get(ctx, &kvpb.GetRequest{Key: []byte(key), Consistency: kvpb.Consistency_SERIALIZABLE})
	if err != nil {
		return nil, err
	}
	return resp.GetKv(), nil
}

// SyncBuffer collects output (a process's, or a command run in-process)
// that the test reads while it is still being written.
type SyncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// WaitFor polls cond on the output until it holds or d passes, and then
// fails the test with the output.
func (s *SyncBuffer) WaitFor(t testing.TB, d time.Duration, what string, cond func(out string) bool) {
	t.Helper()
	if !poll(d, func() bool { return cond(s.String()) }) {
		t.Fatalf("timed out after %v waiting for %s; the output is %q", d, what, s.String())
	}
}

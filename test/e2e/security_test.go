package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/hashring"
	"github.com/kvd/kvd/internal/pki"
	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
)

// testPKI is a CA and certificates for nodes 1..n and user "root",
// written to dir as kvd cert writes them.
type testPKI struct {
	dir string
	ca  *x509.Certificate
}

func newTestPKI(t *testing.T, nodes int) testPKI {
	t.Helper()
	p := testPKI{dir: t.TempDir()}
	certPEM, keyPEM, err := pki.Issue(pki.Request{Kind: pki.KindCA, CN: "test CA"}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := pki.WriteFiles(p.dir, "ca", certPEM, keyPEM); err != nil {
		t.Fatal(err)
	}
	ca, key, err := pki.LoadCA(p.file("ca.crt"), p.file("ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	p.ca = ca
	issue := func(r pki.Request, name string) {
		c, k, err := pki.Issue(r, ca, key)
		if err != nil {
			t.Fatal(err)
		}
		if err := pki.WriteFiles(p.dir, name, c, k); err != nil {
			t.Fatal(err)
		}
	}
	for id := 1; id <= nodes; id++ {
		issue(pki.Request{Kind: pki.KindNode, NodeID: uint64(id), DNS: []string{"localhost"}, IPs: []net.IP{net.ParseIP("127.0.0.1")}}, fmt.Sprintf("node-%d", id))
	}
	issue(pki.Request{Kind: pki.KindClient, CN: "root"}, "client-root")
	return p
}

func (p testPKI) file(name string) string { return filepath.Join(p.dir, name) }

// dialTLS is a TLS configuration trusting the CA that presents name's
// certificate ("" for none).
func (p testPKI) dialTLS(t *testing.T, name string) *tls.Config {
	t.Helper()
	cert, key := "", ""
	if name != "" {
		cert, key = p.file(name+".crt"), p.file(name+".key")
	}
	cfg, err := pki.ClientConfig(p.file("ca.crt"), cert, key)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// startTLSCluster starts n nodes with peer mTLS and client TLS that
// requires a client certificate, each node with its own certificate.
func startTLSCluster(t *testing.T, n int, p testPKI) *proccluster.Cluster {
	t.Helper()
	opts := tlsOptions(t, p)
	opts.Shards = 2
	return proccluster.Start(t, n, opts)
}

// tlsOptions are proccluster options for nodes with their own
// certificates, and a client (kvctl too) with root's.
func tlsOptions(t *testing.T, p testPKI) proccluster.Options {
	t.Helper()
	return proccluster.Options{
		NodeArgs: func(nd *proccluster.Node) []string {
			c, k := p.file(fmt.Sprintf("node-%d.crt", nd.ID)), p.file(fmt.Sprintf("node-%d.key", nd.ID))
			return []string{"--peer-cert", c, "--peer-key", k, "--peer-ca", p.file("ca.crt"),
				"--client-cert", c, "--client-key", k, "--client-ca", p.file("ca.crt")}
		},
		ClientTLS: p.dialTLS(t, "client-root"),
		KvctlArgs: []string{"--cacert", p.file("ca.crt"), "--cert", p.file("client-root.crt"), "--key", p.file("client-root.key")},
	}
}

// intruder makes peer calls the way a member does, claiming to be node
// claim of cluster, over whatever credentials it is given.
type intruder struct {
	creds   credentials.TransportCredentials
	cluster uint64
	claim   uint64
}

func (in intruder) conn(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(in.creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func (in intruder) ctx(ctx context.Context, to uint64) context.Context {
	return metadata.AppendToOutgoingContext(ctx,
		"kvd-cluster-id", strconv.FormatUint(in.cluster, 16), "kvd-from", strconv.FormatUint(in.claim, 16),
		"kvd-to", strconv.FormatUint(to, 16), "kvd-nonce", "5ec")
}

// propose sends Internal.Propose of cmd on shard to the peer port addr.
func (in intruder) propose(t *testing.T, addr string, shard uint64, cmd *peerpb.Command) error {
	t.Helper()
	b, err := proto.Marshal(cmd)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := peerpb.NewInternalClient(in.conn(t, addr)).Propose(in.ctx(ctx, 0), &peerpb.ProposeRequest{Shard: shard, Command: b})
	if err != nil {
		return err
	}
	// A command the state machine refused comes back in the result.
	var res peerpb.Result
	if err := proto.Unmarshal(resp.GetResult(), &res); err != nil {
		t.Fatal(err)
	}
	if res.GetError() != "" {
		t.Fatalf("the state machine refused the command: %s", res.GetError())
	}
	return nil
}

// streamPut opens a Raft stream to node to at addr, says hello, and
// sends a MsgProp of a put of key on shard: the leader of shard appends
// and commits whatever a MsgProp carries.
func (in intruder) streamPut(t *testing.T, addr string, to, shard uint64, key string) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := peerpb.NewRaftClient(in.conn(t, addr)).Stream(in.ctx(ctx, to))
	if err != nil {
		return err
	}
	if _, err := st.Header(); err != nil {
		return err
	}
	if err := st.Send(&peerpb.Batch{From: in.claim, To: to}); err != nil {
		_, err = st.Recv() // the refusal, when the acceptor ended the stream
		return err
	}
	if _, err := st.Recv(); err != nil {
		return err
	}
	cmd, err := proto.Marshal(&peerpb.Command{Op: &peerpb.Command_Put{Put: &kvpb.PutRequest{Key: []byte(key), Value: []byte("forged")}}})
	if err != nil {
		t.Fatal(err)
	}
	// Entries carry an 8-byte proposal id before the command; one no
	// local proposal has.
	data := binary.BigEndian.AppendUint64(nil, 1<<62)
	msg, err := proto.Marshal(&raftpb.Message{Type: raftpb.MessageType_MsgProp.Enum(), From: proto.Uint64(in.claim), To: proto.Uint64(to),
		Entries: []*raftpb.Entry{{Data: append(data, cmd...)}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&peerpb.Batch{From: in.claim, To: to, Msgs: []*peerpb.ShardMessage{{Shard: shard, Msg: msg}}}); err != nil {
		return err
	}
	return st.CloseSend()
}

// clusterInfo reads the cluster map through the cluster's kvctl-facing
// side: the id and the shard of each key.
func clusterInfo(t *testing.T, c *proccluster.Cluster, creds credentials.TransportCredentials) (*kvpb.ClusterMap, *hashring.Ring) {
	t.Helper()
	conn, err := grpc.NewClient(c.Node(1).ClientAddr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m, err := kvpb.NewClusterClient(conn).Map(ctx, &kvpb.MapRequest{})
	if err != nil {
		t.Fatal(err)
	}
	ring, err := hashring.FromMap(m)
	if err != nil {
		t.Fatal(err)
	}
	return m, ring
}

func leaderOf(t *testing.T, c *proccluster.Cluster, shard uint64) *proccluster.Node {
	t.Helper()
	var nd *proccluster.Node
	proccluster.WaitFor(t, 10*time.Second, fmt.Sprintf("a leader of shard %d", shard), func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		nd = c.LeaderOf(ctx, shard)
		return nd != nil
	})
	return nd
}

const metaShard = 0

// TestPeerPortWithoutTLSActsForAnyone shows what peer TLS is for: on a
// cluster without it, anyone who reaches a peer port commits a put with
// Internal.Propose, commits another through a Raft stream that claims to
// be a stopped member, and redirects a member's client address. kvd
// says so in one line at start.
func TestPeerPortWithoutTLSActsForAnyone(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 2})
	if n := strings.Count(c.Node(1).Logs(), "peer TLS is off"); n != 1 {
		t.Fatalf("node 1 logged the open peer port %d times, want once", n)
	}
	m, ring := clusterInfo(t, c, insecure.NewCredentials())
	anon := intruder{creds: insecure.NewCredentials(), cluster: m.GetClusterId()}

	// Internal.Propose, without any identity.
	l := leaderOf(t, c, ring.Shard([]byte("anon/propose")))
	put := &peerpb.Command{Op: &peerpb.Command_Put{Put: &kvpb.PutRequest{Key: []byte("anon/propose"), Value: []byte("forged")}}}
	if err := anon.propose(t, l.PeerAddr, ring.Shard([]byte("anon/propose")), put); err != nil {
		t.Fatalf("anonymous Internal.Propose on a cluster without peer TLS: %v", err)
	}
	if out, errOut, code := c.Kvctl("", "get", "anon/propose"); code != 0 || out != "forged\n" {
		t.Fatalf("get anon/propose: exit %d %q %s", code, out, errOut)
	}

	// A Raft stream claiming to be node 1, once node 1 is gone (its live
	// stream would make the claim a duplicate).
	c.Stop(c.Node(1))
	key := "anon/stream"
	shard := ring.Shard([]byte(key))
	forger := intruder{creds: insecure.NewCredentials(), cluster: m.GetClusterId(), claim: 1}
	proccluster.WaitFor(t, 20*time.Second, "a forged stream's put to commit", func() bool {
		l := leaderOf(t, c, shard)
		if err := forger.streamPut(t, l.PeerAddr, l.ID, shard, key); err != nil {
			return false // node 1's old stream may not have timed out yet
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		kv, err := proccluster.LocalGet(ctx, l.ClientAddr, key)
		return err == nil && string(kv.GetValue()) == "forged"
	})

	// UpdateMember: node 2's client address now points elsewhere.
	ml := leaderOf(t, c, metaShard)
	redirect := &peerpb.Command{Op: &peerpb.Command_UpdateMember{UpdateMember: &peerpb.UpdateMember{
		Member: &kvpb.Member{Id: 2, ClientAddr: "attacker.invalid:2379", PeerAddr: c.Node(2).PeerAddr}}}}
	if err := anon.propose(t, ml.PeerAddr, metaShard, redirect); err != nil {
		t.Fatalf("anonymous UpdateMember: %v", err)
	}
	proccluster.WaitFor(t, 10*time.Second, "the map to list the attacker's address", func() bool {
		out, _, code := c.Kvctl("", "--endpoints", c.Node(3).ClientAddr, "member", "list")
		return code == 0 && strings.Contains(out, "attacker.invalid")
	})
}

// TestPeerMTLSRefusesStrangers runs the same calls against a cluster with
// peer mTLS: no certificate, a client's certificate, and node 3's
// certificate claiming to be node 1 are all refused, on unary calls and
// on the Raft stream's hello; node 3's certificate as node 3 is a member
// and is served. kvctl without a client certificate exits 3 naming TLS.
func TestPeerMTLSRefusesStrangers(t *testing.T) {
	p := newTestPKI(t, 3)
	c := startTLSCluster(t, 3, p)
	if logs := c.Node(1).Logs(); strings.Contains(logs, "peer TLS is off") {
		t.Fatalf("node 1 says its peer port is open although it serves mTLS")
	}
	m, ring := clusterInfo(t, c, credentials.NewTLS(p.dialTLS(t, "client-root")))
	tlsAs := func(name string) credentials.TransportCredentials { return credentials.NewTLS(p.dialTLS(t, name)) }
	strangers := []struct {
		name string
		in   intruder
		code codes.Code
	}{
		{"plaintext", intruder{creds: insecure.NewCredentials(), claim: 1}, codes.Unavailable},
		{"TLS without a certificate", intruder{creds: tlsAs(""), claim: 1}, codes.Unavailable},
		{"a client's certificate", intruder{creds: tlsAs("client-root"), claim: 1}, codes.Unauthenticated},
		{"node 3's certificate claiming node 1", intruder{creds: tlsAs("node-3"), claim: 1}, codes.Unauthenticated},
	}
	key := "tls/propose"
	shard := ring.Shard([]byte(key))
	put := &peerpb.Command{Op: &peerpb.Command_Put{Put: &kvpb.PutRequest{Key: []byte(key), Value: []byte("forged")}}}
	l, ml := leaderOf(t, c, shard), leaderOf(t, c, metaShard)
	redirect := &peerpb.Command{Op: &peerpb.Command_UpdateMember{UpdateMember: &peerpb.UpdateMember{
		Member: &kvpb.Member{Id: 2, ClientAddr: "attacker.invalid:2379", PeerAddr: c.Node(2).PeerAddr}}}}
	for _, s := range strangers {
		s.in.cluster = m.GetClusterId()
		if err := s.in.propose(t, l.PeerAddr, shard, put); status.Code(err) != s.code {
			t.Errorf("Internal.Propose with %s: %v, want %v", s.name, err, s.code)
		}
		if err := s.in.propose(t, ml.PeerAddr, metaShard, redirect); status.Code(err) != s.code {
			t.Errorf("UpdateMember with %s: %v, want %v", s.name, err, s.code)
		}
		// The stream goes to node 2, which node 1 dials.
		err := s.in.streamPut(t, c.Node(2).PeerAddr, 2, shard, "tls/stream")
		want := s.code
		if want == codes.Unauthenticated && s.name != "a client's certificate" {
			want = codes.FailedPrecondition // an identity mismatch, as any other in the handshake
		}
		if status.Code(err) != want {
			t.Errorf("Raft.Stream with %s: %v, want %v", s.name, err, want)
		}
	}
	if out, errOut, code := c.Kvctl("", "get", key); code != 1 {
		t.Errorf("get %s after refused proposals: exit %d %q %s, want 1 (not found)", key, code, out, errOut)
	}
	if out, _, _ := c.Kvctl("", "member", "list"); strings.Contains(out, "attacker.invalid") {
		t.Errorf("a refused UpdateMember changed the map:\n%s", out)
	}
	// A member is served: node 3 proposing as node 3.
	member := intruder{creds: tlsAs("node-3"), cluster: m.GetClusterId(), claim: 3}
	if err := member.propose(t, l.PeerAddr, shard, put); err != nil {
		t.Fatalf("Internal.Propose by node 3 with its own certificate: %v", err)
	}

	// kvctl: without a client certificate, exit 3 saying TLS; with one, served.
	for _, args := range [][]string{
		{"--endpoints", c.Endpoints(), "--timeout", "2s", "get", key},
		{"--endpoints", c.Endpoints(), "--timeout", "2s", "--cacert", p.file("ca.crt"), "get", key},
	} {
		out, errOut, code := runKvctl(t, c.KVCTL, args...)
		if code != 3 || !strings.Contains(errOut, "TLS") {
			t.Errorf("kvctl %v: exit %d %q %s, want 3 naming TLS", args, code, out, errOut)
		}
	}
	if out, errOut, code := c.Kvctl("", "get", key); code != 0 || out != "forged\n" {
		t.Errorf("kvctl get with a client certificate: exit %d %q %s", code, out, errOut)
	}
	https := strings.ReplaceAll("https://"+c.Endpoints(), ",", ",https://")
	if _, errOut, code := runKvctl(t, c.KVCTL, "--endpoints", https, "--cacert", p.file("ca.crt"),
		"--cert", p.file("client-root.crt"), "--key", p.file("client-root.key"), "put", "tls/https", "v"); code != 0 {
		t.Errorf("kvctl put with https:// endpoints: exit %d %s", code, errOut)
	}
}

// runKvctl runs kvctl with exactly args.
func runKvctl(t *testing.T, kvctl string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(kvctl, args...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("kvctl %v: %v", args, err)
		}
		code = ee.ExitCode()
	}
	return out.String(), errb.String(), code
}

// TestMemberAddOnlyByTheJoiner: on a client port that requires
// certificates, MemberAdd (after which every node dials the new member)
// is refused to a client's certificate and to a member adding another id;
// a node joining with its own certificate, with auth enabled, is added
// and becomes ready.
func TestMemberAddOnlyByTheJoiner(t *testing.T) {
	p := newTestPKI(t, 4)
	c := startTLSCluster(t, 3, p)
	for _, name := range []string{"client-root", "node-3"} {
		conn, err := grpc.NewClient(c.Node(1).ClientAddr, grpc.WithTransportCredentials(credentials.NewTLS(p.dialTLS(t, name))))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err = kvpb.NewClusterClient(conn).MemberAdd(ctx, &kvpb.MemberAddRequest{Member: &kvpb.Member{Id: 4, PeerAddr: "attacker.invalid:2380"}})
		cancel()
		conn.Close()
		if status.Code(err) != codes.PermissionDenied {
			t.Errorf("MemberAdd of node 4 with %s's certificate: %v, want PermissionDenied", name, err)
		}
	}
	// With auth on (root identified by its certificate's common name),
	// the node joins all the same: its certificate names it.
	for _, args := range [][]string{{"user", "add", "root", "--no-password"}, {"user", "grant-role", "root", "root"}, {"auth", "enable"}} {
		if out, errOut, code := c.Kvctl("", args...); code != 0 {
			t.Fatalf("kvctl %v: exit %d %s%s", args, code, out, errOut)
		}
	}
	nd := c.AddNode(c.Node(1).ClientAddr)
	c.WaitReady(30 * time.Second)
	if out, errOut, code := c.Kvctl("", "member", "list"); code != 0 || !strings.Contains(out, nd.PeerAddr) || strings.Contains(out, "attacker.invalid") {
		t.Fatalf("member list after node 4 joined: exit %d\n%s%s", code, out, errOut)
	}
}

// TestMemberAddNeedsRootWithAuthOnAndNoClientCA: on a client port with
// TLS but no --client-ca, no certificate names anyone, so with auth on a
// MemberAdd without root's token is refused.
func TestMemberAddNeedsRootWithAuthOnAndNoClientCA(t *testing.T) {
	p := newTestPKI(t, 1)
	c := proccluster.Start(t, 1, proccluster.Options{
		NodeArgs: func(nd *proccluster.Node) []string {
			return []string{"--client-cert", p.file("node-1.crt"), "--client-key", p.file("node-1.key")}
		},
		ClientTLS: p.dialTLS(t, ""),
		KvctlArgs: []string{"--cacert", p.file("ca.crt")},
	})
	for _, args := range [][]string{{"user", "add", "root", "--no-password"}, {"user", "grant-role", "root", "root"}, {"auth", "enable"}} {
		if out, errOut, code := c.Kvctl("", args...); code != 0 {
			t.Fatalf("kvctl %v: exit %d %s%s", args, code, out, errOut)
		}
	}
	conn, err := grpc.NewClient(c.Node(1).ClientAddr, grpc.WithTransportCredentials(credentials.NewTLS(p.dialTLS(t, ""))))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = kvpb.NewClusterClient(conn).MemberAdd(ctx, &kvpb.MemberAddRequest{Member: &kvpb.Member{Id: 2, PeerAddr: "attacker.invalid:2380"}})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("MemberAdd without a token: %v, want PermissionDenied", err)
	}
}

package transport_test

import (
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/kvd/kvd/internal/pki"
	"github.com/kvd/kvd/internal/testkit"
	"github.com/kvd/kvd/transport"
)

// TestPeerCertMustNameTheDialer: with RequirePeerCert over mutual TLS,
// node 2 refuses node 1's stream while node 1 dials with node 3's
// certificate (valid, of the same CA, naming another node than the
// stream claims), and delivers nothing it sent; once node 1 dials with
// its own, its messages arrive.
func TestPeerCertMustNameTheDialer(t *testing.T) {
	dir := t.TempDir()
	caPEM, caKeyPEM, err := pki.Issue(pki.Request{Kind: pki.KindCA, CN: "test"}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := pki.WriteFiles(dir, "ca", caPEM, caKeyPEM); err != nil {
		t.Fatal(err)
	}
	ca, caKey, err := pki.LoadCA(filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []uint64{1, 2, 3} {
		c, k, err := pki.Issue(pki.Request{Kind: pki.KindNode, NodeID: id, IPs: []net.IP{net.ParseIP("127.0.0.1")}}, ca, caKey)
		if err != nil {
			t.Fatal(err)
		}
		if err := pki.WriteFiles(dir, fmt.Sprintf("node-%d", id), c, k); err != nil {
			t.Fatal(err)
		}
	}
	files := func(id uint64) (string, string) {
		return filepath.Join(dir, fmt.Sprintf("node-%d.crt", id)), filepath.Join(dir, fmt.Sprintf("node-%d.key", id))
	}
	// start runs node id serving its own certificate and dialing with
	// certID's.
	start := func(id, certID uint64, logs *testkit.LogBuffer) (*transport.Transport, *recorder, string) {
		cert, key := files(id)
		srvTLS, err := pki.ServerConfig(cert, key, filepath.Join(dir, "ca.crt"))
		if err != nil {
			t.Fatal(err)
		}
		dcert, dkey := files(certID)
		dialTLS, err := pki.ClientConfig(filepath.Join(dir, "ca.crt"), dcert, dkey)
		if err != nil {
			t.Fatal(err)
		}
		h := newRecorder()
		tr := transport.New(transport.Config{NodeID: id, Handler: h, RequirePeerCert: true, Logger: logTo(logs),
			DialOptions: []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(dialTLS))}})
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := grpc.NewServer(append(transport.ServerOptions(), grpc.Creds(credentials.NewTLS(srvTLS)))...)
		tr.Register(srv)
		go srv.Serve(lis) //nolint:errcheck // returns when the server stops
		t.Cleanup(func() { tr.Stop(); srv.Stop() })
		return tr, h, lis.Addr().String()
	}
	var logs1, logs2 testkit.LogBuffer
	_, h2, addr2 := start(2, 2, &logs2)
	forger, _, _ := start(1, 3, &logs1)
	forger.SetPeer(2, addr2)
	forger.Send(1, []*raftpb.Message{msg(raftpb.MessageType_MsgApp, 1, 2, 1)})
	waitFor(t, "node 2 to refuse the stream", func() bool {
		return strings.Contains(logs2.String(), "certificate of node 3 claims to be node 1")
	})
	if got := h2.received(1, 1); len(got) != 0 {
		t.Fatalf("node 2 delivered %v from a stream it refused", got)
	}
	forger.Stop()

	honest, _, _ := start(1, 1, &logs1)
	honest.SetPeer(2, addr2)
	waitFor(t, "node 1's message to arrive", func() bool {
		honest.Send(1, []*raftpb.Message{msg(raftpb.MessageType_MsgApp, 1, 2, 2)})
		return len(h2.received(1, 1)) > 0
	})
}

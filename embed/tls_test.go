package embed_test

import (
	"net"
	"path/filepath"
	"testing"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/embed"
	"github.com/kvd/kvd/internal/pki"
)

// writeCerts writes a CA and a node certificate for node id, naming
// 127.0.0.1, and returns their files.
func writeCerts(t *testing.T, id uint64) (caFile, certFile, keyFile string) {
	t.Helper()
	dir := t.TempDir()
	caPEM, caKeyPEM, err := pki.Issue(pki.Request{Kind: pki.KindCA, CN: "test CA"}, nil, nil)
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
	c, k, err := pki.Issue(pki.Request{Kind: pki.KindNode, NodeID: id, IPs: []net.IP{net.ParseIP("127.0.0.1")}}, ca, caKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := pki.WriteFiles(dir, "node", c, k); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, "ca.crt"), filepath.Join(dir, "node.crt"), filepath.Join(dir, "node.key")
}

// A node serving its client port with mutual TLS: its own client gets in
// (in memory, with the node's certificate), and so does a TCP client with
// a certificate of the CA.
func TestClientTLS(t *testing.T) {
	caFile, certFile, keyFile := writeCerts(t, 1)
	n := start(t, embed.Config{
		DataDir: t.TempDir(), Shards: 2, ClientListener: listen(t),
		ClientCertFile: certFile, ClientKeyFile: keyFile, ClientCAFile: caFile,
	})
	waitReady(t, n)
	ctx := t.Context()
	if _, err := n.Client().Put(ctx, []byte("k"), []byte("v")); err != nil {
		t.Fatal(err)
	}
	tlsCfg, err := pki.ClientConfig(caFile, certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	c, err := client.New(ctx, client.Config{Endpoints: []string{n.Server().ClientAddr()}, TLS: tlsCfg})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	kv, err := c.Get(ctx, []byte("k"))
	if err != nil || string(kv.GetValue()) != "v" {
		t.Fatalf("TCP client over TLS: %v %q", err, kv.GetValue())
	}
}

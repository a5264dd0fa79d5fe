package pki

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"path/filepath"
	"testing"
)

// TestIssueAndIdentity: a node certificate verifies against its CA for
// both ends of a connection and names its node id; a client certificate
// verifies for clients only and names none; another CA's does not verify.
func TestIssueAndIdentity(t *testing.T) {
	dir := t.TempDir()
	caPEM, caKeyPEM, err := Issue(Request{Kind: KindCA, CN: "test"}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := WriteFiles(dir, "ca", caPEM, caKeyPEM); err != nil {
		t.Fatal(err)
	}
	ca, caKey, err := LoadCA(filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	roots, err := Pool(filepath.Join(dir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	parse := func(certPEM, keyPEM []byte) *x509.Certificate {
		t.Helper()
		pair, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			t.Fatal(err)
		}
		c, err := x509.ParseCertificate(pair.Certificate[0])
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	verify := func(c *x509.Certificate, pool *x509.CertPool, usage x509.ExtKeyUsage) error {
		_, err := c.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{usage}})
		return err
	}

	nc, nk, err := Issue(Request{Kind: KindNode, NodeID: 7, DNS: []string{"kvd7"}, IPs: []net.IP{net.ParseIP("127.0.0.1")}}, ca, caKey)
	if err != nil {
		t.Fatal(err)
	}
	node := parse(nc, nk)
	if id, err := NodeID(node); err != nil || id != 7 {
		t.Fatalf("node certificate names node %d (%v), want 7", id, err)
	}
	for _, u := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if err := verify(node, roots, u); err != nil {
			t.Errorf("node certificate, usage %v: %v", u, err)
		}
	}
	if err := node.VerifyHostname("kvd7"); err != nil {
		t.Error(err)
	}

	cc, ck, err := Issue(Request{Kind: KindClient, CN: "alice"}, ca, caKey)
	if err != nil {
		t.Fatal(err)
	}
	cl := parse(cc, ck)
	if _, err := NodeID(cl); !errors.Is(err, ErrNoNodeID) {
		t.Errorf("client certificate: NodeID error %v, want ErrNoNodeID", err)
	}
	if cl.Subject.CommonName != "alice" || verify(cl, roots, x509.ExtKeyUsageClientAuth) != nil {
		t.Errorf("client certificate: CN %q, client verify %v", cl.Subject.CommonName, verify(cl, roots, x509.ExtKeyUsageClientAuth))
	}
	if verify(cl, roots, x509.ExtKeyUsageServerAuth) == nil {
		t.Error("a client certificate verifies for a server")
	}

	otherPEM, otherKeyPEM, err := Issue(Request{Kind: KindCA, CN: "other"}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	other := x509.NewCertPool()
	other.AddCert(parse(otherPEM, otherKeyPEM))
	if verify(node, other, x509.ExtKeyUsageClientAuth) == nil {
		t.Error("a node certificate verifies against another CA")
	}
	if _, _, err := Issue(Request{Kind: KindNode}, ca, caKey); err == nil {
		t.Error("a node certificate without a node id was issued")
	}
}

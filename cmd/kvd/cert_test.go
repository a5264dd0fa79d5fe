package main

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/kvd/kvd/internal/pki"
)

// TestCertCluster: kvd cert cluster writes a CA, node and client
// certificates with the names asked for, and a second run keeps them all
// (the compose file runs it at every start).
func TestCertCluster(t *testing.T) {
	dir := t.TempDir()
	args := []string{"cert", "cluster", "--dir", dir, "--nodes", "2", "--dns", "localhost,kvd{id}", "--client", "root,alice"}
	var out, errb bytes.Buffer
	if code := run(args, &out, &errb, nil); code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	files := []string{"ca.crt", "ca.key", "node-1.crt", "node-1.key", "node-2.crt", "node-2.key",
		"client-root.crt", "client-root.key", "client-alice.crt", "client-alice.key"}
	first := map[string][]byte{}
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		first[f] = b
	}
	block, _ := pem.Decode(first["node-2.crt"])
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if id, err := pki.NodeID(cert); err != nil || id != 2 || !slices.Equal(cert.DNSNames, []string{"localhost", "kvd2"}) {
		t.Errorf("node-2.crt: id %d (%v), DNS %v", id, err, cert.DNSNames)
	}
	if fi, err := os.Stat(filepath.Join(dir, "node-2.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("node-2.key mode %v (%v), want 0600", fi.Mode().Perm(), err)
	}
	out.Reset()
	if code := run(args, &out, &errb, nil); code != 0 {
		t.Fatalf("second run: exit %d: %s", code, errb.String())
	}
	for _, f := range files {
		if b, _ := os.ReadFile(filepath.Join(dir, f)); !bytes.Equal(b, first[f]) {
			t.Errorf("second run rewrote %s", f)
		}
	}
	if code := run([]string{"cert", "node", "--dir", t.TempDir(), "--id", "1"}, &out, &errb, nil); code != exitUsage {
		t.Errorf("kvd cert node without a CA: exit %d, want %d", code, exitUsage)
	}
}

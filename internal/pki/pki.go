// Package pki makes and loads the certificates kvd's TLS uses, and reads a
// node's identity out of a verified peer certificate.
//
// A node certificate names its node id in a URI SAN, kvd://node/<id>, and
// in its common name, node-<id>; the URI is what peers check (a common
// name is free text to most tooling, a URI SAN is not). It carries both
// server and client key usage, as a node is both on the peer port. A
// client certificate has a common name (the user) and client key usage
// only, so it cannot pass as a node.
package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// NodeURIPrefix prefixes the node id in a node certificate's URI SAN.
const NodeURIPrefix = "kvd://node/"

// ErrNoNodeID: a certificate names no node (a client's, or another CA's).
var ErrNoNodeID = errors.New("pki: certificate names no kvd node id")

// NodeID returns the node id a certificate's URI SAN names.
func NodeID(cert *x509.Certificate) (uint64, error) {
	for _, u := range cert.URIs {
		s := u.String()
		if rest, ok := strings.CutPrefix(s, NodeURIPrefix); ok {
			id, err := strconv.ParseUint(rest, 10, 64)
			if err != nil || id == 0 {
				return 0, fmt.Errorf("%w: bad URI SAN %q", ErrNoNodeID, s)
			}
			return id, nil
		}
	}
	return 0, fmt.Errorf("%w (subject %q has no %s<id> URI SAN)", ErrNoNodeID, cert.Subject.CommonName, NodeURIPrefix)
}

// Kind is what a certificate is for.
type Kind int

const (
	KindCA Kind = iota
	KindNode
	KindClient
)

// Request describes one certificate to issue.
type Request struct {
	Kind   Kind
	NodeID uint64 // KindNode
	CN     string // KindClient: the user name; KindCA: the CA's name
	DNS    []string
	IPs    []net.IP
	Valid  time.Duration
}

// Issue makes a key and a certificate for r, signed by the CA (caCert,
// caKey), or self-signed when r is a CA. It returns both PEM-encoded.
func Issue(r Request, caCert *x509.Certificate, caKey *ecdsa.PrivateKey) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: generate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, fmt.Errorf("pki: draw serial: %w", err)
	}
	if r.Valid == 0 {
		r.Valid = 365 * 24 * time.Hour
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		NotBefore:    now.Add(-time.Hour), // a peer's clock may lag a little
		NotAfter:     now.Add(r.Valid),
		DNSNames:     r.DNS,
		IPAddresses:  r.IPs,
	}
	switch r.Kind {
	case KindCA:
		tmpl.Subject = pkix.Name{CommonName: r.CN}
		tmpl.IsCA, tmpl.BasicConstraintsValid = true, true
		tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature
		tmpl.DNSNames, tmpl.IPAddresses = nil, nil
	case KindNode:
		if r.NodeID == 0 {
			return nil, nil, errors.New("pki: a node certificate needs a node id")
		}
		tmpl.Subject = pkix.Name{CommonName: fmt.Sprintf("node-%d", r.NodeID)}
		tmpl.URIs = []*url.URL{{Scheme: "kvd", Host: "node", Path: "/" + strconv.FormatUint(r.NodeID, 10)}}
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	case KindClient:
		if r.CN == "" {
			return nil, nil, errors.New("pki: a client certificate needs a common name")
		}
		tmpl.Subject = pkix.Name{CommonName: r.CN}
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		tmpl.DNSNames, tmpl.IPAddresses = nil, nil
	}
	parent, signer := tmpl, key
	if r.Kind != KindCA {
		if caCert == nil || caKey == nil {
			return nil, nil, errors.New("pki: a CA is needed to sign")
		}
		parent, signer = caCert, caKey
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, signer)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: create certificate: %w", err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), nil
}

// LoadCA reads a CA certificate and its key (as Issue wrote them).
func LoadCA(certFile, keyFile string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: load CA %s: %w", certFile, err)
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, nil, fmt.Errorf("pki: parse CA %s: %w", certFile, err)
	}
	key, ok := pair.PrivateKey.(*ecdsa.PrivateKey)
	if !ok || !cert.IsCA {
		return nil, nil, fmt.Errorf("pki: %s is not an ECDSA CA certificate", certFile)
	}
	return cert, key, nil
}

// WriteFiles writes cert and key PEM to dir/name.crt and dir/name.key
// (the key readable by its owner only).
func WriteFiles(dir, name string, certPEM, keyPEM []byte) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, name+".crt"), certPEM, 0o644); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, name+".key"), keyPEM, 0o600); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	return nil
}

// Pool reads the PEM certificates in file into a pool.
func Pool(file string) (*x509.CertPool, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("pki: read CA %w", err)
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("pki: %s holds no PEM certificate", file)
	}
	return p, nil
}

// ServerConfig is the TLS configuration of a listener serving certFile;
// with caFile, a client certificate signed by it is required.
func ServerConfig(certFile, keyFile, caFile string) (*tls.Config, error) {
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("pki: load %s: %w", certFile, err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
	if caFile != "" {
		if cfg.ClientCAs, err = Pool(caFile); err != nil {
			return nil, err
		}
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// ClientConfig is the TLS configuration of a dialer that trusts caFile
// (the system roots when empty) and, with certFile, presents it.
func ClientConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	var err error
	if caFile != "" {
		if cfg.RootCAs, err = Pool(caFile); err != nil {
			return nil, err
		}
	}
	if certFile != "" || keyFile != "" {
		if certFile == "" || keyFile == "" {
			return nil, errors.New("pki: a client certificate needs both its certificate and its key file")
		}
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("pki: load %s: %w", certFile, err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

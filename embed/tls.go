package embed

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net"

	"google.golang.org/grpc/credentials"

	"github.com/kvd/kvd/internal/pki"
	"github.com/kvd/kvd/server"
)

// clientCreds are the embedded client's credentials when the node serves
// its client port with TLS (Config.ClientCertFile): it presents the
// node's own certificate (a node certificate serves both ends, and
// satisfies --client-ca) and trusts the CA of --client-ca, or of
// --peer-ca without one. Nil without client TLS.
func clientCreds(cfg *Config) (credentials.TransportCredentials, error) {
	if cfg.ClientCertFile == "" {
		return nil, nil
	}
	ca := cfg.ClientCAFile
	if ca == "" {
		ca = cfg.PeerCAFile
	}
	remote, err := pki.ClientConfig(ca, cfg.ClientCertFile, cfg.ClientKeyFile)
	if err != nil {
		return nil, fmt.Errorf("%w: embedded client: %v", server.ErrConfig, err)
	}
	// In memory the peer is this process's own listener, dialed by an
	// address no certificate names: the chain is checked, the name not.
	local := remote.Clone()
	local.InsecureSkipVerify = true
	local.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
		return verifyChain(raw, remote.RootCAs)
	}
	return &splitCreds{TransportCredentials: credentials.NewTLS(remote), local: credentials.NewTLS(local)}, nil
}

func verifyChain(raw [][]byte, roots *x509.CertPool) error {
	if len(raw) == 0 {
		return errors.New("embedded client: the node presented no certificate")
	}
	certs := make([]*x509.Certificate, len(raw))
	for i, b := range raw {
		c, err := x509.ParseCertificate(b)
		if err != nil {
			return fmt.Errorf("embedded client: node certificate: %w", err)
		}
		certs[i] = c
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	return err
}

// splitCreds hands connections dialed in memory to local and the others
// to the embedded TransportCredentials.
type splitCreds struct {
	credentials.TransportCredentials
	local credentials.TransportCredentials
}

func (s *splitCreds) ClientHandshake(ctx context.Context, authority string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	if _, ok := conn.(*memConn); ok {
		return s.local.ClientHandshake(ctx, authority, conn)
	}
	return s.TransportCredentials.ClientHandshake(ctx, authority, conn)
}

func (s *splitCreds) Clone() credentials.TransportCredentials {
	return &splitCreds{TransportCredentials: s.TransportCredentials.Clone(), local: s.local.Clone()}
}

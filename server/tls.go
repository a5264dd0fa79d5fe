package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kvd/kvd/internal/pki"
	"github.com/kvd/kvd/transport"
)

// tlsSetup is what the TLS flags load to: nil configs mean plaintext.
type tlsSetup struct {
	peerServer, peerDial *tls.Config // peer mTLS, both or neither
	client               *tls.Config // the client port
	// joinDial dials members' client addresses (--join): the client CA
	// (the peer CA when there is none) verifies them, and this node's
	// certificate answers a client port that requires one.
	joinDial *tls.Config
}

// loadTLS reads the certificates the configuration names. A missing or
// unreadable file, or a half-given set, is a configuration error.
func loadTLS(c *Config) (tlsSetup, error) {
	var t tlsSetup
	peer := c.PeerCertFile != "" || c.PeerKeyFile != "" || c.PeerCAFile != ""
	if peer && (c.PeerCertFile == "" || c.PeerKeyFile == "" || c.PeerCAFile == "") {
		return t, fmt.Errorf("%w: peer TLS needs all of --peer-cert, --peer-key and --peer-ca", ErrConfig)
	}
	if (c.ClientCertFile == "") != (c.ClientKeyFile == "") || (c.ClientCertFile == "" && c.ClientCAFile != "") {
		return t, fmt.Errorf("%w: client TLS needs --client-cert and --client-key (and optionally --client-ca)", ErrConfig)
	}
	var err error
	if peer {
		if t.peerServer, err = pki.ServerConfig(c.PeerCertFile, c.PeerKeyFile, c.PeerCAFile); err != nil {
			return t, fmt.Errorf("%w: %v", ErrConfig, err)
		}
		if t.peerDial, err = pki.ClientConfig(c.PeerCAFile, c.PeerCertFile, c.PeerKeyFile); err != nil {
			return t, fmt.Errorf("%w: %v", ErrConfig, err)
		}
		// A node certificate that names another node would have every
		// peer refuse this one; say so now rather than in peers' logs.
		leaf, err := parseLeaf(t.peerDial.Certificates[0])
		if err != nil {
			return t, fmt.Errorf("%w: --peer-cert %s: %v", ErrConfig, c.PeerCertFile, err)
		}
		if id, err := pki.NodeID(leaf); err != nil || id != c.NodeID {
			return t, fmt.Errorf("%w: --peer-cert %s must name node %d (a %s%d URI SAN, as `kvd cert node --id %d` writes): %v",
				ErrConfig, c.PeerCertFile, c.NodeID, pki.NodeURIPrefix, c.NodeID, c.NodeID, describeID(id, err))
		}
	}
	if c.ClientCertFile != "" {
		if t.client, err = pki.ServerConfig(c.ClientCertFile, c.ClientKeyFile, c.ClientCAFile); err != nil {
			return t, fmt.Errorf("%w: %v", ErrConfig, err)
		}
		ca, cert, key := c.ClientCAFile, c.ClientCertFile, c.ClientKeyFile
		if ca == "" {
			ca = c.PeerCAFile
		}
		if t.joinDial, err = pki.ClientConfig(ca, cert, key); err != nil {
			return t, fmt.Errorf("%w: %v", ErrConfig, err)
		}
	}
	return t, nil
}

func describeID(id uint64, err error) string {
	if err != nil {
		return err.Error()
	}
	return fmt.Sprintf("it names node %d", id)
}

func parseLeaf(c tls.Certificate) (*x509.Certificate, error) {
	if c.Leaf != nil {
		return c.Leaf, nil
	}
	return x509.ParseCertificate(c.Certificate[0])
}

// peerCreds are the transport credentials of this node's peer dials.
func (t tlsSetup) peerCreds() grpc.DialOption {
	if t.peerDial == nil {
		return grpc.WithTransportCredentials(insecure.NewCredentials())
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(t.peerDial))
}

// joinCreds are the credentials of --join's calls to a member's client
// port.
func (t tlsSetup) joinCreds() grpc.DialOption {
	if t.joinDial == nil {
		return grpc.WithTransportCredentials(insecure.NewCredentials())
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(t.joinDial))
}

// checkJoiner decides who may add member id through the client port.
// Every node dials a new member's peer address from then on, so when the
// client port requires certificates (--client-ca) only the joining node
// itself may: its certificate must name id (kvd --join presents its
// --client-cert, a node certificate). Without --client-ca anyone who
// reaches the client port may, as anyone may do anything there.
func (s *Server) checkJoiner(ctx context.Context, id uint64) error {
	if s.tls.client == nil || s.tls.client.ClientAuth != tls.RequireAndVerifyClientCert {
		return nil
	}
	certID, err := transport.PeerCertID(ctx)
	if err != nil {
		return fmt.Errorf("only node %d itself may add itself, with a node certificate naming it: %w", id, err)
	}
	if certID != id {
		return fmt.Errorf("node %d's certificate may not add node %d: a node adds only itself", certID, id)
	}
	return nil
}

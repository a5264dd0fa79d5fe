package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"net/netip"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kvd/kvd/internal/pki"
	"github.com/kvd/kvd/transport"
)

// onLoopback reports whether addr (host:port, as a listener reports it)
// can be reached from this machine only. An unspecified host (0.0.0.0,
// ::, "") listens on every interface, and a name other than localhost
// may resolve to anything: neither counts as loopback.
func onLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}

// logPlaintextPeer says, once at start, how far a peer port without TLS
// is exposed: whoever reaches it can act as a member (propose writes,
// vote, rewrite the cluster map). On loopback that is this machine's
// processes only, as the default --listen-peer keeps it; on any other
// address it is the network's, which deserves a warning.
func logPlaintextPeer(log *slog.Logger, addr string) {
	if onLoopback(addr) {
		log.Info("peer TLS is off; the peer port listens on loopback, so only this machine can reach it", "peer", addr)
		return
	}
	log.Warn("peer TLS is off and the peer port listens on a non-loopback address: anyone who can reach it can act as a member of this cluster (propose writes, take part in Raft); give --peer-cert, --peer-key and --peer-ca, or listen on 127.0.0.1", "peer", addr)
}

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

// verifiesClientCerts reports whether the client port admits only holders
// of a certificate of --client-ca.
func (s *Server) verifiesClientCerts() bool {
	return s.tls.client != nil && s.tls.client.ClientAuth == tls.RequireAndVerifyClientCert
}

// checkJoiner decides who may add member id through the client port.
// Every node dials a new member's peer address from then on, so when the
// client port requires certificates (--client-ca) only the joining node
// itself may: its certificate must name id (kvd --join presents its
// --client-cert, a node certificate). Without --client-ca anyone who
// reaches the client port may, as anyone may do anything there.
func (s *Server) checkJoiner(ctx context.Context, id uint64) error {
	if !s.verifiesClientCerts() {
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

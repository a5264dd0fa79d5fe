package transport

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/credentials"
	grpcpeer "google.golang.org/grpc/peer"

	"github.com/kvd/kvd/internal/pki"
)

// ErrNoPeerCert: peer TLS is on, and a call came without a node
// certificate of the cluster's CA. gRPC's TLS handshake already refused
// any certificate the CA did not sign; this is a connection that is not
// TLS at all (a listener handed in by a test) or a client certificate,
// which names a user, not a node.
var ErrNoPeerCert = errors.New("transport: no node certificate")

// PeerCertID returns the node id named by the verified certificate the
// caller of ctx presented. Only a certificate verified against the CA
// counts (gRPC's TLS credentials fill VerifiedChains only then).
func PeerCertID(ctx context.Context) (uint64, error) {
	p, ok := grpcpeer.FromContext(ctx)
	if !ok {
		return 0, fmt.Errorf("%w: no peer in the call", ErrNoPeerCert)
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return 0, fmt.Errorf("%w: %s did not connect over TLS", ErrNoPeerCert, p.Addr)
	}
	if len(info.State.VerifiedChains) == 0 || len(info.State.VerifiedChains[0]) == 0 {
		return 0, fmt.Errorf("%w: %s presented no certificate of the cluster CA", ErrNoPeerCert, p.Addr)
	}
	id, err := pki.NodeID(info.State.VerifiedChains[0][0])
	if err != nil {
		return 0, fmt.Errorf("%w: %s: %v", ErrNoPeerCert, p.Addr, err)
	}
	return id, nil
}

// checkCert refuses a stream whose claimed node id is not the one its
// certificate names, when peer certificates are required. The handshake's
// other checks (cluster, addressee, incarnation) stay: a certificate proves
// who dials, not that it dialed the right address.
func (t *Transport) checkCert(ctx context.Context, claimed uint64) error {
	if !t.cfg.RequirePeerCert {
		return nil
	}
	id, err := PeerCertID(ctx)
	if err != nil {
		return err
	}
	if id != claimed {
		return fmt.Errorf("%w: a peer with the certificate of node %d claims to be node %d", ErrPeerMismatch, id, claimed)
	}
	return nil
}

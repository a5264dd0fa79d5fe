package main

import (
	"crypto/tls"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kvd/kvd/internal/pki"
)

// tlsFlags are etcdctl's --cacert, --cert and --key, with KVCTL_CACERT,
// KVCTL_CERT and KVCTL_KEY as their environment.
type tlsFlags struct{ cacert, cert, key string }

func (f *tlsFlags) register(cmd *cobra.Command) {
	pf := cmd.PersistentFlags()
	pf.StringVar(&f.cacert, "cacert", "", "CA that signed the nodes' client-port certificates: connect with TLS (https:// endpoints do too); env KVCTL_CACERT")
	pf.StringVar(&f.cert, "cert", "", "client certificate, for a cluster that requires one (kvd --client-ca); env KVCTL_CERT")
	pf.StringVar(&f.key, "key", "", "key of --cert; env KVCTL_KEY")
}

// load returns the TLS configuration the flags and environment ask for,
// or nil for plaintext. https is set when an endpoint was an https:// URL:
// TLS then, with the system's roots unless --cacert names a CA.
func (f *tlsFlags) load(cmd *cobra.Command, https bool) (*tls.Config, error) {
	for _, e := range []struct {
		flag, env string
		v         *string
	}{{"cacert", "KVCTL_CACERT", &f.cacert}, {"cert", "KVCTL_CERT", &f.cert}, {"key", "KVCTL_KEY", &f.key}} {
		if !cmd.Flags().Changed(e.flag) {
			if v, ok := os.LookupEnv(e.env); ok && v != "" {
				*e.v = v
			}
		}
	}
	if !https && f.cacert == "" && f.cert == "" && f.key == "" {
		return nil, nil
	}
	cfg, err := pki.ClientConfig(f.cacert, f.cert, f.key)
	if err != nil {
		return nil, usageErrorf("%s", strings.TrimPrefix(err.Error(), "pki: "))
	}
	return cfg, nil
}

// creds are the transport credentials of a connection kvctl opens itself.
func (a *app) creds() grpc.DialOption {
	if a.tls == nil {
		return grpc.WithTransportCredentials(insecure.NewCredentials())
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(a.tls))
}

// tlsReason says, for a connection that failed in or for want of a TLS
// handshake, what went wrong and what to give; "" for any other failure.
func tlsReason(s string) string {
	switch {
	case strings.Contains(s, "certificate required"), strings.Contains(s, "bad certificate"):
		return "TLS: the node requires a client certificate; give --cert and --key (env KVCTL_CERT, KVCTL_KEY)"
	case strings.Contains(s, "unknown authority"):
		return "TLS: the node's certificate is not signed by a CA kvctl trusts; give its CA with --cacert (env KVCTL_CACERT)"
	case strings.Contains(s, "first record does not look like a TLS handshake"):
		return "TLS: the node does not serve TLS; drop --cacert/--cert/--key and https://"
	case strings.Contains(s, "x509:"), strings.Contains(s, "tls:"):
		_, after, _ := strings.Cut(s, "x509:")
		if after == "" {
			_, after, _ = strings.Cut(s, "tls:")
		}
		return "TLS handshake failed:" + strings.TrimRight(after, `"`)
	case strings.Contains(s, "server preface"):
		// What a plaintext dial of a TLS port reports.
		return "TLS: the node closed the connection before speaking; it may serve TLS: give --cacert (and --cert, --key) or https:// endpoints"
	}
	return ""
}

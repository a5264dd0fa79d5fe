package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kvd/kvd/internal/pki"
)

// certCmd is "kvd cert ca|node|client": a development CA and the
// certificates a cluster needs, without OpenSSL. Keys are ECDSA P-256.
func certCmd(stdout io.Writer) *cobra.Command {
	var (
		dir      string
		caCert   string
		caKey    string
		dnsNames []string
		ips      []string
		valid    time.Duration
		id       uint64
		name     string
	)
	cmd := &cobra.Command{
		Use:   "cert",
		Short: "Write a development CA and node and client certificates",
		Long: `kvd cert writes the certificates TLS needs, signed by a CA of its own.

A node certificate names its node id in a URI SAN, kvd://node/<id> (and in
its common name, node-<id>); a node's peers refuse a peer call or Raft
stream whose certificate names another id than the caller claims. It is
good for both ends of a connection, so a node uses the same files for
--peer-cert/--peer-key and --client-cert/--client-key. A client
certificate names a user in its common name and is good for clients only.

Files: DIR/ca.crt and ca.key, DIR/node-<id>.crt and .key,
DIR/client-<name>.crt and .key. Keys are readable by their owner only.
An existing CA is kept, so running the commands again re-issues the
certificates under the same CA.`,
		Example: `  kvd cert ca --dir certs
  kvd cert node --dir certs --id 1 --dns localhost,kvd1 --ip 127.0.0.1
  kvd cert client --dir certs --name root
  kvd --id 1 --peer-cert certs/node-1.crt --peer-key certs/node-1.key --peer-ca certs/ca.crt \
      --client-cert certs/node-1.crt --client-key certs/node-1.key --client-ca certs/ca.crt
  kvctl --endpoints https://127.0.0.1:2379 --cacert certs/ca.crt --cert certs/client-root.crt --key certs/client-root.key get k`,
	}
	pf := cmd.PersistentFlags()
	pf.StringVar(&dir, "dir", "certs", "directory the files are written to")
	pf.DurationVar(&valid, "valid", 365*24*time.Hour, "how long the certificate is valid (the CA: ten times this)")
	signer := func(c *cobra.Command) {
		c.Flags().StringVar(&caCert, "ca-cert", "", "the CA certificate that signs (default DIR/ca.crt)")
		c.Flags().StringVar(&caKey, "ca-key", "", "the CA's key (default DIR/ca.key)")
	}
	issue := func(r pki.Request, file string) error {
		ccert, ckey := caCert, caKey
		if ccert == "" {
			ccert = filepath.Join(dir, "ca.crt")
		}
		if ckey == "" {
			ckey = filepath.Join(dir, "ca.key")
		}
		ca, key, err := pki.LoadCA(ccert, ckey)
		if err != nil {
			return usageError{fmt.Errorf("%v (write one with `kvd cert ca --dir %s`)", err, dir)}
		}
		r.Valid = valid
		certPEM, keyPEM, err := pki.Issue(r, ca, key)
		if err != nil {
			return err
		}
		if err := pki.WriteFiles(dir, file, certPEM, keyPEM); err != nil {
			return err
		}
		_, err = fmt.Fprintf(stdout, "wrote %s.crt and %s.key\n", filepath.Join(dir, file), filepath.Join(dir, file))
		return err
	}

	ca := &cobra.Command{
		Use:   "ca",
		Short: "Write a CA (DIR/ca.crt, DIR/ca.key), keeping one that exists",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			if _, err := os.Stat(filepath.Join(dir, "ca.crt")); err == nil {
				_, err := fmt.Fprintf(stdout, "kept the CA in %s\n", filepath.Join(dir, "ca.crt"))
				return err
			} else if !errors.Is(err, os.ErrNotExist) {
				return err
			}
			certPEM, keyPEM, err := pki.Issue(pki.Request{Kind: pki.KindCA, CN: "kvd dev CA", Valid: 10 * valid}, nil, nil)
			if err != nil {
				return err
			}
			if err := pki.WriteFiles(dir, "ca", certPEM, keyPEM); err != nil {
				return err
			}
			_, err = fmt.Fprintf(stdout, "wrote %s and %s\n", filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key"))
			return err
		},
	}
	node := &cobra.Command{
		Use:   "node",
		Short: "Write node <id>'s certificate (DIR/node-<id>.crt, .key)",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			if id == 0 {
				return usageError{errors.New("--id must be the node's positive id")}
			}
			parsed, err := parseIPs(ips)
			if err != nil {
				return err
			}
			return issue(pki.Request{Kind: pki.KindNode, NodeID: id, DNS: dnsNames, IPs: parsed}, fmt.Sprintf("node-%d", id))
		},
	}
	node.Flags().Uint64Var(&id, "id", 0, "the node id the certificate names")
	node.Flags().StringSliceVar(&dnsNames, "dns", []string{"localhost"}, "DNS names peers and clients dial the node by")
	node.Flags().StringSliceVar(&ips, "ip", []string{"127.0.0.1"}, "IP addresses peers and clients dial the node at")
	signer(node)
	client := &cobra.Command{
		Use:   "client",
		Short: "Write a client certificate for user <name> (DIR/client-<name>.crt, .key)",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			if name == "" {
				return usageError{errors.New("--name must name the user")}
			}
			return issue(pki.Request{Kind: pki.KindClient, CN: name}, "client-"+name)
		},
	}
	client.Flags().StringVar(&name, "name", "", "the user the certificate names (its common name)")
	signer(client)
	var nodes int
	var clients []string
	cluster := &cobra.Command{
		Use:   "cluster",
		Short: "Write a CA and the certificates of nodes 1..N and of clients, keeping any that exist",
		Long: `Write, in one command (the container image has no shell), what a cluster
needs: the CA, node-1 .. node-N (each with the DNS names of --dns, where
{id} stands for the node id, and the IPs of --ip) and client-<name> for
each --client. Files that exist are kept, so it can run at every start
and issues certificates only the first time.`,
		Example: `  kvd cert cluster --dir /certs --nodes 3 --dns 'localhost,kvd{id}' --client root`,
		Args:    cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if nodes < 1 {
				return usageError{errors.New("--nodes must be at least 1")}
			}
			if err := ca.RunE(c, nil); err != nil {
				return err
			}
			exists := func(name string) bool {
				_, err := os.Stat(filepath.Join(dir, name+".crt"))
				return err == nil
			}
			parsed, err := parseIPs(ips)
			if err != nil {
				return err
			}
			for n := 1; n <= nodes; n++ {
				name := fmt.Sprintf("node-%d", n)
				if exists(name) {
					continue
				}
				var dns []string
				for _, d := range dnsNames {
					dns = append(dns, strings.ReplaceAll(d, "{id}", strconv.Itoa(n)))
				}
				if err := issue(pki.Request{Kind: pki.KindNode, NodeID: uint64(n), DNS: dns, IPs: parsed}, name); err != nil {
					return err
				}
			}
			for _, u := range clients {
				if !exists("client-" + u) {
					if err := issue(pki.Request{Kind: pki.KindClient, CN: u}, "client-"+u); err != nil {
						return err
					}
				}
			}
			return nil
		},
	}
	cluster.Flags().IntVar(&nodes, "nodes", 3, "certificates for nodes 1..N")
	cluster.Flags().StringSliceVar(&dnsNames, "dns", []string{"localhost"}, "DNS names of each node; {id} is replaced by its id")
	cluster.Flags().StringSliceVar(&ips, "ip", []string{"127.0.0.1"}, "IP addresses in every node certificate")
	cluster.Flags().StringSliceVar(&clients, "client", []string{"root"}, "users to write client certificates for")
	signer(cluster)
	cmd.AddCommand(ca, node, client, cluster)
	return cmd
}

func parseIPs(ips []string) ([]net.IP, error) {
	var parsed []net.IP
	for _, s := range ips {
		ip := net.ParseIP(s)
		if ip == nil {
			return nil, usageError{fmt.Errorf("--ip %q is not an IP address", s)}
		}
		parsed = append(parsed, ip)
	}
	return parsed, nil
}

package main

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/proto/kvpb"
)

const defaultEndpoints = "127.0.0.1:2379"

// app holds one run's flags and streams; nothing in kvctl is global.
type app struct {
	stdin          io.Reader
	stdout, stderr io.Writer

	endpoints []string
	timeout   time.Duration
	output    string
	debug     bool
	tlsFlags  tlsFlags
	user      string // NAME[:PASSWORD]; --password or KVCTL_PASSWORD may give the password
	password  string
	tls       *tls.Config // nil: plaintext (tls.go)

	// ran is set once a command's RunE starts (past flag parsing).
	ran bool
}

func (a *app) rootCmd() *cobra.Command {
	var endpoints string
	root := &cobra.Command{
		Use:   "kvctl",
		Short: "kvctl talks to a kvd cluster",
		Long: `kvctl reads and writes keys in a kvd cluster and shows its state.

Exit codes: 0 success; 1 key not found or compare failed; 2 bad usage or
input; 3 cluster unavailable (no quorum, timeout, no endpoint answers, a
TLS handshake that failed); 4 permission denied (auth is enabled and the
user lacks the permission the message names, or no valid user was given).

TLS, as etcdctl: --cacert (the CA of the nodes' certificates), --cert and
--key (a client certificate, for a cluster that requires one), or the
environment KVCTL_CACERT, KVCTL_CERT, KVCTL_KEY; https:// endpoints also
connect with TLS.`,
		Example: `  kvctl put greeting hello
  kvctl get greeting
  kvctl cas greeting hello hi
  kvctl bench put --clients 10
  kvctl --endpoints 10.0.0.1:2379,10.0.0.2:2379 -o json get greeting
  kvctl cluster status
  kvctl endpoint health
  kvctl --endpoints https://127.0.0.1:2379 --cacert certs/ca.crt --cert certs/client-root.crt --key certs/client-root.key get greeting`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          noArgsOrUnknown,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cmd.SetOut(a.stderr)
			cmd.Usage()
			return usageErrorf("no command given; see 'kvctl --help'")
		},
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			if !cmd.Flags().Changed("endpoints") {
				if env, ok := os.LookupEnv("KVCTL_ENDPOINTS"); ok && env != "" {
					endpoints = env
				}
			}
			a.endpoints = nil
			https := false
			for _, ep := range strings.Split(endpoints, ",") {
				if ep = strings.TrimSpace(ep); ep != "" {
					hp, err := hostPort(ep)
					if err != nil {
						return err
					}
					https = https || strings.HasPrefix(strings.ToLower(ep), "https://")
					a.endpoints = append(a.endpoints, hp)
				}
			}
			var err error
			if a.tls, err = a.tlsFlags.load(cmd, https); err != nil {
				return err
			}
			for _, e := range []struct {
				flag, env string
				v         *string
			}{{"user", "KVCTL_USER", &a.user}, {"password", "KVCTL_PASSWORD", &a.password}} {
				if !cmd.Flags().Changed(e.flag) {
					if v, ok := os.LookupEnv(e.env); ok && v != "" {
						*e.v = v
					}
				}
			}
			if name, pw, ok := strings.Cut(a.user, ":"); ok {
				a.user, a.password = name, pw
			}
			if len(a.endpoints) == 0 {
				return usageErrorf("--endpoints is empty; give host:port[,host:port...]")
			}
			if a.timeout <= 0 {
				return usageErrorf("--timeout must be positive, got %v", a.timeout)
			}
			switch a.output {
			case "simple", "json", "table":
			default:
				return usageErrorf("-o %q is not an output format; use simple, json or table", a.output)
			}
			return checkOutput(cmd, a.output)
		},
	}
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return usageErrorf("%v; see 'kvctl %s --help'", err, strings.TrimPrefix(cmd.CommandPath()+" ", "kvctl "))
	})
	// Our own completion command (completion.go) takes the shell as an
	// argument, as etcdctl's and kubectl's do.
	root.CompletionOptions.DisableDefaultCmd = true
	pf := root.PersistentFlags()
	pf.StringVar(&endpoints, "endpoints", defaultEndpoints, "comma-separated client addresses (host:port, http://host:port, or https://host:port for TLS) of kvd nodes; one is enough, all of them spare a hop and survive a node's loss; env KVCTL_ENDPOINTS")
	pf.DurationVar(&a.timeout, "timeout", 5*time.Second, "deadline of each request to the cluster (connecting, each read, write or scan page)")
	pf.StringVarP(&a.output, "output", "o", "simple", "output format: simple, json or table")
	pf.BoolVar(&a.debug, "debug", false, "log the client's work to stderr: cluster maps, breaker changes, and every attempt that failed, with its node and how long it took")

	a.tlsFlags.register(root)
	pf.StringVar(&a.user, "user", "", "authenticate as NAME[:PASSWORD] once the cluster has auth enabled; env KVCTL_USER")
	pf.StringVar(&a.password, "password", "", "password of --user (instead of NAME:PASSWORD); env KVCTL_PASSWORD")

	root.AddCommand(a.putCmd(), a.withRevision(a.getCmd()), a.delCmd(), a.casCmd(), a.txnCmd(), a.benchCmd(), a.clusterCmd(), a.memberCmd(),
		a.endpointCmd(), a.userCmd(), a.roleCmd(), a.authCmd(), a.versionCmd(), a.completionCmd(root), a.watchCmd(), a.compactCmd(), a.leaseCmd(), a.lockCmd(), a.electCmd())
	return root
}

// noArgsOrUnknown reports an unknown command as usage error (cobra only
// does so by itself for commands without a Run), with the commands it
// may have meant.
func noArgsOrUnknown(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usageErrorf("unknown command %q%s; see 'kvctl --help'", args[0], didYouMean(cmd, args[0]))
	}
	return nil
}

// didYouMean names the subcommands of cmd close to typed (by
// Levenshtein distance or prefix, as cobra judges), or says nothing.
func didYouMean(cmd *cobra.Command, typed string) string {
	if cmd.SuggestionsMinimumDistance <= 0 {
		cmd.SuggestionsMinimumDistance = 2 // cobra's default, which SuggestionsFor does not apply
	}
	s := cmd.SuggestionsFor(typed)
	if len(s) == 0 {
		return ""
	}
	return fmt.Sprintf(" (did you mean %s?)", strings.Join(s, " or "))
}

// outputsKey annotates a command with the -o formats it prints
// ("simple,json"); a command without it prints all three.
const outputsKey = "kvctl/outputs"

// checkOutput refuses an -o format the command does not print, rather
// than print another silently.
func checkOutput(cmd *cobra.Command, format string) error {
	ok, found := cmd.Annotations[outputsKey]
	if !found || slices.Contains(strings.Split(ok, ","), format) {
		return nil
	}
	return usageErrorf("%s prints no %s output; use -o %s", cmd.CommandPath(), format, strings.ReplaceAll(ok, ",", " or -o "))
}

// hostPort reads one --endpoints entry: host:port, or a URL
// (http://host:port or https://host:port, as etcdctl users write them)
// whose scheme is dropped; https:// also turns TLS on (rootCmd). Other
// schemes are refused with what to write instead.
func hostPort(ep string) (string, error) {
	scheme, rest, hasScheme := strings.Cut(ep, "://")
	if !hasScheme {
		return ep, nil
	}
	rest = strings.TrimSuffix(rest, "/")
	switch strings.ToLower(scheme) {
	case "http", "https":
		if rest == "" || strings.Contains(rest, "/") {
			return "", usageErrorf("--endpoints %q: give host:port (a URL may not have a path)", ep)
		}
		return rest, nil
	}
	return "", usageErrorf("--endpoints %q: unknown scheme %q; give host:port", ep, scheme)
}

// exactArgs is cobra.ExactArgs with a message that names the command.
func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usageErrorf("%s needs %s, got %d argument(s); usage: %s", cmd.CommandPath(), what, len(args), cmd.UseLine())
		}
		return nil
	}
}

// groupCmd is a command that only holds subcommands.
func groupCmd(use, short, example string) *cobra.Command {
	return &cobra.Command{
		Use: use, Short: short, Example: example,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usageErrorf("unknown command %q for %s%s; see '%s --help'", args[0], cmd.CommandPath(), didYouMean(cmd, args[0]), cmd.CommandPath())
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			return usageErrorf("%s needs a subcommand; see '%s --help'", cmd.CommandPath(), cmd.CommandPath())
		},
	}
}

// connect creates a client bounded by --timeout.
func (a *app) connect() (*client.Client, error) { return a.connectWith(nil) }

// connectWith is connect with a hook that adjusts the client's Config.
func (a *app) connectWith(adjust func(*client.Config)) (*client.Client, error) {
	a.ran = true
	ctx, cancel := context.WithTimeout(context.Background(), a.timeout)
	defer cancel()
	cfg := client.Config{Endpoints: a.endpoints, DialTimeout: a.timeout, TLS: a.tls, Username: a.user, Password: a.password}
	if a.debug {
		cfg.Logger = slog.New(slog.NewTextHandler(a.stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	if adjust != nil {
		adjust(&cfg)
	}
	c, err := client.New(ctx, cfg)
	if err != nil {
		if denied := deniedBy(err); denied != "" {
			return nil, &exitError{code: exitPermission, msg: "permission denied: " + denied}
		}
		if errors.Is(err, client.ErrUnavailable) {
			why := noEndpointAnswered(err, a.endpoints, a.timeout)
			if a.tls != nil && len(a.tls.Certificates) == 0 && (strings.Contains(why, "broken pipe") || strings.Contains(why, "connection reset")) {
				// A node that requires a client certificate drops the
				// connection after a TLS 1.3 handshake without one; the
				// dialer sees only the broken connection.
				why = "TLS: every endpoint dropped the connection after the handshake; the cluster may require a client certificate: give --cert and --key (env KVCTL_CERT, KVCTL_KEY): " + why
			}
			return nil, &exitError{code: exitUnavailable, msg: "cluster unavailable: " + why +
				"; check that kvd is running and --endpoints is right"}
		}
		return nil, err
	}
	return c, nil
}

// noEndpointAnswered says why client.New found no endpoint: the one
// reason they all gave ("connection refused by every endpoint: ..."),
// or each endpoint's own.
func noEndpointAnswered(err error, endpoints []string, timeout time.Duration) string {
	var eps []*client.EndpointError
	walkErrors(err, func(e error) {
		if ee, ok := e.(*client.EndpointError); ok {
			eps = append(eps, ee)
		}
	})
	// In the order the user gave them, not the order they failed in.
	slices.SortStableFunc(eps, func(x, y *client.EndpointError) int {
		return cmp.Compare(slices.Index(endpoints, x.Endpoint), slices.Index(endpoints, y.Endpoint))
	})
	if len(eps) == 0 {
		return fmt.Sprintf("no endpoint answered within %v", timeout)
	}
	var (
		names, each []string
		common      = dialReason(eps[0].Err, timeout)
	)
	for _, ee := range eps {
		why := dialReason(ee.Err, timeout)
		if why != common {
			common = ""
		}
		names = append(names, ee.Endpoint)
		each = append(each, ee.Endpoint+": "+why)
	}
	switch {
	case common == "connection refused":
		return "connection refused by every endpoint: " + strings.Join(names, ", ")
	case common != "":
		return fmt.Sprintf("no endpoint answered (%s): %s", common, strings.Join(names, ", "))
	}
	return "no endpoint answered: " + strings.Join(each, "; ")
}

// dialReason names why a call to an endpoint failed, in the words of the
// error gRPC reports for it.
func dialReason(err error, timeout time.Duration) string {
	s := err.Error()
	if r := tlsReason(s); r != "" {
		return r
	}
	switch {
	case strings.Contains(s, "connection refused"):
		return "connection refused"
	case strings.Contains(s, "no such host"), strings.Contains(s, "server misbehaving"):
		return "host name not resolved"
	case strings.Contains(s, "DeadlineExceeded"), strings.Contains(s, "deadline exceeded"):
		return fmt.Sprintf("no answer within %v", timeout)
	}
	return clean(err)
}

// walkErrors calls f on err and every error it wraps.
func walkErrors(err error, f func(error)) {
	if err == nil {
		return
	}
	f(err)
	switch u := err.(type) {
	case interface{ Unwrap() error }:
		walkErrors(u.Unwrap(), f)
	case interface{ Unwrap() []error }:
		for _, e := range u.Unwrap() {
			walkErrors(e, f)
		}
	}
}

// ctx is the deadline of one request.
func (a *app) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), a.timeout)
}

// withClient connects, runs f, and closes the client once f returns.
func (a *app) withClient(f func(c *client.Client) error) error {
	c, err := a.connect()
	if err != nil {
		return err
	}
	defer c.Close()
	return f(c)
}

// request runs f, one request and the printing of its answer, with a
// client and the request's deadline.
func (a *app) request(f func(ctx context.Context, c *client.Client) error) error {
	return a.withClient(func(c *client.Client) error {
		ctx, cancel := a.ctx()
		defer cancel()
		return f(ctx, c)
	})
}

func (a *app) putCmd() *cobra.Command {
	var (
		prevKV bool
		lease  int64
	)
	cmd := &cobra.Command{
		Use:   "put KEY VALUE",
		Short: "Set KEY to VALUE",
		Long: `Set KEY to VALUE. With VALUE "-" the value is read from stdin, byte
for byte (a trailing newline is kept). With --prev-kv the answer also
carries the key as it was before the put (the put is then a one-key
transaction, still applied exactly once).

Output: simple prints OK (with --prev-kv, then the previous key and value
on two lines, as etcdctl does, when there was one); json prints the shard
and revision of the write (and "prev_kv", null when the key was new);
table prints the same as columns.`,
		Example: `  kvctl put greeting hello
  kvctl put --prev-kv greeting hi
  printf 'multi\nline' | kvctl put note -
  kvctl put --lease "$(kvctl lease grant 10)" service/a 10.0.0.1`,
		Args: exactArgs(2, "KEY and VALUE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			key, value := []byte(args[0]), []byte(args[1])
			if args[1] == "-" {
				b, err := io.ReadAll(a.stdin)
				if err != nil {
					return usageErrorf("reading the value from stdin: %v", err)
				}
				value = b
			}
			return a.request(func(ctx context.Context, c *client.Client) error {
				if !prevKV {
					resp, err := c.Put(ctx, key, value, client.WithLease(client.LeaseID(lease)))
					if err != nil {
						return leaseErr(err)
					}
					return a.printPut(resp, false)
				}
				// The client's Put does not ask for the previous value;
				// a transaction of one put does, with the same
				// exactly-once guarantee.
				resp, err := c.Txn(ctx, &kvpb.TxnRequest{Success: []*kvpb.RequestOp{
					{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: key, Value: value, PrevKv: true, Lease: lease}}},
				}})
				if err != nil {
					return leaseErr(err)
				}
				put := &kvpb.PutResponse{Header: resp.GetHeader()}
				if rs := resp.GetResponses(); len(rs) > 0 {
					put.PrevKv = rs[0].GetPut().GetPrevKv()
				}
				return a.printPut(put, true)
			})
		},
	}
	cmd.Flags().BoolVar(&prevKV, "prev-kv", false, "print the key's previous value (and revisions) too")
	cmd.Flags().Int64Var(&lease, "lease", 0, "attach the key to lease ID (kvctl lease grant): it is deleted with the lease; a lease that does not exist exits 1")
	return cmd
}

func (a *app) getCmd() *cobra.Command {
	var (
		prefix      bool
		end         string
		keysOnly    bool
		countOnly   bool
		limit       int
		consistency string
		printResume bool
	)
	cmd := &cobra.Command{
		Use:   "get KEY [--end END] | get --prefix PREFIX",
		Short: "Read a key, every key with a prefix, or a range of keys",
		Long: `Read KEY; with --prefix every key that starts with PREFIX; with --end
every key in [KEY, END) (END excluded, like etcdctl's range_end). Ranges
come back in key order.

Output of one key:
  simple  the value alone on one line
  json    {"key", "value", "create_revision", "mod_revision", "version"}
  table   a table with the same fields
Output of --prefix or --end:
  simple  two lines per key, like etcdctl: the key, then the value
          (with --keys-only: one key per line)
  json    a JSON array of the objects above
  table   a table, one row per key
Output of --count-only (with --prefix or --end): the number of keys;
json prints {"count": N}. Counting asks each shard for a number, so no key
or value is transferred, however large the range.

A missing KEY exits 1; a prefix or range that matches nothing prints
nothing (count 0) and exits 0. Keys and values are printed as text; json
uses "value_base64" instead of "value" for values that are not UTF-8.
A range spans shards: each shard's part is linearizable (or serializable)
and read at one revision of the shard, on every page, but the whole is
not one snapshot (revisions are per shard).

--print-resume (with --prefix or --end) also prints the watch resume
token of the state read: 'kvctl watch --prefix PREFIX --resume TOKEN'
then prints exactly the changes made after the read, none missed, none
twice. json output becomes {"kvs": [the array above], "resume": TOKEN};
simple and table print the token alone on one line of stderr.`,
		Example: `  kvctl get greeting
  kvctl get --prefix user/ --keys-only
  kvctl get --prefix user/ --limit 10 -o json
  kvctl get --prefix user/ --count-only
  kvctl get --prefix user/ -o json --print-resume
  kvctl get user/a --end user/m
  kvctl get --consistency serializable greeting`,
		Args: exactArgs(1, "KEY (or PREFIX with --prefix)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			serializable, err := parseConsistency(consistency)
			if err != nil {
				return err
			}
			if limit < 0 {
				return usageErrorf("--limit must be ≥ 0, got %d", limit)
			}
			hasEnd := cmd.Flags().Changed("end")
			isRange := prefix || hasEnd
			switch {
			case prefix && hasEnd:
				return usageErrorf("--prefix and --end cannot be combined; give a prefix or a range [KEY, END)")
			case !isRange && (keysOnly || limit != 0 || countOnly):
				return usageErrorf("--keys-only, --limit and --count-only need --prefix or --end")
			case countOnly && (keysOnly || limit != 0):
				return usageErrorf("--count-only cannot be combined with --keys-only or --limit")
			case printResume && (!isRange || countOnly):
				return usageErrorf("--print-resume goes with --prefix or --end, without --count-only")
			}
			start, stop := []byte(args[0]), []byte(end)
			if prefix {
				stop = client.PrefixEnd(start)
			}
			if isRange && !countOnly {
				// A page at a time, each with its own deadline.
				return a.withClient(func(c *client.Client) error {
					return a.scanRange(c, start, stop, limit, keysOnly, serializable, printResume)
				})
			}
			return a.request(func(ctx context.Context, c *client.Client) error {
				if countOnly {
					n, err := c.Count(ctx, start, stop, serializable)
					if err != nil {
						return err
					}
					return a.printCount(n)
				}
				var opts []client.ReadOption
				if serializable {
					opts = append(opts, client.WithSerializable())
				}
				kv, err := c.Get(ctx, []byte(args[0]), opts...)
				if errors.Is(err, client.ErrNotFound) {
					msg := fmt.Sprintf("key %q not found", args[0])
					if p := commonPrefix(args[0]); p != "" {
						msg += fmt.Sprintf("; list its neighbours with 'kvctl get --prefix %s --keys-only'", shellQuote(p))
					}
					return &exitError{code: exitNotFound, msg: msg}
				}
				if err != nil {
					return err
				}
				return a.printKV(kv)
			})
		},
	}
	f := cmd.Flags()
	f.BoolVar(&prefix, "prefix", false, "read every key that starts with the argument, in key order")
	f.StringVar(&end, "end", "", "read the range [KEY, END) in key order (END excluded; \"\" reads to the end of the key space)")
	f.BoolVar(&keysOnly, "keys-only", false, "with --prefix or --end: print keys, not values")
	f.BoolVar(&countOnly, "count-only", false, "with --prefix or --end: print the number of keys only")
	f.IntVar(&limit, "limit", 0, "with --prefix or --end: print at most N keys in total (0: all)")
	f.StringVar(&consistency, "consistency", "linearizable", "linearizable (up to date, via the leader) or serializable (any replica, may be stale)")
	f.BoolVar(&printResume, "print-resume", false, "with --prefix or --end: also print the watch resume token of the state read (json: a \"resume\" field; else on stderr)")
	return cmd
}

// scanRange prints every key in [start, end), page by page, so memory
// stays bounded by one page whatever the range holds; with printResume,
// then the watch resume token of the state read.
func (a *app) scanRange(c *client.Client, start, end []byte, limit int, keysOnly, serializable, printResume bool) error {
	const page = 1000
	p := a.newKVPrinter(keysOnly)
	p.withResume = printResume
	opts := client.ScanOptions{KeysOnly: keysOnly, Serializable: serializable}
	printed := 0
	for {
		opts.Limit = page
		if limit > 0 {
			opts.Limit = min(page, limit-printed)
		}
		ctx, cancel := a.ctx()
		pg, err := c.Scan(ctx, start, end, opts)
		cancel()
		var ce *client.CompactedError
		if errors.As(err, &ce) {
			// Every page reads a shard at its first page's revision,
			// from the shard's history, which was trimmed meanwhile.
			return &exitError{code: exitNotFound, msg: fmt.Sprintf("shard %d trimmed its history (it keeps revisions from %d) past the revision this read started at; run it again", ce.Shard, ce.Oldest)}
		}
		if err != nil {
			return err
		}
		if err := p.add(pg.KVs); err != nil {
			return err
		}
		printed += len(pg.KVs)
		if pg.Next == "" || (limit > 0 && printed >= limit) {
			return p.close(pg.Resume)
		}
		opts.Token = pg.Next
	}
}

func (a *app) delCmd() *cobra.Command {
	var prefix bool
	cmd := &cobra.Command{
		Use:   "del KEY | del --prefix PREFIX",
		Short: "Delete a key, or every key with a prefix",
		Long: `Delete KEY. Deleting a key that does not exist succeeds (exit 0) and
reports 0 deleted, so a retried delete is harmless.

With --prefix, delete every key that starts with PREFIX: the keys are
listed page by page and deleted one by one, each exactly once. It is not
one atomic operation (the keys span shards): a key written under the
prefix meanwhile may survive, and an interrupted run leaves the rest,
which running it again deletes.

Output: simple prints the number of keys deleted; json prints
{"deleted", "revision", "shard"} ({"deleted"} alone with --prefix); table
prints the same as columns.`,
		Example: `  kvctl del greeting
  kvctl del --prefix session/`,
		Args: exactArgs(1, "KEY (or PREFIX with --prefix)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if prefix {
				return a.withClient(func(c *client.Client) error {
					n, err := a.deletePrefix(c, []byte(args[0]))
					if err != nil {
						return err
					}
					return a.printDeleted(n)
				})
			}
			return a.request(func(ctx context.Context, c *client.Client) error {
				resp, err := c.Delete(ctx, []byte(args[0]))
				if err != nil {
					return err
				}
				return a.printDelete(resp)
			})
		},
	}
	cmd.Flags().BoolVar(&prefix, "prefix", false, "delete every key that starts with the argument")
	return cmd
}

// deletePrefix deletes every key that starts with prefix, a page of keys
// at a time, each page and each delete with its own deadline; it returns
// how many it deleted.
func (a *app) deletePrefix(c *client.Client, prefix []byte) (int64, error) {
	if len(prefix) == 0 {
		return 0, usageErrorf("del --prefix needs a non-empty prefix; deleting every key is not offered")
	}
	// Latest: the pages of a scan that deletes what it reads need not
	// replay the history of its own deletes.
	opts := client.ScanOptions{KeysOnly: true, Limit: 1000, Latest: true}
	var deleted int64
	for {
		ctx, cancel := a.ctx()
		pg, err := c.Scan(ctx, prefix, client.PrefixEnd(prefix), opts)
		cancel()
		if err != nil {
			return deleted, err
		}
		for _, kv := range pg.KVs {
			ctx, cancel := a.ctx()
			resp, err := c.Delete(ctx, kv.GetKey())
			cancel()
			if err != nil {
				return deleted, fmt.Errorf("after deleting %d key(s): %w", deleted, err)
			}
			deleted += resp.GetDeleted()
		}
		if pg.Next == "" {
			return deleted, nil
		}
		opts.Token = pg.Next
	}
}

func (a *app) clusterCmd() *cobra.Command {
	cmd := groupCmd("cluster", "Show the state of the cluster", "  kvctl cluster status")
	cmd.AddCommand(&cobra.Command{
		Use:   "status",
		Short: "Show every node's health and every shard's leader, term and indexes",
		Long: `Ask every member for its status and print two tables: the nodes (id,
address, health, map epoch) and the shards (leader, term, commit and applied
index, voters), as reported by each shard's leader.

simple and table print the tables; json prints {"nodes": [...], "shards": [...]}.
Exits 0 when at least one node answers and every shard has a leader (down
nodes are listed); 3 when no node answers or a shard has no leader (its
LEADER reads NONE).`,
		Example: `  kvctl cluster status
  kvctl --endpoints 10.0.0.1:2379 cluster status -o json`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.request(func(ctx context.Context, c *client.Client) error {
				st, err := c.Status(ctx)
				if err != nil {
					return err
				}
				return a.printStatus(st)
			})
		},
	})
	return cmd
}

func (a *app) memberCmd() *cobra.Command {
	cmd := groupCmd("member", "List the members of the cluster", "  kvctl member list")
	cmd.AddCommand(&cobra.Command{
		Use:   "list",
		Short: "List the members: id, client address, peer address",
		Long: `List the cluster's members.

simple prints one member per line: "ID CLIENT_ADDR PEER_ADDR"; table adds a
header; json prints {"epoch", "members": [{"id", "client_addr", "peer_addr"}]}.`,
		Example: `  kvctl member list
  kvctl member list -o table`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.request(func(ctx context.Context, c *client.Client) error {
				ml, err := c.MemberList(ctx)
				if err != nil {
					return err
				}
				return a.printMembers(ml)
			})
		},
	})
	return cmd
}

// parseConsistency reads a --consistency flag: linearizable (l) or
// serializable (s, true).
func parseConsistency(s string) (serializable bool, err error) {
	switch s {
	case "linearizable", "l":
		return false, nil
	case "serializable", "s":
		return true, nil
	}
	return false, usageErrorf("--consistency %q is not valid; use linearizable or serializable", s)
}

// commonPrefix suggests a prefix to list near key: up to its last '/',
// or "" when it has none.
func commonPrefix(key string) string {
	if i := strings.LastIndexByte(key, '/'); i > 0 {
		return key[:i+1]
	}
	return ""
}

func shellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool {
		return !(r == '/' || r == '-' || r == '_' || r == '.' || r == ':' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z')
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

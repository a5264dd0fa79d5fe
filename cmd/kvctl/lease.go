package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/kvd/kvd/client"
)

func (a *app) leaseCmd() *cobra.Command {
	cmd := groupCmd("lease", "Grant, keep alive, revoke and inspect leases",
		`  id=$(kvctl lease grant 10)
  kvctl put --lease "$id" service/a 10.0.0.1
  kvctl lease keepalive "$id"
  kvctl lease ttl "$id" --keys
  kvctl lease revoke "$id"`)
	cmd.Long = `A lease is granted with a TTL in seconds. Keys put with it (put --lease)
are deleted, in every shard, when it is revoked or when nobody renews it
for its TTL. A lease that does not exist (never granted, revoked,
expired) exits 1.`
	cmd.AddCommand(a.leaseGrantCmd(), a.leaseKeepAliveCmd(), a.leaseRevokeCmd(), a.leaseTTLCmd(), a.leaseListCmd())
	return cmd
}

func parseLeaseID(s string) (client.LeaseID, error) {
	id, err := strconv.ParseInt(s, 10, 64)
	if err != nil || id <= 0 {
		return 0, usageErrorf("lease id %q: give the positive number lease grant printed", s)
	}
	return client.LeaseID(id), nil
}

// leaseErr makes a lease that is gone exit 1, as a missing key does.
func leaseErr(err error) error {
	if errors.Is(err, client.ErrLeaseNotFound) {
		return &exitError{code: exitNotFound, msg: clean(err)}
	}
	return err
}

func (a *app) leaseGrantCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "grant TTL",
		Short: "Grant a lease of TTL seconds and print its id",
		Long: `Grant a lease of TTL seconds (1 to a year). Output: simple prints the
id alone, for scripts; json {"id": ..., "ttl": ...}.`,
		Example:     `  id=$(kvctl lease grant 10)`,
		Args:        exactArgs(1, "a TTL in seconds"),
		Annotations: map[string]string{outputsKey: "simple,json"},
		RunE: func(cmd *cobra.Command, args []string) error {
			ttl, err := strconv.ParseInt(args[0], 10, 64)
			if err != nil || ttl <= 0 {
				return usageErrorf("TTL %q: give a whole number of seconds, at least 1", args[0])
			}
			return a.request(func(ctx context.Context, c *client.Client) error {
				id, err := c.Grant(ctx, time.Duration(ttl)*time.Second)
				if err != nil {
					return err
				}
				if a.output == "json" {
					return writeJSON(a.stdout, map[string]any{"id": int64(id), "ttl": ttl})
				}
				_, err = fmt.Fprintln(a.stdout, int64(id))
				return err
			})
		},
	}
}

func (a *app) leaseKeepAliveCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "keepalive ID",
		Short: "Renew a lease until interrupted",
		Long: `Renew lease ID every third of its TTL until Ctrl-C (or SIGTERM), through
leader changes and node failures. It prints the TTL after each renewal
(simple: "lease ID TTL Ns"). It exits 0 when interrupted, 1 when the lease
is gone (revoked, or expired because no renewal reached the cluster in
time).`,
		Args:        exactArgs(1, "a lease ID"),
		Annotations: map[string]string{outputsKey: "simple,json"},
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := parseLeaseID(args[0])
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return a.withClient(func(c *client.Client) error {
				// Only the first renewal is bounded by --timeout.
				first, cancel := context.WithTimeout(ctx, a.timeout)
				_, err := c.TimeToLive(first, id, false)
				cancel()
				if err != nil {
					return leaseErr(err)
				}
				renewals, stopped, err := c.KeepAlive(ctx, id)
				if err != nil {
					return leaseErr(err)
				}
				for ttl := range renewals {
					if a.output == "json" {
						err = writeJSON(a.stdout, map[string]any{"id": int64(id), "ttl": int64(ttl / time.Second)})
					} else {
						_, err = fmt.Fprintf(a.stdout, "lease %d TTL %ds\n", id, int64(ttl/time.Second))
					}
					if err != nil {
						return err
					}
				}
				if err := stopped(); ctx.Err() == nil {
					return leaseErr(err)
				}
				return nil
			})
		},
	}
}

func (a *app) leaseRevokeCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "revoke ID",
		Short: "Revoke a lease and delete its keys",
		Long: `Revoke lease ID: its keys are deleted in every shard. Output: simple
prints the number of keys deleted; json {"deleted": N}.`,
		Args:        exactArgs(1, "a lease ID"),
		Annotations: map[string]string{outputsKey: "simple,json,table"},
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := parseLeaseID(args[0])
			if err != nil {
				return err
			}
			return a.request(func(ctx context.Context, c *client.Client) error {
				n, err := c.Revoke(ctx, id)
				if err != nil {
					return leaseErr(err)
				}
				return a.printDeleted(n)
			})
		},
	}
}

func (a *app) leaseTTLCmd() *cobra.Command {
	var keys bool
	cmd := &cobra.Command{
		Use:   "ttl ID [--keys]",
		Short: "Show a lease's remaining TTL (and its keys)",
		Long: `Show what remains of lease ID's TTL and the TTL it was granted with; with
--keys, the keys attached to it, as many as one answer carries (4 MiB by
default; a note on stderr says when the lease holds more). Output: simple
prints "lease ID granted Gs remaining Rs", then one key per line; json
adds "more_keys" when it holds more.`,
		Args:        exactArgs(1, "a lease ID"),
		Annotations: map[string]string{outputsKey: "simple,json"},
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := parseLeaseID(args[0])
			if err != nil {
				return err
			}
			return a.request(func(ctx context.Context, c *client.Client) error {
				st, err := c.TimeToLive(ctx, id, keys)
				if err != nil {
					return leaseErr(err)
				}
				if a.output == "json" {
					j := map[string]any{"id": int64(id), "granted_ttl": int64(st.Granted / time.Second), "ttl": int64(st.TTL / time.Second)}
					if keys {
						ks := []string{}
						for _, k := range st.Keys {
							ks = append(ks, string(k))
						}
						j["keys"] = ks
						if st.MoreKeys {
							j["more_keys"] = true
						}
					}
					return writeJSON(a.stdout, j)
				}
				fmt.Fprintf(a.stdout, "lease %d granted %ds remaining %ds\n", id, int64(st.Granted/time.Second), int64(st.TTL/time.Second))
				for _, k := range st.Keys {
					fmt.Fprintf(a.stdout, "%s\n", k)
				}
				if st.MoreKeys {
					fmt.Fprintf(a.stderr, "kvctl: lease %d holds more keys than one answer carries; these are the first %d\n", id, len(st.Keys))
				}
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&keys, "keys", false, "list the keys attached to the lease")
	return cmd
}

func (a *app) leaseListCmd() *cobra.Command {
	return &cobra.Command{
		Use:         "list",
		Short:       "List the live leases",
		Long:        `List the live leases. Output: simple prints one id per line; table and json add the TTLs.`,
		Args:        exactArgs(0, "no arguments"),
		Annotations: map[string]string{outputsKey: "simple,json,table"},
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.request(func(ctx context.Context, c *client.Client) error {
				ls, err := c.Leases(ctx)
				if err != nil {
					return err
				}
				switch a.output {
				case "json":
					out := []map[string]any{}
					for _, l := range ls {
						out = append(out, map[string]any{"id": int64(l.ID), "granted_ttl": int64(l.Granted / time.Second), "ttl": int64(l.TTL / time.Second)})
					}
					return writeJSON(a.stdout, out)
				case "table":
					tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
					fmt.Fprintln(tw, "ID\tGRANTED\tREMAINING")
					for _, l := range ls {
						fmt.Fprintf(tw, "%d\t%ds\t%ds\n", l.ID, int64(l.Granted/time.Second), int64(l.TTL/time.Second))
					}
					return tw.Flush()
				}
				for _, l := range ls {
					fmt.Fprintln(a.stdout, int64(l.ID))
				}
				return nil
			})
		},
	}
}

package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/proto/kvpb"
)

// exitPermission: auth is enabled and the user may not do what was asked
// (or no valid user was given).
const exitPermission = 4

// change applies one auth change and prints OK.
func (a *app) change(req *kvpb.AuthChangeRequest) error {
	return a.request(func(ctx context.Context, c *client.Client) error {
		if err := c.Auth(ctx, req); err != nil {
			return err
		}
		_, err := fmt.Fprintln(a.stdout, "OK")
		return err
	})
}

func (a *app) userCmd() *cobra.Command {
	cmd := groupCmd("user", "Add, delete, list users, grant and revoke their roles, change passwords", "  kvctl user add alice --password secret\n  kvctl user grant-role alice reader\n  kvctl user passwd alice --password n3w")
	var password string
	var noPassword bool
	add := &cobra.Command{
		Use:   "add NAME",
		Short: "Add a user, with a password or (--no-password) for client certificates only",
		Long: `Add a user. With --password it authenticates with kvctl --user NAME:PASSWORD;
with --no-password only by a client certificate whose common name is NAME
(kvd cert client --name NAME). The password is sent to a node, which
replicates its bcrypt hash only. Once auth is enabled, only root may.`,
		Example: "  kvctl user add root --password s3cret\n  kvctl user add backup --no-password",
		Args:    exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if (password == "") == !noPassword {
				return usageErrorf("give --password PASSWORD or --no-password")
			}
			return a.change(&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserAdd{UserAdd: &kvpb.UserAdd{Name: args[0], Password: password}}})
		},
	}
	add.Flags().StringVar(&password, "password", "", "the user's password")
	add.Flags().BoolVar(&noPassword, "no-password", false, "no password: the user authenticates by client certificate only")
	cmd.AddCommand(add, &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a user (not root while auth is enabled)",
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.change(&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserDelete{UserDelete: &kvpb.UserDelete{Name: args[0]}}})
		},
	}, &cobra.Command{
		Use:   "grant-role USER ROLE",
		Short: "Grant a role (root, or one made with role add) to a user",
		Args:  exactArgs(2, "USER and ROLE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.change(&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserGrantRole{UserGrantRole: &kvpb.UserGrantRole{User: args[0], Role: args[1]}}})
		},
	}, &cobra.Command{
		Use:   "revoke-role USER ROLE",
		Short: "Take a role from a user; the user's next request is checked without it",
		Args:  exactArgs(2, "USER and ROLE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.change(&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserRevokeRole{UserRevokeRole: &kvpb.UserRevokeRole{User: args[0], Role: args[1]}}})
		},
	}, a.passwdCmd(), &cobra.Command{
		Use:         "list",
		Short:       `List users and their roles ("NAME ROLE,ROLE" per line)`,
		Args:        exactArgs(0, "no arguments"),
		Annotations: map[string]string{outputsKey: "simple,json"},
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.authStatus(func(st *kvpb.AuthStatusResponse) error {
				if a.output == "json" {
					return writeJSON(a.stdout, st.GetUsers())
				}
				for _, u := range st.GetUsers() {
					if _, err := fmt.Fprintf(a.stdout, "%s %s\n", u.GetName(), strings.Join(u.GetRoles(), ",")); err != nil {
						return err
					}
				}
				return nil
			})
		},
	})
	return cmd
}

func (a *app) passwdCmd() *cobra.Command {
	var password string
	cmd := &cobra.Command{
		Use:   "passwd NAME --password NEW",
		Short: "Change a user's password; tokens issued before stop working",
		Long: `Change NAME's password. The node hashes it (bcrypt) and replicates the
hash only. Every token issued to NAME before the change is refused from
then on (Unauthenticated: authenticate again), so a client that still has
the old password stops at its next request; client certificates are not
affected. Once auth is enabled, only root may.`,
		Example: "  kvctl --user root:s3cret user passwd alice --password n3w",
		Args:    exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if password == "" {
				return usageErrorf("give the new password with --password")
			}
			return a.change(&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserChangePassword{UserChangePassword: &kvpb.UserChangePassword{Name: args[0], Password: password}}})
		},
	}
	cmd.Flags().StringVar(&password, "password", "", "the new password")
	return cmd
}

// permArg is the permission role grant-permission and revoke-permission
// name: KEY alone, [KEY, END) with end = [END], or the prefix KEY.
func permArg(key string, end []string, prefix bool) *kvpb.Permission {
	perm := &kvpb.Permission{Key: []byte(key)}
	switch {
	case prefix:
		perm.RangeEnd = client.PrefixEnd(perm.Key)
		if perm.RangeEnd == nil {
			perm.RangeEnd = []byte{0}
		}
	case len(end) == 1:
		perm.RangeEnd = []byte(end[0])
	}
	return perm
}

func (a *app) roleCmd() *cobra.Command {
	cmd := groupCmd("role", "Add roles, grant and revoke their permissions, list them", "  kvctl role add reader\n  kvctl role grant-permission reader read --prefix app/\n  kvctl role revoke-permission reader --prefix app/")
	var prefix, revokePrefix bool
	grant := &cobra.Command{
		Use:   "grant-permission ROLE read|readwrite KEY [END]",
		Short: "Grant a role read or readwrite on a key, a range [KEY, END) or a prefix",
		Long: `Grant ROLE read (get, scans) or readwrite (also put, delete, cas, txn) on
KEY alone, on the range [KEY, END), or with --prefix on every key that
starts with KEY. A request is served when every key it touches is granted
what it needs by one of its user's roles; the role root needs no grants.`,
		Example: "  kvctl role grant-permission reader read --prefix app/\n  kvctl role grant-permission writer readwrite app/a app/m",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 3 || len(args) > 4 || (prefix && len(args) == 4) {
				return usageErrorf("%s needs ROLE, read or readwrite, KEY and optionally END (not with --prefix); usage: %s", cmd.CommandPath(), cmd.UseLine())
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			perm := permArg(args[2], args[3:], prefix)
			switch args[1] {
			case "read":
			case "readwrite":
				perm.Write = true
			default:
				return usageErrorf("permission %q: use read or readwrite", args[1])
			}
			return a.change(&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_RoleGrantPermission{RoleGrantPermission: &kvpb.RoleGrantPermission{Role: args[0], Perm: perm}}})
		},
	}
	grant.Flags().BoolVar(&prefix, "prefix", false, "grant every key that starts with KEY")
	revoke := &cobra.Command{
		Use:   "revoke-permission ROLE KEY [END]",
		Short: "Take from a role its permission on a key, a range [KEY, END) or a prefix",
		Long: `Remove ROLE's permissions (read and readwrite) on exactly KEY alone, the
range [KEY, END), or with --prefix the prefix KEY, as grant-permission gave
them; 'kvctl role list' shows them. Requests of the role's users are
checked without it from their next request on (on the node that made the
change; on the others within the commit interval and 100 ms). Revoking
what the role does not have fails.`,
		Example: "  kvctl role revoke-permission reader --prefix app/\n  kvctl role revoke-permission writer app/a app/m",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 2 || len(args) > 3 || (revokePrefix && len(args) == 3) {
				return usageErrorf("%s needs ROLE, KEY and optionally END (not with --prefix); usage: %s", cmd.CommandPath(), cmd.UseLine())
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			perm := permArg(args[1], args[2:], revokePrefix)
			return a.change(&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_RoleRevokePermission{RoleRevokePermission: &kvpb.RoleRevokePermission{Role: args[0], Perm: perm}}})
		},
	}
	revoke.Flags().BoolVar(&revokePrefix, "prefix", false, "revoke the permission on every key that starts with KEY")
	cmd.AddCommand(&cobra.Command{
		Use:   "add NAME",
		Short: "Add a role without permissions",
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.change(&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_RoleAdd{RoleAdd: &kvpb.RoleAdd{Name: args[0]}}})
		},
	}, grant, revoke, &cobra.Command{
		Use:         "list",
		Short:       `List roles and their permissions ("ROLE read|readwrite KEY [END]" per line)`,
		Args:        exactArgs(0, "no arguments"),
		Annotations: map[string]string{outputsKey: "simple,json"},
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.authStatus(func(st *kvpb.AuthStatusResponse) error {
				if a.output == "json" {
					return writeJSON(a.stdout, st.GetRoles())
				}
				for _, r := range st.GetRoles() {
					if len(r.GetPerms()) == 0 {
						if _, err := fmt.Fprintln(a.stdout, r.GetName()); err != nil {
							return err
						}
					}
					for _, p := range r.GetPerms() {
						kind := "read"
						if p.GetWrite() {
							kind = "readwrite"
						}
						line := fmt.Sprintf("%s %s %q", r.GetName(), kind, p.GetKey())
						if len(p.GetRangeEnd()) > 0 {
							line += fmt.Sprintf(" %q", p.GetRangeEnd())
						}
						if _, err := fmt.Fprintln(a.stdout, line); err != nil {
							return err
						}
					}
				}
				return nil
			})
		},
	})
	return cmd
}

func (a *app) authCmd() *cobra.Command {
	cmd := groupCmd("auth", "Enable or disable authentication", "  kvctl auth enable")
	cmd.AddCommand(&cobra.Command{
		Use:   "enable",
		Short: "Enable authentication (needs a user root with the role root)",
		Long: `Enable authentication: from then on every request needs a user (kvctl
--user NAME:PASSWORD, or a client certificate whose common name is a user)
whose roles grant what it does; denied requests exit 4. Make the user
root with the role root first:

  kvctl user add root --password s3cret
  kvctl user grant-role root root
  kvctl auth enable`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.change(&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_Enable{Enable: &kvpb.AuthEnable{}}})
		},
	}, &cobra.Command{
		Use:   "disable",
		Short: "Disable authentication (root only)",
		Args:  exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.change(&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_Disable{Disable: &kvpb.AuthDisable{}}})
		},
	})
	return cmd
}

func (a *app) authStatus(print func(*kvpb.AuthStatusResponse) error) error {
	return a.request(func(ctx context.Context, c *client.Client) error {
		st, err := c.AuthStatus(ctx)
		if err != nil {
			return err
		}
		return print(st)
	})
}

// deniedBy returns the message of the first answer in err that refused
// the caller's identity or permission, or "".
func deniedBy(err error) string {
	msg := ""
	walkErrors(err, func(e error) {
		if msg != "" {
			return
		}
		// The status itself, not an error that wraps one (whose
		// message would be the whole chain).
		se, ok := e.(interface{ GRPCStatus() *status.Status })
		if !ok {
			return
		}
		if st := se.GRPCStatus(); st.Code() == codes.PermissionDenied || st.Code() == codes.Unauthenticated {
			msg = st.Message()
		}
	})
	return msg
}

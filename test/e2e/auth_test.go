package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/proto/kvpb"
)

// TestAuthRolesAndExitCodes sets up etcd's model with kvctl (a root user,
// a read-only user on a/), enables auth, and checks: a request without a
// user and the read-only user's put exit 4 naming what is missing, the
// read-only user reads and watches under a/ and nothing else, root writes and lists
// users; a member add is refused to the read-only user and done for root.
func TestAuthRolesAndExitCodes(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 2})
	for _, args := range [][]string{
		{"user", "add", "root", "--password", "r00t"},
		{"user", "grant-role", "root", "root"},
		{"user", "add", "ro", "--password", "pw"},
		{"role", "add", "reader"},
		{"role", "grant-permission", "reader", "read", "--prefix", "a/"},
		{"user", "grant-role", "ro", "reader"},
		{"auth", "enable"},
	} {
		if out, errOut, code := c.Kvctl("", args...); code != 0 || out != "OK\n" {
			t.Fatalf("kvctl %v: exit %d %q %s", args, code, out, errOut)
		}
	}
	// Every node enforces it within its commit interval. Each node is asked
	// itself, without a user: a kvctl put would go to its shard's leader
	// only, and leave the other nodes unchecked.
	proccluster.WaitFor(t, 10*time.Second, "every node to refuse a call without a user", func() bool {
		for _, nd := range c.Nodes {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_, err := c.Status(ctx, nd)
			cancel()
			if status.Code(err) != codes.Unauthenticated {
				return false
			}
		}
		return true
	})
	root, ro := []string{"--user", "root:r00t"}, []string{"--user", "ro:pw"}
	check := func(args []string, wantCode int, wantOut, wantErr string) {
		t.Helper()
		out, errOut, code := c.Kvctl("", args...)
		if code != wantCode || !strings.Contains(out, wantOut) || !strings.Contains(errOut, wantErr) {
			t.Errorf("kvctl %v: exit %d, stdout %q, stderr %q; want exit %d, %q, %q", args, code, out, errOut, wantCode, wantOut, wantErr)
		}
	}
	check([]string{"put", "a/x", "anon"}, 4, "", "permission denied: auth is enabled")
	check(append(ro, "put", "a/x", "v"), 4, "", `user "ro" lacks readwrite on "a/x"`)
	check(append(ro, "get", "a/x"), 1, "", "")
	check(append(root, "put", "a/x", "v"), 0, "OK", "")
	check(append(ro, "get", "a/x"), 0, "v\n", "")
	check(append(ro, "get", "b/x"), 4, "", `user "ro" lacks read on "b/x"`)
	check(append(ro, "get", "--prefix", "a/"), 0, "a/x\nv\n", "")
	// A watch reads what it watches: the same permissions as a get.
	check(append(ro, "watch", "a/x", "--rev", "1", "--count", "1"), 0, "PUT a/x v\n", "")
	check(append(ro, "watch", "b/x", "--count", "1"), 4, "", `user "ro" lacks read on "b/x"`)
	check(append(ro, "watch", "--prefix", "b/", "--count", "1"), 4, "", `user "ro" lacks read on`)
	check(append(ro, "user", "list"), 4, "", `lacks the role "root"`)
	check([]string{"--user", "ro:wrong", "get", "a/x"}, 4, "", "wrong user name or password")
	check(append(root, "user", "list"), 0, "ro reader\nroot root\n", "")

	// Member add: root only (node 4 at a closed loopback port).
	conn, err := grpc.NewClient(c.Node(1).ClientAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	add := func(name, password string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		tok, err := kvpb.NewAuthClient(conn).Authenticate(ctx, &kvpb.AuthenticateRequest{Name: name, Password: password})
		if err != nil {
			t.Fatalf("authenticate %s: %v", name, err)
		}
		ctx = metadata.AppendToOutgoingContext(ctx, "token", tok.GetToken())
		_, err = kvpb.NewClusterClient(conn).MemberAdd(ctx, &kvpb.MemberAddRequest{Member: &kvpb.Member{Id: 4, PeerAddr: "127.0.0.1:1", ClientAddr: "127.0.0.1:1"}})
		return err
	}
	if err := add("ro", "pw"); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("member add as ro: %v, want PermissionDenied", err)
	}
	if err := add("root", "r00t"); err != nil {
		t.Fatalf("member add as root: %v", err)
	}
	proccluster.WaitFor(t, 10*time.Second, "member list to show node 4", func() bool {
		out, _, code := c.Kvctl("", append(root, "member", "list")...)
		return code == 0 && strings.Contains(out, "4 127.0.0.1:1 127.0.0.1:1")
	})
}

// TestAuthRevokeAndPasswordChange: a revoked permission and a revoked role
// are enforced from the user's next request; a password change refuses the
// tokens issued before it (and the old password), and the new password
// works.
func TestAuthRevokeAndPasswordChange(t *testing.T) {
	c := proccluster.Start(t, 1, proccluster.Options{Shards: 2})
	root, ro := []string{"--user", "root:r00t"}, []string{"--user", "ro:pw"}
	check := func(args []string, wantCode int, wantOut, wantErr string) {
		t.Helper()
		out, errOut, code := c.Kvctl("", args...)
		if code != wantCode || !strings.Contains(out, wantOut) || !strings.Contains(errOut, wantErr) {
			t.Fatalf("kvctl %v: exit %d, stdout %q, stderr %q; want exit %d, %q, %q", args, code, out, errOut, wantCode, wantOut, wantErr)
		}
	}
	for _, args := range [][]string{
		{"user", "add", "root", "--password", "r00t"},
		{"user", "grant-role", "root", "root"},
		{"user", "add", "ro", "--password", "pw"},
		{"role", "add", "reader"},
		{"role", "grant-permission", "reader", "read", "--prefix", "a/"},
		{"role", "grant-permission", "reader", "read", "b/x"},
		{"user", "grant-role", "ro", "reader"},
		{"put", "a/x", "v"},
		{"put", "b/x", "v"},
		{"auth", "enable"},
	} {
		check(args, 0, "OK", "")
	}
	proccluster.WaitFor(t, 10*time.Second, "a put without a user to be refused", func() bool {
		_, _, code := c.Kvctl("", "put", "probe", "anon")
		return code == 4
	})

	// Revoke a permission: the very next read is refused, the other
	// permission stays.
	check(append(ro, "get", "a/x"), 0, "v\n", "")
	check(append(root, "role", "revoke-permission", "reader", "--prefix", "a/"), 0, "OK", "")
	check(append(ro, "get", "a/x"), 4, "", `user "ro" lacks read on "a/x"`)
	check(append(ro, "get", "b/x"), 0, "v\n", "")
	check(append(root, "role", "list"), 0, "reader read \"b/x\"\n", "")
	check(append(root, "role", "revoke-permission", "reader", "--prefix", "a/"), 2, "", "no permission on exactly")
	// Revoke the role: nothing is left.
	check(append(root, "user", "revoke-role", "ro", "reader"), 0, "OK", "")
	check(append(ro, "get", "b/x"), 4, "", `user "ro" lacks read on "b/x"`)
	check(append(root, "user", "list"), 0, "ro \nroot root\n", "")
	check(append(root, "user", "grant-role", "ro", "reader"), 0, "OK", "")

	// A token issued before a password change is refused after it.
	conn, err := grpc.NewClient(c.Node(1).ClientAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	getAs := func(token string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		ctx = metadata.AppendToOutgoingContext(ctx, "token", token)
		_, err := kvpb.NewKVClient(conn).Get(ctx, &kvpb.GetRequest{Key: []byte("b/x")})
		return err
	}
	authenticate := func(password string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		resp, err := kvpb.NewAuthClient(conn).Authenticate(ctx, &kvpb.AuthenticateRequest{Name: "ro", Password: password})
		return resp.GetToken(), err
	}
	old, err := authenticate("pw")
	if err != nil {
		t.Fatal(err)
	}
	if err := getAs(old); err != nil {
		t.Fatalf("get with a fresh token: %v", err)
	}
	check(append(ro, "user", "passwd", "ro", "--password", "n3w"), 4, "", `lacks the role "root"`)
	check(append(root, "user", "passwd", "ro", "--password", "n3w"), 0, "OK", "")
	if err := getAs(old); status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "password") {
		t.Fatalf("get with a token of the old password: %v, want Unauthenticated naming the password change", err)
	}
	if _, err := authenticate("pw"); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("authenticate with the old password: %v, want Unauthenticated", err)
	}
	fresh, err := authenticate("n3w")
	if err != nil {
		t.Fatal(err)
	}
	if err := getAs(fresh); err != nil {
		t.Fatalf("get with a token of the new password: %v", err)
	}
	check(append(ro, "get", "b/x"), 4, "", "wrong user name or password")
	check([]string{"--user", "ro:n3w", "get", "b/x"}, 0, "v\n", "")
}

package fsm

import (
	"errors"
	"slices"
	"testing"

	"github.com/kvd/kvd/proto/kvpb"
)

// TestAuthRevokesAndPasswordChange: revoking takes a role from a user and
// a permission from a role (only what exists; never root's root role while
// auth is on), and a password change stores the new hash and moves the
// user to a new token generation.
func TestAuthRevokesAndPasswordChange(t *testing.T) {
	st := &kvpb.AuthState{Enabled: true, Secret: make([]byte, 32)}
	perm := func(key, end string, write bool) *kvpb.Permission {
		return &kvpb.Permission{Key: []byte(key), RangeEnd: []byte(end), Write: write}
	}
	must := func(c *kvpb.AuthChangeRequest) {
		t.Helper()
		if err := changeAuth(st, c); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []*kvpb.AuthChangeRequest{
		{Change: &kvpb.AuthChangeRequest_UserAdd{UserAdd: &kvpb.UserAdd{Name: RootUser, PasswordHash: []byte("h0")}}},
		{Change: &kvpb.AuthChangeRequest_UserGrantRole{UserGrantRole: &kvpb.UserGrantRole{User: RootUser, Role: RootRole}}},
		{Change: &kvpb.AuthChangeRequest_UserAdd{UserAdd: &kvpb.UserAdd{Name: "alice", PasswordHash: []byte("h1")}}},
		{Change: &kvpb.AuthChangeRequest_RoleAdd{RoleAdd: &kvpb.RoleAdd{Name: "rw"}}},
		{Change: &kvpb.AuthChangeRequest_RoleGrantPermission{RoleGrantPermission: &kvpb.RoleGrantPermission{Role: "rw", Perm: perm("a/", "a0", false)}}},
		{Change: &kvpb.AuthChangeRequest_RoleGrantPermission{RoleGrantPermission: &kvpb.RoleGrantPermission{Role: "rw", Perm: perm("a/", "a0", true)}}},
		{Change: &kvpb.AuthChangeRequest_RoleGrantPermission{RoleGrantPermission: &kvpb.RoleGrantPermission{Role: "rw", Perm: perm("k", "", true)}}},
		{Change: &kvpb.AuthChangeRequest_UserGrantRole{UserGrantRole: &kvpb.UserGrantRole{User: "alice", Role: "rw"}}},
		{Change: &kvpb.AuthChangeRequest_UserGrantRole{UserGrantRole: &kvpb.UserGrantRole{User: "alice", Role: RootRole}}},
	} {
		must(c)
	}
	userOf := func(name string) *kvpb.AuthUser {
		for _, u := range st.GetUsers() {
			if u.GetName() == name {
				return u
			}
		}
		t.Fatalf("no user %q", name)
		return nil
	}

	// Revoke a role.
	must(&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserRevokeRole{UserRevokeRole: &kvpb.UserRevokeRole{User: "alice", Role: RootRole}}})
	if got := userOf("alice").GetRoles(); !slices.Equal(got, []string{"rw"}) {
		t.Fatalf("alice's roles after the revoke: %v", got)
	}
	// Revoke a permission: both grants on [a/, a0) go, k stays.
	must(&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_RoleRevokePermission{RoleRevokePermission: &kvpb.RoleRevokePermission{Role: "rw", Perm: perm("a/", "a0", false)}}})
	if got := st.GetRoles()[0].GetPerms(); len(got) != 1 || string(got[0].GetKey()) != "k" {
		t.Fatalf("rw's permissions after the revoke: %v", got)
	}
	// Password change.
	must(&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserChangePassword{UserChangePassword: &kvpb.UserChangePassword{Name: "alice", PasswordHash: []byte("h2")}}})
	if u := userOf("alice"); string(u.GetPasswordHash()) != "h2" || u.GetTokenGeneration() != 1 {
		t.Fatalf("alice after a password change: hash %q, generation %d", u.GetPasswordHash(), u.GetTokenGeneration())
	}

	for _, tc := range []struct {
		name string
		c    *kvpb.AuthChangeRequest
		want error
	}{
		{"a role the user lacks", &kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserRevokeRole{UserRevokeRole: &kvpb.UserRevokeRole{User: "alice", Role: RootRole}}}, ErrAuthChange},
		{"a role of no user", &kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserRevokeRole{UserRevokeRole: &kvpb.UserRevokeRole{User: "bob", Role: "rw"}}}, ErrAuthChange},
		{"root's root role", &kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserRevokeRole{UserRevokeRole: &kvpb.UserRevokeRole{User: RootUser, Role: RootRole}}}, ErrAuthChange},
		{"a permission the role lacks", &kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_RoleRevokePermission{RoleRevokePermission: &kvpb.RoleRevokePermission{Role: "rw", Perm: perm("k", "l", true)}}}, ErrAuthChange},
		{"a permission of no role", &kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_RoleRevokePermission{RoleRevokePermission: &kvpb.RoleRevokePermission{Role: "nope", Perm: perm("k", "", true)}}}, ErrAuthChange},
		{"a password in clear", &kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserChangePassword{UserChangePassword: &kvpb.UserChangePassword{Name: "alice", Password: "pw", PasswordHash: []byte("h")}}}, ErrMalformed},
		{"no new hash", &kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserChangePassword{UserChangePassword: &kvpb.UserChangePassword{Name: "alice"}}}, ErrMalformed},
		{"the password of no user", &kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserChangePassword{UserChangePassword: &kvpb.UserChangePassword{Name: "bob", PasswordHash: []byte("h")}}}, ErrAuthChange},
	} {
		if err := changeAuth(st, tc.c); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	// With auth off, root may give up its role.
	st.Enabled = false
	must(&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserRevokeRole{UserRevokeRole: &kvpb.UserRevokeRole{User: RootUser, Role: RootRole}}})
}

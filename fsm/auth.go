package fsm

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"slices"

	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
)

// Auth state is one record in the meta shard's meta bucket: users (with
// bcrypt hashes the proposer computed), roles with their permissions,
// whether auth is on, and the key tokens are signed with (drawn by the
// proposer). Apply only validates and stores: the hashing and the secret's
// randomness happen before the command is proposed, so every replica
// stores the same bytes.
var metaAuth = []byte("auth")

// RootRole grants everything: membership, auth changes, every key.
const (
	RootRole = "root"
	RootUser = "root"
)

// ErrAuthChange: an auth change that conflicts with the auth state (a
// user that exists, a role that does not, enabling without a root user).
var ErrAuthChange = errors.New("fsm: auth change refused")

// AuthState reads the auth state; a shard without one has auth off.
func AuthState(r View) (*kvpb.AuthState, error) {
	return authStateFrom(r.GetMeta(metaAuth))
}

func authStateFrom(b []byte) (*kvpb.AuthState, error) {
	st := &kvpb.AuthState{}
	if b == nil {
		return st, nil
	}
	if err := proto.Unmarshal(b, st); err != nil {
		return nil, fmt.Errorf("%w: auth state: %v", ErrCorrupt, err)
	}
	return st, nil
}

// applyAuth applies one auth change (meta shard only, as the cluster map).
func applyAuth(tx State, c *kvpb.AuthChangeRequest) *peerpb.Result {
	cur := tx.GetMeta(metaClusterMap)
	if cur == nil {
		return reject(fmt.Errorf("%w: auth lives on the meta shard", ErrNotMeta))
	}
	st, err := authStateFrom(tx.GetMeta(metaAuth))
	if err != nil {
		return reject(err)
	}
	if err := changeAuth(st, c); err != nil {
		return reject(err)
	}
	if err := tx.PutMeta(metaAuth, encode(st)); err != nil {
		return reject(err)
	}
	return &peerpb.Result{}
}

func changeAuth(st *kvpb.AuthState, c *kvpb.AuthChangeRequest) error {
	user := func(name string) *kvpb.AuthUser {
		for _, u := range st.GetUsers() {
			if u.GetName() == name {
				return u
			}
		}
		return nil
	}
	role := func(name string) *kvpb.AuthRole {
		for _, r := range st.GetRoles() {
			if r.GetName() == name {
				return r
			}
		}
		return nil
	}
	switch ch := c.GetChange().(type) {
	case *kvpb.AuthChangeRequest_Enable:
		if u := user(RootUser); u == nil || !slices.Contains(u.GetRoles(), RootRole) {
			return fmt.Errorf("%w: auth needs a user %q with the role %q first", ErrAuthChange, RootUser, RootRole)
		}
		if len(st.GetSecret()) == 0 {
			if len(ch.Enable.GetSecret()) < 32 {
				return fmt.Errorf("%w: enabling needs a token secret of at least 32 bytes", ErrMalformed)
			}
			st.Secret = ch.Enable.GetSecret()
		}
		st.Enabled = true
	case *kvpb.AuthChangeRequest_Disable:
		st.Enabled = false
	case *kvpb.AuthChangeRequest_UserAdd:
		a := ch.UserAdd
		if a.GetName() == "" || a.GetPassword() != "" {
			return fmt.Errorf("%w: a user needs a name, and only the hash of a password", ErrMalformed)
		}
		if user(a.GetName()) != nil {
			return fmt.Errorf("%w: user %q exists", ErrAuthChange, a.GetName())
		}
		st.Users = append(st.Users, &kvpb.AuthUser{Name: a.GetName(), PasswordHash: a.GetPasswordHash()})
		slices.SortFunc(st.Users, func(x, y *kvpb.AuthUser) int { return cmp.Compare(x.GetName(), y.GetName()) })
	case *kvpb.AuthChangeRequest_UserDelete:
		name := ch.UserDelete.GetName()
		if user(name) == nil {
			return fmt.Errorf("%w: no user %q", ErrAuthChange, name)
		}
		if name == RootUser && st.GetEnabled() {
			return fmt.Errorf("%w: user %q cannot be deleted while auth is enabled", ErrAuthChange, RootUser)
		}
		st.Users = slices.DeleteFunc(st.Users, func(u *kvpb.AuthUser) bool { return u.GetName() == name })
	case *kvpb.AuthChangeRequest_UserGrantRole:
		g := ch.UserGrantRole
		u := user(g.GetUser())
		if u == nil {
			return fmt.Errorf("%w: no user %q", ErrAuthChange, g.GetUser())
		}
		if g.GetRole() != RootRole && role(g.GetRole()) == nil {
			return fmt.Errorf("%w: no role %q", ErrAuthChange, g.GetRole())
		}
		if !slices.Contains(u.Roles, g.GetRole()) {
			u.Roles = append(u.Roles, g.GetRole())
			slices.Sort(u.Roles)
		}
	case *kvpb.AuthChangeRequest_RoleAdd:
		name := ch.RoleAdd.GetName()
		if name == "" {
			return fmt.Errorf("%w: a role needs a name", ErrMalformed)
		}
		if name == RootRole || role(name) != nil {
			return fmt.Errorf("%w: role %q exists", ErrAuthChange, name)
		}
		st.Roles = append(st.Roles, &kvpb.AuthRole{Name: name})
		slices.SortFunc(st.Roles, func(x, y *kvpb.AuthRole) int { return cmp.Compare(x.GetName(), y.GetName()) })
	case *kvpb.AuthChangeRequest_RoleGrantPermission:
		g := ch.RoleGrantPermission
		r := role(g.GetRole())
		if r == nil {
			return fmt.Errorf("%w: no role %q (the role %q needs no permissions)", ErrAuthChange, g.GetRole(), RootRole)
		}
		if len(g.GetPerm().GetKey()) == 0 {
			return fmt.Errorf("%w: a permission needs a key", ErrMalformed)
		}
		r.Perms = append(r.Perms, g.GetPerm())
	case *kvpb.AuthChangeRequest_UserRevokeRole:
		g := ch.UserRevokeRole
		u := user(g.GetUser())
		if u == nil {
			return fmt.Errorf("%w: no user %q", ErrAuthChange, g.GetUser())
		}
		if !slices.Contains(u.GetRoles(), g.GetRole()) {
			return fmt.Errorf("%w: user %q does not have the role %q", ErrAuthChange, g.GetUser(), g.GetRole())
		}
		if g.GetUser() == RootUser && g.GetRole() == RootRole && st.GetEnabled() {
			// Nobody could change auth any more.
			return fmt.Errorf("%w: user %q keeps the role %q while auth is enabled", ErrAuthChange, RootUser, RootRole)
		}
		u.Roles = slices.DeleteFunc(u.Roles, func(r string) bool { return r == g.GetRole() })
	case *kvpb.AuthChangeRequest_RoleRevokePermission:
		g := ch.RoleRevokePermission
		r := role(g.GetRole())
		if r == nil {
			return fmt.Errorf("%w: no role %q", ErrAuthChange, g.GetRole())
		}
		n := len(r.Perms)
		r.Perms = slices.DeleteFunc(r.Perms, func(p *kvpb.Permission) bool {
			return bytes.Equal(p.GetKey(), g.GetPerm().GetKey()) && bytes.Equal(p.GetRangeEnd(), g.GetPerm().GetRangeEnd())
		})
		if len(r.Perms) == n {
			return fmt.Errorf("%w: role %q has no permission on exactly that key or range", ErrAuthChange, g.GetRole())
		}
	case *kvpb.AuthChangeRequest_UserChangePassword:
		c := ch.UserChangePassword
		if c.GetPassword() != "" || len(c.GetPasswordHash()) == 0 {
			return fmt.Errorf("%w: a password change carries the hash of a new password only", ErrMalformed)
		}
		u := user(c.GetName())
		if u == nil {
			return fmt.Errorf("%w: no user %q", ErrAuthChange, c.GetName())
		}
		u.PasswordHash = c.GetPasswordHash()
		u.TokenGeneration++ // the tokens issued so far name the old generation
	default:
		return ErrUnknownCmd
	}
	return nil
}

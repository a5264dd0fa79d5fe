package server

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"strconv"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/proto/kvpb"
)

func TestTokens(t *testing.T) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	now := time.Now()
	tok := signToken(secret, "al.ice", 3, now.Add(time.Minute))
	if u, gen, err := checkToken(secret, tok, now); err != nil || u != "al.ice" || gen != 3 {
		t.Fatalf("checkToken = %q, %d, %v", u, gen, err)
	}
	if _, _, err := checkToken(secret, tok, now.Add(2*time.Minute)); err == nil {
		t.Error("an expired token passed")
	}
	if _, _, err := checkToken([]byte("another secret, another cluster!"), tok, now); err == nil {
		t.Error("a token of another secret passed")
	}
	forged := signToken(secret, "root", 3, now.Add(time.Minute))
	if _, _, err := checkToken(secret, tok[:len(tok)-43]+forged[len(forged)-43:], now); err == nil {
		t.Error("a token with another token's MAC passed")
	}
	// A token of the form before generations ("user.expiry.mac") is of
	// generation 0.
	body := base64.RawURLEncoding.EncodeToString([]byte("bob")) + "." + strconv.FormatInt(now.Add(time.Minute).UnixMilli(), 10)
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(body))
	old := body + "." + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
	if u, gen, err := checkToken(secret, old, now); err != nil || u != "bob" || gen != 0 {
		t.Errorf("a token without generation: %q, %d, %v", u, gen, err)
	}
}

// TestTokenOfAnOldPasswordIsRefused: identify refuses a token issued in
// an earlier token generation of its user (before a password change).
func TestTokenOfAnOldPasswordIsRefused(t *testing.T) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	st := &kvpb.AuthState{Enabled: true, Secret: secret, Users: []*kvpb.AuthUser{{Name: "u", TokenGeneration: 1}}}
	for _, tc := range []struct {
		gen  uint64
		want codes.Code
	}{{0, codes.Unauthenticated}, {1, codes.OK}, {2, codes.Unauthenticated}} {
		ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs(mdToken, signToken(secret, "u", tc.gen, time.Now().Add(time.Minute))))
		_, err := (&Server{}).identify(ctx, st)
		if status.Code(err) != tc.want {
			t.Errorf("token of generation %d for a user at 1: %v, want %v", tc.gen, err, tc.want)
		}
	}
}

// TestPermissions: a permission covers its key alone, its range, or
// (range end "\x00") every key from it on; read does not cover write.
// enableAuth makes the changes first (users, roles), then adds the user
// root (password "s3cret") with the role root and enables auth, through
// admin.
func enableAuth(ctx context.Context, t *testing.T, admin *client.Client, first ...*kvpb.AuthChangeRequest) {
	t.Helper()
	for _, ch := range append(first,
		&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserAdd{UserAdd: &kvpb.UserAdd{Name: "root", Password: "s3cret"}}},
		&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_UserGrantRole{UserGrantRole: &kvpb.UserGrantRole{User: "root", Role: "root"}}},
		&kvpb.AuthChangeRequest{Change: &kvpb.AuthChangeRequest_Enable{Enable: &kvpb.AuthEnable{}}},
	) {
		if err := admin.Auth(ctx, ch); err != nil {
			t.Fatalf("auth change %v: %v", ch, err)
		}
	}
}

func TestPermissions(t *testing.T) {
	st := &kvpb.AuthState{Enabled: true, Roles: []*kvpb.AuthRole{
		{Name: "r", Perms: []*kvpb.Permission{
			{Key: []byte("a/"), RangeEnd: []byte("a0")},
			{Key: []byte("k"), Write: true},
			{Key: []byte("z"), RangeEnd: []byte{0}},
		}},
	}}
	u := &kvpb.AuthUser{Name: "u", Roles: []string{"r"}}
	for _, tc := range []struct {
		a    access
		want bool
	}{
		{access{key: []byte("a/x")}, true},
		{access{key: []byte("a/x"), write: true}, false},
		{access{key: []byte("a0")}, false},
		{access{key: []byte("a/"), end: []byte("a0")}, true},
		{access{key: []byte("a/"), end: []byte("b")}, false},
		{access{key: []byte("a/"), end: []byte{}}, false},
		{access{key: []byte("k"), write: true}, true},
		{access{key: []byte("k"), end: []byte("l")}, false},
		{access{key: []byte("kk")}, false},
		{access{key: []byte("zz"), end: []byte{}}, true},
		{access{key: []byte("y")}, false},
	} {
		err := permit(st, u, []access{tc.a})
		if (err == nil) != tc.want {
			t.Errorf("%v: %v, want allowed %v", tc.a, err, tc.want)
		}
		if err != nil && status.Code(err) != codes.PermissionDenied {
			t.Errorf("%v: code %v, want PermissionDenied", tc.a, status.Code(err))
		}
	}
	// A watch needs read on what it watches.
	for _, tc := range []struct {
		c    *kvpb.WatchCreateRequest
		want bool
	}{
		{&kvpb.WatchCreateRequest{Key: []byte("a/x")}, true},
		{&kvpb.WatchCreateRequest{Key: []byte("a/"), Prefix: true}, true},
		{&kvpb.WatchCreateRequest{Key: []byte("a"), Prefix: true}, false},
		{&kvpb.WatchCreateRequest{Key: []byte("a/b"), RangeEnd: []byte("a/c")}, true},
		{&kvpb.WatchCreateRequest{Key: []byte("a/b"), RangeEnd: []byte("b")}, false},
		{&kvpb.WatchCreateRequest{Key: []byte("z"), Prefix: true}, true},
		{&kvpb.WatchCreateRequest{Key: []byte("y")}, false},
	} {
		if err := permit(st, u, needs(tc.c)); (err == nil) != tc.want {
			t.Errorf("watch %v: %v, want allowed %v", tc.c, err, tc.want)
		}
	}
	if err := permit(st, &kvpb.AuthUser{Name: "root", Roles: []string{"root"}}, []access{{key: []byte("x"), write: true}}); err != nil {
		t.Errorf("root: %v", err)
	}
}

// Password checks take turns: while as many run as the node allows, one
// more waits, and is refused with ResourceExhausted if its turn does not
// come in passwordCheckWait; once a turn frees, it is served.
func TestPasswordChecksTakeTurns(t *testing.T) {
	c := newTestCluster(t, 1, 1, nil)
	s := c.servers[0]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	admin := c.client()
	enableAuth(ctx, t, admin)
	defer func(d time.Duration) { passwordCheckWait = d }(passwordCheckWait)
	passwordCheckWait = 50 * time.Millisecond
	authc := kvpb.NewAuthClient(clientConn(t, s))
	for range passwordChecks { // every turn taken
		s.authc.checking <- struct{}{}
	}
	_, err := authc.Authenticate(ctx, &kvpb.AuthenticateRequest{Name: "root", Password: "s3cret"})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("Authenticate while every turn is taken: %v, want ResourceExhausted", err)
	}
	for range passwordChecks {
		<-s.authc.checking
	}
	if _, err := authc.Authenticate(ctx, &kvpb.AuthenticateRequest{Name: "root", Password: "s3cret"}); err != nil {
		t.Fatalf("Authenticate with its turn free: %v", err)
	}
}

package server

import (
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/proto/kvpb"
)

func TestTokens(t *testing.T) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	now := time.Now()
	tok := signToken(secret, "al.ice", now.Add(time.Minute))
	if u, err := checkToken(secret, tok, now); err != nil || u != "al.ice" {
		t.Fatalf("checkToken = %q, %v", u, err)
	}
	if _, err := checkToken(secret, tok, now.Add(2*time.Minute)); err == nil {
		t.Error("an expired token passed")
	}
	if _, err := checkToken([]byte("another secret, another cluster!"), tok, now); err == nil {
		t.Error("a token of another secret passed")
	}
	forged := signToken(secret, "root", now.Add(time.Minute))
	if _, err := checkToken(secret, tok[:len(tok)-43]+forged[len(forged)-43:], now); err == nil {
		t.Error("a token with another token's MAC passed")
	}
}

// TestPermissions: a permission covers its key alone, its range, or
// (range end "\x00") every key from it on; read does not cover write.
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

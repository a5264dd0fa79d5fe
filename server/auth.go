package server

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/bcrypt"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	grpcpeer "google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/fsm"
	"github.com/kvd/kvd/internal/keys"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/storage"
	"github.com/kvd/kvd/transport"
)

// Authentication and roles, as etcd's. The auth state is replicated in
// the meta shard (fsm/auth.go); every node reads it from its own replica,
// or from a replica's node when it hosts none, and caches it for
// authCacheFor, so a change is enforced everywhere within that plus the
// commit interval. While auth is off nothing is checked.
//
// A caller is identified by a token (metadata "token", from
// Auth.Authenticate: user and expiry signed with HMAC-SHA256 under the
// cluster's secret, which only the meta shard holds), or else by the
// common name of its verified client certificate. A request is served
// when one of its user's roles grants what it needs: read on every key a
// read touches, write (readwrite) on every key a write touches; the role
// root grants everything, and alone may change auth, add members and
// open streams other than Batch.

// mdToken carries the token of a request.
const mdToken = "token"

// authCacheFor bounds how long a node serves from the auth state it read.
const authCacheFor = 100 * time.Millisecond

// DefaultAuthTokenTTL is how long a token from Authenticate is good for.
const DefaultAuthTokenTTL = 5 * time.Minute

type authSnapshot struct {
	st *kvpb.AuthState
	at time.Time
}

// authCache holds the last auth state read; refresh is held by the one
// goroutine that reads a newer one while the others use the last.
type authCache struct {
	cur     atomic.Pointer[authSnapshot]
	refresh sync.Mutex
	// checking holds a token per password being checked (passwordChecks).
	checking chan struct{}
}

// A bcrypt comparison takes tens of milliseconds of CPU, and anyone who
// reaches the client port may ask for one with a user name that exists:
// passwordChecks run at once, on at most half the node's cores, and a
// check that waits passwordCheckWait for its turn is refused, so a flood
// of Authenticate calls cannot starve Raft of CPU.
var (
	passwordChecks    = max(1, runtime.GOMAXPROCS(0)/2)
	passwordCheckWait = time.Second
)

// checkPassword compares password with hash, in its turn.
func (s *Server) checkPassword(ctx context.Context, hash []byte, password string) (bool, error) {
	t := time.NewTimer(passwordCheckWait)
	defer t.Stop()
	select {
	case s.authc.checking <- struct{}{}:
	case <-t.C:
		return false, status.Error(codes.ResourceExhausted, "auth: too many password checks at once; retry with backoff")
	case <-ctx.Done():
		return false, status.FromContextError(ctx.Err()).Err()
	}
	defer func() { <-s.authc.checking }()
	if err := ctx.Err(); err != nil {
		// A caller that gave up while waiting would hold the turn for a
		// comparison nobody reads.
		return false, status.FromContextError(err).Err()
	}
	return bcrypt.CompareHashAndPassword(hash, []byte(password)) == nil, nil
}

// authState returns the auth state, at most authCacheFor old unless it
// cannot be read; an error only when none was ever read.
func (s *Server) authState(ctx context.Context) (*kvpb.AuthState, error) {
	snap := s.authc.cur.Load()
	if snap != nil && time.Since(snap.at) < authCacheFor {
		return snap.st, nil
	}
	if snap != nil && !s.authc.refresh.TryLock() {
		return snap.st, nil // another request is reading it
	}
	if snap == nil {
		s.authc.refresh.Lock()
	}
	defer s.authc.refresh.Unlock()
	if cur := s.authc.cur.Load(); cur != nil && time.Since(cur.at) < authCacheFor {
		return cur.st, nil
	}
	st, err := s.readAuthState(ctx)
	if err != nil {
		if snap != nil {
			return snap.st, nil
		}
		return nil, status.Errorf(codes.Unavailable, "auth state unknown: %v", err)
	}
	s.authc.cur.Store(&authSnapshot{st: st, at: time.Now()})
	return st, nil
}

// readAuthState reads the local meta replica's auth state, or asks a
// node that hosts one.
func (s *Server) readAuthState(ctx context.Context) (*kvpb.AuthState, error) {
	// A replica that has applied nothing yet (one added to a running
	// shard, waiting for its snapshot) knows nothing: ask the others.
	if n := s.host.Node(MetaShard); n != nil && n.Applied() > 0 {
		if st, err := s.localAuthState(); err == nil {
			return st, nil
		}
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	err := errors.New("no replica of the meta shard is known")
	for _, id := range replicasOf(s.clusterMap(), MetaShard) {
		if id == s.cfg.NodeID {
			continue
		}
		var resp *peerpb.AuthStateResponse
		resp, err = internal(s, id, func(c peerpb.InternalClient) (*peerpb.AuthStateResponse, error) {
			return c.AuthState(ctx, &peerpb.AuthStateRequest{})
		})
		if err == nil {
			return resp.GetState(), nil
		}
	}
	return nil, err
}

func (s *Server) localAuthState() (*kvpb.AuthState, error) {
	sh, err := s.engine.OpenShard(MetaShard)
	if err != nil {
		return nil, err
	}
	var st *kvpb.AuthState
	err = sh.View(func(r *storage.Reader) error {
		st, err = fsm.AuthState(r)
		return err
	})
	return st, err
}

// AuthState implements peerpb.Internal: this node's replica's auth state,
// for a node that hosts none (the peer port admits members only).
func (s *Server) AuthState(context.Context, *peerpb.AuthStateRequest) (*peerpb.AuthStateResponse, error) {
	if n := s.host.Node(MetaShard); n == nil || n.Applied() == 0 {
		return nil, s.toStatus(ErrNoReplica, MetaShard)
	}
	st, err := s.localAuthState()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "read auth state: %v", err)
	}
	return &peerpb.AuthStateResponse{State: st}, nil
}

// signToken and checkToken: "user.generation.expiry_ms.mac", user
// base64url, generation the user's token generation when the token was
// issued (a password change increments it, which refuses older tokens).
// Tokens of the earlier form "user.expiry_ms.mac" are of generation 0.
func signToken(secret []byte, user string, gen uint64, exp time.Time) string {
	body := base64.RawURLEncoding.EncodeToString([]byte(user)) + "." + strconv.FormatUint(gen, 10) + "." + strconv.FormatInt(exp.UnixMilli(), 10)
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(body))
	return body + "." + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// checkToken returns the user and token generation tok names, when the
// secret signed it and it has not expired.
func checkToken(secret []byte, tok string, now time.Time) (string, uint64, error) {
	i := strings.LastIndexByte(tok, '.')
	if i < 0 {
		return "", 0, errors.New("malformed token")
	}
	body, mac := tok[:i], tok[i+1:]
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(body))
	got, err := base64.RawURLEncoding.DecodeString(mac)
	if err != nil || !hmac.Equal(got, m.Sum(nil)) {
		return "", 0, errors.New("invalid token")
	}
	u, rest, _ := strings.Cut(body, ".")
	var gen uint64
	if g, e, ok := strings.Cut(rest, "."); ok {
		if gen, err = strconv.ParseUint(g, 10, 64); err != nil {
			return "", 0, errors.New("malformed token")
		}
		rest = e
	}
	exp, err := strconv.ParseInt(rest, 10, 64)
	if err != nil {
		return "", 0, errors.New("malformed token")
	}
	if now.UnixMilli() >= exp {
		return "", 0, errors.New("token expired; authenticate again")
	}
	user, err := base64.RawURLEncoding.DecodeString(u)
	if err != nil {
		return "", 0, errors.New("malformed token")
	}
	return string(user), gen, nil
}

// identify returns the user a request comes from, or Unauthenticated.
func (s *Server) identify(ctx context.Context, st *kvpb.AuthState) (*kvpb.AuthUser, error) {
	name, byToken, gen := "", false, uint64(0)
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get(mdToken); len(v) > 0 {
		u, g, err := checkToken(st.GetSecret(), v[0], tokenTime(ctx))
		if err != nil {
			return nil, status.Errorf(codes.Unauthenticated, "auth: %v", err)
		}
		name, byToken, gen = u, true, g
	} else if p, ok := grpcpeer.FromContext(ctx); ok {
		if info, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(info.State.VerifiedChains) > 0 {
			name = info.State.VerifiedChains[0][0].Subject.CommonName
		}
	}
	if name == "" {
		return nil, status.Error(codes.Unauthenticated, "auth is enabled: give a user (kvctl --user NAME:PASSWORD) or a client certificate of a user")
	}
	for _, u := range st.GetUsers() {
		if u.GetName() == name {
			if byToken && gen != u.GetTokenGeneration() {
				return nil, status.Errorf(codes.Unauthenticated, "auth: the password of user %q changed after this token was issued; authenticate again", name)
			}
			return u, nil
		}
	}
	return nil, status.Errorf(codes.Unauthenticated, "auth: no user %q", name)
}

func hasRole(u *kvpb.AuthUser, role string) bool {
	for _, r := range u.GetRoles() {
		if r == role {
			return true
		}
	}
	return false
}

// access is what one request needs on one key or range.
type access struct {
	key, end []byte // end nil: key alone; empty non-nil: from key on
	write    bool
}

func (a access) String() string {
	kind := "read"
	if a.write {
		kind = "readwrite"
	}
	switch {
	case a.end == nil:
		return fmt.Sprintf("%s on %s", kind, keys.Quote(a.key))
	case len(a.end) == 0:
		return fmt.Sprintf("%s on keys from %s", kind, keys.Quote(a.key))
	}
	return fmt.Sprintf("%s on [%s, %s)", kind, keys.Quote(a.key), keys.Quote(a.end))
}

// needs lists what a KV request needs; nil for a request that is not one.
func needs(req any) []access {
	switch r := req.(type) {
	case *kvpb.PutRequest:
		return []access{{key: r.GetKey(), write: true}}
	case *kvpb.DeleteRequest:
		return []access{{key: r.GetKey(), write: true}}
	case *kvpb.GetRequest:
		return []access{{key: r.GetKey()}}
	case *kvpb.RangeRequest:
		end := r.GetEnd()
		if end == nil {
			end = []byte{}
		}
		return []access{{key: r.GetStart(), end: end}}
	case *kvpb.WatchCreateRequest:
		// A watch reads what it watches, previous values included.
		switch {
		case r.GetPrefix():
			end := keys.PrefixEnd(r.GetKey())
			if end == nil {
				end = []byte{}
			}
			return []access{{key: r.GetKey(), end: end}}
		case len(r.GetRangeEnd()) > 0:
			return []access{{key: r.GetKey(), end: r.GetRangeEnd()}}
		}
		return []access{{key: r.GetKey()}}
	case *kvpb.TxnRequest:
		var out []access
		for _, c := range r.GetCompare() {
			out = append(out, access{key: c.GetKey()})
		}
		for _, op := range append(append([]*kvpb.RequestOp(nil), r.GetSuccess()...), r.GetFailure()...) {
			switch {
			case op.GetPut() != nil:
				out = append(out, access{key: op.GetPut().GetKey(), write: true})
			case op.GetDelete() != nil:
				out = append(out, access{key: op.GetDelete().GetKey(), write: true})
			case op.GetGet() != nil:
				out = append(out, access{key: op.GetGet().GetKey()})
			}
		}
		return out
	}
	return nil
}

// grants reports whether permission p covers a.
func grants(p *kvpb.Permission, a access) bool {
	if a.write && !p.GetWrite() {
		return false
	}
	pk, pe := p.GetKey(), p.GetRangeEnd()
	unbounded := bytes.Equal(pe, []byte{0})
	if len(pe) == 0 { // the key alone
		return a.end == nil && bytes.Equal(a.key, pk)
	}
	if bytes.Compare(a.key, pk) < 0 {
		return false
	}
	if unbounded {
		return true
	}
	if a.end == nil {
		return bytes.Compare(a.key, pe) < 0
	}
	return len(a.end) > 0 && bytes.Compare(a.end, pe) <= 0
}

// permit checks that u may do everything in want.
func permit(st *kvpb.AuthState, u *kvpb.AuthUser, want []access) error {
	if hasRole(u, fsm.RootRole) {
		return nil
	}
next:
	for _, a := range want {
		for _, r := range st.GetRoles() {
			if !hasRole(u, r.GetName()) {
				continue
			}
			for _, p := range r.GetPerms() {
				if grants(p, a) {
					continue next
				}
			}
		}
		return status.Errorf(codes.PermissionDenied, "user %q lacks %s", u.GetName(), a)
	}
	return nil
}

// authorizeKV checks a KV request (unary, or an item of a Batch stream)
// against the auth state.
func (s *Server) authorizeKV(ctx context.Context, req any) error {
	return s.mayAccess(ctx, needs(req))
}

// mayReadKeys: with auth on, the caller may read each of keys. A lease's
// attached keys are listed only to a user who may read them all, as
// etcd does: a lease is anyone's, its keys are not.
func (s *Server) mayReadKeys(ctx context.Context, keys [][]byte) error {
	if len(keys) == 0 {
		return nil
	}
	want := make([]access, len(keys))
	for i, k := range keys {
		want[i] = access{key: k}
	}
	return s.mayAccess(ctx, want)
}

// mayAccess: with auth on, the caller is a user whose roles grant every
// access in want. A request forwarded by a member was checked by that
// member.
func (s *Server) mayAccess(ctx context.Context, want []access) error {
	if ctx.Value(forwardedKey{}) != nil {
		return nil
	}
	st, err := s.authState(ctx)
	if err != nil || !st.GetEnabled() {
		return err
	}
	u, err := s.identify(ctx, st)
	if err != nil {
		return err
	}
	return permit(st, u, want)
}

// requireRoot admits the root role only, when auth is on.
func (s *Server) requireRoot(ctx context.Context, what string) error {
	st, err := s.authState(ctx)
	if err != nil || !st.GetEnabled() {
		return err
	}
	u, err := s.identify(ctx, st)
	if err != nil {
		return err
	}
	if !hasRole(u, fsm.RootRole) {
		return status.Errorf(codes.PermissionDenied, "user %q lacks the role %q, which %s needs", u.GetName(), fsm.RootRole, what)
	}
	return nil
}

// authUnary is the client port's unary check.
func (s *Server) authUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	var err error
	switch m := info.FullMethod; {
	case m == kvpb.Auth_Authenticate_FullMethodName, strings.HasPrefix(m, "/grpc.health.v1.Health/"):
	case m == kvpb.Cluster_MemberAdd_FullMethodName:
		// MemberAdd decides itself: root, or the joining node.
	case m == kvpb.Auth_Change_FullMethodName, m == kvpb.Auth_Status_FullMethodName:
		err = s.requireRoot(ctx, "changing or listing auth")
	case m == kvpb.Cluster_Compact_FullMethodName:
		err = s.requireRoot(ctx, "compacting history")
	case strings.HasPrefix(m, "/kvd.kv.v1.Cluster/"):
		// A node's own certificate reads the map too: a node joining
		// with --join asks for it before and after adding itself.
		if _, certErr := transport.PeerCertID(ctx); certErr != nil {
			err = s.requireUser(ctx)
		}
	case strings.HasPrefix(m, "/kvd.kv.v1.Lease/"):
		// Leases are anyone's; the keys put with one need their own
		// permissions.
		err = s.requireUser(ctx)
	case needs(req) != nil:
		err = s.authorizeKV(ctx, req)
	default:
		err = s.requireRoot(ctx, info.FullMethod)
	}
	if err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

// authStream: a Batch, Watch or lease KeepAlive stream needs a user (each item, or each
// watch, is checked as it is served or created); any other stream the
// root role.
func (s *Server) authStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	var err error
	switch info.FullMethod {
	case kvpb.KV_Batch_FullMethodName, kvpb.Watch_Watch_FullMethodName, kvpb.Lease_KeepAlive_FullMethodName:
		err = s.requireUser(ss.Context())
	default:
		err = s.requireRoot(ss.Context(), info.FullMethod)
	}
	if err != nil {
		return err
	}
	return handler(srv, openedStream{ss, context.WithValue(ss.Context(), streamOpenedKey{}, time.Now())})
}

// A stream's token is judged as of when the stream opened. A stream sends
// its token once, at the start, and a client that only writes keeps one
// Batch stream for its life: judged at each item, the token would expire
// under it and refuse every write after its TTL. Each item is still
// checked against the auth state as it is now (the user, its roles, the
// password's generation), so a revoked permission or a changed password
// applies to open streams too; only the token's age does not.
type streamOpenedKey struct{}

type openedStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s openedStream) Context() context.Context { return s.ctx }

// tokenTime is when a request's token must be unexpired: its stream's
// start, or now for a unary call.
func tokenTime(ctx context.Context) time.Time {
	if t, ok := ctx.Value(streamOpenedKey{}).(time.Time); ok {
		return t
	}
	return time.Now()
}

func (s *Server) requireUser(ctx context.Context) error {
	st, err := s.authState(ctx)
	if err != nil || !st.GetEnabled() {
		return err
	}
	_, err = s.identify(ctx, st)
	return err
}

// mayAddMember: with auth on, the root role or the joining node's own
// certificate; with it off, checkJoiner's rule.
func (s *Server) mayAddMember(ctx context.Context, id uint64) error {
	st, err := s.authState(ctx)
	if err != nil {
		return err
	}
	if !st.GetEnabled() {
		if err := s.checkJoiner(ctx, id); err != nil {
			return status.Errorf(codes.PermissionDenied, "member add: %v", err)
		}
		return nil
	}
	if s.requireRoot(ctx, "member add") == nil {
		return nil
	}
	// checkJoiner lets anyone through on a port that verifies no client
	// certificate: with auth on, only a certificate naming the node
	// stands in for root.
	if s.verifiesClientCerts() && s.checkJoiner(ctx, id) == nil {
		return nil
	}
	return status.Errorf(codes.PermissionDenied, "member add of node %d needs the role %q (or the joining node's own certificate)", id, fsm.RootRole)
}

// authService implements kvpb.AuthServer.
type authService struct {
	kvpb.UnimplementedAuthServer
	s *Server
}

func (a authService) Authenticate(ctx context.Context, req *kvpb.AuthenticateRequest) (*kvpb.AuthenticateResponse, error) {
	st, err := a.s.authState(ctx)
	if err != nil {
		return nil, err
	}
	if !st.GetEnabled() {
		return nil, status.Error(codes.FailedPrecondition, "auth is not enabled")
	}
	for _, u := range st.GetUsers() {
		if u.GetName() != req.GetName() || len(u.GetPasswordHash()) == 0 {
			continue
		}
		ok, err := a.s.checkPassword(ctx, u.GetPasswordHash(), req.GetPassword())
		if err != nil {
			return nil, err
		}
		if ok {
			exp := time.Now().Add(a.s.cfg.AuthTokenTTL)
			return &kvpb.AuthenticateResponse{Token: signToken(st.GetSecret(), u.GetName(), u.GetTokenGeneration(), exp), ExpiresUnixMs: exp.UnixMilli()}, nil
		}
	}
	return nil, status.Error(codes.Unauthenticated, "auth: wrong user name or password")
}

func (a authService) Change(ctx context.Context, req *kvpb.AuthChangeRequest) (*kvpb.AuthChangeResponse, error) {
	req = proto.CloneOf(req)
	switch ch := req.GetChange().(type) {
	case *kvpb.AuthChangeRequest_UserAdd:
		if pw := ch.UserAdd.GetPassword(); pw != "" {
			h, err := bcrypt.GenerateFromPassword([]byte(pw), bcrypt.DefaultCost)
			if err != nil {
				return nil, status.Errorf(codes.InvalidArgument, "user add: %v", err)
			}
			ch.UserAdd.Password, ch.UserAdd.PasswordHash = "", h
		}
	case *kvpb.AuthChangeRequest_UserChangePassword:
		pw := ch.UserChangePassword.GetPassword()
		if pw == "" {
			return nil, status.Error(codes.InvalidArgument, "password change: the new password is empty")
		}
		h, err := bcrypt.GenerateFromPassword([]byte(pw), bcrypt.DefaultCost)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "password change: %v", err)
		}
		ch.UserChangePassword.Password, ch.UserChangePassword.PasswordHash = "", h
	case *kvpb.AuthChangeRequest_Enable:
		ch.Enable.Secret = make([]byte, 32)
		if _, err := rand.Read(ch.Enable.Secret); err != nil {
			return nil, status.Errorf(codes.Internal, "draw the token secret: %v", err)
		}
	}
	cmd, err := proto.Marshal(&peerpb.Command{Op: &peerpb.Command_Auth{Auth: req}})
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "auth change: %v", err)
	}
	if err := a.s.proposeMeta(ctx, cmd); err != nil {
		if rej := (rejectedError{}); errors.As(err, &rej) {
			return nil, status.Errorf(codes.FailedPrecondition, "auth change: %v", rej.error)
		}
		return nil, a.s.toStatus(err, MetaShard)
	}
	a.s.refreshAuthAfterChange(ctx)
	return &kvpb.AuthChangeResponse{}, nil
}

// refreshAuthAfterChange has this node enforce an auth change it just
// committed from its next request on (a revoked permission, a refused
// token). Leading the meta shard, it reads the auth state linearizably (a
// ReadIndex, which also makes the applied change visible to readers) and
// caches it; otherwise it waits for its replica and drops its cache, and
// the change is enforced here within the commit interval and authCacheFor.
// The refresh lock keeps a refresh that read the state before the change
// from caching it after.
func (s *Server) refreshAuthAfterChange(ctx context.Context) {
	s.authc.refresh.Lock()
	defer s.authc.refresh.Unlock()
	var st *kvpb.AuthState
	err := s.read(ctx, MetaShard, kvpb.Consistency_LINEARIZABLE, func(r *storage.Reader) error {
		var err error
		st, err = fsm.AuthState(r)
		return err
	})
	if err == nil {
		s.authc.cur.Store(&authSnapshot{st: st, at: time.Now()})
		return
	}
	s.awaitLocalMeta(ctx)
	s.authc.cur.Store(nil) // the next request reads the state again
}

// awaitLocalMeta waits, when this node hosts the meta shard, until what
// its replica applied so far is visible to readers (the storage commits
// applied writes every --commit-interval): when this node led the change,
// it is enforced here from the next request on; on the other nodes
// within the commit interval and authCacheFor.
func (s *Server) awaitLocalMeta(ctx context.Context) {
	n := s.host.Node(MetaShard)
	if n == nil {
		return
	}
	want := n.Applied()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		var got uint64
		if sh, err := s.engine.OpenShard(MetaShard); err == nil {
			_ = sh.View(func(r *storage.Reader) error { got, _ = r.Applied(); return nil })
		}
		if got >= want {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (a authService) Status(ctx context.Context, _ *kvpb.AuthStatusRequest) (*kvpb.AuthStatusResponse, error) {
	st, err := a.s.readAuthState(ctx)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "auth state: %v", err)
	}
	out := &kvpb.AuthStatusResponse{Enabled: st.GetEnabled(), Roles: st.GetRoles()}
	for _, u := range st.GetUsers() {
		out.Users = append(out.Users, &kvpb.AuthUser{Name: u.GetName(), Roles: u.GetRoles()})
	}
	return out, nil
}

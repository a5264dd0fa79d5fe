package embed

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/internal/authtoken"
	"github.com/kvd/kvd/proto/kvpb"
)

// Option tunes Start with what the kvd flags (Config) do not hold.
type Option func(*Node)

// WithClientAuth makes the node's Client authenticate as user, for a
// cluster with auth enabled: it gets a token from this node (in memory)
// and renews it before it expires. The user needs the permissions of
// every call the program makes, and Ready's check reads and compares
// kvd/embed/ready{N} keys (the role root has all of them). While auth is
// disabled requests carry no token (whether it is enabled is asked again
// at most once a second); but a stream the client opened then (a watch,
// the batch stream writes share) keeps going without one, and is refused
// once auth is enabled. So enable auth first, then start the node with
// WithClientAuth (a restart on the same data dir is enough).
func WithClientAuth(user, password string) Option {
	return func(n *Node) { n.auth = &tokenSource{n: n, user: user, password: password} }
}

// authRecheck: how long "auth is not enabled" is believed.
const authRecheck = time.Second

// tokenSource is the embedded client's per-call credentials. The
// client's own (client.Config.Username) authenticate at an endpoint over
// TCP and fail every call while auth is disabled; this one asks the node
// itself, in memory, and sends no token while auth is disabled.
type tokenSource struct {
	n              *Node
	user, password string

	mu       sync.Mutex // held while a token is fetched: one fetch at a time
	token    string
	renew    time.Time // when the token is replaced (authtoken.RenewAt)
	disabled time.Time // when auth was last found disabled
}

func (t *tokenSource) RequireTransportSecurity() bool { return false }

func (t *tokenSource) GetRequestMetadata(ctx context.Context, _ ...string) (map[string]string, error) {
	tok, err := t.get(ctx)
	if err != nil || tok == "" {
		return nil, err
	}
	return map[string]string{"token": tok}, nil
}

func (t *tokenSource) get(ctx context.Context) (string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.token != "" && time.Now().Before(t.renew) {
		return t.token, nil
	}
	if !t.disabled.IsZero() && time.Since(t.disabled) < authRecheck {
		return "", nil
	}
	resp, err := t.authenticate(ctx)
	if status.Code(err) == codes.FailedPrecondition {
		t.token, t.disabled = "", time.Now()
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("authenticate as %q: %w", t.user, err)
	}
	t.token, t.renew, t.disabled = resp.GetToken(), authtoken.RenewAt(time.Now(), time.UnixMilli(resp.GetExpiresUnixMs())), time.Time{}
	return t.token, nil
}

func (t *tokenSource) authenticate(ctx context.Context) (*kvpb.AuthenticateResponse, error) {
	opts := []grpc.DialOption{grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return t.n.mem.dial(ctx) })}
	if t.n.creds != nil {
		opts = append(opts, grpc.WithTransportCredentials(t.n.creds))
	} else {
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	conn, err := grpc.NewClient("passthrough:///"+t.n.clientAddr, opts...)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	resp, err := kvpb.NewAuthClient(conn).Authenticate(ctx, &kvpb.AuthenticateRequest{Name: t.user, Password: t.password})
	if err != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return nil, fmt.Errorf("node did not answer: %w", err)
	}
	return resp, err
}

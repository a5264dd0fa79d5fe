package embed

import (
	"context"
	"errors"
	"fmt"
	"net"
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
	return func(n *Node) {
		n.auth = &authtoken.Source{Fetch: func(ctx context.Context) (string, time.Time, error) {
			return n.fetchToken(ctx, user, password)
		}}
	}
}

// authRecheck: how long "auth is not enabled" is believed.
const authRecheck = time.Second

// fetchToken gets a token for user from the node itself, in memory. The
// client's own credentials (client.Config.Username) authenticate at an
// endpoint over TCP and fail every call while auth is disabled; these
// send no token while auth is disabled, believing that for authRecheck.
func (n *Node) fetchToken(ctx context.Context, user, password string) (string, time.Time, error) {
	resp, err := n.authenticate(ctx, user, password)
	if status.Code(err) == codes.FailedPrecondition {
		return "", time.Now().Add(authRecheck), nil
	}
	if err != nil {
		return "", time.Time{}, fmt.Errorf("authenticate as %q: %w", user, err)
	}
	return resp.GetToken(), authtoken.RenewAt(time.Now(), time.UnixMilli(resp.GetExpiresUnixMs())), nil
}

func (n *Node) authenticate(ctx context.Context, user, password string) (*kvpb.AuthenticateResponse, error) {
	opts := []grpc.DialOption{grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return n.mem.dial(ctx) })}
	if n.creds != nil {
		opts = append(opts, grpc.WithTransportCredentials(n.creds))
	} else {
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	conn, err := grpc.NewClient("passthrough:///"+n.clientAddr, opts...)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	resp, err := kvpb.NewAuthClient(conn).Authenticate(ctx, &kvpb.AuthenticateRequest{Name: user, Password: password})
	if err != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return nil, fmt.Errorf("node did not answer: %w", err)
	}
	return resp, err
}

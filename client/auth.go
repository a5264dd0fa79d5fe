package client

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/internal/authtoken"
	"github.com/kvd/kvd/proto/kvpb"
)

// dialTarget is the gRPC target of a host:port: passthrough, so the name
// is resolved by each connection attempt (see dialNode).
func dialTarget(addr string) string {
	if strings.Contains(addr, "://") {
		return addr
	}
	return "passthrough:///" + addr
}

// dialOptions are the credentials of every connection: TLS when
// Config.TLS is set, and the token of Config.Username on every call.
func (c *Client) dialOptions() []grpc.DialOption {
	creds := insecure.NewCredentials()
	if c.cfg.TLS != nil {
		creds = credentials.NewTLS(c.cfg.TLS)
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if c.cfg.Username != "" {
		fetch := func(ctx context.Context) (string, time.Time, error) { return c.fetchToken(ctx, creds) }
		opts = append(opts, grpc.WithPerRPCCredentials(&authtoken.Source{Fetch: fetch, Base: c.base}))
	}
	return append(opts, c.cfg.DialOptions...)
}

// fetchToken gets a token for Config.Username from Auth.Authenticate at
// the first endpoint that answers.
func (c *Client) fetchToken(ctx context.Context, creds credentials.TransportCredentials) (string, time.Time, error) {
	var errs []error
	for _, ep := range c.cfg.Endpoints {
		resp, err := c.authenticate(ctx, ep, creds)
		if err == nil {
			return resp.GetToken(), authtoken.RenewAt(time.Now(), time.UnixMilli(resp.GetExpiresUnixMs())), nil
		}
		errs = append(errs, &EndpointError{Endpoint: ep, Err: err})
		if ctx.Err() != nil {
			break
		}
	}
	// The status of the first answer (a wrong password: Unauthenticated)
	// becomes the call's.
	return "", time.Time{}, fmt.Errorf("authenticate as %q: %w", c.cfg.Username, errors.Join(errs...))
}

func (c *Client) authenticate(ctx context.Context, ep string, creds credentials.TransportCredentials) (*kvpb.AuthenticateResponse, error) {
	conn, err := grpc.NewClient(dialTarget(ep), grpc.WithTransportCredentials(creds))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, c.cfg.DialTimeout)
	defer cancel()
	return kvpb.NewAuthClient(conn).Authenticate(ctx, &kvpb.AuthenticateRequest{Name: c.cfg.Username, Password: c.cfg.Password})
}

// Auth applies one auth change (users, roles, enabling); once auth is
// enabled only a user with the role root may.
func (c *Client) Auth(ctx context.Context, req *kvpb.AuthChangeRequest) error {
	_, err := anyNode(ctx, c, "auth change", func(ctx context.Context, n *node) (*kvpb.AuthChangeResponse, error) {
		return kvpb.NewAuthClient(n.conn).Change(ctx, req)
	})
	return err
}

// AuthStatus lists users (without password hashes) and roles, and says
// whether auth is enabled.
func (c *Client) AuthStatus(ctx context.Context) (*kvpb.AuthStatusResponse, error) {
	return anyNode(ctx, c, "auth status", func(ctx context.Context, n *node) (*kvpb.AuthStatusResponse, error) {
		return kvpb.NewAuthClient(n.conn).Status(ctx, &kvpb.AuthStatusRequest{})
	})
}

// anyNode calls f on the members in turn until one answers, as
// MemberList does; an answer that refuses the call (permission, a
// conflicting change) is final.
func anyNode[T any](ctx context.Context, c *Client, what string, f func(context.Context, *node) (T, error)) (T, error) {
	var zero T
	if c.isClosed() {
		return zero, ErrClosed
	}
	var lastErr error
	for attempt := 0; ; attempt++ {
		for _, n := range c.nodesInOrder() {
			actx, cancel := c.attemptCtx(ctx)
			r, err := f(actx, n)
			cancel()
			if err == nil {
				return r, nil
			}
			st, _ := status.FromError(err)
			switch st.Code() {
			case codes.PermissionDenied, codes.Unauthenticated:
				return zero, fmt.Errorf("%w: %s", ErrPermissionDenied, st.Message())
			case codes.InvalidArgument, codes.FailedPrecondition:
				return zero, fmt.Errorf("%w: %s", ErrInvalidArgument, st.Message())
			}
			lastErr = fmt.Errorf("node %d (%s): %w", n.id, n.addr, err)
			if ctx.Err() != nil || c.isClosed() {
				break
			}
		}
		if c.isClosed() {
			return zero, ErrClosed
		}
		if !c.sleep(ctx, backoff(attempt)) {
			if c.isClosed() {
				return zero, ErrClosed
			}
			return zero, c.giveUp(ctx, what, lastErr)
		}
	}
}

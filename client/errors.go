package client

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every error the client returns wraps at most one of these
// (plus context); match them with errors.Is.
var (
	// ErrNotFound: Get found no such key.
	ErrNotFound = errors.New("client: key not found")
	// ErrUnavailable: the cluster could not serve the request before the
	// caller's deadline: no node answered, a shard has no leader or no
	// quorum, or every replica was down or busy. Retrying later may succeed.
	ErrUnavailable = errors.New("client: cluster unavailable")
	// ErrInvalidArgument: the server (or the client, before sending)
	// rejected the request as malformed; retrying it unchanged cannot help.
	ErrInvalidArgument = errors.New("client: invalid argument")
	// ErrInvalidToken: a Scan continuation token was not produced by this
	// client version or was corrupted.
	ErrInvalidToken = errors.New("client: invalid scan token")
	// ErrResultNotKept: a retried write was applied by an earlier attempt,
	// but the cluster did not keep its result for a retry (a transaction
	// whose read results were too large to keep). The error says at which
	// revision it applied and which branch it took; its reads must be done
	// again. Retrying the same request cannot bring the result back.
	ErrResultNotKept = errors.New("client: write applied, result not kept")
	// ErrClosed: the Client was closed.
	ErrClosed = errors.New("client: closed")
)

// EndpointError is why one of Config.Endpoints did not answer New. The
// ErrUnavailable that New returns when none answered wraps one for each.
type EndpointError struct {
	Endpoint string
	Err      error
}

func (e *EndpointError) Error() string { return fmt.Sprintf("%s: %v", e.Endpoint, e.Err) }
func (e *EndpointError) Unwrap() error { return e.Err }

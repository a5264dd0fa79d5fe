package client

import (
	"errors"
	"fmt"
	"strings"
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
	// but the cluster did not keep its result for a retry (its read
	// results, a transaction's gets or a prev_kv, were too large to keep).
	// The error says at which revision it applied (and which branch a
	// transaction took); its reads must be done again. Retrying the same request cannot bring the result back.
	ErrResultNotKept = errors.New("client: write applied, result not kept")
	// ErrPermissionDenied: auth is enabled and the request's user may not
	// do it (the message names the permission it lacks), or the request
	// has no valid user (Config.Username, a client certificate).
	ErrPermissionDenied = errors.New("client: permission denied")
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

// UnreachableError: a request ran out of time because members it needed
// (its shard's leader, or a majority of its replicas) were out of the
// client's reach at the addresses they advertise, which the client was
// not given and never reached, and no member it reached could forward
// the request. The cluster may well be healthy: the client needs an
// address of every member that it can reach (Config.Endpoints). Nodes
// describes each member: "node 2 at ADDR: why". It wraps ErrUnavailable.
type UnreachableError struct {
	Shard uint64
	Nodes []string
}

func (e *UnreachableError) Error() string {
	return fmt.Sprintf("%v: shard %d: out of this client's reach at the addresses they advertise: %s",
		ErrUnavailable, e.Shard, strings.Join(e.Nodes, "; "))
}

func (e *UnreachableError) Unwrap() error { return ErrUnavailable }

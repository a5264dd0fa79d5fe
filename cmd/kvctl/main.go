// Command kvctl is the command-line client of kvd.
//
// Exit codes (docs/design.md, kvctl): 0 success; 1 key not found (or compare
// failed); 2 bad usage or input; 3 cluster unavailable (no quorum,
// timeout, no endpoint answers). Errors go to stderr as one line that says
// what to do next.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"

	"github.com/kvd/kvd/client"
)

// Exit codes.
const (
	exitOK          = 0
	exitNotFound    = 1
	exitUsage       = 2
	exitUnavailable = 3
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// run executes kvctl with args (without the program name) and returns the
// exit code. Everything it prints goes to stdout and stderr; it reads
// KVCTL_ENDPOINTS from the environment.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	app := &app{stdin: stdin, stdout: stdout, stderr: stderr}
	root := app.rootCmd()
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	_, err := root.ExecuteC()
	if err == nil {
		return exitOK
	}
	code, msg := classify(err, app)
	fmt.Fprintln(stderr, "kvctl: "+oneLine(msg))
	return code
}

// exitError is an error a command returns with its exit code and the full
// message (what happened; what to do).
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

func usageErrorf(format string, a ...any) error {
	return &exitError{code: exitUsage, msg: fmt.Sprintf(format, a...)}
}

// classify maps an error to an exit code and a message. Errors that are
// not exitErrors and not client errors come from cobra's own parsing
// (unknown flag or command, wrong argument count): bad usage.
func classify(err error, a *app) (int, string) {
	var (
		ee *exitError
		ue *client.UnreachableError
	)
	switch {
	case errors.As(err, &ee):
		return ee.code, ee.msg
	case errors.As(err, &ue):
		return exitUnavailable, fmt.Sprintf("cluster unavailable: shard %d cannot be served from here: %s; either those members are down, or they advertise addresses this host cannot reach and no node in --endpoints could forward to them: list every member in --endpoints",
			ue.Shard, clean(errors.New(strings.Join(ue.Nodes, "; "))))
	case errors.Is(err, client.ErrPermissionDenied):
		return exitPermission, "permission denied: " + strings.TrimPrefix(clean(err), "permission denied: ")
	case errors.Is(err, client.ErrNotFound):
		return exitNotFound, err.Error()
	case errors.Is(err, client.ErrInvalidArgument), errors.Is(err, client.ErrInvalidToken):
		return exitUsage, fmt.Sprintf("%s; fix the input and try again", clean(err))
	case errors.Is(err, client.ErrResultNotKept):
		// The write applied; the message says where and what to read
		// again. The cluster is fine: no advice to check it.
		return exitUnavailable, clean(err)
	case errors.Is(err, client.ErrUnavailable):
		return exitUnavailable, fmt.Sprintf("cluster unavailable at %s: %s; check the cluster with 'kvctl cluster status' or retry with a longer --timeout",
			strings.Join(a.endpoints, ","), clean(err))
	case a.ran:
		// A command got past parsing and failed in a way the client
		// does not classify (an unexpected server error): the cluster
		// could not serve the request.
		return exitUnavailable, fmt.Sprintf("%s; check the cluster with 'kvctl cluster status'", clean(err))
	}
	return exitUsage, fmt.Sprintf("%v; see 'kvctl --help'", err)
}

// oneLine folds a multi-line message (errors.Join) into one line.
func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", "; ")), " ")
}

// clean strips the layers of gRPC and client boilerplate from an error
// message, which the one-line error has no room for.
func clean(err error) string {
	s := dialError.ReplaceAllString(oneLine(err.Error()), "$1")
	for _, junk := range []string{
		"client: cluster unavailable: ", "client: invalid argument: ", "client: ",
		"transport: Error while dialing: ", "connection error: desc = ",
	} {
		s = strings.ReplaceAll(s, junk, "")
	}
	return rpcPrefix.ReplaceAllString(s, "")
}

var (
	rpcPrefix = regexp.MustCompile(`rpc error: code = \w+ desc = `)
	// dialError is how gRPC words a failed dial, the cause quoted.
	dialError = regexp.MustCompile(`(?:connection error: desc = )?"transport: Error while dialing: ([^"]*)"`)
)

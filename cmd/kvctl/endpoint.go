package main

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/kvd/kvd/proto/kvpb"
)

// endpointCmd is etcdctl's "endpoint health" and "endpoint status": each
// endpoint given in --endpoints is asked on its own, not the members the
// cluster map lists (cluster status does that).
func (a *app) endpointCmd() *cobra.Command {
	cmd := groupCmd("endpoint", "Check the endpoints given in --endpoints, one by one",
		"  kvctl endpoint health\n  kvctl --endpoints 127.0.0.1:2379,127.0.0.1:22379 endpoint status -o table")
	cmd.AddCommand(&cobra.Command{
		Use:   "health",
		Short: "Say whether each endpoint is healthy",
		Long: `Ask each endpoint in --endpoints for its gRPC health and its shards. An
endpoint is healthy when it answers SERVING and every shard replica it
hosts knows a leader (so it can serve writes and linearizable reads).

Output: simple prints "ENDPOINT is healthy: took 1.2ms" or "ENDPOINT is
unhealthy: REASON" per endpoint; json prints an array of {"endpoint",
"healthy", "took", "error"}; table prints the same as columns.
Exits 0 when every endpoint is healthy, 3 otherwise.`,
		Example: "  kvctl endpoint health\n  kvctl --endpoints 127.0.0.1:2379,127.0.0.1:22379 endpoint health -o json",
		Args:    exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			a.ran = true
			res := a.probeEndpoints()
			return a.printHealth(res)
		},
	})
	cmd.AddCommand(&cobra.Command{
		Use:   "status",
		Short: "Show each endpoint's node id, map epoch, shards and leaderships",
		Long: `Ask each endpoint in --endpoints for its status: the node behind it, the
cluster map epoch it holds, how many shard replicas it hosts and leads,
and the corruption alarms it knows of.

Output: simple and table print one row per endpoint; json prints an
array of {"endpoint", "node", "epoch", "shards", "leading", "alarms",
"took", "error"}. Exits 0 when every endpoint answers, 3 otherwise.`,
		Example: "  kvctl endpoint status\n  kvctl --endpoints 127.0.0.1:2379,127.0.0.1:22379 endpoint status -o json",
		Args:    exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			a.ran = true
			res := a.probeEndpoints()
			return a.printEndpointStatus(res)
		},
	})
	return cmd
}

// endpointResult is what one endpoint answered.
type endpointResult struct {
	endpoint string
	status   *kvpb.StatusResponse
	serving  bool
	took     time.Duration
	err      error
}

// healthy: serving, and every replica it hosts knows a leader.
func (r endpointResult) healthy() (bool, string) {
	if r.err != nil {
		return false, clean(r.err)
	}
	if !r.serving {
		return false, "health check answers NOT_SERVING"
	}
	var none []string
	for _, s := range r.status.GetShards() {
		if s.GetLeader() == 0 {
			none = append(none, fmt.Sprint(s.GetShard()))
		}
	}
	if len(none) > 0 {
		return false, fmt.Sprintf("shard %s has no leader", strings.Join(none, ", "))
	}
	return true, ""
}

// probeEndpoints asks every endpoint for its health and status at once,
// each within --timeout.
func (a *app) probeEndpoints() []endpointResult {
	out := make([]endpointResult, len(a.endpoints))
	var wg sync.WaitGroup
	for i, ep := range a.endpoints {
		wg.Go(func() { out[i] = a.probeEndpoint(ep) })
	}
	wg.Wait()
	return out
}

func (a *app) probeEndpoint(ep string) endpointResult {
	r := endpointResult{endpoint: ep}
	// passthrough: the name is resolved by the connection attempt, which
	// the deadline cuts short (see client.dialNode).
	conn, err := grpc.NewClient("passthrough:///"+ep, a.creds())
	if err != nil {
		r.err = err
		return r
	}
	defer conn.Close()
	ctx, cancel := a.ctx()
	defer cancel()
	start := time.Now()
	h, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err == nil {
		r.serving = h.GetStatus() == healthpb.HealthCheckResponse_SERVING
		r.status, err = kvpb.NewClusterClient(conn).Status(ctx, &kvpb.StatusRequest{})
	}
	r.took = time.Since(start)
	if err != nil {
		r.err = fmt.Errorf("%s", dialReason(err, a.timeout))
	}
	return r
}

func (a *app) printHealth(res []endpointResult) error {
	type row struct {
		Endpoint string `json:"endpoint"`
		Healthy  bool   `json:"healthy"`
		Took     string `json:"took"`
		Error    string `json:"error,omitempty"`
	}
	var rows []row
	bad := 0
	for _, r := range res {
		ok, why := r.healthy()
		if !ok {
			bad++
		}
		rows = append(rows, row{r.endpoint, ok, r.took.Round(10 * time.Microsecond).String(), why})
	}
	var err error
	switch a.output {
	case "json":
		err = writeJSON(a.stdout, rows)
	case "table":
		tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "ENDPOINT\tHEALTH\tTOOK\tERROR")
		for _, r := range rows {
			fmt.Fprintf(tw, "%s\t%v\t%s\t%s\n", r.Endpoint, r.Healthy, r.Took, r.Error)
		}
		err = tw.Flush()
	default:
		for _, r := range rows {
			if r.Healthy {
				_, err = fmt.Fprintf(a.stdout, "%s is healthy: took %s\n", r.Endpoint, r.Took)
			} else {
				_, err = fmt.Fprintf(a.stdout, "%s is unhealthy: %s\n", r.Endpoint, r.Error)
			}
			if err != nil {
				break
			}
		}
	}
	if err != nil {
		return err
	}
	if bad > 0 {
		return &exitError{code: exitUnavailable, msg: fmt.Sprintf("%d of %d endpoints unhealthy; see 'kvctl cluster status'", bad, len(res))}
	}
	return nil
}

func (a *app) printEndpointStatus(res []endpointResult) error {
	type row struct {
		Endpoint string `json:"endpoint"`
		Node     uint64 `json:"node,omitempty"`
		Epoch    uint64 `json:"epoch,omitempty"`
		Shards   int    `json:"shards"`
		Leading  int    `json:"leading"`
		Alarms   int    `json:"alarms"`
		Took     string `json:"took"`
		Error    string `json:"error,omitempty"`
	}
	var rows []row
	var failed []error
	for _, r := range res {
		rw := row{Endpoint: r.endpoint, Took: r.took.Round(10 * time.Microsecond).String()}
		if r.err != nil {
			rw.Error = clean(r.err)
			failed = append(failed, fmt.Errorf("%s: %s", r.endpoint, rw.Error))
		} else {
			st := r.status
			rw.Node, rw.Epoch, rw.Shards, rw.Alarms = st.GetNode(), st.GetEpoch(), len(st.GetShards()), len(st.GetAlarms())
			for _, s := range st.GetShards() {
				if s.GetRole() == "leader" {
					rw.Leading++
				}
			}
		}
		rows = append(rows, rw)
	}
	if a.output == "json" {
		if err := writeJSON(a.stdout, rows); err != nil {
			return err
		}
	} else {
		tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "ENDPOINT\tNODE\tEPOCH\tSHARDS\tLEADING\tALARMS\tTOOK\tERROR")
		for _, r := range rows {
			fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%s\t%s\n", r.Endpoint, r.Node, r.Epoch, r.Shards, r.Leading, r.Alarms, r.Took, r.Error)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if len(failed) > 0 {
		return &exitError{code: exitUnavailable, msg: fmt.Sprintf("%d of %d endpoints did not answer: %v", len(failed), len(res), errors.Join(failed...))}
	}
	return nil
}

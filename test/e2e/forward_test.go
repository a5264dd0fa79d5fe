package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/proto/kvpb"
)

// TestOneEndpointIsEnough runs a cluster whose members advertise client
// addresses no one can resolve (nodeN.invalid, as a container's service
// name is seen from the host) and gives kvctl one real endpoint: every
// key is served all the same, node 1 forwarding what it does not lead to
// the leader over its peer connection. A write forwarded twice with one
// (session, seq) applies once. With the other members down, the error
// says to list every member rather than naming an address.
func TestOneEndpointIsEnough(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 4, Advertise: func(nd *proccluster.Node) (string, string) {
		_, port, _ := strings.Cut(nd.ClientAddr, ":")
		return fmt.Sprintf("node%d.invalid:%s", nd.ID, port), ""
	}})
	one := c.Node(1)
	// Node 1 must lead less than every data shard, or nothing would be
	// forwarded: a node restarted comes back a follower of each shard.
	lctx, lcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer lcancel()
	leadsAll := true
	for shard := uint64(1); shard <= 4; shard++ {
		if l := c.LeaderOf(lctx, shard); l == nil || l.ID != 1 {
			leadsAll = false
		}
	}
	if leadsAll {
		c.Stop(one)
		c.StartNode(one)
		c.WaitReady(30 * time.Second)
	}
	kvctl := func(args ...string) (string, string, int) {
		t.Helper()
		cmd := exec.Command(c.KVCTL, append([]string{"--endpoints", one.ClientAddr, "--timeout", "3s"}, args...)...)
		var out, errb strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errb
		code := 0
		if err := cmd.Run(); err != nil {
			ee, ok := err.(*exec.ExitError)
			if !ok {
				t.Fatalf("kvctl %v: %v", args, err)
			}
			code = ee.ExitCode()
		}
		return out.String(), errb.String(), code
	}

	const keys = 24 // over 4 shards: some led by nodes 2 and 3
	var want []string
	for i := range keys {
		k := fmt.Sprintf("one/%02d", i)
		want = append(want, k)
		if _, errOut, code := kvctl("put", k, "v"+k); code != 0 {
			t.Fatalf("put %s through one endpoint: exit %d: %s", k, code, errOut)
		}
	}
	for _, k := range want {
		if out, errOut, code := kvctl("get", k); code != 0 || out != "v"+k+"\n" {
			t.Fatalf("get %s through one endpoint: exit %d, %q, %s", k, code, out, errOut)
		}
	}
	if out, errOut, code := kvctl("get", "--prefix", "one/", "--keys-only"); code != 0 || out != strings.Join(want, "\n")+"\n" {
		t.Fatalf("get --prefix through one endpoint: exit %d: %q %s", code, out, errOut)
	}
	if forwarded := metric(t, one.MetricsAddr, `kvd_forwarded_requests_total{result="answered"}`); forwarded == "" || forwarded == "0" {
		t.Fatalf("node 1 forwarded nothing (kvd_forwarded_requests_total answered = %q): the test did not test forwarding", forwarded)
	}

	// Exactly-once through a forward: one (session, seq) sent twice to a
	// follower, for a key of a shard node 1 does not lead.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var key string
	for _, k := range want {
		if l := c.LeaderOf(ctx, shardOf(t, c, k)); l != nil && l.ID != 1 {
			key = k
			break
		}
	}
	if key == "" {
		t.Fatal("node 1 leads every shard; nothing to forward")
	}
	conn, err := grpc.NewClient(one.ClientAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	kv := kvpb.NewKVClient(conn)
	put := &kvpb.PutRequest{Header: &kvpb.RequestHeader{Session: 0x5eed, Seq: 1}, Key: []byte(key), Value: []byte("once")}
	first, err := kv.Put(ctx, put)
	if err != nil {
		t.Fatalf("forwarded put: %v", err)
	}
	again, err := kv.Put(ctx, put)
	if err != nil {
		t.Fatalf("forwarded retry: %v", err)
	}
	got, err := kv.Get(ctx, &kvpb.GetRequest{Header: &kvpb.RequestHeader{}, Key: []byte(key)})
	if err != nil {
		t.Fatal(err)
	}
	if again.GetHeader().GetRevision() != first.GetHeader().GetRevision() || got.GetKv().GetVersion() != 2 || got.GetKv().GetModRevision() != first.GetHeader().GetRevision() {
		t.Fatalf("a retried forwarded put applied twice: revisions %d then %d; key now %v",
			first.GetHeader().GetRevision(), again.GetHeader().GetRevision(), got.GetKv())
	}

	// Neither the client nor node 1 can reach a leader: the advice is
	// to list every member, not an address the host cannot use.
	c.Kill(c.Node(2))
	c.Kill(c.Node(3))
	_, errOut, code := kvctl("put", key, "x")
	if code != 3 || !strings.Contains(errOut, "list every member in --endpoints") || strings.Contains(errOut, "leader is node") {
		t.Fatalf("put with the other members down: exit %d, stderr %q", code, errOut)
	}
}

// metric returns the value of the sample named exactly name (labels
// included) on a node's /metrics, or "".
func metric(t *testing.T, addr, name string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			return v
		}
	}
	return ""
}

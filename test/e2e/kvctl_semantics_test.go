package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/kvd/kvd/hashring"
	"github.com/kvd/kvd/internal/proccluster"
)

// TestKvctlSemantics drives the semantics users rely on (docs/design.md,
// Semantics and kvctl)
// through kvctl against a real 3-node cluster: compare-and-swap,
// transactions within and across shards, revisions, counts, ranges and the
// request limits, each with its exit code.
func TestKvctlSemantics(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 8})
	ring := clusterRing(t, c)

	run := func(stdin string, want int, args ...string) (string, string) {
		t.Helper()
		out, errOut, code := c.Kvctl(stdin, args...)
		if code != want {
			t.Fatalf("kvctl %.80q: exit %d, want %d (stdout %.200q, stderr %q)", args, code, want, out, errOut)
		}
		if code != 0 && strings.Count(strings.TrimSuffix(errOut, "\n"), "\n") != 0 {
			t.Fatalf("kvctl %.80q: error is not one line: %q", args, errOut)
		}
		return out, errOut
	}

	t.Run("cas", func(t *testing.T) {
		run("", 0, "cas", "--create", "lock", "a")
		if _, e := run("", 1, "cas", "--create", "lock", "b"); !strings.Contains(e, `"lock" already exists`) {
			t.Fatalf("cas --create on an existing key: %q", e)
		}
		if out, _ := run("", 0, "cas", "lock", "a", "b"); out != "OK\n" {
			t.Fatalf("cas: %q", out)
		}
		if _, e := run("", 1, "cas", "lock", "a", "c"); e != "kvctl: compare failed: \"lock\" is \"b\", not \"a\"\n" {
			t.Fatalf("cas with a stale old value: %q", e)
		}
		if _, e := run("", 1, "cas", "no-such", "a", "c"); !strings.Contains(e, `"no-such" does not exist`) {
			t.Fatalf("cas on a missing key: %q", e)
		}
		if out, _ := run("", 0, "get", "lock"); out != "b\n" {
			t.Fatalf("after the cas calls lock = %q, want b", out)
		}
	})

	t.Run("txn", func(t *testing.T) {
		if ring.Shard([]byte("{user1}.a")) != ring.Shard([]byte("{user1}.b")) {
			t.Fatal("a hash tag did not put {user1}.a and {user1}.b in one shard")
		}
		in := `{"compare":[{"key":"{user1}.a","target":"exists","op":"=","exists":false}],
			"success":[{"put":{"key":"{user1}.a","value":"1"}},{"put":{"key":"{user1}.b","value":"2"}},{"get":{"key":"{user1}.a"}}],
			"failure":[{"get":{"key":"{user1}.a"}},{"get":{"key":"{user1}.b"}}]}`
		if out, _ := run(in, 0, "txn"); out != "SUCCESS\nput {user1}.a OK\nput {user1}.b OK\nget {user1}.a 1\n" {
			t.Fatalf("txn success: %q", out)
		}
		if out, _ := run(in, 1, "txn"); out != "FAILURE\nget {user1}.a 1\nget {user1}.b 2\n" {
			t.Fatalf("txn failure: %q", out)
		}
		out, _ := run(`{"compare":[{"key":"{user1}.a","target":"version","op":"=","version":1},{"key":"{user1}.b","value":"2"}],
			"success":[{"del":{"key":"{user1}.b"}},{"get":{"key":"{user1}.b"}}]}`, 0, "-o", "json", "txn")
		var j struct {
			Succeeded bool  `json:"succeeded"`
			Revision  int64 `json:"revision"`
			Responses []struct {
				Op      string `json:"op"`
				Deleted *int64 `json:"deleted"`
				Found   *bool  `json:"found"`
			} `json:"responses"`
		}
		if err := json.Unmarshal([]byte(out), &j); err != nil || !j.Succeeded || j.Revision == 0 || len(j.Responses) != 2 ||
			*j.Responses[0].Deleted != 1 || *j.Responses[1].Found {
			t.Fatalf("txn -o json: %v %s", err, out)
		}

		// Malformed input: exit 2, naming the problem.
		for in, msg := range map[string]string{
			`{"compare": [`:                               "invalid JSON",
			`{"success":[{"put":{"key":"k"}}]}`:           `success[0]: put: "value" is missing`,
			`{"compare":[{"key":"k","target":"colour"}]}`: `target "colour"`,
		} {
			if _, e := run(in, 2, "txn"); !strings.Contains(e, msg) {
				t.Errorf("malformed txn %q: stderr %q lacks %q", in, e, msg)
			}
		}

		// Keys in two shards: rejected whole, with the hint to use hash tags.
		a, b := "x0", ""
		for i := 1; b == ""; i++ {
			if k := fmt.Sprintf("x%d", i); ring.Shard([]byte(k)) != ring.Shard([]byte(a)) {
				b = k
			}
		}
		cross := fmt.Sprintf(`{"success":[{"put":{"key":%q,"value":"1"}},{"put":{"key":%q,"value":"1"}}]}`, a, b)
		if _, e := run(cross, 2, "txn"); !strings.Contains(e, "hash tag") || !strings.Contains(e, "shard") {
			t.Fatalf("cross-shard txn: stderr %q does not suggest hash tags", e)
		}
		for _, k := range []string{a, b} {
			run("", 1, "get", k) // nothing applied
		}
	})

	t.Run("revisions", func(t *testing.T) {
		var revs []int64
		for i := 1; i <= 3; i++ {
			out, _ := run("", 0, "-o", "json", "put", "rev", fmt.Sprint(i))
			var p struct{ Revision int64 }
			json.Unmarshal([]byte(out), &p)
			revs = append(revs, p.Revision)
		}
		out, _ := run("", 0, "-o", "json", "get", "rev")
		var kv struct {
			Value          string `json:"value"`
			CreateRevision int64  `json:"create_revision"`
			ModRevision    int64  `json:"mod_revision"`
			Version        int64  `json:"version"`
		}
		if err := json.Unmarshal([]byte(out), &kv); err != nil {
			t.Fatal(err)
		}
		if kv.Value != "3" || kv.Version != 3 || kv.CreateRevision != revs[0] || kv.ModRevision != revs[2] ||
			!(revs[0] < revs[1] && revs[1] < revs[2]) {
			t.Fatalf("after 3 puts (revisions %v): %+v", revs, kv)
		}
		// A delete and a re-create start the version again.
		run("", 0, "del", "rev")
		run("", 0, "put", "rev", "again")
		out, _ = run("", 0, "-o", "json", "get", "rev")
		json.Unmarshal([]byte(out), &kv)
		if kv.Version != 1 || kv.CreateRevision <= revs[2] {
			t.Fatalf("re-created key: %+v", kv)
		}
		// A version compare sees it.
		run(`{"compare":[{"key":"rev","target":"version","op":"=","version":1}],"success":[{"put":{"key":"rev","value":"v2"}}]}`, 0, "txn")
		run(`{"compare":[{"key":"rev","target":"mod","op":"<","mod_revision":1}],"success":[]}`, 1, "txn")
	})

	t.Run("count and ranges", func(t *testing.T) {
		for i := range 30 {
			run("", 0, "put", fmt.Sprintf("cnt/%02d", i), fmt.Sprint(i))
		}
		if out, _ := run("", 0, "get", "--prefix", "cnt/", "--count-only"); out != "30\n" {
			t.Fatalf("count-only: %q", out)
		}
		// A serializable read may lag: a follower learns of commits with
		// the next heartbeat, and any replica shows applied state once its
		// storage commits (every CommitInterval).
		var out string
		proccluster.WaitFor(t, 10*time.Second, "a serializable count of 30", func() bool {
			out, _ = run("", 0, "get", "--prefix", "cnt/", "--count-only", "--consistency", "serializable", "-o", "json")
			return strings.Contains(out, `"count": 30`)
		})
		if out, _ := run("", 0, "get", "cnt/10", "--end", "cnt/20", "--count-only"); out != "10\n" {
			t.Fatalf("range count: %q", out)
		}
		if out, _ := run("", 0, "get", "cnt/27", "--end", "cnt/99", "--keys-only"); out != "cnt/27\ncnt/28\ncnt/29\n" {
			t.Fatalf("range: %q", out)
		}
		if out, _ := run("", 0, "get", "cnt/05", "--end", "cnt/07"); out != "cnt/05\n5\ncnt/06\n6\n" {
			t.Fatalf("range with values: %q", out)
		}
	})

	t.Run("limits", func(t *testing.T) {
		run("", 2, "put", "", "v")
		run("", 2, "get", "")
		run("", 2, "cas", "--create", "", "v")
		mib := strings.Repeat("v", 1<<20)
		run(mib, 0, "put", "big", "-") // exactly the limit is fine
		if _, e := run(mib+"v", 2, "put", "big", "-"); !strings.Contains(e, "limit") {
			t.Fatalf("value of 1 MiB + 1: %q", e)
		}
		var ops []string
		for i := range 129 {
			ops = append(ops, fmt.Sprintf(`{"put":{"key":"{t}.%d","value":"v"}}`, i))
		}
		if _, e := run(`{"success":[`+strings.Join(ops, ",")+`]}`, 2, "txn"); !strings.Contains(e, "128") {
			t.Fatalf("txn of 129 ops: %q", e)
		}
		run(`{"success":[`+strings.Join(ops[:128], ",")+`]}`, 0, "txn")
	})
}

// clusterRing builds the ring from the cluster map, as clients do.
func clusterRing(t *testing.T, c *proccluster.Cluster) *hashring.Ring {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := newClient(t, c).Map(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []uint64
	for _, s := range m.GetShards() {
		if s.GetId() != 0 {
			ids = append(ids, s.GetId())
		}
	}
	ring, err := hashring.New(ids, int(m.GetVnodes()))
	if err != nil {
		t.Fatal(err)
	}
	return ring
}

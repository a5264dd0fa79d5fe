package e2e

import (
	"encoding/json"
	"os/exec"
	"strings"
	"testing"

	"github.com/kvd/kvd/internal/proccluster"
)

// TestKvctlConveniences drives what an etcdctl user types against real
// processes: URL endpoints, a mistyped command, put --prev-kv, del
// --prefix, endpoint health and status, version and completion, and
// kvd --version and --help on stdout.
func TestKvctlConveniences(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 4})
	urls := "http://" + strings.ReplaceAll(c.Endpoints(), ",", ",http://")
	kvctl := func(args ...string) (string, string, int) {
		t.Helper()
		cmd := exec.Command(c.KVCTL, append([]string{"--endpoints", urls}, args...)...)
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
	must := func(want string, args ...string) {
		t.Helper()
		out, errOut, code := kvctl(args...)
		if code != 0 || out != want {
			t.Fatalf("kvctl %v: exit %d, stdout %q (want %q), stderr %q", args, code, out, want, errOut)
		}
	}

	must("OK\n", "put", "greeting", "hello")
	must("OK\ngreeting\nhello\n", "put", "--prev-kv", "greeting", "hi")
	must("OK\n", "put", "--prev-kv", "fresh", "x") // nothing replaced: nothing more printed
	out, errOut, code := kvctl("-o", "json", "put", "--prev-kv", "greeting", "hey")
	var put struct {
		Revision int64          `json:"revision"`
		PrevKV   map[string]any `json:"prev_kv"`
	}
	if err := json.Unmarshal([]byte(out), &put); err != nil || code != 0 || put.PrevKV["value"] != "hi" || put.Revision == 0 {
		t.Fatalf("put --prev-kv -o json: exit %d, %v, %q %s", code, err, out, errOut)
	}
	for _, k := range []string{"s/1", "s/2", "s/3", "s/4", "s/5", "s/6"} {
		must("OK\n", "put", k, "v")
	}
	must("6\n", "del", "--prefix", "s/")
	must("0\n", "get", "--prefix", "s/", "--count-only")
	must("hey\n", "get", "greeting")

	if _, errOut, code := kvctl("delte", "greeting"); code != 2 || !strings.Contains(errOut, "did you mean del?") {
		t.Fatalf("mistyped command: exit %d, stderr %q", code, errOut)
	}
	out, errOut, code = kvctl("endpoint", "health")
	if code != 0 || strings.Count(out, "is healthy: took") != 3 {
		t.Fatalf("endpoint health: exit %d, %q %s", code, out, errOut)
	}
	out, errOut, code = kvctl("-o", "json", "endpoint", "status")
	var rows []struct {
		Node    uint64 `json:"node"`
		Shards  int    `json:"shards"`
		Leading int    `json:"leading"`
	}
	if err := json.Unmarshal([]byte(out), &rows); err != nil || code != 0 || len(rows) != 3 {
		t.Fatalf("endpoint status -o json: exit %d, %v, %q %s", code, err, out, errOut)
	}
	leading := 0
	for i, r := range rows {
		if r.Node != uint64(i+1) || r.Shards != 5 {
			t.Errorf("endpoint status row %d = %+v, want node %d with 5 shards", i, r, i+1)
		}
		leading += r.Leading
	}
	if leading != 5 {
		t.Errorf("endpoints lead %d shards in all, want 5", leading)
	}
	c.Kill(c.Node(3))
	out, errOut, code = kvctl("endpoint", "health")
	if code != 3 || !strings.Contains(out, c.Node(3).ClientAddr+" is unhealthy: connection refused") || !strings.Contains(errOut, "1 of 3 endpoints unhealthy") {
		t.Fatalf("endpoint health with node 3 down: exit %d, %q %s", code, out, errOut)
	}

	if out, _, code := kvctl("version"); code != 0 || !strings.HasPrefix(out, "kvctl ") {
		t.Fatalf("kvctl version: exit %d, %q", code, out)
	}
	if out, _, code := kvctl("completion", "bash"); code != 0 || !strings.Contains(out, "__start_kvctl") {
		t.Fatalf("kvctl completion bash: exit %d", code)
	}
	for _, args := range [][]string{{"--version"}, {"--help"}} {
		cmd := exec.Command(c.KVD, args...)
		var out, errb strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil || errb.Len() != 0 || out.Len() == 0 {
			t.Fatalf("kvd %v: %v, stdout %d bytes, stderr %q", args, err, out.Len(), errb.String())
		}
	}
}

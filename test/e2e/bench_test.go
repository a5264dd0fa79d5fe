package e2e

import (
	"encoding/json"
	"testing"

	"github.com/kvd/kvd/internal/proccluster"
)

// TestKvctlBenchJSON runs a short kvctl bench against a real cluster and
// checks the JSON report scripts (scripts/bench.sh) rely on.
func TestKvctlBenchJSON(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 4})
	out, errOut, code := c.Kvctl("", "bench", "put", "--total", "200", "--clients", "4", "-o", "json")
	if code != 0 {
		t.Fatalf("kvctl bench put: exit %d: %s", code, errOut)
	}
	var rep map[string]any
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("bench -o json is not JSON: %v\n%s", err, out)
	}
	for _, f := range []string{"workload", "ops", "errors", "errors_by_class", "ops_per_sec", "elapsed_s", "latency_ms", "histogram"} {
		if _, ok := rep[f]; !ok {
			t.Errorf("report lacks %q: %s", f, out)
		}
	}
	lat, _ := rep["latency_ms"].(map[string]any)
	for _, f := range []string{"p50", "p90", "p99", "p99_9", "max"} {
		if v, _ := lat[f].(float64); v <= 0 {
			t.Errorf("latency_ms.%s = %v, want > 0", f, lat[f])
		}
	}
	if ops, _ := rep["ops"].(float64); ops != 200 {
		t.Errorf("ops = %v, want 200", rep["ops"])
	}
	if v, _ := rep["ops_per_sec"].(float64); v <= 0 {
		t.Errorf("ops_per_sec = %v", rep["ops_per_sec"])
	}
}

// A serializable read workload right after its prefill finds every key:
// the prefill ends with a linearizable count, which makes each leader
// commit the applied prefill (readers see applied state only once the
// node's storage commits, every 50 ms). Without it this run saw 20-60
// NotFound errors in 20,000 reads.
func TestKvctlBenchSerializableAfterPrefill(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 4})
	out, errOut, code := c.Kvctl("", "bench", "get", "--consistency", "serializable", "--clients", "50", "--conns", "5",
		"--total", "20000", "--key-space", "2000", "-o", "json")
	if code != 0 {
		t.Fatalf("kvctl bench get: exit %d: %s", code, errOut)
	}
	var rep struct {
		Ops, Errors   int64
		ErrorsByClass map[string]int64 `json:"errors_by_class"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("bench -o json is not JSON: %v\n%s", err, out)
	}
	if rep.Ops != 20000 || rep.Errors != 0 {
		t.Fatalf("serializable reads after the prefill: %d ops, %d errors %v", rep.Ops, rep.Errors, rep.ErrorsByClass)
	}
}

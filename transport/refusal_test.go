package transport

import (
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/kvd/kvd/internal/testkit"
)

// The refusal log throttles a repeated key, and the keys it remembers, and
// the lines it writes, stay bounded however many distinct ones arrive:
// each dialer's nonce is part of its key.
func TestRefusalLogBounded(t *testing.T) {
	var logs testkit.LogBuffer
	tr := New(Config{NodeID: 1, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	t.Cleanup(tr.Stop)

	tr.logRefusal("same", "refused")
	tr.logRefusal("same", "refused")
	if n := strings.Count(logs.String(), "msg=refused"); n != 1 {
		t.Fatalf("a repeated key was logged %d times, want once", n)
	}
	for i := range 10 * maxRefusalKeys {
		tr.logRefusal(fmt.Sprint("nonce ", i), "flood")
		tr.refusals.mu.Lock()
		n := len(tr.refusals.last)
		tr.refusals.mu.Unlock()
		if n > maxRefusalKeys {
			t.Fatalf("after %d distinct keys the refusal log remembers %d, want at most %d", i+1, n, maxRefusalKeys)
		}
	}
	// The flood is logged a line per key up to the bound, then summed up.
	out := logs.String()
	if n := strings.Count(out, "msg=flood"); n > maxRefusalKeys {
		t.Fatalf("%d distinct refusals logged within 30 s, want at most %d", n, maxRefusalKeys)
	}
	if !strings.Contains(out, "refusals not logged") {
		t.Fatal("the refusals not logged were not summed up")
	}
}

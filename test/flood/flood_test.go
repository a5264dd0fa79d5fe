//go:build flood

package flood

import (
	"flag"
	"testing"
	"time"
)

var (
	duration   = flag.Duration("flood.duration", 30*time.Second, "how long each flood of TestFlood lasts")
	scanValues = flag.Int("flood.scan-values", 128, "1 MiB values the range flood of TestFlood reads")
	only       = flag.String("flood.only", "", "run only the floods whose name contains this")
)

// TestFlood is make flood: every flood for -flood.duration.
func TestFlood(t *testing.T) {
	run(t, Plan{Duration: *duration, ScanValues: *scanValues, Only: *only}, DefaultBudget)
}

// TestFloodShort is make flood-short: every flood for 5 seconds.
func TestFloodShort(t *testing.T) {
	run(t, Plan{Duration: 5 * time.Second, ScanValues: 32, Only: *only}, DefaultBudget)
}

package flood

import (
	"os"
	"testing"

	"github.com/kvd/kvd/internal/proccluster"
)

// TestMain removes the kvd and kvctl this package's tests built.
func TestMain(m *testing.M) { os.Exit(proccluster.Main(m)) }

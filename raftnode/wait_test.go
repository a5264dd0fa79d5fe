package raftnode

import (
	"testing"
	"time"
)

// WaitFor polls cond until it holds, failing t after d. It is exported
// from a test file so that the package's own tests and the external
// raftnode_test ones share it; it is not part of the package's API.
func WaitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(time.Millisecond) // polling interval, not synchronisation
	}
}

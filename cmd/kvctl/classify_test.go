package main

import (
	"fmt"
	"strings"
	"testing"

	"github.com/kvd/kvd/client"
)

// A transaction applied whose result was not kept for the retry shows the
// server's explanation, without sending the user to check the cluster.
func TestClassifyResultNotKept(t *testing.T) {
	err := fmt.Errorf("txn on key \"k\": %w: shard 1: fsm: result not kept for a retry: the transaction was applied at revision 9 (succeeded=true); its read results (3145728 bytes) were too large to keep for a retry; read the keys again", client.ErrResultNotKept)
	code, msg := classify(err, &app{ran: true})
	if code != exitUnavailable || !strings.Contains(msg, "applied at revision 9 (succeeded=true)") || !strings.Contains(msg, "read the keys again") || strings.Contains(msg, "cluster status") {
		t.Fatalf("classify = %d, %q", code, msg)
	}
}

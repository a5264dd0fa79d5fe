package client

import (
	"errors"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/proto/kvpb"
)

// A node answers Aborted for a retried transaction that applied but whose
// result was not kept: retrying cannot help, so the client must not.
func TestResultNotKeptNotRetried(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	c := newClient(t, f, Config{})
	key := []byte("{u1}/a")
	msg := "shard 1: fsm: result not kept for a retry: the transaction was applied at revision 9 (succeeded=true); its read results (3145728 bytes) were too large to keep for a retry; read the keys again"
	for _, n := range f.Nodes {
		n.AnswerNext(1, status.Error(codes.Aborted, msg))
	}
	req := &kvpb.TxnRequest{Success: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Get{Get: &kvpb.GetRequest{Key: key}}}}}
	_, err := c.Txn(ctxT(t, 5*time.Second), req)
	if !errors.Is(err, ErrResultNotKept) || !strings.Contains(err.Error(), "applied at revision 9") {
		t.Fatalf("err = %v, want ErrResultNotKept with the server's message", err)
	}
	if n := totalCalls(f, "Txn"); n != 1 {
		t.Fatalf("%d attempts, want 1", n)
	}
}

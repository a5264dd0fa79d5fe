package embed

import (
	"net"
	"sync/atomic"
	"testing"
)

// tempErr is an Accept error to wait out, as EMFILE is.
type tempErr struct{}

func (tempErr) Error() string   { return "accept: too many open files" }
func (tempErr) Temporary() bool { return true }
func (tempErr) Timeout() bool   { return false }

// flakyListener fails its first Accepts with tempErr.
type flakyListener struct {
	net.Listener
	fails atomic.Int32
}

func (f *flakyListener) Accept() (net.Conn, error) {
	if f.fails.Add(-1) >= 0 {
		return nil, tempErr{}
	}
	return f.Listener.Accept()
}

// A node out of file descriptors for a while keeps serving once it has
// them again: temporary Accept errors are waited out, not taken for the
// end of the listener.
func TestBothListenerWaitsOutTemporaryErrors(t *testing.T) {
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	flaky := &flakyListener{Listener: tcp}
	flaky.fails.Store(3)
	l := newBothListener(flaky, newMemListener("test"))
	defer l.Close()
	c, err := net.Dial("tcp", tcp.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got, err := l.Accept()
	if err != nil {
		t.Fatalf("Accept after 3 temporary errors: %v", err)
	}
	got.Close()
}

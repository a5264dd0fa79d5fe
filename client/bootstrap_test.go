package client

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/kvd/kvd/client/clienttest"
)

// A hung endpoint (a node just killed behind a port forwarder holds
// connections open like this) must not hold New up for its DialTimeout: the
// other endpoints answer, and that is enough.
func TestBootstrapDoesNotWaitForHungEndpoint(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	f.Node(1).SetMode(clienttest.Hang)
	t.Cleanup(func() { f.Node(1).SetMode(clienttest.Up) })
	// With one endpoint at a time, New would spend its whole context on
	// node 1, which hangs for DialTimeout, far longer.
	c, err := New(ctxT(t, 20*time.Second), Config{
		Endpoints:      f.Endpoints(),
		DialTimeout:    time.Minute,
		AttemptTimeout: 200 * time.Millisecond,
	})
	if err != nil {
		t.Fatalf("New with one hung endpoint: %v", err)
	}
	defer c.Close()
	for s := uint64(1); s <= 4; s++ {
		if f.Leader(s) == 1 {
			if err := f.SetLeader(s, 2); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := c.Put(ctxT(t, 10*time.Second), []byte("a"), []byte("b")); err != nil {
		t.Fatal(err)
	}
}

// Endpoints that are not the addresses members advertise (published
// container ports seen from the host) become those members' addresses; one
// that answers only after New returned still does.
func TestBootstrapLearnsEndpointsBehindForwarders(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	fwd := map[uint64]string{}
	var eps []string
	for _, n := range f.Nodes {
		fwd[n.ID] = forward(t, n.Addr)
		eps = append(eps, fwd[n.ID])
	}
	f.Node(1).SetMode(clienttest.Hang)
	c, err := New(ctxT(t, 20*time.Second), Config{Endpoints: eps, DialTimeout: time.Minute, HeartbeatInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	addr := func(id uint64) string {
		c.mu.RLock()
		defer c.mu.RUnlock()
		if n, ok := c.mu.nodes[id]; ok {
			return n.addr
		}
		return ""
	}
	for _, id := range []uint64{2, 3} {
		if got := addr(id); got != fwd[id] {
			t.Errorf("member %d dialed at %s, want its endpoint %s", id, got, fwd[id])
		}
	}
	if got := addr(1); got != f.Node(1).Addr {
		t.Errorf("member 1 (endpoint still hung) dialed at %s, want its advertised %s", got, f.Node(1).Addr)
	}
	f.Node(1).SetMode(clienttest.Up)
	waitFor(t, "member 1 to be dialed at its endpoint once it answers", func() bool { return addr(1) == fwd[1] })
}

// A member whose address the map does not list yet when the client starts
// (a cluster still publishing addresses) is dialed once it is published,
// with no request around to make the client ask for a new map.
func TestUnpublishedMemberIsPickedUpLater(t *testing.T) {
	f := newCluster(t, 3, 4, 3)
	addr3 := f.Node(3).Addr
	if err := f.SetClientAddr(3, ""); err != nil {
		t.Fatal(err)
	}
	c, err := New(ctxT(t, 5*time.Second), Config{
		Endpoints:         []string{f.Node(1).Addr, f.Node(2).Addr},
		HeartbeatInterval: 20 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dialed := func() bool {
		c.mu.RLock()
		defer c.mu.RUnlock()
		_, ok := c.mu.nodes[3]
		return ok
	}
	if dialed() {
		t.Fatal("member 3 dialed before it had an address")
	}
	if err := f.SetClientAddr(3, addr3); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "member 3 to be dialed once its address is published", dialed)
}

// forward listens on loopback and relays every connection to target until
// the test ends; it returns the listening address.
func forward(t *testing.T, target string) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns []net.Conn
	)
	track := func(c net.Conn) {
		mu.Lock()
		conns = append(conns, c)
		mu.Unlock()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			in, err := lis.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", target)
			if err != nil {
				in.Close()
				continue
			}
			track(in)
			track(out)
			wg.Add(2)
			go func() { defer wg.Done(); _, _ = io.Copy(out, in); out.Close() }()
			go func() { defer wg.Done(); _, _ = io.Copy(in, out); in.Close() }()
		}
	}()
	t.Cleanup(func() {
		lis.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return lis.Addr().String()
}

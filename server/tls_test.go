package server

import (
	"log/slog"
	"strings"
	"testing"

	"github.com/kvd/kvd/internal/testkit"
)

// TestPlaintextPeerWarnsOffLoopback: a peer port without TLS is noted
// at INFO on loopback (the default --listen-peer) and warned about on
// every other address, including all interfaces and names that may
// resolve anywhere.
func TestPlaintextPeerWarnsOffLoopback(t *testing.T) {
	for _, tc := range []struct {
		addr string
		warn bool
	}{
		{DefaultPeerAddr, false},
		{"127.0.0.2:2380", false},
		{"[::1]:2380", false},
		{"localhost:2380", false},
		{"0.0.0.0:2380", true},
		{"[::]:2380", true},
		{":2380", true},
		{"192.0.2.7:2380", true},
		{"[2001:db8::1]:2380", true},
		{"kvd1.invalid:2380", true},
		{"not an address", true},
	} {
		var buf testkit.LogBuffer
		logPlaintextPeer(slog.New(slog.NewTextHandler(&buf, nil)), tc.addr)
		out := buf.String()
		if !strings.Contains(out, "peer TLS is off") || strings.Count(out, "\n") != 1 {
			t.Errorf("%s: logged %q, want one line saying peer TLS is off", tc.addr, out)
		}
		if got := strings.Contains(out, "level=WARN"); got != tc.warn {
			t.Errorf("%s: warned %v, want %v (%q)", tc.addr, got, tc.warn, out)
		}
	}
}

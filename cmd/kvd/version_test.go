package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/kvd/kvd/transport"
)

// kvd --version names the peer protocol versions the build speaks, which
// decide whom it can run a cluster with (docs/design.md, Versions and
// compatibility).
func TestVersionNamesPeerProtocol(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run([]string{"--version"}, &out, &errOut, nil); code != 0 {
		t.Fatalf("--version: exit %d, stderr %q", code, errOut.String())
	}
	if v := strings.TrimSuffix(out.String(), "\n"); !strings.HasSuffix(v, ", peer protocol "+transport.Spoken().String()) {
		t.Fatalf("--version printed %q, want it to end with the peer protocol %s", v, transport.Spoken())
	}
}

package e2e

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kvd/kvd/internal/proccluster"
)

// TestMakeClusterScript runs scripts/cluster.sh, the README's first
// command (make cluster), as a user would: the three nodes it starts serve
// kvctl on the documented ports, and stopping the script stops every one
// of them. A change once replaced the script with a library that started
// nothing, and no test noticed.
func TestMakeClusterScript(t *testing.T) {
	kvd, kvctl := proccluster.Binaries(t)
	for _, port := range []string{"2379", "2380", "2381", "22379", "22380", "22381", "32379", "32380", "32381"} {
		if c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, 200*time.Millisecond); err == nil {
			c.Close()
			t.Fatalf("port %s is in use (a running make cluster?); the script needs it", port)
		}
	}
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	var out proccluster.SyncBuffer
	cmd := exec.Command(filepath.Join(root, "scripts", "cluster.sh"))
	cmd.Env = append(os.Environ(), "BIN="+filepath.Dir(kvd), "DATA="+t.TempDir())
	cmd.Stdout, cmd.Stderr = &out, &out
	// Its own process group: the script, its nodes and their log filters
	// can all be signalled, and checked gone, together.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pgid := cmd.Process.Pid
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = syscall.Kill(-pgid, syscall.SIGKILL) // whatever is left after a failure
		if t.Failed() {
			t.Logf("cluster.sh output:\n%s", out.String())
		}
	})

	const endpoints = "127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379"
	run := func(args ...string) (string, error) {
		c := exec.Command(kvctl, append([]string{"--endpoints", endpoints, "--timeout", "2s"}, args...)...)
		b, err := c.CombinedOutput()
		return string(b), err
	}
	proccluster.WaitFor(t, 30*time.Second, "kvctl put through the cluster make cluster started", func() bool {
		_, err := run("put", "greeting", "hello")
		return err == nil
	})
	if got, err := run("get", "greeting"); err != nil || got != "hello\n" {
		t.Fatalf("kvctl get greeting = %q, %v; want hello", got, err)
	}
	for _, s := range []string{"[kvd1]", "[kvd2]", "[kvd3]", "export KVCTL_ENDPOINTS=" + endpoints,
		"cluster.sh: started kvd1 (pid ", "client 127.0.0.1:22379", "Press Ctrl-C to stop the three kvd processes"} {
		if !strings.Contains(out.String(), s) {
			t.Errorf("cluster.sh output lacks %q", s)
		}
	}

	// A node that dies is reported, with how.
	m := regexp.MustCompile(`started kvd2 \(pid (\d+)\)`).FindStringSubmatch(out.String())
	if m == nil {
		t.Fatalf("cluster.sh does not say kvd2's pid:\n%s", out.String())
	}
	pid, _ := strconv.Atoi(m[1])
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	out.WaitFor(t, 10*time.Second, "cluster.sh to report kvd2's death", func(out string) bool {
		return strings.Contains(out, "cluster.sh: kvd2 (pid "+m[1]+") was killed by signal 9 (SIGKILL)")
	})

	// Ctrl-C in a terminal reaches the script; TERM takes the same path.
	if err := syscall.Kill(pgid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
	case <-time.After(20 * time.Second):
		t.Fatal("cluster.sh did not exit within 20 s of SIGTERM")
	}
	proccluster.WaitFor(t, 10*time.Second, "every process of make cluster gone", func() bool {
		return errors.Is(syscall.Kill(-pgid, 0), syscall.ESRCH)
	})
	for _, s := range []string{"cluster.sh: stopping the kvd nodes it started", "cluster.sh: kvd1 (pid ", "exited cleanly (status 0)", "all stopped; data kept"} {
		if !strings.Contains(out.String(), s) {
			t.Errorf("cluster.sh output lacks %q after SIGTERM:\n%s", s, out.String())
		}
	}
}

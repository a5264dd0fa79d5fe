package e2e

import (
	"errors"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kvd/kvd/internal/proccluster"
)

// bg starts kvctl with args in the background; the test stops it.
func bg(t *testing.T, c *proccluster.Cluster, args ...string) (*exec.Cmd, *proccluster.SyncBuffer) {
	t.Helper()
	var buf proccluster.SyncBuffer
	cmd := exec.Command(c.KVCTL, append([]string{"--endpoints", c.Endpoints()}, args...)...)
	cmd.Stdout = &buf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	return cmd, &buf
}

// exitOf waits for cmd and returns its exit code.
func exitOf(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(30 * time.Second):
		t.Fatalf("kvctl %q did not exit", cmd.Args)
		return -1
	}
}

// TestKvctlLockAndElect: kvctl lock runs a command under the lock with
// its fencing token and exits with the command's code; a second locker
// waits until the first lets go; kvctl elect hands leadership on when the
// leader resigns, and elect --listen prints each leader.
func TestKvctlLockAndElect(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 2})

	out, _, code := c.Kvctl("", "lock", "job", "--", "sh", "-c", `echo "token $KVCTL_LOCK_TOKEN"; exit 3`)
	if code != 3 || !strings.HasPrefix(out, "{job}/") || !strings.Contains(out, "\ntoken ") {
		t.Fatalf("lock -- CMD: exit %d, output %q; want exit 3, the key, then the token", code, out)
	}

	holder, hbuf := bg(t, c, "lock", "job")
	hbuf.WaitFor(t, 20*time.Second, "the first locker holding", func(out string) bool { return strings.HasPrefix(out, "{job}/") })
	waiter, wbuf := bg(t, c, "lock", "job", "--", "echo", "second")
	// Once the second locker is queued (two keys under the lock), it
	// still waits.
	proccluster.WaitFor(t, 20*time.Second, "the second locker queued", func() bool {
		out, _, _ := c.Kvctl("", "get", "--prefix", "{job}/", "--count-only")
		return out == "2\n"
	})
	if strings.Contains(wbuf.String(), "second") {
		t.Fatal("the second locker ran while the first held the lock")
	}
	if err := holder.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if code := exitOf(t, holder); code != 0 {
		t.Fatalf("lock after Ctrl-C: exit %d", code)
	}
	if code := exitOf(t, waiter); code != 0 || !strings.HasSuffix(wbuf.String(), "second\n") {
		t.Fatalf("second locker: exit %d, output %q", code, wbuf.String())
	}

	_, lbuf := bg(t, c, "elect", "sched", "--listen")
	one, obuf := bg(t, c, "elect", "sched", "one")
	obuf.WaitFor(t, 20*time.Second, "one elected", func(out string) bool { return strings.HasSuffix(out, "one\n") })
	lbuf.WaitFor(t, 20*time.Second, "the listener seeing one", func(out string) bool { return out == "one\n" })
	two, tbuf := bg(t, c, "elect", "sched", "two")
	if err := one.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if code := exitOf(t, one); code != 0 {
		t.Fatalf("elect after Ctrl-C: exit %d", code)
	}
	tbuf.WaitFor(t, 20*time.Second, "two elected", func(out string) bool { return strings.HasSuffix(out, "two\n") })
	lbuf.WaitFor(t, 20*time.Second, "the listener seeing two", func(out string) bool { return out == "one\ntwo\n" })
	_ = two.Process.Signal(syscall.SIGINT)
	if code := exitOf(t, two); code != 0 {
		t.Fatalf("elect two after Ctrl-C: exit %d", code)
	}
	_, _, code = c.Kvctl("", "elect", "sched")
	if code != 2 {
		t.Fatalf("elect without a proposal or --listen: exit %d, want 2", code)
	}
}

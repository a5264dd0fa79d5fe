package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kvd/kvd/internal/proccluster"
)

type watchLine struct {
	Type        string `json:"type"`
	Key         string `json:"key"`
	Value       string `json:"value"`
	ModRevision int64  `json:"mod_revision"`
	Shard       uint64 `json:"shard"`
	Resume      string `json:"resume"`
}

func parseWatchLines(t *testing.T, out string) []watchLine {
	t.Helper()
	var ls []watchLine
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if l == "" {
			continue
		}
		var w watchLine
		if err := json.Unmarshal([]byte(l), &w); err != nil {
			t.Fatalf("watch line %q: %v", l, err)
		}
		ls = append(ls, w)
	}
	return ls
}

// TestKvctlWatch drives kvctl watch against a real 3-node cluster: a
// replay from a revision with --count, a prefix watch killed and resumed
// from the token of the last event it printed (nothing lost, nothing
// twice), a compacted start (exit 1 naming the oldest revision) and no
// cluster (exit 3).
func TestKvctlWatch(t *testing.T) {
	c := proccluster.Start(t, 3, proccluster.Options{Shards: 2})
	run := func(want int, args ...string) (string, string) {
		t.Helper()
		out, errOut, code := c.Kvctl("", args...)
		if code != want {
			t.Fatalf("kvctl %.80q: exit %d, want %d (stdout %.300q, stderr %q)", args, code, want, out, errOut)
		}
		if code != 0 && strings.Count(strings.TrimSuffix(errOut, "\n"), "\n") != 0 {
			t.Fatalf("kvctl %.80q: error is not one line: %q", args, errOut)
		}
		return out, errOut
	}

	// --rev replay with --count.
	var first struct {
		Shard    uint64 `json:"shard"`
		Revision int64  `json:"revision"`
	}
	out, _ := run(0, "-o", "json", "put", "k", "v1")
	if err := json.Unmarshal([]byte(out), &first); err != nil || first.Revision == 0 {
		t.Fatalf("put -o json: %q, %v", out, err)
	}
	run(0, "put", "k", "v2")
	run(0, "del", "k")
	out, _ = run(0, "watch", "k", "--rev", fmt.Sprint(first.Revision), "--count", "3", "--prev-kv")
	if out != "PUT k v1\nPUT k v2 v1\nDELETE k v2\n" {
		t.Fatalf("watch --rev --count: %q", out)
	}
	if out, _ := run(0, "get", "k", "--rev", fmt.Sprint(first.Revision)); out != "v1\n" {
		t.Fatalf("get --rev: %q", out)
	}

	// A prefix watch over both shards, killed after it printed some
	// events, resumed from the last token it printed.
	var buf proccluster.SyncBuffer
	w := exec.Command(c.KVCTL, "--endpoints", c.Endpoints(), "-o", "json", "watch", "--prefix", "w/")
	w.Stdout = &buf
	if err := w.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if w.ProcessState == nil {
			_ = w.Process.Kill()
			_ = w.Wait()
		}
	})
	// The watch starts "now" on each shard: put until it has printed an
	// event of both.
	n := 0
	put := func() string {
		t.Helper()
		k := fmt.Sprint("w/", n)
		run(0, "put", k, "v")
		n++
		return k
	}
	lines := func() []watchLine { return parseWatchLines(t, buf.String()) }
	proccluster.WaitFor(t, 30*time.Second, "the watcher's events of both shards", func() bool {
		shards := map[uint64]bool{}
		for _, l := range lines() {
			shards[l.Shard] = true
		}
		if len(shards) == 2 {
			return true
		}
		put()
		return false
	})
	var later []string
	for range 10 {
		later = append(later, put())
	}
	proccluster.WaitFor(t, 20*time.Second, "the watcher printing every later put", func() bool {
		printed := map[string]bool{}
		for _, l := range lines() {
			printed[l.Key] = true
		}
		for _, k := range later {
			if !printed[k] {
				return false
			}
		}
		return true
	})
	if err := w.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = w.Wait()
	seen := lines()
	// Pretend the watcher handled only up to the 5th event it printed:
	// the rest, and what is put now, must come once each on resume.
	handled := seen[:5]
	want := map[string]int{}
	for _, l := range seen {
		want[l.Key]++
	}
	for range 10 {
		want[put()]++
	}
	out, _ = run(0, "-o", "json", "watch", "--prefix", "w/", "--resume", handled[len(handled)-1].Resume, "--count", fmt.Sprint(len(want)-len(handled)))
	got := map[string]int{}
	for _, l := range append(slices.Clone(handled), parseWatchLines(t, out)...) {
		got[l.Key]++
	}
	for k, c := range want {
		if c != 1 || got[k] != 1 {
			t.Fatalf("key %s: printed %d times by the watcher, %d times handled and resumed, want once", k, c, got[k])
		}
	}
	if len(got) != len(want) {
		t.Fatalf("handled and resumed %v, want %v", got, want)
	}

	// A start below the shard's history.
	run(0, "compact", fmt.Sprint(first.Revision+2), "--shard", fmt.Sprint(first.Shard))
	_, errOut := run(1, "watch", "k", "--rev", fmt.Sprint(first.Revision))
	if !strings.Contains(errOut, "revision compacted") || !strings.Contains(errOut, fmt.Sprintf("from revision %d", first.Revision+2)) {
		t.Fatalf("compacted start: %q", errOut)
	}

	// No cluster.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := l.Addr().String()
	l.Close()
	cmd := exec.Command(c.KVCTL, "--endpoints", closed, "--timeout", "1s", "watch", "k")
	if err := cmd.Run(); err == nil || cmd.ProcessState.ExitCode() != 3 {
		t.Fatalf("watch without a cluster: %v", err)
	}
}

// TestKvctlGetPrefixThenWatchResume: get --prefix --print-resume prints
// the watch resume token of what it read (json: a "resume" field; simple:
// a line on stderr), and watch --resume from it prints exactly the
// changes made after the read.
func TestKvctlGetPrefixThenWatchResume(t *testing.T) {
	c := proccluster.Start(t, 1, proccluster.Options{Shards: 3})
	run := func(args ...string) (string, string) {
		t.Helper()
		out, errOut, code := c.Kvctl("", args...)
		if code != 0 {
			t.Fatalf("kvctl %.80q: exit %d (stdout %.300q, stderr %q)", args, code, out, errOut)
		}
		return out, errOut
	}
	for i := range 12 {
		run("put", fmt.Sprint("g/", i), "before")
	}

	out, _ := run("-o", "json", "get", "--prefix", "g/", "--print-resume")
	var read struct {
		KVs []struct {
			Key   string `json:"key"`
			Value string `json:"value"`
		} `json:"kvs"`
		Resume string `json:"resume"`
	}
	if err := json.Unmarshal([]byte(out), &read); err != nil || len(read.KVs) != 12 || read.Resume == "" {
		t.Fatalf("get --prefix -o json --print-resume: %v, %q", err, out)
	}
	for _, kv := range read.KVs {
		if kv.Value != "before" {
			t.Fatalf("read %s = %q", kv.Key, kv.Value)
		}
	}

	// Changes after the read, on several shards: each comes once, and
	// nothing the read saw comes again.
	run("put", "g/0", "after")
	run("del", "g/1")
	run("put", "g/new", "after")
	run("put", "h/outside", "x")
	out, _ = run("-o", "json", "watch", "--prefix", "g/", "--resume", read.Resume, "--count", "3")
	var got []string
	for _, l := range parseWatchLines(t, out) {
		got = append(got, l.Type+" "+l.Key+" "+l.Value)
	}
	slices.Sort(got)
	if want := []string{"DELETE g/1 ", "PUT g/0 after", "PUT g/new after"}; !slices.Equal(got, want) {
		t.Fatalf("watch from the read's token printed %q, want %q", got, want)
	}

	// Simple output: the token alone on stderr, the listing unchanged.
	out, errOut := run("get", "--prefix", "g/", "--keys-only", "--print-resume")
	if want := "g/0\ng/10\ng/11\ng/2\ng/3\ng/4\ng/5\ng/6\ng/7\ng/8\ng/9\ng/new\n"; out != want {
		t.Fatalf("get --prefix --keys-only --print-resume: stdout %q, want %q", out, want)
	}
	tok := strings.TrimSuffix(errOut, "\n")
	if tok == "" || strings.ContainsAny(tok, " \n") {
		t.Fatalf("stderr %q is not one token", errOut)
	}
	run("put", "g/last", "after")
	if out, _ := run("watch", "--prefix", "g/", "--resume", tok, "--count", "1"); out != "PUT g/last after\n" {
		t.Fatalf("watch from the simple output's token: %q", out)
	}

	// A flag that does not apply is a usage error.
	if _, errOut, code := c.Kvctl("", "get", "g/0", "--print-resume"); code != 2 || !strings.Contains(errOut, "--print-resume") {
		t.Fatalf("get KEY --print-resume: exit %d, %q", code, errOut)
	}
}

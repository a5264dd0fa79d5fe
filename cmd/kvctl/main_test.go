package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/kvd/kvd/client/clienttest"
	"github.com/kvd/kvd/internal/proccluster"
	"github.com/kvd/kvd/internal/version"
	"github.com/kvd/kvd/proto/kvpb"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(procMain{m}) }

// procMain removes the kvd binaries a process cluster test built, once
// the tests have run.
type procMain struct{ m *testing.M }

func (p procMain) Run() int { return proccluster.Main(p.m) }

type result struct {
	code           int
	stdout, stderr string
}

// kvctl runs kvctl in-process against endpoints.
func kvctl(t *testing.T, endpoints string, stdin string, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	full := args
	if endpoints != "" {
		full = append([]string{"--endpoints", endpoints}, args...)
	}
	code := run(full, strings.NewReader(stdin), &out, &errb)
	r := result{code, out.String(), errb.String()}
	if code != 0 {
		// Every failure is exactly one line on stderr (plus usage
		// text only for a bare "kvctl").
		lines := strings.Split(strings.TrimSuffix(r.stderr, "\n"), "\n")
		last := lines[len(lines)-1]
		if !strings.HasPrefix(last, "kvctl: ") {
			t.Errorf("kvctl %v: stderr does not end in one 'kvctl: ' line: %q", args, r.stderr)
		}
	}
	return r
}

// noQuorum stops nodes 2 and 3: node 1 answers, but no shard can have a
// leader.
func noQuorum(t *testing.T, f *clienttest.Cluster) {
	t.Helper()
	for _, id := range []uint64{2, 3} {
		if err := f.Node(id).Stop(); err != nil {
			t.Fatal(err)
		}
	}
}

// cluster starts a 3-node cluster of 4 shards and returns it with its
// endpoints as --endpoints takes them.
func cluster(t *testing.T) (*clienttest.Cluster, string) {
	t.Helper()
	f, err := clienttest.New(3, 4, 3)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	return f, strings.Join(f.Endpoints(), ",")
}

// deadAddr is an address where nothing listens.
func deadAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

func TestPutGetDel(t *testing.T) {
	_, eps := cluster(t)
	if r := kvctl(t, eps, "", "put", "greeting", "hello"); r.code != 0 || r.stdout != "OK\n" {
		t.Fatalf("put: %+v", r)
	}
	if r := kvctl(t, eps, "", "get", "greeting"); r.code != 0 || r.stdout != "hello\n" {
		t.Fatalf("get: %+v", r)
	}
	if r := kvctl(t, eps, "line1\nline2\n", "put", "note", "-"); r.code != 0 {
		t.Fatalf("put from stdin: %+v", r)
	}
	if r := kvctl(t, eps, "", "get", "note"); r.stdout != "line1\nline2\n\n" {
		t.Fatalf("value from stdin not kept byte for byte: %q", r.stdout)
	}
	r := kvctl(t, eps, "", "-o", "json", "get", "greeting")
	var j map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &j); err != nil || r.code != 0 {
		t.Fatalf("get -o json: %+v: %v", r, err)
	}
	for _, k := range []string{"key", "value", "create_revision", "mod_revision", "version"} {
		if _, ok := j[k]; !ok {
			t.Errorf("json output lacks %q: %s", k, r.stdout)
		}
	}
	if j["value"] != "hello" || j["version"] != float64(1) {
		t.Fatalf("json = %s", r.stdout)
	}
	if r := kvctl(t, eps, "", "-o", "table", "get", "greeting"); r.code != 0 || !strings.Contains(r.stdout, "VALUE") || !strings.Contains(r.stdout, "hello") {
		t.Fatalf("get -o table: %+v", r)
	}
	// A serializable read is served by any replica, which may not have
	// applied the put yet: it sees it soon, not at once.
	for deadline := time.Now().Add(10 * time.Second); ; {
		r := kvctl(t, eps, "", "get", "--consistency", "serializable", "greeting")
		if r.code == 0 && r.stdout == "hello\n" {
			break
		}
		if time.Now().After(deadline) || (r.code != 0 && !strings.Contains(r.stderr, "not found")) {
			t.Fatalf("serializable get: %+v", r)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if r := kvctl(t, eps, "", "del", "greeting"); r.code != 0 || r.stdout != "1\n" {
		t.Fatalf("del: %+v", r)
	}
	if r := kvctl(t, eps, "", "del", "greeting"); r.code != 0 || r.stdout != "0\n" {
		t.Fatalf("del again: %+v", r)
	}
	if r := kvctl(t, eps, "", "get", "greeting"); r.code != 1 || !strings.Contains(r.stderr, "not found") || r.stdout != "" {
		t.Fatalf("get deleted: %+v", r)
	}
}

func TestGetPrefix(t *testing.T) {
	_, eps := cluster(t)
	var want []string
	for i := range 30 {
		k := fmt.Sprintf("user/%02d", i)
		want = append(want, k)
		if r := kvctl(t, eps, "", "put", k, "v"+k); r.code != 0 {
			t.Fatal(r)
		}
	}
	kvctl(t, eps, "", "put", "userx", "no")
	kvctl(t, eps, "", "put", "a", "no")

	r := kvctl(t, eps, "", "get", "--prefix", "user/")
	var simple []string
	for _, k := range want {
		simple = append(simple, k, "v"+k)
	}
	if r.code != 0 || r.stdout != strings.Join(simple, "\n")+"\n" {
		t.Fatalf("get --prefix: %+v", r)
	}
	r = kvctl(t, eps, "", "get", "--prefix", "user/", "--keys-only", "--limit", "5")
	if r.code != 0 || r.stdout != strings.Join(want[:5], "\n")+"\n" {
		t.Fatalf("--keys-only --limit 5: %+v", r)
	}
	r = kvctl(t, eps, "", "-o", "json", "get", "--prefix", "user/")
	var arr []map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &arr); err != nil || len(arr) != 30 || arr[29]["key"] != "user/29" {
		t.Fatalf("json prefix: %v %+v", err, r)
	}
	r = kvctl(t, eps, "", "-o", "json", "get", "--prefix", "nothing/")
	if r.code != 0 || strings.TrimSpace(r.stdout) != "[]" {
		t.Fatalf("empty json prefix: %+v", r)
	}
	// --print-resume: json wraps the array with the watch resume token.
	for _, p := range []struct {
		prefix string
		n      int
	}{{"user/", 30}, {"nothing/", 0}} {
		r = kvctl(t, eps, "", "-o", "json", "get", "--prefix", p.prefix, "--print-resume")
		var obj struct {
			KVs    []map[string]any `json:"kvs"`
			Resume string           `json:"resume"`
		}
		if err := json.Unmarshal([]byte(r.stdout), &obj); err != nil || r.code != 0 || len(obj.KVs) != p.n || obj.Resume == "" || obj.KVs == nil {
			t.Fatalf("json --print-resume of %s: %v %+v", p.prefix, err, r)
		}
	}
	if r := kvctl(t, eps, "", "get", "--prefix", "nothing/"); r.code != 0 || r.stdout != "" {
		t.Fatalf("empty prefix: %+v", r)
	}
	if r := kvctl(t, eps, "", "-o", "table", "get", "--prefix", "user/"); r.code != 0 || strings.Count(r.stdout, "\n") != 31 {
		t.Fatalf("table prefix: %+v", r)
	}
}

func TestClusterStatusAndMembers(t *testing.T) {
	f, eps := cluster(t)
	r := kvctl(t, eps, "", "cluster", "status")
	if r.code != 0 || !strings.Contains(r.stdout, "SHARD") || !strings.Contains(r.stdout, "healthy") {
		t.Fatalf("cluster status: %+v", r)
	}
	f.Node(3).SetMode(clienttest.Down)
	r = kvctl(t, eps, "", "-o", "json", "cluster", "status")
	var st struct {
		Nodes []struct {
			ID      uint64 `json:"id"`
			Healthy bool   `json:"healthy"`
			Error   string `json:"error"`
		} `json:"nodes"`
		Shards []struct {
			Shard, Leader uint64
		} `json:"shards"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || r.code != 0 {
		t.Fatalf("status json: %v %+v", err, r)
	}
	if len(st.Nodes) != 3 || st.Nodes[2].Healthy || st.Nodes[2].Error == "" || !st.Nodes[0].Healthy || len(st.Shards) != 5 { // the meta shard and 4
		t.Fatalf("status = %+v", st)
	}
	for _, s := range st.Shards {
		if s.Leader != f.Leader(s.Shard) {
			t.Errorf("shard %d leader %d, want %d", s.Shard, s.Leader, f.Leader(s.Shard))
		}
	}
	r = kvctl(t, eps, "", "member", "list")
	if r.code != 0 || strings.Count(r.stdout, "\n") != 3 || !strings.HasPrefix(r.stdout, "1 "+f.Nodes[0].Addr) {
		t.Fatalf("member list: %+v", r)
	}
}

func TestExitCodes(t *testing.T) {
	f, eps := cluster(t)
	dead := deadAddr(t)
	big := strings.Repeat("k", clienttest.MaxKeySize+1)
	for _, tc := range []struct {
		name string
		eps  string
		args []string
		code int
		msg  string // in stderr
	}{
		{"put ok", eps, []string{"put", "k", "v"}, 0, ""},
		{"get ok", eps, []string{"get", "k"}, 0, ""},
		{"help", eps, []string{"get", "--help"}, 0, ""},
		{"not found", eps, []string{"get", "missing"}, 1, `key "missing" not found`},
		{"unknown flag", eps, []string{"get", "--bogus", "k"}, 2, "unknown flag"},
		{"unknown global flag", eps, []string{"--bogus", "get", "k"}, 2, "unknown flag"},
		{"unknown command", eps, []string{"frobnicate"}, 2, "unknown command"},
		{"unknown subcommand", eps, []string{"cluster", "frob"}, 2, "unknown command"},
		{"no command", eps, nil, 2, "no command"},
		{"missing args", eps, []string{"put", "k"}, 2, "needs KEY and VALUE"},
		{"extra args", eps, []string{"get", "a", "b"}, 2, "needs KEY"},
		{"bad output", eps, []string{"-o", "xml", "get", "k"}, 2, "not an output format"},
		{"bad consistency", eps, []string{"get", "--consistency", "eventual", "k"}, 2, "--consistency"},
		{"bad timeout", eps, []string{"--timeout", "soon", "get", "k"}, 2, "invalid argument"},
		{"limit without prefix", eps, []string{"get", "--limit", "3", "k"}, 2, "need --prefix"},
		{"server invalid argument", eps, []string{"put", big, "v"}, 2, "limit"},
		{"mistyped command", eps, []string{"pt", "k", "v"}, 2, `unknown command "pt" (did you mean put or get?)`},
		{"mistyped subcommand", eps, []string{"cluster", "stauts"}, 2, "(did you mean status?)"},
		{"URL endpoint", "http://" + strings.ReplaceAll(eps, ",", ",http://"), []string{"put", "k", "v"}, 0, ""},
		{"https endpoint of a plaintext node", "https://" + strings.Split(eps, ",")[0], []string{"--timeout", "1s", "get", "k"}, 3, "TLS"},
		{"a certificate without its key", eps, []string{"--cert", "x.crt", "get", "k"}, 2, "both its certificate and its key"},
		{"unknown scheme", "unix:///tmp/kvd.sock", []string{"get", "k"}, 2, `unknown scheme "unix"`},
		{"format a command does not print", eps, []string{"-o", "table", "cas", "k", "v", "w"}, 2, "kvctl cas prints no table output; use -o simple or -o json"},
		{"completion for an unknown shell", eps, []string{"completion", "tcsh"}, 2, `unknown shell "tcsh"`},
		{"no endpoint answers", dead, []string{"--timeout", "500ms", "get", "k"}, 3, "connection refused by every endpoint: " + dead},
		{"no endpoint answers status", dead, []string{"--timeout", "500ms", "cluster", "status"}, 3, "check that kvd is running"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := kvctl(t, tc.eps, "", tc.args...)
			t.Logf("exit %d, stderr: %s", r.code, r.stderr)
			if r.code != tc.code {
				t.Fatalf("exit %d, want %d: %+v", r.code, tc.code, r)
			}
			if !strings.Contains(r.stderr, tc.msg) {
				t.Fatalf("stderr %q lacks %q", r.stderr, tc.msg)
			}
			if strings.Contains(r.stderr, "\n") && strings.Count(strings.TrimSuffix(r.stderr, "\n"), "\n") > 0 && tc.name != "no command" {
				t.Fatalf("stderr is not one line: %q", r.stderr)
			}
		})
	}

	// Connected, but no shard has a leader: unavailable after --timeout.
	noQuorum(t, f)
	r := kvctl(t, eps, "", "--timeout", "300ms", "put", "k", "v")
	t.Logf("no leader: exit %d, stderr: %s", r.code, r.stderr)
	if r.code != 3 || !strings.Contains(r.stderr, "cluster unavailable") || !strings.Contains(r.stderr, "kvctl cluster status") {
		t.Fatalf("no leader: %+v", r)
	}
}

func TestEndpointsFromEnv(t *testing.T) {
	_, eps := cluster(t)
	t.Setenv("KVCTL_ENDPOINTS", eps)
	if r := kvctl(t, "", "", "put", "e", "1"); r.code != 0 {
		t.Fatalf("with KVCTL_ENDPOINTS: %+v", r)
	}
	// The flag wins over the environment.
	if r := kvctl(t, deadAddr(t), "", "--timeout", "300ms", "get", "e"); r.code != 3 {
		t.Fatalf("--endpoints did not override the env: %+v", r)
	}
}

// TestHelpDocumentsFlags checks that every command's --help lists the flags
// this table says it has, and shows an example.
func TestHelpDocumentsFlags(t *testing.T) {
	global := []string{"--endpoints", "--timeout", "-o, --output", "KVCTL_ENDPOINTS"}
	benchFlags := []string{"--clients", "--conns", "--total", "--duration", "--key-size", "--val-size",
		"--key-space", "--consistency", "--rate", "--seed", "--progress", "coordinated omission"}
	for _, tc := range []struct {
		cmd   []string
		flags []string
	}{
		{nil, nil},
		{[]string{"put"}, []string{"--prev-kv"}},
		{[]string{"get"}, []string{"--prefix", "--end", "--keys-only", "--count-only", "--limit", "--consistency", "--print-resume"}},
		{[]string{"cas"}, []string{"--create"}},
		{[]string{"txn"}, []string{"-f, --file"}},
		{[]string{"bench"}, nil},
		{[]string{"bench", "put"}, benchFlags},
		{[]string{"bench", "get"}, benchFlags},
		{[]string{"bench", "mixed"}, append([]string{"--read-ratio"}, benchFlags...)},
		{[]string{"bench", "txn"}, benchFlags},
		{[]string{"del"}, []string{"--prefix"}},
		{[]string{"cluster"}, nil},
		{[]string{"cluster", "status"}, nil},
		{[]string{"member"}, nil},
		{[]string{"member", "list"}, nil},
		{[]string{"endpoint"}, nil},
		{[]string{"endpoint", "health"}, nil},
		{[]string{"endpoint", "status"}, nil},
		{[]string{"version"}, nil},
		{[]string{"completion"}, nil},
	} {
		r := kvctl(t, "", "", append(tc.cmd, "--help")...)
		if r.code != 0 {
			t.Fatalf("%v --help: exit %d", tc.cmd, r.code)
		}
		for _, fl := range append(tc.flags, global...) {
			if !strings.Contains(r.stdout, fl) {
				t.Errorf("kvctl %v --help does not document %s", tc.cmd, fl)
			}
		}
		if !strings.Contains(r.stdout, "Examples:") {
			t.Errorf("kvctl %v --help shows no example", tc.cmd)
		}
	}
}

// TestDebugLogsTheClientsWork: --debug shows the cluster map the client
// took and each failed attempt with its node, so a slow command can be
// explained; without it stderr stays quiet.
func TestDebugLogsTheClientsWork(t *testing.T) {
	f, eps := cluster(t)
	if r := kvctl(t, eps, "", "put", "a", "1"); r.code != 0 || r.stderr != "" {
		t.Fatalf("put without --debug: %+v", r)
	}
	r := kvctl(t, eps, "", "--debug", "put", "a", "2")
	if r.code != 0 || !strings.Contains(r.stderr, "client: cluster map") {
		t.Fatalf("put --debug: %+v", r)
	}
	// The key's leader is down: its attempts fail, and each is logged
	// whatever the put's outcome.
	shard := f.ShardOf([]byte("a"))
	f.Node(f.Leader(shard)).SetMode(clienttest.Down)
	r = kvctl(t, eps, "", "--debug", "--timeout", "500ms", "put", "a", "3")
	if !strings.Contains(r.stderr, "client: attempt failed") || !strings.Contains(r.stderr, fmt.Sprintf("shard=%d", shard)) {
		t.Fatalf("put --debug with the leader down logs no failed attempt: %+v", r)
	}
}

// TestEveryCommandHonoursOutput: put and del print json and tables as
// get does, and del --prefix
// deletes every key under the prefix and nothing else.
func TestEveryCommandHonoursOutput(t *testing.T) {
	_, eps := cluster(t)
	r := kvctl(t, eps, "", "-o", "table", "put", "k", "v1")
	if r.code != 0 || !strings.HasPrefix(r.stdout, "SHARD") || strings.Count(r.stdout, "\n") != 2 {
		t.Fatalf("put -o table: %+v", r)
	}
	// put --prev-kv needs a real state machine: test/e2e TestKvctlConveniences.
	if r := kvctl(t, eps, "", "-o", "table", "del", "k"); r.code != 0 || !strings.HasPrefix(r.stdout, "DELETED") || !strings.Contains(r.stdout, "\n1 ") {
		t.Fatalf("del -o table: %+v", r)
	}
	for i := range 25 {
		kvctl(t, eps, "", "put", fmt.Sprintf("tmp/%02d", i), "v")
	}
	kvctl(t, eps, "", "put", "tmpx", "stays")
	if r := kvctl(t, eps, "", "-o", "json", "del", "--prefix", "tmp/"); r.code != 0 || strings.TrimSpace(r.stdout) != "{\n  \"deleted\": 25\n}" {
		t.Fatalf("del --prefix: %+v", r)
	}
	if r := kvctl(t, eps, "", "get", "--prefix", "tmp", "--keys-only"); r.stdout != "tmpx\n" {
		t.Fatalf("after del --prefix tmp/: %+v", r)
	}
	if r := kvctl(t, eps, "", "del", "--prefix", ""); r.code != 2 {
		t.Fatalf("del --prefix of everything: %+v", r)
	}
	if r := kvctl(t, eps, "", "-o", "table", "member", "list"); r.code != 0 || !strings.HasPrefix(r.stdout, "ID") {
		t.Fatalf("member list -o table: %+v", r)
	}
	r = kvctl(t, eps, "", "-o", "json", "endpoint", "status")
	var rows []map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &rows); err != nil || r.code != 0 || len(rows) != 3 {
		t.Fatalf("endpoint status -o json: %v %+v", err, r)
	}
	if r := kvctl(t, eps, "", "endpoint", "health"); r.code != 0 || strings.Count(r.stdout, "is healthy: took") != 3 {
		t.Fatalf("endpoint health: %+v", r)
	}
	if r := kvctl(t, eps+","+deadAddr(t), "", "endpoint", "health"); r.code != 3 || !strings.Contains(r.stdout, "is unhealthy: connection refused") ||
		!strings.Contains(r.stderr, "1 of 4 endpoints unhealthy") {
		t.Fatalf("endpoint health with one endpoint down: %+v", r)
	}
	if r := kvctl(t, "", "", "version"); r.code != 0 || !strings.HasPrefix(r.stdout, "kvctl ") || !strings.HasSuffix(r.stdout, ", API "+version.API+"\n") {
		t.Fatalf("version: %+v", r)
	}
	// The API version is the protobuf package the client speaks.
	if got := string(kvpb.File_kvpb_kv_proto.Package()); got != version.API {
		t.Fatalf("proto/kvpb's package is %s; internal/version.API says %s", got, version.API)
	}
	for _, sh := range []string{"bash", "zsh", "fish"} {
		if r := kvctl(t, "", "", "completion", sh); r.code != 0 || !strings.Contains(r.stdout, "kvctl") || len(r.stdout) < 1000 {
			t.Fatalf("completion %s: exit %d, %d bytes", sh, r.code, len(r.stdout))
		}
	}
}

package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kvd/kvd/proto/kvpb"
)

func TestCas(t *testing.T) {
	_, eps := cluster(t)
	if r := kvctl(t, eps, "", "cas", "--create", "k", "v1"); r.code != 0 || r.stdout != "OK\n" {
		t.Fatalf("cas --create on a missing key: %+v", r)
	}
	if r := kvctl(t, eps, "", "cas", "--create", "k", "v2"); r.code != 1 || !strings.Contains(r.stderr, `compare failed: "k" already exists (value "v1")`) {
		t.Fatalf("cas --create on an existing key: %+v", r)
	}
	if r := kvctl(t, eps, "", "cas", "k", "v1", "v2"); r.code != 0 || r.stdout != "OK\n" {
		t.Fatalf("cas with the right old value: %+v", r)
	}
	r := kvctl(t, eps, "", "cas", "k", "old", "v3")
	if r.code != 1 || r.stdout != "" || r.stderr != "kvctl: compare failed: \"k\" is \"v2\", not \"old\"\n" {
		t.Fatalf("cas with a wrong old value: %+v", r)
	}
	if r := kvctl(t, eps, "", "cas", "missing", "old", "v"); r.code != 1 || !strings.Contains(r.stderr, `"missing" does not exist`) {
		t.Fatalf("cas on a missing key: %+v", r)
	}
	if r := kvctl(t, eps, "", "get", "k"); r.stdout != "v2\n" {
		t.Fatalf("a failed cas changed the value: %+v", r)
	}
	r = kvctl(t, eps, "", "-o", "json", "cas", "k", "nope", "v3")
	var j struct {
		Succeeded bool    `json:"succeeded"`
		Current   *jsonKV `json:"current"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &j); err != nil || r.code != 1 || j.Succeeded || j.Current == nil || j.Current.Value != "v2" {
		t.Fatalf("cas -o json on failure: %v %+v", err, r)
	}
	for _, args := range [][]string{{"cas", "k", "v"}, {"cas", "--create", "k"}, {"cas", "--create", "k", "a", "b"}, {"cas", "", "a", "b"}} {
		if r := kvctl(t, eps, "", args...); r.code != 2 {
			t.Errorf("kvctl %q: exit %d, want 2: %+v", args, r.code, r)
		}
	}
}

func TestTxn(t *testing.T) {
	_, eps := cluster(t)
	kvctl(t, eps, "", "put", "{u}.a", "1")
	txn := `{"compare":[{"key":"{u}.a","target":"value","op":"=","value":"1"}],
		"success":[{"put":{"key":"{u}.a","value":"2"}},{"get":{"key":"{u}.a"}},{"get":{"key":"{u}.none"}},{"del":{"key":"{u}.b"}}],
		"failure":[{"get":{"key":"{u}.a"}}]}`
	r := kvctl(t, eps, txn, "txn")
	want := "SUCCESS\nput {u}.a OK\nget {u}.a 2\nget {u}.none (not found)\ndel {u}.b 0\n"
	if r.code != 0 || r.stdout != want {
		t.Fatalf("txn success: %+v, want stdout %q", r, want)
	}
	// Same transaction again: the value is now 2, so the failure branch runs.
	r = kvctl(t, eps, txn, "txn")
	if r.code != 1 || r.stdout != "FAILURE\nget {u}.a 2\n" || !strings.Contains(r.stderr, "compare failed") {
		t.Fatalf("txn failure: %+v", r)
	}
	r = kvctl(t, eps, txn, "-o", "json", "txn")
	var j struct {
		Succeeded bool
		Revision  int64
		Responses []jsonTxnOp
	}
	if err := json.Unmarshal([]byte(r.stdout), &j); err != nil || r.code != 1 || j.Succeeded || len(j.Responses) != 1 ||
		j.Responses[0].Op != "get" || j.Responses[0].KV == nil || j.Responses[0].KV.Value != "2" || j.Responses[0].KV.Version != 2 {
		t.Fatalf("txn -o json: %v %+v", err, r)
	}

	// From a file, with every compare target.
	file := filepath.Join(t.TempDir(), "txn.json")
	os.WriteFile(file, []byte(`{"compare":[
		{"key":"{u}.a","version":2},
		{"key":"{u}.a","target":"mod","op":">","mod_revision":0},
		{"key":"{u}.a","target":"create","op":"<","create_revision":1000},
		{"key":"{u}.a","target":"exists","exists":true},
		{"key":"{u}.b","target":"exists","op":"!=","exists":true},
		{"key":"{u}.b","target":"version","version":0}],
		"success":[{"put":{"key":"{u}.b","value":""}}]}`), 0o644)
	if r := kvctl(t, eps, "", "txn", "-f", file); r.code != 0 || r.stdout != "SUCCESS\nput {u}.b OK\n" {
		t.Fatalf("txn -f: %+v", r)
	}
}

func TestTxnMalformed(t *testing.T) {
	_, eps := cluster(t)
	for _, tc := range []struct{ in, msg string }{
		{``, "empty input"},
		{`{"compare": [}`, "invalid JSON at line 1, column 14"},
		{"{\n\"compare\": 3}", `at line 2, column 12: "compare" must be a list, not a number`},
		{`{"compares": []}`, `unknown field "compares"`},
		{`{}`, "no compares and no operations"},
		{`{"success":[{}]}`, `success[0]: an operation needs exactly one of "put", "get", "del"`},
		{`{"success":[{"put":{"key":"k"}}]}`, `success[0]: put: "value" is missing`},
		{`{"failure":[{"get":{"key":""}}]}`, `failure[0]: get: "key" is missing or empty`},
		{`{"compare":[{"key":"k","target":"colour","value":"x"}]}`, `compare[0]: target "colour" is not one of`},
		{`{"compare":[{"key":"k","target":"value","version":1}]}`, `compare[0]: target value needs "value"`},
		{`{"compare":[{"key":"k","value":"x","version":1}]}`, `compare[0]: several operands`},
		{`{"compare":[{"key":"k","op":"~","value":"x"}]}`, `compare[0]: op "~" is not one of`},
		{`{"compare":[{"key":"k","op":">","exists":true}]}`, `does not apply to exists`},
		{`{"compare":[{"key":"k","version":"1"}]}`, `"compare.version" must be an integer, not a string`},
		{`{} {}`, "more than one JSON value"},
	} {
		r := kvctl(t, eps, tc.in, "txn")
		if r.code != 2 || !strings.Contains(r.stderr, tc.msg) || strings.Count(r.stderr, "\n") != 1 {
			t.Errorf("txn %q: exit %d stderr %q, want exit 2 and %q", tc.in, r.code, r.stderr, tc.msg)
		}
	}
	if r := kvctl(t, eps, "", "txn", "-f", "/no/such/file"); r.code != 2 || !strings.Contains(r.stderr, "no such file") {
		t.Errorf("txn -f missing: %+v", r)
	}
}

func TestTxnAcrossShardsIsRejected(t *testing.T) {
	f, eps := cluster(t)
	a := "x0"
	var b string
	for i := 1; b == ""; i++ {
		if k := fmt.Sprintf("x%d", i); f.ShardOf([]byte(k)) != f.ShardOf([]byte(a)) {
			b = k
		}
	}
	in := fmt.Sprintf(`{"success":[{"put":{"key":%q,"value":"1"}},{"put":{"key":%q,"value":"1"}}]}`, a, b)
	if r := kvctl(t, eps, in, "txn"); r.code != 2 || !strings.Contains(r.stderr, "hash tag") {
		t.Fatalf("cross-shard txn: %+v", r)
	}
}

func TestParseTxnBuildsTheRequest(t *testing.T) {
	req, err := parseTxn(strings.NewReader(`{"compare":[{"key":"k","op":"!=","value":"v"},{"key":"k","target":"create_revision","op":"<","create_revision":7}],
		"success":[{"del":{"key":"k"}}],"failure":[{"put":{"key":"k","value":"w"}}]}`))
	if err != nil {
		t.Fatal(err)
	}
	c0, c1 := req.Compare[0], req.Compare[1]
	if c0.Target != kvpb.Compare_VALUE || c0.Result != kvpb.Compare_NOT_EQUAL || string(c0.Value) != "v" ||
		c1.Target != kvpb.Compare_CREATE || c1.Result != kvpb.Compare_LESS || c1.CreateRevision != 7 ||
		string(req.Success[0].GetDelete().GetKey()) != "k" || string(req.Failure[0].GetPut().GetValue()) != "w" {
		t.Fatalf("parsed %v", req)
	}
}

func TestGetCountAndRange(t *testing.T) {
	_, eps := cluster(t)
	for i := range 20 {
		kvctl(t, eps, "", "put", fmt.Sprintf("r/%02d", i), fmt.Sprint(i))
	}
	kvctl(t, eps, "", "put", "s", "outside")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"get", "--prefix", "r/", "--count-only"}, "20\n"},
		{[]string{"get", "r/05", "--end", "r/08", "--count-only"}, "3\n"},
		{[]string{"get", "r/05", "--end", "r/08", "--keys-only"}, "r/05\nr/06\nr/07\n"},
		{[]string{"get", "r/05", "--end", "r/07"}, "r/05\n5\nr/06\n6\n"},
		{[]string{"get", "r/18", "--end", ""}, "r/18\n18\nr/19\n19\ns\noutside\n"},
		{[]string{"get", "r/10", "--end", "r/", "--count-only"}, "0\n"},
		{[]string{"get", "--prefix", "none/", "--count-only"}, "0\n"},
		{[]string{"-o", "json", "get", "--prefix", "r/", "--count-only", "--consistency", "serializable"}, "{\n  \"count\": 20\n}\n"},
	} {
		if r := kvctl(t, eps, "", tc.args...); r.code != 0 || r.stdout != tc.want {
			t.Errorf("kvctl %q: %+v, want stdout %q", tc.args, r, tc.want)
		}
	}
	for _, args := range [][]string{
		{"get", "r/", "--count-only"},
		{"get", "--prefix", "r/", "--end", "s"},
		{"get", "--prefix", "r/", "--count-only", "--limit", "3"},
	} {
		if r := kvctl(t, eps, "", args...); r.code != 2 {
			t.Errorf("kvctl %q: exit %d, want 2", args, r.code)
		}
	}
}

func TestSemanticsHonourTimeout(t *testing.T) {
	f, eps := cluster(t)
	noQuorum(t, f)
	for _, args := range [][]string{
		{"put", "k", "v"},
		{"cas", "k", "a", "b"},
		{"txn"},
		{"get", "--prefix", "k", "--count-only"},
	} {
		r := kvctl(t, eps, `{"success":[{"put":{"key":"k","value":"v"}}]}`, append([]string{"--timeout", "300ms"}, args...)...)
		if r.code != 3 || !strings.Contains(r.stderr, "cluster unavailable") {
			t.Errorf("kvctl %q without leaders: %+v, want exit 3", args, r)
		}
	}
}

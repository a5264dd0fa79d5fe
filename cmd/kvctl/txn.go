package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/proto/kvpb"
)

// exitCompareFailed is exit 1 for a transaction whose compares failed
// (docs/design.md, kvctl, shares it with "key not found").
const exitCompareFailed = exitNotFound

func (a *app) casCmd() *cobra.Command {
	var create bool
	cmd := &cobra.Command{
		Annotations: map[string]string{outputsKey: "simple,json"},
		Use:         "cas KEY OLD NEW | cas --create KEY NEW",
		Short:       "Compare-and-swap: set KEY to NEW only if its value is OLD",
		Long: `Atomically set KEY to NEW if its current value is OLD. With --create, set
KEY to NEW only if KEY does not exist.

It is one transaction on KEY's shard (compare the value, then put), so no
other write can come between the check and the swap. A retry after a
timeout is applied at most once (the write carries the session and
sequence number of its first attempt).

Exit 0 when the swap happened; exit 1 when the compare failed, with the
current value (or "does not exist") on stderr; 2 bad input; 3 unavailable.
Output: simple prints OK; json prints {"succeeded", "revision", "shard"}
and, when the compare failed, "current" (the key as it is, or null).`,
		Example: `  kvctl cas config/leader node-a node-b
  kvctl cas --create lock/backup "$HOSTNAME"
  kvctl -o json cas counter 41 42`,
		Args: func(cmd *cobra.Command, args []string) error {
			if create {
				return exactArgs(2, "KEY and NEW with --create")(cmd, args)
			}
			return exactArgs(3, "KEY, OLD and NEW")(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			key := []byte(args[0])
			cmp := &kvpb.Compare{Key: key, Target: kvpb.Compare_EXISTS, Result: kvpb.Compare_EQUAL, Exists: false}
			newValue := []byte(args[1])
			if !create {
				cmp = &kvpb.Compare{Key: key, Target: kvpb.Compare_VALUE, Result: kvpb.Compare_EQUAL, Value: []byte(args[1])}
				newValue = []byte(args[2])
			}
			req := &kvpb.TxnRequest{
				Compare: []*kvpb.Compare{cmp},
				Success: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: key, Value: newValue}}}},
				// On failure read the key, to say what it holds instead.
				Failure: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Get{Get: &kvpb.GetRequest{Key: key}}}},
			}
			return a.request(func(ctx context.Context, c *client.Client) error {
				resp, err := c.Txn(ctx, req)
				if err != nil {
					return err
				}
				var cur *kvpb.KeyValue
				if !resp.GetSucceeded() && len(resp.GetResponses()) > 0 {
					cur = resp.GetResponses()[0].GetGet().GetKv()
				}
				if a.output == "json" {
					out := map[string]any{
						"succeeded": resp.GetSucceeded(),
						"revision":  resp.GetHeader().GetRevision(),
						"shard":     resp.GetHeader().GetShard(),
					}
					if !resp.GetSucceeded() {
						out["current"] = nil
						if cur != nil {
							out["current"] = toJSONKV(cur, false)
						}
					}
					if err := writeJSON(a.stdout, out); err != nil {
						return err
					}
				} else if resp.GetSucceeded() {
					if _, err := fmt.Fprintln(a.stdout, "OK"); err != nil {
						return err
					}
				}
				if resp.GetSucceeded() {
					return nil
				}
				var msg string
				switch {
				case cur == nil:
					msg = fmt.Sprintf("compare failed: %s does not exist", quoteShort([]byte(args[0])))
				case create:
					msg = fmt.Sprintf("compare failed: %s already exists (value %s)", quoteShort(key), quoteShort(cur.GetValue()))
				default:
					msg = fmt.Sprintf("compare failed: %s is %s, not %s", quoteShort(key), quoteShort(cur.GetValue()), quoteShort([]byte(args[1])))
				}
				return &exitError{code: exitCompareFailed, msg: msg}
			})
		},
	}
	cmd.Flags().BoolVar(&create, "create", false, "succeed only if KEY does not exist yet (arguments: KEY NEW)")
	return cmd
}

// quoteShort quotes b for a one-line message, cut to a readable length.
func quoteShort(b []byte) string {
	const max = 64
	if len(b) > max {
		return fmt.Sprintf("%q...(%d bytes)", b[:max], len(b))
	}
	return fmt.Sprintf("%q", b)
}

func (a *app) txnCmd() *cobra.Command {
	var file string
	cmd := &cobra.Command{
		Annotations: map[string]string{outputsKey: "simple,json"},
		Use:         "txn [-f FILE]",
		Short:       "Run a transaction (compares, then success or failure operations) read as JSON",
		Long: `Run one atomic transaction, read as JSON from stdin (or from -f FILE):
if every compare holds, the "success" operations run, else the "failure"
ones, all in one step on one shard.

  {
    "compare": [{"key": "k", "target": "value", "op": "=", "value": "v"}],
    "success": [{"put": {"key": "k", "value": "v2"}}, {"get": {"key": "k"}}],
    "failure": [{"get": {"key": "k"}}, {"del": {"key": "other"}}]
  }

A compare has "key", "target" (value, version, mod, create or exists;
guessed from the operand when left out), "op" (=, !=, > or <; default =)
and the operand of its target: "value" (text), "version",
"mod_revision", "create_revision" (integers) or "exists" (true/false; only
= and !=). On a missing key a value compare is false, version, mod and
create compare against 0, and exists compares existence.
An operation is {"put": {"key", "value"}}, {"get": {"key"}} or
{"del": {"key"}}.

All keys must be in one shard, or the cluster rejects the transaction
(exit 2): give related keys a hash tag, the part between { and }, which
alone decides the shard: {user1}.a and {user1}.b go together.
At most 128 compares and operations in all.

Output: simple prints SUCCESS or FAILURE, then one line per operation of
the branch that ran: "put KEY OK", "get KEY VALUE" (or "get KEY (not
found)"), "del KEY N" (keys deleted). json prints {"succeeded",
"revision", "shard", "responses": [...]}.
Exit 0 when the compares held; 1 when they failed (the failure branch
ran; its results are printed too); 2 malformed input or a transaction the
cluster rejects; 3 unavailable.`,
		Example: `  echo '{"compare":[{"key":"k","value":"old"}],"success":[{"put":{"key":"k","value":"new"}}]}' | kvctl txn
  kvctl txn -f move.json -o json
  # lock-free increment of a version-checked key
  kvctl txn <<'EOF'
  {"compare": [{"key": "{user1}.a", "target": "version", "op": "=", "version": 3}],
   "success": [{"put": {"key": "{user1}.a", "value": "4"}}, {"put": {"key": "{user1}.b", "value": "x"}}],
   "failure": [{"get": {"key": "{user1}.a"}}]}
  EOF`,
		Args: exactArgs(0, "no arguments (the transaction comes from stdin or -f)"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			var in io.Reader = a.stdin
			name := "stdin"
			if file != "" && file != "-" {
				f, err := os.Open(file)
				if err != nil {
					return usageErrorf("reading the transaction: %v", err)
				}
				defer f.Close()
				in, name = f, file
			}
			req, err := parseTxn(in)
			if err != nil {
				return usageErrorf("transaction from %s: %v; see 'kvctl txn --help'", name, err)
			}
			return a.request(func(ctx context.Context, c *client.Client) error {
				resp, err := c.Txn(ctx, req)
				if err != nil {
					return err
				}
				ops := req.GetSuccess()
				if !resp.GetSucceeded() {
					ops = req.GetFailure()
				}
				if err := a.printTxn(ops, resp); err != nil {
					return err
				}
				if !resp.GetSucceeded() {
					return &exitError{code: exitCompareFailed, msg: fmt.Sprintf(
						"compare failed: the failure branch ran (%d operation(s))", len(ops))}
				}
				return nil
			})
		},
	}
	cmd.Flags().StringVarP(&file, "file", "f", "", "read the transaction from FILE instead of stdin (\"-\": stdin)")
	return cmd
}

// The friendly JSON form of a transaction (kvctl txn --help).
type (
	txnInput struct {
		Compare []cmpInput `json:"compare"`
		Success []opInput  `json:"success"`
		Failure []opInput  `json:"failure"`
	}
	cmpInput struct {
		Key            *string `json:"key"`
		Target         string  `json:"target"`
		Op             string  `json:"op"`
		Value          *string `json:"value"`
		Version        *int64  `json:"version"`
		ModRevision    *int64  `json:"mod_revision"`
		CreateRevision *int64  `json:"create_revision"`
		Exists         *bool   `json:"exists"`
	}
	keyInput struct {
		Key   *string `json:"key"`
		Value *string `json:"value"`
	}
	opInput struct {
		Put *keyInput `json:"put"`
		Get *keyInput `json:"get"`
		Del *keyInput `json:"del"`
	}
)

// parseTxn decodes and checks a transaction. Its errors name the part at
// fault ("compare[1]: ...") in one line. Limits the server enforces (op
// count, key and value sizes, one shard) are left to the server, which
// knows its configured values.
func parseTxn(r io.Reader) (*kvpb.TxnRequest, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, errors.New("empty input; give a JSON object with compare, success and failure")
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var in txnInput
	if err := dec.Decode(&in); err != nil {
		return nil, jsonError(data, err)
	}
	if dec.More() {
		return nil, errors.New("more than one JSON value; give one transaction object")
	}
	req := &kvpb.TxnRequest{}
	for i, c := range in.Compare {
		cmp, err := c.toProto()
		if err != nil {
			return nil, fmt.Errorf("compare[%d]: %w", i, err)
		}
		req.Compare = append(req.Compare, cmp)
	}
	for _, branch := range []struct {
		name string
		in   []opInput
		out  *[]*kvpb.RequestOp
	}{{"success", in.Success, &req.Success}, {"failure", in.Failure, &req.Failure}} {
		for i, o := range branch.in {
			op, err := o.toProto()
			if err != nil {
				return nil, fmt.Errorf("%s[%d]: %w", branch.name, i, err)
			}
			*branch.out = append(*branch.out, op)
		}
	}
	if len(req.Compare)+len(req.Success)+len(req.Failure) == 0 {
		return nil, errors.New("no compares and no operations")
	}
	return req, nil
}

// jsonError makes a decoding error say where the input went wrong.
func jsonError(data []byte, err error) error {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		line, col := position(data, se.Offset)
		return fmt.Errorf("invalid JSON at line %d, column %d: %v", line, col, se)
	case errors.As(err, &te):
		line, col := position(data, te.Offset)
		return fmt.Errorf("at line %d, column %d: %q must be %s, not a %s", line, col, te.Field, kindName(te.Type.String()), te.Value)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return errors.New("invalid JSON: unexpected end of input")
	}
	return fmt.Errorf("%s", strings.TrimPrefix(err.Error(), "json: "))
}

func kindName(goType string) string {
	switch strings.TrimPrefix(goType, "*") {
	case "string":
		return "a string"
	case "int64":
		return "an integer"
	case "bool":
		return "true or false"
	}
	if strings.HasPrefix(goType, "[]") {
		return "a list"
	}
	return "an object"
}

// position converts a byte offset into a 1-based line and column.
func position(data []byte, off int64) (line, col int) {
	off = min(max(off, 0), int64(len(data)))
	before := data[:off]
	line = bytes.Count(before, []byte("\n")) + 1
	col = int(off) - (bytes.LastIndexByte(before, '\n') + 1)
	return line, max(col, 1)
}

func (c cmpInput) toProto() (*kvpb.Compare, error) {
	if c.Key == nil || *c.Key == "" {
		return nil, errors.New(`"key" is missing or empty`)
	}
	out := &kvpb.Compare{Key: []byte(*c.Key)}
	// The operands in a fixed order, so errors are the same run to run.
	operands := []struct {
		target, field string
		set           bool
	}{
		{"value", "value", c.Value != nil}, {"version", "version", c.Version != nil},
		{"mod", "mod_revision", c.ModRevision != nil}, {"create", "create_revision", c.CreateRevision != nil},
		{"exists", "exists", c.Exists != nil},
	}
	target := c.Target
	if target == "" {
		// Guess the target from the one operand given.
		for _, o := range operands {
			if o.set {
				if target != "" {
					return nil, errors.New(`several operands and no "target"; say which to compare`)
				}
				target = o.target
			}
		}
		if target == "" {
			return nil, errors.New(`no "target" and no operand; give e.g. "target": "value", "value": "v"`)
		}
	}
	switch target {
	case "value":
		out.Target = kvpb.Compare_VALUE
	case "version":
		out.Target = kvpb.Compare_VERSION
	case "mod", "mod_revision":
		target, out.Target = "mod", kvpb.Compare_MOD
	case "create", "create_revision":
		target, out.Target = "create", kvpb.Compare_CREATE
	case "exists":
		out.Target = kvpb.Compare_EXISTS
	default:
		return nil, fmt.Errorf("target %q is not one of value, version, mod, create, exists", target)
	}
	for _, o := range operands {
		if o.target == target && !o.set {
			return nil, fmt.Errorf("target %s needs %q", target, o.field)
		}
		if o.target != target && o.set {
			return nil, fmt.Errorf("target %s does not take %q", target, o.field)
		}
	}
	switch target {
	case "value":
		out.Value = []byte(*c.Value)
	case "version":
		out.Version = *c.Version
	case "mod":
		out.ModRevision = *c.ModRevision
	case "create":
		out.CreateRevision = *c.CreateRevision
	case "exists":
		out.Exists = *c.Exists
	}
	switch c.Op {
	case "", "=", "==":
		out.Result = kvpb.Compare_EQUAL
	case "!=":
		out.Result = kvpb.Compare_NOT_EQUAL
	case ">":
		out.Result = kvpb.Compare_GREATER
	case "<":
		out.Result = kvpb.Compare_LESS
	default:
		return nil, fmt.Errorf("op %q is not one of =, !=, >, <", c.Op)
	}
	if target == "exists" && (out.Result == kvpb.Compare_GREATER || out.Result == kvpb.Compare_LESS) {
		return nil, fmt.Errorf("op %q does not apply to exists; use = or !=", c.Op)
	}
	return out, nil
}

func (o opInput) toProto() (*kvpb.RequestOp, error) {
	n := 0
	for _, set := range []bool{o.Put != nil, o.Get != nil, o.Del != nil} {
		if set {
			n++
		}
	}
	if n != 1 {
		return nil, errors.New(`an operation needs exactly one of "put", "get", "del"`)
	}
	key := func(name string, k *keyInput) ([]byte, error) {
		if k.Key == nil || *k.Key == "" {
			return nil, fmt.Errorf(`%s: "key" is missing or empty`, name)
		}
		if name != "put" && k.Value != nil {
			return nil, fmt.Errorf(`%s: takes no "value"`, name)
		}
		return []byte(*k.Key), nil
	}
	switch {
	case o.Put != nil:
		k, err := key("put", o.Put)
		if err != nil {
			return nil, err
		}
		if o.Put.Value == nil {
			return nil, errors.New(`put: "value" is missing (use "" for an empty value)`)
		}
		return &kvpb.RequestOp{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: k, Value: []byte(*o.Put.Value)}}}, nil
	case o.Get != nil:
		k, err := key("get", o.Get)
		if err != nil {
			return nil, err
		}
		return &kvpb.RequestOp{Op: &kvpb.RequestOp_Get{Get: &kvpb.GetRequest{Key: k}}}, nil
	default:
		k, err := key("del", o.Del)
		if err != nil {
			return nil, err
		}
		return &kvpb.RequestOp{Op: &kvpb.RequestOp_Delete{Delete: &kvpb.DeleteRequest{Key: k}}}, nil
	}
}

// jsonTxnOp is the json form of one operation's result.
type jsonTxnOp struct {
	Op      string  `json:"op"` // put, get or del
	Key     string  `json:"key"`
	Found   *bool   `json:"found,omitempty"`   // get
	KV      *jsonKV `json:"kv,omitempty"`      // get, when found
	Deleted *int64  `json:"deleted,omitempty"` // del
}

// printTxn prints the outcome and the results of ops, the branch that ran.
func (a *app) printTxn(ops []*kvpb.RequestOp, resp *kvpb.TxnResponse) error {
	results := resp.GetResponses()
	if a.output == "json" {
		out := struct {
			Succeeded bool        `json:"succeeded"`
			Revision  int64       `json:"revision"`
			Shard     uint64      `json:"shard"`
			Responses []jsonTxnOp `json:"responses"`
		}{resp.GetSucceeded(), resp.GetHeader().GetRevision(), resp.GetHeader().GetShard(), []jsonTxnOp{}}
		for i, op := range ops {
			var r *kvpb.ResponseOp
			if i < len(results) {
				r = results[i]
			}
			j := jsonTxnOp{}
			switch {
			case op.GetPut() != nil:
				j.Op, j.Key = "put", string(op.GetPut().GetKey())
			case op.GetGet() != nil:
				j.Op, j.Key = "get", string(op.GetGet().GetKey())
				kv := r.GetGet().GetKv()
				found := kv != nil
				j.Found = &found
				if found {
					v := toJSONKV(kv, false)
					j.KV = &v
				}
			case op.GetDelete() != nil:
				j.Op, j.Key = "del", string(op.GetDelete().GetKey())
				d := r.GetDelete().GetDeleted()
				j.Deleted = &d
			}
			out.Responses = append(out.Responses, j)
		}
		return writeJSON(a.stdout, out)
	}
	var b strings.Builder
	if resp.GetSucceeded() {
		b.WriteString("SUCCESS\n")
	} else {
		b.WriteString("FAILURE\n")
	}
	for i, op := range ops {
		var r *kvpb.ResponseOp
		if i < len(results) {
			r = results[i]
		}
		switch {
		case op.GetPut() != nil:
			fmt.Fprintf(&b, "put %s OK\n", printable(op.GetPut().GetKey()))
		case op.GetGet() != nil:
			if kv := r.GetGet().GetKv(); kv != nil {
				fmt.Fprintf(&b, "get %s %s\n", printable(op.GetGet().GetKey()), printable(kv.GetValue()))
			} else {
				fmt.Fprintf(&b, "get %s (not found)\n", printable(op.GetGet().GetKey()))
			}
		case op.GetDelete() != nil:
			fmt.Fprintf(&b, "del %s %d\n", printable(op.GetDelete().GetKey()), r.GetDelete().GetDeleted())
		}
	}
	_, err := io.WriteString(a.stdout, b.String())
	return err
}

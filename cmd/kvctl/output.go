package main

import (
	"cmp"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"unicode/utf8"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/proto/kvpb"
)

// jsonKV is the json form of a key-value pair. Text that is not UTF-8
// goes in the *_base64 field instead, so no byte is lost.
type jsonKV struct {
	Key            string `json:"key,omitempty"`
	KeyBase64      string `json:"key_base64,omitempty"`
	Value          string `json:"value,omitempty"`
	ValueBase64    string `json:"value_base64,omitempty"`
	CreateRevision int64  `json:"create_revision"`
	ModRevision    int64  `json:"mod_revision"`
	Version        int64  `json:"version"`
}

func toJSONKV(kv *kvpb.KeyValue, keysOnly bool) jsonKV {
	j := jsonKV{CreateRevision: kv.CreateRevision, ModRevision: kv.ModRevision, Version: kv.Version}
	j.Key, j.KeyBase64 = textOrBase64(kv.Key)
	if !keysOnly {
		j.Value, j.ValueBase64 = textOrBase64(kv.Value)
	}
	return j
}

// textOrBase64 returns b as text when it is UTF-8, else base64-encoded
// in the second result.
func textOrBase64(b []byte) (text, b64 string) {
	if utf8.Valid(b) {
		return string(b), ""
	}
	return "", base64.StdEncoding.EncodeToString(b)
}

func writeJSON(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

func (a *app) printKV(kv *kvpb.KeyValue) error {
	switch a.output {
	case "json":
		return writeJSON(a.stdout, toJSONKV(kv, false))
	case "table":
		p := a.newKVPrinter(false)
		if err := p.add([]*kvpb.KeyValue{kv}); err != nil {
			return err
		}
		return p.close("")
	}
	_, err := fmt.Fprintf(a.stdout, "%s\n", kv.Value)
	return err
}

// kvPrinter prints the pages of a prefix scan as they arrive.
type kvPrinter struct {
	a        *app
	keysOnly bool
	// withResume wraps json output in {"kvs": [...], "resume": TOKEN}
	// (get --print-resume); other outputs print the token on stderr.
	withResume bool
	n          int
	tw         *tabwriter.Writer
}

func (a *app) newKVPrinter(keysOnly bool) *kvPrinter {
	return &kvPrinter{a: a, keysOnly: keysOnly}
}

// jsonIndent is the indent of the kvs of a json scan: inside the
// {"kvs": [...]} object of --print-resume, one level deeper.
func (p *kvPrinter) jsonIndent() string {
	if p.withResume {
		return "    "
	}
	return "  "
}

func (p *kvPrinter) add(kvs []*kvpb.KeyValue) error {
	w := p.a.stdout
	for _, kv := range kvs {
		var err error
		switch p.a.output {
		case "json":
			// Stream one JSON array: "[" before the first element.
			sep := ",\n" + p.jsonIndent()
			if p.n == 0 {
				sep = "[\n" + p.jsonIndent()
				if p.withResume {
					sep = "{\n  \"kvs\": " + sep
				}
			}
			b, merr := json.Marshal(toJSONKV(kv, p.keysOnly))
			if merr != nil {
				return merr
			}
			_, err = fmt.Fprintf(w, "%s%s", sep, b)
		case "table":
			if p.tw == nil {
				p.tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
				if p.keysOnly {
					fmt.Fprintln(p.tw, "KEY\tCREATE_REV\tMOD_REV\tVERSION")
				} else {
					fmt.Fprintln(p.tw, "KEY\tVALUE\tCREATE_REV\tMOD_REV\tVERSION")
				}
			}
			if p.keysOnly {
				_, err = fmt.Fprintf(p.tw, "%s\t%d\t%d\t%d\n", printable(kv.Key), kv.CreateRevision, kv.ModRevision, kv.Version)
			} else {
				_, err = fmt.Fprintf(p.tw, "%s\t%s\t%d\t%d\t%d\n", printable(kv.Key), printable(kv.Value), kv.CreateRevision, kv.ModRevision, kv.Version)
			}
		default:
			if p.keysOnly {
				_, err = fmt.Fprintf(w, "%s\n", kv.Key)
			} else {
				_, err = fmt.Fprintf(w, "%s\n%s\n", kv.Key, kv.Value)
			}
		}
		if err != nil {
			return err
		}
		p.n++
	}
	if p.tw != nil {
		return p.tw.Flush() // one page at a time: memory stays bounded
	}
	return nil
}

// close ends the output; resume is the scan's watch resume token, printed
// when withResume is set.
func (p *kvPrinter) close(resume string) error {
	if p.a.output == "json" {
		if !p.withResume {
			end := "\n]\n"
			if p.n == 0 {
				end = "[]\n"
			}
			_, err := io.WriteString(p.a.stdout, end)
			return err
		}
		end := "\n  ]"
		if p.n == 0 {
			end = "{\n  \"kvs\": []"
		}
		tok, err := json.Marshal(resume)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(p.a.stdout, "%s,\n  \"resume\": %s\n}\n", end, tok)
		return err
	}
	if p.tw != nil {
		if err := p.tw.Flush(); err != nil {
			return err
		}
	}
	if p.withResume {
		_, err := fmt.Fprintln(p.a.stderr, resume)
		return err
	}
	return nil
}

// printable makes a table cell of b: tabs and newlines would break the
// table, so they are escaped.
func printable(b []byte) string {
	s := string(b)
	if !utf8.ValidString(s) || strings.ContainsAny(s, "\t\n\r") {
		q := fmt.Sprintf("%q", s)
		return q
	}
	return s
}

// printPut prints a put's answer; withPrev adds the key as it was.
func (a *app) printPut(resp *kvpb.PutResponse, withPrev bool) error {
	h, prev := resp.GetHeader(), resp.GetPrevKv()
	switch a.output {
	case "json":
		out := map[string]any{"shard": h.GetShard(), "revision": h.GetRevision()}
		if withPrev {
			out["prev_kv"] = nil
			if prev != nil {
				out["prev_kv"] = toJSONKV(prev, false)
			}
		}
		return writeJSON(a.stdout, out)
	case "table":
		tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
		if withPrev {
			fmt.Fprintln(tw, "SHARD\tREVISION\tPREV_VALUE\tPREV_MOD_REV")
			pv, pm := "", ""
			if prev != nil {
				pv, pm = printable(prev.GetValue()), fmt.Sprint(prev.GetModRevision())
			}
			fmt.Fprintf(tw, "%d\t%d\t%s\t%s\n", h.GetShard(), h.GetRevision(), pv, pm)
		} else {
			fmt.Fprintln(tw, "SHARD\tREVISION")
			fmt.Fprintf(tw, "%d\t%d\n", h.GetShard(), h.GetRevision())
		}
		return tw.Flush()
	}
	if _, err := fmt.Fprintln(a.stdout, "OK"); err != nil {
		return err
	}
	if withPrev && prev != nil {
		_, err := fmt.Fprintf(a.stdout, "%s\n%s\n", prev.GetKey(), prev.GetValue())
		return err
	}
	return nil
}

func (a *app) printDelete(resp *kvpb.DeleteResponse) error {
	h := resp.GetHeader()
	switch a.output {
	case "json":
		return writeJSON(a.stdout, map[string]any{
			"deleted": resp.GetDeleted(), "shard": h.GetShard(), "revision": h.GetRevision(),
		})
	case "table":
		tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "DELETED\tSHARD\tREVISION")
		fmt.Fprintf(tw, "%d\t%d\t%d\n", resp.GetDeleted(), h.GetShard(), h.GetRevision())
		return tw.Flush()
	}
	_, err := fmt.Fprintln(a.stdout, resp.GetDeleted())
	return err
}

// printDeleted prints the count of a del --prefix, which spans shards.
func (a *app) printDeleted(n int64) error {
	switch a.output {
	case "json":
		return writeJSON(a.stdout, map[string]any{"deleted": n})
	case "table":
		_, err := fmt.Fprintf(a.stdout, "DELETED\n%d\n", n)
		return err
	}
	_, err := fmt.Fprintln(a.stdout, n)
	return err
}

type jsonNode struct {
	ID      uint64 `json:"id"`
	Address string `json:"address"`
	Healthy bool   `json:"healthy"`
	Breaker string `json:"breaker"`
	Epoch   uint64 `json:"epoch,omitempty"`
	Error   string `json:"error,omitempty"`
}

type jsonShard struct {
	Shard    uint64   `json:"shard"`
	Leader   uint64   `json:"leader"`
	Term     uint64   `json:"term"`
	Commit   uint64   `json:"commit"`
	Applied  uint64   `json:"applied"`
	Voters   []uint64 `json:"voters"`
	Reporter uint64   `json:"reported_by"`
}

// shardView merges the nodes' reports into one line per shard: the
// leader's own report when it answered, else the report with the highest
// term (ties: highest commit).
func shardView(st []client.NodeStatus) []jsonShard {
	best := map[uint64]jsonShard{}
	for _, ns := range st {
		if ns.Status == nil {
			continue
		}
		for _, s := range ns.Status.Shards {
			j := jsonShard{Shard: s.Shard, Leader: s.Leader, Term: s.Term, Commit: s.Commit,
				Applied: s.Applied, Voters: s.Voters, Reporter: ns.ID}
			old, ok := best[s.Shard]
			switch {
			case !ok, s.Role == "leader",
				old.Reporter != old.Leader && (j.Term > old.Term || j.Term == old.Term && j.Commit > old.Commit):
				best[s.Shard] = j
			}
		}
	}
	var out []jsonShard
	for _, j := range best {
		out = append(out, j)
	}
	slices.SortFunc(out, func(x, y jsonShard) int { return cmp.Compare(x.Shard, y.Shard) })
	return out
}

func (a *app) printStatus(st []client.NodeStatus) error {
	var nodes []jsonNode
	for _, ns := range st {
		j := jsonNode{ID: ns.ID, Address: ns.Addr, Healthy: ns.Healthy, Breaker: ns.Breaker}
		if ns.Status != nil {
			j.Epoch = ns.Status.Epoch
		}
		if ns.Err != nil {
			j.Error = oneLine(ns.Err.Error())
		}
		nodes = append(nodes, j)
	}
	shards := shardView(st)
	alarms := alarmView(st)
	if a.output == "json" {
		if err := writeJSON(a.stdout, map[string]any{"nodes": nodes, "shards": shards, "alarms": alarms}); err != nil {
			return err
		}
		return leaderless(shards)
	}
	tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tADDRESS\tHEALTH\tEPOCH\tERROR")
	for _, n := range nodes {
		health := "healthy"
		if !n.Healthy {
			health = "unhealthy"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%s\n", n.ID, n.Address, health, n.Epoch, n.Error)
	}
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "SHARD\tLEADER\tTERM\tCOMMIT\tAPPLIED\tVOTERS")
	for _, s := range shards {
		leader := fmt.Sprint(s.Leader)
		if s.Leader == 0 {
			leader = "NONE"
		}
		fmt.Fprintf(tw, "%d\t%s\t%d\t%d\t%d\t%s\n", s.Shard, leader, s.Term, s.Commit, s.Applied, joinIDs(s.Voters))
	}
	if len(alarms) > 0 {
		fmt.Fprintln(tw)
		fmt.Fprintln(tw, "ALARM\tSHARD\tNODE\tREPORTED_BY\tREASON")
		for _, al := range alarms {
			fmt.Fprintf(tw, "CORRUPT\t%d\t%d\t%d\t%s\n", al.Shard, al.Node, al.Reporter, al.Reason)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	return leaderless(shards)
}

// leaderless fails a status that shows shards without a leader: they
// take no writes and no linearizable reads, so a script checking
// `kvctl cluster status` must not see success.
func leaderless(shards []jsonShard) error {
	var ids []string
	for _, s := range shards {
		if s.Leader == 0 {
			ids = append(ids, fmt.Sprint(s.Shard))
		}
	}
	if len(ids) == 0 {
		return nil
	}
	return &exitError{code: exitUnavailable, msg: fmt.Sprintf(
		"%d of %d shards have no leader (shard %s): they serve no writes and no linearizable reads until a majority of their voters is up",
		len(ids), len(shards), strings.Join(ids, ", "))}
}

// jsonAlarm is a corrupt replica some node reported: it refuses to serve
// its shard until rebuilt.
type jsonAlarm struct {
	Shard    uint64 `json:"shard"`
	Node     uint64 `json:"node"`
	Reason   string `json:"reason"`
	Reporter uint64 `json:"reported_by"`
}

// alarmView lists each (shard, node) alarm once, as the first node that
// reports it says it.
func alarmView(st []client.NodeStatus) []jsonAlarm {
	out := []jsonAlarm{}
	seen := map[[2]uint64]bool{}
	for _, ns := range st {
		if ns.Status == nil {
			continue
		}
		for _, al := range ns.Status.Alarms {
			k := [2]uint64{al.Shard, al.Node}
			if !seen[k] {
				seen[k] = true
				out = append(out, jsonAlarm{Shard: al.Shard, Node: al.Node, Reason: oneLine(al.Reason), Reporter: ns.ID})
			}
		}
	}
	slices.SortFunc(out, func(x, y jsonAlarm) int {
		return cmp.Or(cmp.Compare(x.Shard, y.Shard), cmp.Compare(x.Node, y.Node))
	})
	return out
}

func joinIDs(ids []uint64) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = fmt.Sprint(id)
	}
	return strings.Join(s, ",")
}

func (a *app) printMembers(ml *kvpb.MemberListResponse) error {
	switch a.output {
	case "json":
		type member struct {
			ID         uint64 `json:"id"`
			ClientAddr string `json:"client_addr"`
			PeerAddr   string `json:"peer_addr"`
		}
		out := struct {
			Epoch   uint64   `json:"epoch"`
			Members []member `json:"members"`
		}{Epoch: ml.Epoch, Members: []member{}}
		for _, m := range ml.Members {
			out.Members = append(out.Members, member{m.Id, m.ClientAddr, m.PeerAddr})
		}
		return writeJSON(a.stdout, out)
	case "table":
		tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tCLIENT_ADDR\tPEER_ADDR")
		for _, m := range ml.Members {
			fmt.Fprintf(tw, "%d\t%s\t%s\n", m.Id, m.ClientAddr, m.PeerAddr)
		}
		return tw.Flush()
	}
	for _, m := range ml.Members {
		if _, err := fmt.Fprintf(a.stdout, "%d %s %s\n", m.Id, m.ClientAddr, m.PeerAddr); err != nil {
			return err
		}
	}
	return nil
}

func (a *app) printCount(n int64) error {
	switch a.output {
	case "json":
		return writeJSON(a.stdout, map[string]any{"count": n})
	case "table":
		_, err := fmt.Fprintf(a.stdout, "COUNT\n%d\n", n)
		return err
	}
	_, err := fmt.Fprintln(a.stdout, n)
	return err
}

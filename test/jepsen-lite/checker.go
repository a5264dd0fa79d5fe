package jepsenlite

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/anishathalye/porcupine"
)

// regInput and regOutput are what the porcupine model sees of an Op.
type regInput struct {
	kind, key, value, expect string
}

type regOutput struct {
	read    string // get
	swapped bool   // cas
	unknown bool   // indeterminate write: any outcome, at any later time
}

// registerModel is a per-key register with get, put and cas; the state is
// the value, "" for an absent key. Partitioned by key.
//
// An indeterminate write has Return = after everything else, so porcupine
// may linearize it anywhere after its call, including after every other
// operation, where its effect is invisible: applying it whenever its
// compare holds is therefore both sound and complete, and the model stays
// deterministic.
var registerModel = porcupine.Model{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		byKey := map[string][]porcupine.Operation{}
		var keys []string
		for _, op := range history {
			k := op.Input.(regInput).key
			if _, ok := byKey[k]; !ok {
				keys = append(keys, k)
			}
			byKey[k] = append(byKey[k], op)
		}
		sort.Strings(keys)
		out := make([][]porcupine.Operation, 0, len(keys))
		for _, k := range keys {
			out = append(out, byKey[k])
		}
		return out
	},
	Init: func() any { return "" },
	Step: func(state, input, output any) (bool, any) {
		st, in, out := state.(string), input.(regInput), output.(regOutput)
		switch in.kind {
		case kindGet:
			return out.read == st, st
		case kindPut:
			return true, in.value
		case kindDel:
			return true, ""
		case kindCas:
			if out.unknown || out.swapped {
				if st == in.expect {
					return true, in.value
				}
				return out.unknown, st
			}
			return st != in.expect, st
		}
		return false, st
	},
	DescribeOperation: func(input, output any) string {
		in, out := input.(regInput), output.(regOutput)
		res := ""
		switch {
		case out.unknown:
			res = " → ?"
		case in.kind == kindGet:
			res = fmt.Sprintf(" → %q", out.read)
		case in.kind == kindCas:
			res = fmt.Sprintf(" → %v", out.swapped)
		}
		switch in.kind {
		case kindGet:
			return "get()" + res
		case kindPut:
			return fmt.Sprintf("put(%q)%s", in.value, res)
		case kindDel:
			return "del()" + res
		default:
			return fmt.Sprintf("cas(%q→%q)%s", in.expect, in.value, res)
		}
	},
	DescribeState: func(state any) string { return fmt.Sprintf("%q", state.(string)) },
}

// toPorcupine converts the ops that can matter: failed ops and reads
// whose outcome is unknown have no effect and are left out; indeterminate
// writes end after everything else.
func toPorcupine(ops []Op) []porcupine.Operation {
	var end int64
	for _, op := range ops {
		end = max(end, op.Call, op.Return)
	}
	out := make([]porcupine.Operation, 0, len(ops))
	for _, op := range ops {
		if op.Status == statusFail || (op.Status == statusInfo && op.Kind == kindGet) {
			continue // no effect, and no observation
		}
		po := porcupine.Operation{
			ClientId: op.Client,
			Input:    regInput{kind: op.Kind, key: op.Key, value: op.Value, expect: op.Expect},
			Call:     op.Call,
			Return:   op.Return,
			Output:   regOutput{read: op.Read, swapped: op.Swapped},
		}
		if op.Status == statusInfo {
			po.Return = end + 1
			po.Output = regOutput{unknown: true}
		}
		out = append(out, po)
	}
	return out
}

// linResult is the outcome of the linearizability check.
type linResult struct {
	keys, illegal, unknown int
	illegalKeys            []string
	vizPath                string
	elapsed                time.Duration
}

// checkLinearizable checks every key's history with porcupine, each
// bounded by perKey and all of them by budget; a key whose check runs out
// of time counts as unknown, not as an anomaly. On a violation it writes
// porcupine's visualization of the illegal keys, with the nemesis events as
// annotations, to vizPath.
func checkLinearizable(ops []Op, events []Event, perKey, budget time.Duration, vizPath string) linResult {
	start := time.Now()
	parts := registerModel.Partition(toPorcupine(ops))
	res := linResult{keys: len(parts)}
	var bad []porcupine.Operation
	for _, part := range parts {
		left := budget - time.Since(start)
		if left <= 0 {
			res.unknown++
			continue
		}
		switch porcupine.CheckOperationsTimeout(registerModel, part, min(perKey, left)) {
		case porcupine.Illegal:
			res.illegal++
			res.illegalKeys = append(res.illegalKeys, part[0].Input.(regInput).key)
			bad = append(bad, part...)
		case porcupine.Unknown:
			res.unknown++
		}
	}
	if len(bad) > 0 && vizPath != "" {
		_, info := porcupine.CheckOperationsVerbose(registerModel, bad, perKey)
		var ann []porcupine.Annotation
		for _, e := range events {
			ann = append(ann, porcupine.Annotation{Tag: "nemesis", Start: e.Time, Description: e.Event, BackgroundColor: "#ffd6d6"})
		}
		info.AddAnnotations(ann)
		if err := porcupine.VisualizePath(registerModel, info, vizPath); err == nil {
			res.vizPath = vizPath
		}
	}
	res.elapsed = time.Since(start)
	return res
}

// durResult is the outcome of the durability check.
type durResult struct {
	keys, acked, lost int
	examples          []string
}

// checkDurable checks, for every register key, that the final read (made
// after the final heal and a restart of every node) reflects every
// acknowledged write: the value read must come from a write that did not
// complete before an acknowledged write was invoked. An acked write is
// lost when the final value is absent, unknown, or older than it.
// (Counter keys are checked by checkCounters: their values repeat.)
func checkDurable(ops []Op) durResult {
	var res durResult
	final := map[string]Op{}
	// key → value → the writes of it: one put or cas for a register's
	// unique values, every delete for "" (absent).
	writes := map[string]map[string][]Op{}
	var acked []Op
	for _, op := range ops {
		if op.Counter {
			continue
		}
		if op.Final {
			if op.Status == statusOK {
				final[op.Key] = op
			}
			continue
		}
		if op.Kind == kindGet || op.Status == statusFail || (op.Status == statusOK && op.Kind == kindCas && !op.Swapped) {
			continue
		}
		if writes[op.Key] == nil {
			writes[op.Key] = map[string][]Op{}
		}
		writes[op.Key][op.Value] = append(writes[op.Key][op.Value], op)
		if op.Status == statusOK {
			acked = append(acked, op)
		}
	}
	res.keys = len(writes)
	res.acked = len(acked)
	for _, w := range acked {
		f, ok := final[w.Key]
		var why string
		switch {
		case !ok:
			why = "no final read succeeded"
		case len(writes[w.Key][f.Read]) == 0 && f.Read == "":
			why = "key absent, and never deleted"
		case len(writes[w.Key][f.Read]) == 0:
			why = fmt.Sprintf("final value %q was never written", f.Read)
		default:
			why = fmt.Sprintf("final value %q was written before this write started", f.Read)
			for _, src := range writes[w.Key][f.Read] {
				if src.Status != statusOK || src.Return >= w.Call {
					why = ""
				}
			}
		}
		if why != "" {
			res.lost++
			if len(res.examples) < 5 {
				res.examples = append(res.examples, fmt.Sprintf("key %s: acked %s %q (call %v, return %v) lost: %s",
					w.Key, w.Kind, w.Value, time.Duration(w.Call), time.Duration(w.Return), why))
			}
		}
	}
	return res
}

// ctrResult is the outcome of the exactly-once counter check.
type ctrResult struct {
	counters, acked, indeterminate int
	// below: increments lost (value under the range, or absent/unreadable
	// with increments acked); above: increments applied more often than
	// acknowledged, or a value that is not a number.
	below, above int
	lines        []string
}

// checkCounters checks every counter's final value against its
// increments: exactly the acknowledged ones, plus up to the indeterminate
// ones. A write applied twice (a retry not deduplicated) or a dedup answer
// that reported failure for an applied increment pushes the value above
// the range; a lost increment pushes it below.
func checkCounters(ops []Op) ctrResult {
	var res ctrResult
	type ctr struct {
		acked, info int
		final       string
		read        bool
	}
	ctrs := map[string]*ctr{}
	get := func(k string) *ctr {
		if ctrs[k] == nil {
			ctrs[k] = &ctr{}
		}
		return ctrs[k]
	}
	for _, op := range ops {
		if !op.Counter {
			continue
		}
		c := get(op.Key)
		switch {
		case op.Final && op.Status == statusOK:
			c.final, c.read = op.Read, true
		case op.Kind == kindCas && op.Status == statusOK && op.Swapped:
			c.acked++
		case op.Kind == kindCas && op.Status == statusInfo:
			c.info++
		}
	}
	keys := make([]string, 0, len(ctrs))
	for k := range ctrs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	res.counters = len(keys)
	for _, k := range keys {
		c := ctrs[k]
		res.acked += c.acked
		res.indeterminate += c.info
		v := 0
		ok := c.read
		if c.read && c.final != "" {
			n, err := strconv.Atoi(c.final)
			v, ok = n, err == nil
		}
		verdict := "ok"
		switch {
		case !ok && c.read:
			verdict = "ANOMALY: not a number"
			res.above++
		case !c.read || v < c.acked:
			verdict = "ANOMALY: acknowledged increments lost"
			res.below++
		case v > c.acked+c.info:
			verdict = "ANOMALY: more increments applied than made"
			res.above++
		}
		res.lines = append(res.lines, fmt.Sprintf("counter %s: final=%s expected [%d, %d] (acked %d, indeterminate %d): %s",
			k, orNone(c.final, c.read), c.acked, c.acked+c.info, c.acked, c.info, verdict))
	}
	return res
}

func orNone(v string, read bool) string {
	switch {
	case !read:
		return "<unread>"
	case v == "":
		return "<absent>"
	}
	return v
}

// excerpt renders the ops of key around a time, for reports.
func excerpt(ops []Op, key string, limit int) string {
	var b strings.Builder
	n := 0
	for _, op := range ops {
		if op.Key != key {
			continue
		}
		if n++; n > limit {
			fmt.Fprintf(&b, "  ...\n")
			break
		}
		ret := "?"
		if op.Return >= 0 {
			ret = time.Duration(op.Return).Round(time.Millisecond).String()
		}
		fmt.Fprintf(&b, "  c%-3d %-4s %-4s value=%q expect=%q read=%q swapped=%v [%v, %s] %s\n",
			op.Client, op.Status, op.Kind, op.Value, op.Expect, op.Read, op.Swapped,
			time.Duration(op.Call).Round(time.Millisecond), ret, op.Err)
	}
	return b.String()
}

package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/proto/kvpb"
)

// TestStatusShowsCorruptionAlarms: an alarm any node reports is listed
// once, in the table and in JSON.
func TestStatusShowsCorruptionAlarms(t *testing.T) {
	al := &kvpb.CorruptionAlarm{Shard: 2, Node: 3, Reason: "state hash differs"}
	st := []client.NodeStatus{
		{ID: 1, Healthy: true, Status: &kvpb.StatusResponse{Node: 1, Alarms: []*kvpb.CorruptionAlarm{al}}},
		{ID: 3, Healthy: true, Status: &kvpb.StatusResponse{Node: 3, Alarms: []*kvpb.CorruptionAlarm{al}}},
		{ID: 2, Healthy: true, Status: &kvpb.StatusResponse{Node: 2}},
	}
	var out bytes.Buffer
	if err := (&app{stdout: &out, output: "table"}).printStatus(st); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(out.String(), "CORRUPT"); n != 1 || !strings.Contains(out.String(), "state hash differs") {
		t.Fatalf("table shows the alarm %d times:\n%s", n, out.String())
	}
	out.Reset()
	if err := (&app{stdout: &out, output: "json"}).printStatus(st); err != nil {
		t.Fatal(err)
	}
	var j struct {
		Alarms []jsonAlarm `json:"alarms"`
	}
	if err := json.Unmarshal(out.Bytes(), &j); err != nil {
		t.Fatal(err)
	}
	if len(j.Alarms) != 1 || j.Alarms[0].Shard != 2 || j.Alarms[0].Node != 3 || j.Alarms[0].Reporter != 1 {
		t.Fatalf("json alarms %+v", j.Alarms)
	}
	// Without alarms the table has no alarm section.
	out.Reset()
	if err := (&app{stdout: &out, output: "table"}).printStatus(st[2:]); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out.String(), "ALARM") {
		t.Fatalf("alarm section without alarms:\n%s", out.String())
	}
}

// TestAlarmViewOrder: alarms are listed by shard, then node, across the
// whole range of ids (a node id may be any uint64).
func TestAlarmViewOrder(t *testing.T) {
	const big = 1 << 63
	alarms := []*kvpb.CorruptionAlarm{
		{Shard: big + 5, Node: 1}, {Shard: 1, Node: big + 5}, {Shard: 1, Node: 2},
	}
	got := alarmView([]client.NodeStatus{{ID: 1, Status: &kvpb.StatusResponse{Alarms: alarms}}})
	want := [][2]uint64{{1, 2}, {1, big + 5}, {big + 5, 1}}
	if len(got) != len(want) {
		t.Fatalf("alarmView = %+v", got)
	}
	for i, w := range want {
		if got[i].Shard != w[0] || got[i].Node != w[1] {
			t.Fatalf("alarm %d is (shard %d, node %d), want (%d, %d): %+v", i, got[i].Shard, got[i].Node, w[0], w[1], got)
		}
	}
}

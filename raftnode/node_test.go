package raftnode

import (
	"fmt"
	"strings"
	"testing"

	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

func TestDropCoveredCommits(t *testing.T) {
	// app: an append to peer to with commit c and n entries; hb: a heartbeat.
	app := func(to, c uint64, n int) *pb.Message {
		m := &pb.Message{Type: pb.MsgApp.Enum(), To: proto.Uint64(to), Commit: proto.Uint64(c)}
		for i := 0; i < n; i++ {
			m.Entries = append(m.Entries, &pb.Entry{Data: []byte("x")})
		}
		return m
	}
	hb := func(to, c uint64) *pb.Message {
		return &pb.Message{Type: pb.MsgHeartbeat.Enum(), To: proto.Uint64(to), Commit: proto.Uint64(c)}
	}
	show := func(ms []*pb.Message) string {
		var s []string
		for _, m := range ms {
			s = append(s, fmt.Sprintf("%s→%d c%d e%d", m.GetType(), m.GetTo(), m.GetCommit(), len(m.GetEntries())))
		}
		return strings.Join(s, ", ")
	}
	for _, tc := range []struct {
		name string
		in   []*pb.Message
		keep []int // indexes of in that stay, in order
	}{
		{"commit bump, then entries with that commit: dropped",
			[]*pb.Message{app(2, 7, 0), app(3, 7, 0), app(2, 7, 3), app(3, 7, 3)}, []int{2, 3}},
		{"entries carry a higher commit: dropped",
			[]*pb.Message{app(2, 7, 0), app(2, 9, 1)}, []int{1}},
		{"entries carry a lower commit: kept",
			[]*pb.Message{app(2, 7, 0), app(2, 6, 1)}, []int{0, 1}},
		{"entries to another peer: kept",
			[]*pb.Message{app(2, 7, 0), app(3, 7, 1)}, []int{0, 1}},
		{"entries before the bump, not after: kept",
			[]*pb.Message{app(2, 6, 1), app(2, 7, 0)}, []int{0, 1}},
		{"a heartbeat does not carry the commit for an append",
			[]*pb.Message{app(2, 7, 0), hb(2, 7)}, []int{0, 1}},
		{"other messages keep their place",
			[]*pb.Message{hb(3, 5), app(2, 7, 0), hb(2, 7), app(2, 7, 2), hb(3, 7)}, []int{0, 2, 3, 4}},
		{"nothing to drop", nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var want []*pb.Message
			for _, i := range tc.keep {
				want = append(want, tc.in[i])
			}
			got := dropCoveredCommits(append([]*pb.Message(nil), tc.in...))
			if show(got) != show(want) || len(got) != len(want) {
				t.Fatalf("got  [%s]\nwant [%s]", show(got), show(want))
			}
			for i := range got {
				if got[i] != want[i] {
					t.Fatalf("message %d is not the one kept", i)
				}
			}
		})
	}
}

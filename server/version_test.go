package server

import (
	"context"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/kvd/kvd/internal/testkit"
	"github.com/kvd/kvd/proto/kvpb"
	"github.com/kvd/kvd/proto/peerpb"
	"github.com/kvd/kvd/transport"
)

// Every unary call on the peer port from a node of a release whose peer
// protocol this node does not speak is refused with FailedPrecondition and
// one line naming both versions, logged at ERROR; a call that announces
// no version (a build from before versions) or this build's is served.
func TestPeerCallOfUnknownProtocolRefused(t *testing.T) {
	var logs testkit.LogBuffer
	c := newTestCluster(t, 1, 1, func(cfg *Config) { cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil)) })
	s := c.servers[0]
	conn, err := grpc.NewClient(s.PeerAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cluster := strconv.FormatUint(s.clusterMap().GetClusterId(), 16)
	calls := map[string]func(context.Context) error{
		"Cluster.Map": func(ctx context.Context) error {
			_, err := kvpb.NewClusterClient(conn).Map(ctx, &kvpb.MapRequest{})
			return err
		},
		"Cluster.MemberAdd": func(ctx context.Context) error {
			_, err := kvpb.NewClusterClient(conn).MemberAdd(ctx, &kvpb.MemberAddRequest{Member: &kvpb.Member{Id: 7, PeerAddr: "127.0.0.1:1"}})
			return err
		},
		"Internal.AuthState": func(ctx context.Context) error {
			_, err := peerpb.NewInternalClient(conn).AuthState(ctx, &peerpb.AuthStateRequest{})
			return err
		},
		"Internal.Propose": func(ctx context.Context) error {
			_, err := peerpb.NewInternalClient(conn).Propose(ctx, &peerpb.ProposeRequest{Shard: 1})
			return err
		},
		"forwarded KV.Get": func(ctx context.Context) error {
			_, err := kvpb.NewKVClient(conn).Get(ctx, &kvpb.GetRequest{Key: []byte("k")})
			return err
		},
	}
	want := "node 9 at 127.0.0.1:"
	for name, call := range calls {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		ctx = metadata.AppendToOutgoingContext(ctx, "kvd-cluster-id", cluster, "kvd-from", "9")
		future := metadata.AppendToOutgoingContext(ctx, "kvd-peer-protocol", "3", "kvd-peer-protocol-min", "3")
		err := call(future)
		cancel()
		msg := status.Convert(err).Message()
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(msg, want) ||
			!strings.Contains(msg, "speaks peer protocol 3; node 1 speaks "+transport.Spoken().String()) || strings.Contains(msg, "\n") {
			t.Errorf("%s from peer protocol 3 = %v; want FailedPrecondition in one line naming both versions", name, err)
		}
	}
	waitFor(t, 10*time.Second, "the refusal logged at ERROR", func() bool {
		return logs.HasError("refused a peer call", "speaks peer protocol 3")
	})
	if m := member(s.clusterMap(), 7); m != nil {
		t.Fatalf("a member add from peer protocol 3 added %v", m)
	}
	for _, announce := range [][]string{nil, transport.Spoken().Pairs()} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		ctx = metadata.AppendToOutgoingContext(ctx, append([]string{"kvd-cluster-id", cluster, "kvd-from", "9"}, announce...)...)
		err := calls["Cluster.Map"](ctx)
		cancel()
		if err != nil {
			t.Errorf("Map announcing %v = %v; want it served", announce, err)
		}
	}
}

// A joining node announces its peer protocol on MemberAdd at a member's
// client port; one the member does not speak is not added, one it speaks
// joins.
func TestJoinerOfUnknownProtocolRefused(t *testing.T) {
	c := newTestCluster(t, 1, 1, nil)
	s := c.servers[0]
	conn, err := grpc.NewClient(s.ClientAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	add := func(ctx context.Context, id uint64) error {
		_, err := kvpb.NewClusterClient(conn).MemberAdd(ctx, &kvpb.MemberAddRequest{Member: &kvpb.Member{Id: id, PeerAddr: "127.0.0.1:" + strconv.FormatUint(id, 10)}})
		return err
	}
	err = add(metadata.AppendToOutgoingContext(ctx, "kvd-peer-protocol", "3"), 7)
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "node 7 at 127.0.0.1:7 speaks peer protocol 3; node 1 speaks "+transport.Spoken().String()) {
		t.Fatalf("MemberAdd of a peer protocol 3 node = %v; want FailedPrecondition naming both versions", err)
	}
	if m := member(s.clusterMap(), 7); m != nil {
		t.Fatalf("node 7 was added: %v", m)
	}
	// kvd --join announces this build's versions: the node joins.
	c.joinNode(2, 0)
	waitFor(t, 10*time.Second, "node 2 in the map", func() bool { return member(s.clusterMap(), 2) != nil })
}

// recordingInternal records the metadata of the Internal calls it serves.
type recordingInternal struct {
	peerpb.UnimplementedInternalServer
	md chan metadata.MD
}

func (r *recordingInternal) AuthState(ctx context.Context, _ *peerpb.AuthStateRequest) (*peerpb.AuthStateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	r.md <- md
	return &peerpb.AuthStateResponse{}, nil
}

// A node's own calls to its peers announce the peer protocol versions it
// speaks, with its cluster and node id.
func TestPeerCallsAnnounceProtocol(t *testing.T) {
	c := newTestCluster(t, 1, 1, nil)
	s := c.servers[0]
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rec := &recordingInternal{md: make(chan metadata.MD, 1)}
	srv := grpc.NewServer()
	peerpb.RegisterInternalServer(srv, rec)
	go srv.Serve(lis) //nolint:errcheck // returns when the server stops
	defer srv.Stop()
	conn, err := s.peerConn(lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := peerpb.NewInternalClient(conn).AuthState(ctx, &peerpb.AuthStateRequest{}); err != nil {
		t.Fatal(err)
	}
	md := <-rec.md
	got, err := transport.ProtocolsOf(md)
	if err != nil || got != transport.Spoken() || len(md.Get(transport.MetadataProtocol)) != 1 {
		t.Fatalf("the call announced %v (%v), metadata %v; want %v", got, err, md, transport.Spoken())
	}
}

package transport

import (
	"context"
	"errors"
	"fmt"
	"io"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/kvd/kvd/proto/peerpb"
)

// snapJob is a MsgSnap waiting for a snapshot worker.
type snapJob struct {
	shard uint64
	m     *raftpb.Message
}

// queueSnapshot hands a MsgSnap to the snapshot workers without blocking.
// Raft pauses replication to a follower until ReportSnapshot, so failing
// fast when the queue is full costs one retry, not progress.
func (t *Transport) queueSnapshot(shard uint64, m *raftpb.Message) {
	if t.ctx.Err() != nil {
		return
	}
	select {
	case t.snapq <- snapJob{shard: shard, m: m}:
	default:
		t.stats.snapshotsFailed.Add(1)
		t.cfg.Handler.ReportSnapshot(shard, m.GetTo(), true)
	}
}

// snapshotWorker is one of snapshotWorkers goroutines that send snapshots;
// their number is the bound on snapshots in flight.
func (t *Transport) snapshotWorker() {
	for {
		select {
		case <-t.ctx.Done():
			return
		case job := <-t.snapq:
			t.sendSnapshot(job)
		}
	}
}

// sendSnapshot streams one snapshot and reports its outcome to raft.
func (t *Transport) sendSnapshot(job snapJob) {
	to := job.m.GetTo()
	err := t.streamSnapshot(job)
	if err != nil {
		t.stats.snapshotsFailed.Add(1)
		if t.ctx.Err() == nil {
			t.log.Warn("transport: send snapshot failed", "shard", job.shard, "peer", to, "err", err)
		}
	} else {
		t.stats.snapshotsSent.Add(1)
	}
	t.cfg.Handler.ReportSnapshot(job.shard, to, err != nil)
}

// streamSnapshot opens the shard's state, rewrites the MsgSnap's metadata to
// the state's, and streams header then pairs on a Snapshot RPC over a
// connection of its own: a multi-megabyte snapshot then shares neither a
// stream nor a TCP send buffer with heartbeats, and it does not matter
// which side of the pair owns the Stream.
func (t *Transport) streamSnapshot(job snapJob) (err error) {
	to := job.m.GetTo()
	p := t.peer(to)
	if p == nil {
		return fmt.Errorf("transport: snapshot of shard %d to %d: %w", job.shard, to, ErrUnknownPeer)
	}
	if t.cfg.Snapshots == nil {
		return ErrNoSnapshotSource
	}
	r, err := t.cfg.Snapshots.OpenSnapshot(job.shard)
	if err != nil {
		return fmt.Errorf("transport: open snapshot of shard %d: %w", job.shard, err)
	}
	defer func() {
		if cerr := r.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("transport: close snapshot of shard %d: %w", job.shard, cerr)
		}
	}()
	md := r.Metadata()
	if md == nil {
		return fmt.Errorf("transport: snapshot of shard %d has no metadata", job.shard)
	}
	// Clone: the header must describe the state the reader streams, not the
	// (older) one raft asked for, and the caller's message stays untouched.
	m := proto.Clone(job.m).(*raftpb.Message)
	m.Snapshot = &raftpb.Snapshot{Metadata: md}
	header, err := proto.Marshal(m)
	if err != nil {
		return fmt.Errorf("transport: marshal snapshot header of shard %d: %w", job.shard, err)
	}

	addr := p.address()
	cc, err := grpc.NewClient(addr, t.dialOpts...)
	if err != nil {
		return fmt.Errorf("transport: dial peer %d for snapshot: %w", to, err)
	}
	defer cc.Close()
	ctx, cancel := context.WithCancel(p.ctx) // ends on Stop
	defer cancel()
	sctx, err := t.outgoing(ctx, to)
	if err != nil {
		return err
	}
	stream, err := peerpb.NewRaftClient(cc).Snapshot(sctx)
	if err != nil {
		return fmt.Errorf("transport: open snapshot stream to peer %d: %w", to, err)
	}
	// The receiver answers with its identity before it reads anything; a
	// refusal ends the stream without one.
	hdr, err := stream.Header()
	if err != nil || len(hdr.Get(mdNode)) == 0 {
		if _, rerr := stream.CloseAndRecv(); rerr != nil {
			err = rerr
		}
		if err == nil {
			err = fmt.Errorf("%w: node %d at %s answered without its identity", ErrProtocol, to, addr)
		}
		t.refused(err, stream.Trailer(), to, addr, "snapshot")
		return fmt.Errorf("transport: snapshot of shard %d to peer %d: %w", job.shard, to, err)
	}
	if _, err := t.checkAnswer(hdr, to, addr); err != nil {
		t.refused(err, nil, to, addr, "snapshot")
		return fmt.Errorf("transport: snapshot of shard %d: %w", job.shard, err)
	}
	chunk := &peerpb.SnapshotChunk{From: t.id, To: to, Shard: job.shard, Header: header}
	if err := stream.Send(chunk); err != nil {
		return snapshotSendError(stream, to, job.shard, err)
	}
	for {
		pairs, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("transport: read snapshot of shard %d: %w", job.shard, err)
		}
		if len(pairs) == 0 {
			continue
		}
		chunk := &peerpb.SnapshotChunk{From: t.id, To: to, Shard: job.shard, Pairs: pairs}
		if err := stream.Send(chunk); err != nil {
			return snapshotSendError(stream, to, job.shard, err)
		}
	}
	if err := stream.Send(&peerpb.SnapshotChunk{From: t.id, To: to, Shard: job.shard, Last: true}); err != nil {
		return snapshotSendError(stream, to, job.shard, err)
	}
	if _, err := stream.CloseAndRecv(); err != nil {
		return fmt.Errorf("transport: snapshot of shard %d to peer %d: %w", job.shard, to, err)
	}
	return nil
}

// snapshotSendError turns a failed Send into the receiver's verdict: gRPC
// returns io.EOF from Send when the server ended the RPC, and the reason
// (the handler's error) is only available from CloseAndRecv.
func snapshotSendError(stream peerpb.Raft_SnapshotClient, to, shard uint64, err error) error {
	if errors.Is(err, io.EOF) {
		if _, rerr := stream.CloseAndRecv(); rerr != nil {
			err = rerr
		}
	}
	return fmt.Errorf("transport: send snapshot of shard %d to peer %d: %w", shard, to, err)
}

// decodeSnapshotHeader unmarshals and checks the header chunk's message.
func decodeSnapshotHeader(header []byte) (*raftpb.Message, error) {
	if len(header) == 0 {
		return nil, fmt.Errorf("%w: first snapshot chunk has no header", ErrProtocol)
	}
	m := new(raftpb.Message)
	if err := proto.Unmarshal(header, m); err != nil {
		return nil, fmt.Errorf("%w: snapshot header: %v", ErrProtocol, err)
	}
	if m.GetType() != raftpb.MsgSnap || m.GetSnapshot().GetMetadata() == nil {
		return nil, fmt.Errorf("%w: snapshot header is %v, want MsgSnap with metadata", ErrProtocol, m.GetType())
	}
	return m, nil
}

// snapshotReceiver is the pull side of an incoming snapshot: next reads one
// chunk from the gRPC stream per call, so memory stays at one chunk.
type snapshotReceiver struct {
	t       *Transport
	stream  peerpb.Raft_SnapshotServer
	pending []*peerpb.SnapshotPair // pairs received but not yet returned
	last    bool                   // the last chunk has been received
}

func (r *snapshotReceiver) next() ([]*peerpb.SnapshotPair, error) {
	for {
		if len(r.pending) > 0 {
			p := r.pending
			r.pending = nil
			return p, nil
		}
		if r.last {
			return nil, io.EOF
		}
		if r.t.ctx.Err() != nil {
			return nil, ErrStopped
		}
		c, err := recvWithin(r.stream.Recv, snapshotChunkTimeout)
		if errors.Is(err, io.EOF) {
			return nil, ErrSnapshotTruncated
		}
		if err != nil {
			return nil, fmt.Errorf("transport: receive snapshot chunk: %w", err)
		}
		r.pending, r.last = c.GetPairs(), c.GetLast()
	}
}

package server

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"

	"github.com/kvd/kvd/proto/kvpb"
)

// ErrNodeFailed marks the failure of a node that cannot be trusted to serve
// any more: its storage engine failed, one of its Raft replicas stopped on
// an error, or its peers refused it (its data dir is not the one the
// cluster knew). It is wrapped by a *FailedError.
var ErrNodeFailed = errors.New("node failed")

// FailedError is why a node became fatal. Clients see its message with
// codes.Unavailable on every KV request, so they fail over to another
// replica; the node only recovers by restarting.
type FailedError struct {
	Node   uint64
	Reason error
}

func (e *FailedError) Error() string {
	return fmt.Sprintf("node %d failed: %v; it must be restarted", e.Node, e.Reason)
}

func (e *FailedError) Unwrap() error        { return e.Reason }
func (e *FailedError) Is(target error) bool { return target == ErrNodeFailed }

// fatalScan is how often the watcher looks for replicas that stopped on an
// error; the engine's failure it notices at once.
const fatalScan = 100 * time.Millisecond

// Fatal delivers, once, the error that made the node fatal. The node then
// answers NOT_SERVING on the gRPC health service and 503 on /healthz and
// /readyz, and refuses every KV request; the embedder is expected to Stop
// it and exit (cmd/kvd does).
func (s *Server) Fatal() <-chan error { return s.fatal.c }

// failure returns why the node is fatal, or nil.
func (s *Server) failure() error {
	if p := s.fatal.err.Load(); p != nil {
		return *p
	}
	return nil
}

// setFatal makes the node fatal with reason, unless it already is.
func (s *Server) setFatal(reason error) {
	var err error = &FailedError{Node: s.cfg.NodeID, Reason: reason}
	if !s.fatal.err.CompareAndSwap(nil, &err) {
		return
	}
	s.log.Error("node failed; refusing every request until it is restarted", "err", reason)
	// Shutdown sets every service NOT_SERVING and ignores later
	// updates, so nothing can flip it back.
	s.health.Shutdown()
	s.fatal.c <- err
}

// watchFatal makes the node fatal when the engine fails or a replica stops
// on an error. Replicas come and go (joins, new placements), so they are
// scanned rather than each watched.
func (s *Server) watchFatal() {
	defer s.wg.Done()
	t := time.NewTicker(fatalScan)
	defer t.Stop()
	files := s.engine.Paths()
	opened := make([]os.FileInfo, len(files))
	for i, f := range files {
		opened[i], _ = os.Stat(f)
	}
	for i := 0; ; i++ {
		select {
		case <-s.stopc:
			return
		case <-s.engine.Failed():
			s.setFatal(fmt.Errorf("storage engine: %w", s.engine.Err()))
			return
		case <-t.C:
		}
		for _, n := range s.host.Nodes() {
			select {
			case <-n.Done():
				if err := n.Err(); err != nil {
					s.setFatal(fmt.Errorf("raft replica of shard %d stopped: %w", n.Shard(), err))
					return
				}
			default:
			}
		}
		// A data dir removed (or replaced) under a running node leaves
		// it writing to files no restart will find: every write it
		// acknowledges from then on would be lost. Unlinked files stay
		// writable, so the engine itself never notices.
		if i%dataDirScanEvery == 0 {
			for j, f := range files {
				if opened[j] == nil {
					continue
				}
				if now, err := os.Stat(f); err != nil || !os.SameFile(opened[j], now) {
					s.setFatal(fmt.Errorf("data dir %s lost: %s is gone or replaced (%v)", s.cfg.DataDir, f, err))
					return
				}
			}
		}
	}
}

// dataDirScanEvery is how many fatal scans pass between checks that the
// data dir is still the one the node opened: once a second.
const dataDirScanEvery = int(time.Second / fatalScan)

// isKV reports whether a full gRPC method name is of the KV service, whose
// answers a failed node must not give.
func isKV(method string) bool {
	return strings.HasPrefix(method, "/"+kvpb.KV_ServiceDesc.ServiceName+"/")
}

// refuseUnaryIfFailed and refuseStreamIfFailed refuse KV requests once the
// node is fatal: a failed engine may answer reads from a state that lost
// acknowledged writes.
func (s *Server) refuseUnaryIfFailed(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := s.failure(); err != nil && isKV(info.FullMethod) {
		return nil, s.toStatus(err, 0)
	}
	return handler(ctx, req)
}

func (s *Server) refuseStreamIfFailed(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if !isKV(info.FullMethod) {
		return handler(srv, ss)
	}
	if err := s.failure(); err != nil {
		return s.toStatus(err, 0)
	}
	return handler(srv, refusingStream{ss, s})
}

// refusingStream ends a KV stream opened before the node became fatal at
// its next request. The handler is usually already blocked in RecvMsg when
// the node fails, so the check also runs after a message arrives.
type refusingStream struct {
	grpc.ServerStream
	s *Server
}

func (r refusingStream) RecvMsg(m any) error {
	if err := r.s.failure(); err != nil {
		return r.s.toStatus(err, 0)
	}
	if err := r.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if err := r.s.failure(); err != nil {
		return r.s.toStatus(err, 0)
	}
	return nil
}

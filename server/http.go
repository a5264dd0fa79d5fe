package server

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/pprof"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// readyLag is how far a replica's applied index may trail its commit index
// for the node to count as caught up.
const readyLag = 1000

// httpHandler serves /metrics, /healthz, /readyz (and /debug/pprof/ with EnablePprof) on the
// metrics listener.
func (s *Server) httpHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		if err := s.failure(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "failed: %v\n", err)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("/metrics", promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := s.NotReady(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "not ready: %v\n", err)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	if s.cfg.EnablePprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// shardsWithoutLeader lists local shards whose leader is not known.
func (s *Server) shardsWithoutLeader() []uint64 {
	var out []uint64
	for _, n := range s.host.Nodes() {
		if n.Leader() == 0 {
			out = append(out, n.Shard())
		}
	}
	return out
}

// shardsBehind lists local shards whose applied index trails their commit
// index by more than readyLag entries.
func (s *Server) shardsBehind() []uint64 {
	var out []uint64
	for _, n := range s.host.Nodes() {
		if n.Commit() > n.Applied()+readyLag {
			out = append(out, n.Shard())
		}
	}
	return out
}

// NotReady says why the node is not ready to serve, or nil when it is:
// it has not failed, every shard it hosts has a leader and has caught up,
// and the cluster map lists its addresses. /readyz answers it; embedders
// (package embed) wait on it.
func (s *Server) NotReady() error {
	if err := s.failure(); err != nil {
		return fmt.Errorf("failed: %w", err)
	}
	if missing := s.shardsWithoutLeader(); len(missing) > 0 {
		return fmt.Errorf("shards without a leader: %v", missing)
	}
	if behind := s.shardsBehind(); len(behind) > 0 {
		return fmt.Errorf("shards still catching up: %v", behind)
	}
	if !s.published.Load() {
		// Clients find members through the map: a node it does not
		// list yet is unreachable for them.
		return errors.New("this node's addresses are not yet in the cluster map")
	}
	return nil
}

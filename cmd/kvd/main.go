// Command kvd runs a kvd node. With no flags it is a usable single-node
// store in ./kvd-data on 127.0.0.1 (client 2379, peer 2380, metrics 2381).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/kvd/kvd/embed"
	"github.com/kvd/kvd/internal/version"
	"github.com/kvd/kvd/server"
	"github.com/kvd/kvd/transport"
)

// Exit codes.
const (
	exitOK     = 0
	exitFailed = 1
	exitUsage  = 2
	// exitNodeFailed: the node failed while running (its storage, a Raft
	// replica, or its peers refused its identity) and stopped serving.
	exitNodeFailed = 3
)

// fatalGrace is how long a node that failed keeps answering before it
// exits: NOT_SERVING on health, 503 on /healthz, Unavailable with the
// reason on KV requests, so health checkers and clients that poll see why
// it went away rather than only a refused connection. It is short because
// the node serves nothing meanwhile and its supervisor should restart it.
const fatalGrace = time.Second

// fatalStopTimeout bounds Stop after a failure: a node whose disk failed
// may hang closing it, and must exit all the same.
const fatalStopTimeout = 10 * time.Second

func main() {
	setGCPercent()
	setMemoryLimit()
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr, nil))
}

// defaultGOGC is the garbage collector's target unless the GOGC
// environment variable sets one. A node's live heap is small and bounded
// (each shard's log cache, and what admission lets in), while it allocates
// fast under load. Collection work per second follows the allocation
// rate divided by GOGC, so Go's default of 100 spent a large share of the
// CPU collecting a small heap. 300, with the log cache cut to 256 KiB per
// shard, kept the nodes' memory about where it was and made puts faster
// (a681cab has the measurements). GOMEMLIMIT still caps the heap when set.
const defaultGOGC = 300

func setGCPercent() {
	if _, ok := os.LookupEnv("GOGC"); !ok {
		debug.SetGCPercent(defaultGOGC)
	}
}

// defaultMemoryLimit is the soft memory limit of the Go runtime unless the
// GOMEMLIMIT environment variable sets one. With GOGC=300 the heap may grow
// to four times what is live before a collection; under a flood of large
// requests what is live is bounded by admission (--max-inflight-bytes) and
// the per-stream bounds, but four times it is not. The limit makes the
// collector work harder as the heap nears it instead, which keeps a node
// under 512 MiB resident in make flood (docs/memory.md).
const defaultMemoryLimit = 384 << 20

func setMemoryLimit() {
	if _, ok := os.LookupEnv("GOMEMLIMIT"); !ok {
		debug.SetMemoryLimit(defaultMemoryLimit)
	}
}

// run parses args and runs a node until SIGINT/SIGTERM (or until stop is
// closed, for tests). It returns the process exit code. --help and
// --version print to stdout, as a user piping them to less expects;
// everything else (logs, errors) goes to stderr.
func run(args []string, stdout, stderr io.Writer, stop <-chan struct{}) int {
	def := embed.DefaultConfig()
	var (
		cfg            embed.Config
		initialCluster string
		logLevel       string
		showVersion    bool
	)
	cmd := &cobra.Command{
		Use:   "kvd",
		Short: "kvd is a Raft-replicated, sharded key-value store node",
		Long: `kvd runs one node of a kvd cluster. Each node hosts replicas of many shards
(Raft groups); keys map to shards by a consistent-hash ring.

With no flags, kvd starts a usable single-node store in ./kvd-data listening
on 127.0.0.1 (client 2379, peer 2380, metrics 2381).

Every flag can also be set by an environment variable KVD_<FLAG>, with
dashes as underscores: --data-dir is KVD_DATA_DIR. A flag on the command
line wins over the environment.

A node that restarts on an existing data dir recovers from it and ignores
the bootstrap flags (--initial-cluster, --shards, --replicas); if they are
given and describe another cluster, kvd refuses to start.

kvd runs Go's garbage collector with GOGC=300 unless the GOGC environment
variable says otherwise, and with a soft memory limit of 384 MiB unless
GOMEMLIMIT sets another (e.g. GOMEMLIMIT=200MiB, or GOMEMLIMIT=off).

A node started with --join on a fresh data dir adds itself to the running
cluster instead of bootstrapping. The cluster then gives it replicas of the
shards that have fewer copies than --replicas asked for at bootstrap (a
cluster bootstrapped on one node with --replicas 3 grows to three copies as
two nodes join); each new replica catches up from a snapshot as a Raft
learner before it votes.

The peer port listens on 127.0.0.1 unless --listen-peer names another
address. Without TLS, anyone who can reach it can act as a member of the
cluster: kvd says so in one line at start, as a WARN when the port
listens on a non-loopback address. --peer-cert,
--peer-key and --peer-ca turn on mutual TLS between nodes: a peer's
certificate must be signed by the CA and name the node id it claims
(kvd cert node writes such certificates; kvd cert --help). --client-cert
and --client-key serve the client port with TLS; --client-ca also
requires client certificates. /debug/pprof/ is served only with
--enable-pprof.

A node that can no longer be trusted (its storage failed, one of its Raft
replicas stopped on an error, or its peers refused it because its data dir
is not the one the cluster knew) stops serving at once: health reports
NOT_SERVING, /healthz and /readyz answer 503 with the reason, and KV
requests get Unavailable. One second later it exits with code 3 and the
reason on its last line; restart it (a refused data dir must instead join
as a new member with a new --id).`,
		Example: `  # single node
  kvd

  # a 3-node cluster on one machine (run each in its own terminal)
  kvd --id 1 --data-dir data/1 --listen-client 127.0.0.1:2379 --listen-peer 127.0.0.1:2380 --listen-metrics 127.0.0.1:2381 \
      --initial-cluster 1=127.0.0.1:2380,2=127.0.0.1:22380,3=127.0.0.1:32380
  kvd --id 2 --data-dir data/2 --listen-client 127.0.0.1:22379 --listen-peer 127.0.0.1:22380 --listen-metrics 127.0.0.1:22381 \
      --initial-cluster 1=127.0.0.1:2380,2=127.0.0.1:22380,3=127.0.0.1:32380
  (and node 3 likewise on 32379/32380/32381)

  # grow the cluster: a fourth node joins through any member
  kvd --id 4 --data-dir data/4 --listen-client 127.0.0.1:42379 --listen-peer 127.0.0.1:42380 --listen-metrics 127.0.0.1:42381 \
      --join 127.0.0.1:2379`,
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usageError{fmt.Errorf("unknown command %q: kvd takes flags only (see kvd --help)", args[0])}
			}
			return nil
		},
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	f := cmd.Flags()
	f.Uint64Var(&cfg.NodeID, "id", def.NodeID, "this node's id: a positive integer, unique in the cluster and listed in --initial-cluster")
	f.StringVar(&cfg.DataDir, "data-dir", def.DataDir, "directory for the node's data (one bbolt file holding every shard, and its write-ahead log)")
	f.StringVar(&cfg.ListenClient, "listen-client", server.DefaultClientAddr, "address for the client API (gRPC: KV, Cluster, health)")
	f.StringVar(&cfg.AdvertiseClient, "advertise-client", "", "client address other nodes and clients should dial (default: --listen-client)")
	f.StringVar(&cfg.ListenPeer, "listen-peer", server.DefaultPeerAddr, "address for Raft traffic between nodes (gRPC)")
	f.StringVar(&cfg.AdvertisePeer, "advertise-peer", "", "peer address other nodes should dial (default: --listen-peer)")
	f.StringVar(&cfg.ListenMetrics, "listen-metrics", server.DefaultMetricsAddr, "HTTP address for /metrics, /healthz, /readyz (and /debug/pprof/ with --enable-pprof); empty disables it")
	f.StringVar(&initialCluster, "initial-cluster", "", "bootstrap members as ID=HOST:PEERPORT,... (default: this node alone at its peer address)")
	f.IntVar(&cfg.Shards, "shards", def.Shards, "data shards (Raft groups) created at bootstrap; the meta shard 0 comes on top")
	f.IntVar(&cfg.Replicas, "replicas", def.Replicas, "copies of each shard, capped by the number of nodes")
	f.StringVar(&cfg.Join, "join", "", "client address(es) of running members (HOST:PORT,...): a node on a fresh data dir joins their cluster and receives replicas of shards that lack copies; give it a new --id")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	f.DurationVar(&cfg.TickInterval, "tick-interval", def.TickInterval, "length of one Raft tick")
	f.IntVar(&cfg.ElectionTicks, "election-ticks", def.ElectionTicks, "ticks without a leader before a follower campaigns (randomised up to twice this)")
	f.IntVar(&cfg.HeartbeatTicks, "heartbeat-ticks", def.HeartbeatTicks, "ticks between leader heartbeats")
	f.Uint64Var(&cfg.SnapshotEntries, "snapshot-entries", def.SnapshotEntries, "applied entries beyond the last compaction that trigger log compaction")
	f.Uint64Var(&cfg.SnapshotBytes, "snapshot-bytes", def.SnapshotBytes, "bytes of commands applied since the last compaction that trigger log compaction (whichever of this and --snapshot-entries comes first)")
	f.IntVar(&cfg.StoragePartitions, "storage-partitions", def.StoragePartitions, "how many bbolt files, each with its own writer, WAL region and Raft loop, a new data dir spreads its shards over: a shard's large writes (1 MiB transactions) then delay only the shards of its own file, but small writes cost more CPU (a WAL write, a commit and a loop pass per file). An existing data dir keeps the count it was created with (a warning says so when this differs)")
	f.DurationVar(&cfg.CommitInterval, "commit-interval", def.CommitInterval, "how long applied writes wait (durable in the WAL) before the bbolt commit that makes them visible to serializable reads; longer is cheaper, shorter is fresher")
	f.DurationVar(&cfg.SessionTTL, "session-ttl", def.SessionTTL, "idle time after which a client session's exactly-once records are dropped")
	f.Int64Var(&cfg.HistoryRevisions, "history-revisions", def.HistoryRevisions, "revisions of changes each shard keeps for reads at a revision and watches (negative: no count limit)")
	f.Int64Var(&cfg.HistoryBytes, "history-bytes", def.HistoryBytes, "bytes of history each shard keeps, previous values of overwritten and deleted keys included; the oldest revisions are trimmed beyond it (negative: no byte limit)")
	f.DurationVar(&cfg.HistoryRetention, "history-retention", def.HistoryRetention, "also drop changes older than this (0: off)")
	f.DurationVar(&cfg.WatchProgressInterval, "watch-progress-interval", def.WatchProgressInterval, "how often an idle watch is told its shard's revision")
	f.DurationVar(&cfg.CorruptionCheckInterval, "corruption-check-interval", def.CorruptionCheckInterval, "how often each shard's leader has its replicas compare state hashes; a replica that differs from the majority raises an alarm and stops serving the shard (0 disables)")
	f.DurationVar(&cfg.ScrubInterval, "scrub-interval", def.ScrubInterval, "how often the node verifies every stored value's checksum and each shard's state hash, paced to 32 MiB/s (0 disables)")
	f.DurationVar(&cfg.RequestTimeout, "request-timeout", def.RequestTimeout, "deadline for a request that arrives without one")
	f.IntVar(&cfg.Limits.MaxKeyBytes, "max-key-bytes", def.Limits.MaxKeyBytes, "largest key accepted")
	f.IntVar(&cfg.Limits.MaxValueBytes, "max-value-bytes", def.Limits.MaxValueBytes, "largest value accepted")
	f.IntVar(&cfg.Limits.MaxRequestBytes, "max-request-bytes", def.Limits.MaxRequestBytes, "largest request accepted")
	f.IntVar(&cfg.Limits.MaxTxnOps, "max-txn-ops", def.Limits.MaxTxnOps, "most compares and operations in one transaction")
	f.IntVar(&cfg.Limits.MaxInFlightBytes, "max-inflight-bytes", def.Limits.MaxInFlightBytes, "request bytes (and Batch answers not yet sent) the node holds at once before new requests get ResourceExhausted; a quarter is kept for requests of 64 KiB or less")
	f.IntVar(&cfg.Limits.MaxResponseBytes, "max-response-bytes", def.Limits.MaxResponseBytes, "largest Range page or Watch response in bytes: a page stops before it (and says there is more), a watch sends the rest next; each holds at least one key")
	f.IntVar(&cfg.Limits.MaxBatchStreamBytes, "max-batch-stream-bytes", def.Limits.MaxBatchStreamBytes, "bytes one Batch stream may hold (requests being served, answers not yet sent) before the node stops reading it")
	f.IntVar(&cfg.Limits.MaxClientConns, "max-client-conns", def.Limits.MaxClientConns, "client connections the node keeps open; more are closed on accept")
	f.IntVar(&cfg.Limits.MaxWatchStreams, "max-watch-streams", def.Limits.MaxWatchStreams, "Watch streams the node serves at once")
	f.IntVar(&cfg.Limits.MaxWatchesPerStream, "max-watches-per-stream", def.Limits.MaxWatchesPerStream, "watches one Watch stream may carry")
	f.DurationVar(&cfg.BatchSendTimeout, "batch-send-timeout", def.BatchSendTimeout, "a Batch stream whose answers could not be sent for this long (its client is not reading) ends with ResourceExhausted, and a client connection owing unary answers that wrote nothing for this long is closed")
	f.IntVar(&cfg.Limits.MaxPendingProposals, "max-pending-proposals", def.Limits.MaxPendingProposals, "writes waiting to commit per shard before new ones get ResourceExhausted")
	f.BoolVar(&cfg.EnablePprof, "enable-pprof", false, "serve /debug/pprof/ on --listen-metrics (off: a profile reveals code paths and costs CPU on demand)")
	f.StringVar(&cfg.PeerCertFile, "peer-cert", "", "this node's certificate for the peer port, naming its id (kvd cert node); with --peer-key and --peer-ca, peers must present one too (mutual TLS)")
	f.StringVar(&cfg.PeerKeyFile, "peer-key", "", "the key of --peer-cert")
	f.StringVar(&cfg.PeerCAFile, "peer-ca", "", "the CA that signs every member's peer certificate")
	f.StringVar(&cfg.ClientCertFile, "client-cert", "", "certificate the client port serves TLS with (a node certificate will do)")
	f.StringVar(&cfg.ClientKeyFile, "client-key", "", "the key of --client-cert")
	f.StringVar(&cfg.ClientCAFile, "client-ca", "", "CA of client certificates: with it, clients must present one it signed")
	f.DurationVar(&cfg.AuthTokenTTL, "auth-token-ttl", def.AuthTokenTTL, "how long a token from authentication (kvctl --user) is good for, once auth is enabled (kvctl auth enable)")
	f.BoolVar(&showVersion, "version", false, "print kvd's version (release, commit, Go version, peer protocol) and exit")

	code := exitOK
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		if showVersion {
			_, err := fmt.Fprintf(stdout, "%s, peer protocol %s\n", version.Get().Line("kvd"), transport.Spoken())
			return err
		}
		if err := applyEnv(cmd.Flags()); err != nil {
			return usageError{err}
		}
		level, err := parseLevel(logLevel)
		if err != nil {
			return usageError{err}
		}
		fl := cmd.Flags()
		if cfg.NodeID == 0 {
			return usageError{errors.New("--id must be a positive integer")}
		}
		if initialCluster != "" {
			if cfg.InitialCluster, err = server.ParseInitialCluster(initialCluster); err != nil {
				return usageError{err}
			}
		}
		cfg.BootstrapExplicit = fl.Changed("initial-cluster") || fl.Changed("shards") || fl.Changed("replicas")
		cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
		// The flags take 0 for "off"; the Config takes 0 for "default".
		offIfZero(&cfg.CorruptionCheckInterval)
		offIfZero(&cfg.ScrubInterval)
		// A kvd process always listens: an empty address takes the
		// default rather than the embedder's in-memory node.
		if cfg.ListenClient == "" {
			cfg.ListenClient = server.DefaultClientAddr
		}
		if cfg.ListenPeer == "" {
			cfg.ListenPeer = server.DefaultPeerAddr
		}

		node, err := embed.Start(context.Background(), cfg)
		if err != nil {
			if errors.Is(err, server.ErrConfig) {
				return usageError{err}
			}
			return err
		}
		sigc := make(chan os.Signal, 1)
		signal.Notify(sigc, syscall.SIGINT, syscall.SIGTERM)
		defer signal.Stop(sigc)
		select {
		case sig := <-sigc:
			cfg.Logger.Info("shutting down", "signal", sig.String())
		case <-stop:
		case err := <-node.Err():
			cfg.Logger.Error("node failed; exiting", "err", err, "grace", fatalGrace)
			time.Sleep(fatalGrace)
			stopped := make(chan struct{})
			go func() { _ = node.Close(); close(stopped) }()
			select {
			case <-stopped:
			case <-time.After(fatalStopTimeout):
				cfg.Logger.Error("node failed and did not stop in time; exiting anyway", "timeout", fatalStopTimeout)
			}
			return nodeFailedError{err}
		}
		if err := node.Close(); err != nil {
			return fmt.Errorf("shutdown: %w", err)
		}
		return nil
	}
	cmd.AddCommand(certCmd(stdout))
	cmd.SetArgs(args)
	cmd.SetOut(stdout)
	cmd.SetErr(stderr)
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	if err := cmd.Execute(); err != nil {
		var ue usageError
		var nf nodeFailedError
		code = exitFailed
		msg := oneLine(err)
		switch {
		case errors.As(err, &ue):
			code = exitUsage
		case errors.As(err, &nf):
			code, msg = exitNodeFailed, nf.line()
		}
		fmt.Fprintf(stderr, "kvd: %s\n", msg)
	}
	return code
}

type usageError struct{ error }

// nodeFailedError is a running node's failure (server.Server.Fatal).
type nodeFailedError struct{ error }

// line is the failure in one line: a reason that carries a stack (a
// storage panic) keeps only its first line here; the log has the rest.
func (e nodeFailedError) line() string {
	var fe *server.FailedError
	if !errors.As(e.error, &fe) {
		return oneLine(e.error)
	}
	reason, _, _ := strings.Cut(fe.Reason.Error(), "\n")
	return fmt.Sprintf("node %d failed: %s; it must be restarted", fe.Node, reason)
}

func (u usageError) Unwrap() error { return u.error }

// applyEnv sets every flag not given on the command line from KVD_<FLAG>.
func applyEnv(fs *pflag.FlagSet) error {
	var err error
	fs.VisitAll(func(f *pflag.Flag) {
		if err != nil || f.Changed || f.Name == "help" {
			return
		}
		name := "KVD_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := os.LookupEnv(name); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("%s=%q: %v", name, v, e)
			}
		}
	})
	return err
}

// offIfZero turns a flag's 0 ("off") into the Config's negative ("off").
func offIfZero(d *time.Duration) {
	if *d == 0 {
		*d = -1
	}
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("--log-level %q: use debug, info, warn or error", s)
	}
	return l, nil
}

func oneLine(err error) string {
	return strings.ReplaceAll(err.Error(), "\n", " ")
}

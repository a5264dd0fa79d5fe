// Command configstore keeps an application's configuration in kvd: it
// loads every key under a prefix with one scan, then watches the prefix
// from that scan's position and reloads on every change. Each instance
// registers itself under a lease (services/configstore/<id>, gone when
// the instance dies) and the instances elect one leader, which alone
// writes a heartbeat key.
//
//	go run ./examples/configstore -data-dir /tmp/cfg -listen-client 127.0.0.1:2379 -id a
//	go run ./examples/configstore -endpoints 127.0.0.1:2379 -id b
//	go run ./examples/configstore -endpoints 127.0.0.1:2379 -id c
//
// The first embeds a kvd node (with -listen-client, other processes can
// reach it); the others are clients of it. docs/config-store.md walks
// through it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"maps"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/client/concurrency"
	"github.com/kvd/kvd/embed"
	"github.com/kvd/kvd/proto/kvpb"
)

const (
	// registryPrefix holds one key per live instance.
	registryPrefix = "services/configstore/"
	// electionName is the election the instances campaign in.
	electionName = "configstore"
	// heartbeatKey is written by the leader only.
	heartbeatKey = "configstore/heartbeat"
)

func main() {
	dataDir := flag.String("data-dir", "configstore-data", "directory of the embedded kvd node (without -endpoints)")
	listen := flag.String("listen-client", "", "client address of the embedded node, so other instances can use it (empty: in-process only)")
	endpoints := flag.String("endpoints", "", "comma-separated client addresses of an existing cluster: embed no node")
	prefix := flag.String("prefix", "config/", "prefix of the configuration keys")
	id := flag.String("id", defaultID(), "this instance's id, unique among the instances")
	ttl := flag.Duration("ttl", 10*time.Second, "lease TTL: how long the registration and the leadership of a dead instance last")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	c, closeClient, err := connect(ctx, *dataDir, *listen, *endpoints)
	if err != nil {
		log.Fatal(err)
	}
	defer closeClient()
	if c == nil {
		return // interrupted before the node was ready
	}
	cfg := client.WithNamespace(c, *prefix)
	// A default the first run writes, so there is something to load.
	if _, err := cfg.Txn(ctx, &kvpb.TxnRequest{
		Compare: []*kvpb.Compare{{Key: []byte("log-level"), Target: kvpb.Compare_EXISTS, Result: kvpb.Compare_EQUAL, Exists: false}},
		Success: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: []byte("log-level"), Value: []byte("info")}}}},
	}); err != nil {
		log.Fatal(err)
	}

	s, err := concurrency.NewSession(ctx, c, concurrency.WithTTL(*ttl))
	if err != nil {
		log.Fatal(err)
	}
	// On a clean exit the lease is revoked, so the registration and any
	// leadership go at once; a crash leaves them until the TTL runs out.
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.Close(cctx)
	}()
	if err := register(ctx, s, *id); err != nil {
		log.Fatal(err)
	}
	go func() {
		err := lead(ctx, s, *id, time.Second, func() { fmt.Println("leader:", *id) })
		if err != nil && !errors.Is(err, context.Canceled) {
			log.Printf("election: %v", err)
			stop()
		}
	}()
	go observe(ctx, c, func(leader string) { fmt.Println("current leader:", leader) })

	err = follow(ctx, cfg, func(c Config) { fmt.Fprintln(os.Stdout, c) })
	if err != nil && !errors.Is(err, context.Canceled) {
		log.Fatal(err)
	}
}

func defaultID() string {
	h, _ := os.Hostname()
	return fmt.Sprintf("%s-%d", h, os.Getpid())
}

// connect returns a client of the cluster at endpoints, or of a node it
// embeds when endpoints is empty (nil when ctx ended first), and what
// closes it.
func connect(ctx context.Context, dataDir, listen, endpoints string) (*client.Client, func(), error) {
	if endpoints != "" {
		c, err := client.New(ctx, client.Config{Endpoints: strings.Split(endpoints, ",")})
		if err != nil {
			return nil, nil, fmt.Errorf("connect to %s: %w", endpoints, err)
		}
		return c, func() { _ = c.Close() }, nil
	}
	node, err := embed.Start(ctx, embed.Config{DataDir: dataDir, ListenClient: listen})
	if err != nil {
		return nil, nil, fmt.Errorf("embedded node: %w", err)
	}
	closeNode := func() { _ = node.Close() }
	select {
	case <-node.Ready():
		return node.Client(), closeNode, nil
	case err := <-node.Err():
		closeNode()
		return nil, nil, fmt.Errorf("embedded node: %w", err)
	case <-ctx.Done():
		return nil, closeNode, nil
	}
}

// register puts this instance's key under the session's lease: it exists
// while the session is renewed and vanishes with the lease.
func register(ctx context.Context, s *concurrency.Session, id string) error {
	_, err := s.Client().Put(ctx, []byte(registryPrefix+id), []byte(time.Now().UTC().Format(time.RFC3339)), client.WithLease(s.Lease()))
	if err != nil {
		return fmt.Errorf("register %s: %w", id, err)
	}
	return nil
}

// lead campaigns as id and, each time it wins, calls onLead and does the
// leader-only work (a heartbeat every interval) until ctx ends (it then
// resigns) or the session ends (its candidacy went with the lease).
func lead(ctx context.Context, s *concurrency.Session, id string, every time.Duration, onLead func()) error {
	e, err := concurrency.NewElection(s, electionName)
	if err != nil {
		return err
	}
	for {
		if err := e.Campaign(ctx, id); err != nil {
			return fmt.Errorf("campaign: %w", err)
		}
		onLead()
		err := heartbeat(ctx, s, e, id, every)
		switch {
		case errors.Is(err, concurrency.ErrNotLeader):
			continue // deposed: campaign again
		case ctx.Err() != nil:
			// Stopped: hand leadership over now rather than at expiry.
			rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_ = e.Resign(rctx)
			cancel()
		}
		// Otherwise the session ended: the candidacy goes with its lease.
		return err
	}
}

// heartbeat writes heartbeatKey every interval while this session leads.
// Proclaim first checks, in the election key's own transaction, that the
// session still leads: the election key and the heartbeat may live in
// different shards, and a transaction is atomic only within one, so a
// leader deposed between the two writes one stale heartbeat at most.
func heartbeat(ctx context.Context, s *concurrency.Session, e *concurrency.Election, id string, every time.Duration) error {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if err := e.Proclaim(ctx, id); err != nil {
			return err
		}
		if _, err := s.Client().Put(ctx, []byte(heartbeatKey), []byte(id+" "+time.Now().UTC().Format(time.RFC3339)), client.WithLease(s.Lease())); err != nil {
			return fmt.Errorf("heartbeat: %w", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.Done():
			return fmt.Errorf("session ended: %w", s.Err())
		case <-t.C:
		}
	}
}

// observe calls onChange with the leader's id each time another instance
// leads, until ctx ends.
func observe(ctx context.Context, c *client.Client, onChange func(string)) {
	leaders, err := concurrency.Observe(ctx, c, electionName)
	if err != nil {
		log.Printf("observe: %v", err)
		return
	}
	var last []byte
	for kv := range leaders {
		// Every proclaim (heartbeat) is a change of the leader's value;
		// only a new key is a new leader.
		if !slices.Equal(kv.GetKey(), last) {
			last = kv.GetKey()
			onChange(string(kv.GetValue()))
		}
	}
}

// Config is the configuration: every key under the prefix, without it.
type Config map[string]string

func (c Config) String() string {
	var b strings.Builder
	b.WriteString("config:")
	for _, k := range slices.Sorted(maps.Keys(c)) {
		fmt.Fprintf(&b, " %s=%s", k, c[k])
	}
	return b.String()
}

// load reads the whole configuration, page by page (every page of one
// scan reads each shard at the same revision), and returns the scan's
// watch token: a watch from there delivers exactly the changes made
// after the read.
func load(ctx context.Context, ns *client.Namespace) (Config, string, error) {
	cfg := Config{}
	var watchFrom, token string
	for {
		page, err := ns.Scan(ctx, nil, nil, client.ScanOptions{Token: token})
		if err != nil {
			return nil, "", fmt.Errorf("load config: %w", err)
		}
		if watchFrom == "" {
			watchFrom = page.Resume
		}
		for _, kv := range page.KVs {
			cfg[string(kv.GetKey())] = string(kv.GetValue())
		}
		if token = page.Next; token == "" {
			return cfg, watchFrom, nil
		}
	}
}

// follow loads the configuration, hands it to apply, and hands every
// later version to apply again until ctx ends or the watch fails.
func follow(ctx context.Context, ns *client.Namespace, apply func(Config)) error {
	cfg, from, err := load(ctx, ns)
	if err != nil {
		return err
	}
	apply(maps.Clone(cfg))
	for resp := range ns.Watch(ctx, nil, client.WithPrefix(), client.WithResume(from)) {
		if resp.Err != nil {
			return fmt.Errorf("watch config: %w", resp.Err)
		}
		if len(resp.Events) == 0 {
			continue
		}
		for _, ev := range resp.Events {
			k := string(ev.GetKv().GetKey())
			if ev.GetType() == kvpb.Event_DELETE {
				delete(cfg, k)
			} else {
				cfg[k] = string(ev.GetKv().GetValue())
			}
		}
		apply(maps.Clone(cfg))
	}
	return ctx.Err()
}

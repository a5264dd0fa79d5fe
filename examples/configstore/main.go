// Command configstore keeps an application's configuration in an embedded
// kvd node: it loads every key under a prefix with one scan, then watches
// the prefix from that scan's position and reloads on every change.
//
//	go run ./examples/configstore -data-dir /tmp/cfg
//
// docs/config-store.md walks through it.
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

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/embed"
	"github.com/kvd/kvd/proto/kvpb"
)

func main() {
	dataDir := flag.String("data-dir", "configstore-data", "directory of the embedded kvd node")
	prefix := flag.String("prefix", "config/", "prefix of the configuration keys")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	node, err := embed.Start(ctx, embed.Config{DataDir: *dataDir})
	if err != nil {
		log.Fatal(err)
	}
	defer node.Close()
	select {
	case <-node.Ready():
	case err := <-node.Err():
		log.Fatal(err)
	case <-ctx.Done():
		return
	}
	cfg := client.WithNamespace(node.Client(), *prefix)
	// A default the first run writes, so there is something to load.
	if _, err := cfg.Txn(ctx, &kvpb.TxnRequest{
		Compare: []*kvpb.Compare{{Key: []byte("log-level"), Target: kvpb.Compare_EXISTS, Result: kvpb.Compare_EQUAL, Exists: false}},
		Success: []*kvpb.RequestOp{{Op: &kvpb.RequestOp_Put{Put: &kvpb.PutRequest{Key: []byte("log-level"), Value: []byte("info")}}}},
	}); err != nil {
		log.Fatal(err)
	}
	err = follow(ctx, cfg, func(c Config) { fmt.Fprintln(os.Stdout, c) })
	if err != nil && !errors.Is(err, context.Canceled) {
		log.Fatal(err)
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

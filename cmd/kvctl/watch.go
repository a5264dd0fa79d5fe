package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/proto/kvpb"
)

// jsonEvent is one line of `kvctl watch -o json`.
type jsonEvent struct {
	Type string `json:"type"`
	jsonKV
	PrevValue       *string `json:"prev_value,omitempty"`
	PrevValueBase64 string  `json:"prev_value_base64,omitempty"`
	Shard           uint64  `json:"shard"`
	Resume          string  `json:"resume"`
}

func (a *app) watchCmd() *cobra.Command {
	var (
		prefix bool
		rev    int64
		resume string
		prevKV bool
		count  int
	)
	cmd := &cobra.Command{
		Use:   "watch KEY | watch --prefix PREFIX",
		Short: "Print every change of a key or of the keys with a prefix, as it happens",
		Long: `Print every change of KEY, or with --prefix of every key that starts
with PREFIX, in order, until interrupted (or --count events). From now on,
or from --rev N (revisions are per shard, so only for a key, or a prefix
on a cluster of one shard), or after the event whose resume token
--resume gives (from -o json). The watch follows leader changes, node
deaths and reconnects by itself without losing or repeating an event.

Output per event:
  simple  PUT key value | DELETE key (with --prev-kv: then the old value)
  json    one object per line: type, key, value (or key_base64,
          value_base64), create_revision, mod_revision, version, shard,
          prev_value with --prev-kv, and resume: the token that continues
          after this event

A start the shard's history no longer holds exits 1 naming the oldest
revision kept; no cluster exits 3.`,
		Example: `  kvctl watch greeting
  kvctl watch --prefix user/ -o json
  kvctl watch greeting --rev 12 --count 3
  kvctl watch --prefix user/ --resume TOKEN`,
		Args: exactArgs(1, "KEY (or PREFIX with --prefix)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			switch {
			case rev < 0:
				return usageErrorf("--rev must be positive, got %d", rev)
			case count < 0:
				return usageErrorf("--count must be ≥ 0, got %d", count)
			case rev > 0 && resume != "":
				return usageErrorf("--rev and --resume cannot be combined")
			}
			opts := []client.WatchOption{}
			if prefix {
				opts = append(opts, client.WithPrefix())
			}
			if rev > 0 {
				opts = append(opts, client.WithRevision(rev))
			}
			if resume != "" {
				opts = append(opts, client.WithResume(resume))
			}
			if prevKV {
				opts = append(opts, client.WithPrevKV())
			}
			return a.withClient(func(c *client.Client) error {
				ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
				defer stop()
				return a.watch(ctx, c, []byte(args[0]), count, opts)
			})
		},
	}
	f := cmd.Flags()
	f.BoolVar(&prefix, "prefix", false, "watch every key that starts with the argument")
	f.Int64Var(&rev, "rev", 0, "replay the changes from this revision of the key's shard on")
	f.StringVar(&resume, "resume", "", "continue after the event whose json resume token this is")
	f.BoolVar(&prevKV, "prev-kv", false, "print each key's value before the change too")
	f.IntVar(&count, "count", 0, "exit 0 after this many events (0: run until interrupted)")
	return cmd
}

func (a *app) watch(ctx context.Context, c *client.Client, key []byte, count int, opts []client.WatchOption) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	n := 0
	for r := range c.Watch(ctx, key, opts...) {
		if r.Err != nil {
			var ce *client.CompactedError
			switch {
			case errors.As(r.Err, &ce):
				return &exitError{code: exitNotFound, msg: fmt.Sprintf(
					"revision compacted: shard %d keeps its history from revision %d; start the watch at %d or later (--rev) or from now",
					ce.Shard, ce.Oldest, ce.Oldest)}
			case errors.Is(r.Err, context.Canceled) && ctx.Err() != nil:
				return nil // interrupted
			}
			return r.Err
		}
		for i, ev := range r.Events {
			if err := a.printEvent(ev, r.ResumeAfter(i)); err != nil {
				return err
			}
			if n++; count > 0 && n == count {
				return nil
			}
		}
	}
	return nil
}

func (a *app) printEvent(ev *kvpb.Event, resume string) error {
	kv, prev := ev.GetKv(), ev.GetPrevKv()
	if a.output == "json" {
		j := jsonEvent{Type: ev.GetType().String(), jsonKV: toJSONKV(kv, false), Shard: ev.GetShard(), Resume: resume}
		if prev != nil {
			text, b64 := textOrBase64(prev.GetValue())
			if b64 != "" {
				j.PrevValueBase64 = b64
			} else {
				j.PrevValue = &text
			}
		}
		b, err := json.Marshal(j)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(a.stdout, "%s\n", b)
		return err
	}
	line := fmt.Sprintf("%s %s", ev.GetType(), printable(kv.GetKey()))
	if ev.GetType() == kvpb.Event_PUT {
		line += " " + printable(kv.GetValue())
	}
	if prev != nil {
		line += " " + printable(prev.GetValue())
	}
	_, err := fmt.Fprintln(a.stdout, line)
	return err
}

// compactCmd drops history below a revision.
func (a *app) compactCmd() *cobra.Command {
	var shard uint64
	cmd := &cobra.Command{
		Use:   "compact REV",
		Short: "Drop the history of changes below a revision",
		Long: `Drop each shard's history of changes below revision REV: reads at,
and watches from, an older revision then fail with the oldest revision
kept. With --shard only that shard; without, every data shard, each
capped at its own revision + 1 (revisions are per shard). Every replica
drops the same events (the shard's leader replicates the trim).

Output: one line per shard, "shard N: history from revision M"; json: an
array of {"shard", "oldest_revision"}.`,
		Example: `  kvctl compact 1000 --shard 3
  kvctl compact 5000`,
		Args: exactArgs(1, "REV"),
		RunE: func(cmd *cobra.Command, args []string) error {
			rev, err := strconv.ParseInt(args[0], 10, 64)
			if err != nil || rev <= 0 {
				return usageErrorf("REV must be a positive revision, got %q", args[0])
			}
			return a.request(func(ctx context.Context, c *client.Client) error {
				shards := c.DataShards()
				if shard != 0 {
					shards = []uint64{shard}
				}
				type out struct {
					Shard  uint64 `json:"shard"`
					Oldest int64  `json:"oldest_revision"`
				}
				var res []out
				for _, sh := range shards {
					oldest, err := c.Compact(ctx, sh, rev)
					if err != nil {
						return err
					}
					res = append(res, out{sh, oldest})
				}
				if a.output == "json" {
					return writeJSON(a.stdout, res)
				}
				for _, r := range res {
					if _, err := fmt.Fprintf(a.stdout, "shard %d: history from revision %d\n", r.Shard, r.Oldest); err != nil {
						return err
					}
				}
				return nil
			})
		},
	}
	cmd.Flags().Uint64Var(&shard, "shard", 0, "compact only this shard (0: every data shard)")
	return cmd
}

// withRevision adds --rev to get: a read of the past, from the shard's
// history. Revisions are per shard, so --prefix --rev reads one shard.
func (a *app) withRevision(get *cobra.Command) *cobra.Command {
	var rev int64
	var shard uint64
	plain := get.RunE
	get.RunE = func(cmd *cobra.Command, args []string) error {
		if rev == 0 {
			if cmd.Flags().Changed("shard") {
				return usageErrorf("--shard goes with --prefix --rev")
			}
			return plain(cmd, args)
		}
		prefix, _ := cmd.Flags().GetBool("prefix")
		switch {
		case rev < 0:
			return usageErrorf("--rev must be positive, got %d", rev)
		case cmd.Flags().Changed("end") || cmd.Flags().Changed("count-only") || cmd.Flags().Changed("keys-only") || cmd.Flags().Changed("limit") || cmd.Flags().Changed("print-resume"):
			return usageErrorf("--rev reads a key or a --prefix; --end, --count-only, --keys-only, --limit and --print-resume do not apply")
		case !prefix && cmd.Flags().Changed("shard"):
			return usageErrorf("--shard goes with --prefix --rev")
		}
		return a.request(func(ctx context.Context, c *client.Client) error {
			if !prefix {
				kv, err := c.GetAt(ctx, []byte(args[0]), rev)
				if errors.Is(err, client.ErrNotFound) {
					return &exitError{code: exitNotFound, msg: fmt.Sprintf("key %q did not exist at revision %d of its shard", args[0], rev)}
				}
				if err != nil {
					return compactedExit(err)
				}
				return a.printKV(kv)
			}
			sh := shard
			if sh == 0 {
				if shards := c.DataShards(); len(shards) == 1 {
					sh = shards[0]
				} else {
					return usageErrorf("revisions are per shard and the prefix spans %d shards; read one with --shard N (see 'kvctl cluster status')", len(shards))
				}
			}
			start := []byte(args[0])
			kvs, err := c.ScanAt(ctx, sh, start, client.PrefixEnd(start), rev)
			if err != nil {
				return compactedExit(err)
			}
			p := a.newKVPrinter(false)
			if err := p.add(kvs); err != nil {
				return err
			}
			return p.close("")
		})
	}
	get.Flags().Int64Var(&rev, "rev", 0, "read as of this revision of the key's shard (with --prefix: of --shard)")
	get.Flags().Uint64Var(&shard, "shard", 0, "with --prefix --rev: the shard to read (needed when there are several)")
	return get
}

// compactedExit is the one-line exit 1 of a read below the history.
func compactedExit(err error) error {
	var ce *client.CompactedError
	if errors.As(err, &ce) {
		return &exitError{code: exitNotFound, msg: fmt.Sprintf("revision compacted: shard %d keeps its history from revision %d; read at %d or later", ce.Shard, ce.Oldest, ce.Oldest-1)}
	}
	return err
}

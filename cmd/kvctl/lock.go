package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kvd/kvd/client"
	"github.com/kvd/kvd/client/concurrency"
)

// exitLost: the session's lease was lost while holding (exit 1, as a
// lease that is gone).
func lostErr(s *concurrency.Session) error {
	return &exitError{code: exitNotFound, msg: fmt.Sprintf("session lost: %s", clean(s.Err()))}
}

func (a *app) lockCmd() *cobra.Command {
	var ttl int64
	cmd := &cobra.Command{
		Use:   "lock NAME [-- CMD ARGS...]",
		Short: "Hold a distributed lock, or run a command under it",
		Long: `Take the lock NAME, waiting for it as long as it takes, and print the
key that holds it. Without CMD, hold it until Ctrl-C (exit 0). With CMD,
run it while holding the lock (its environment has KVCTL_LOCK_KEY and
KVCTL_LOCK_TOKEN, the fencing token), release the lock when it ends and
exit with its code. The lock is kept by a lease of --ttl seconds, renewed
in the background: if kvctl dies, the lock is free again within the TTL.
If the lease is lost while holding, CMD is stopped (SIGTERM) and kvctl
exits 1.`,
		Example: `  kvctl lock backups -- ./run-backup.sh
  kvctl lock --ttl 10 deploy`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 1 {
				return usageErrorf("%s needs a lock NAME; usage: %s", cmd.CommandPath(), cmd.UseLine())
			}
			return nil
		},
		Annotations: map[string]string{outputsKey: "simple"},
		RunE: func(cmd *cobra.Command, args []string) error {
			if ttl <= 0 {
				return usageErrorf("--ttl must be at least 1 second")
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return a.withClient(func(c *client.Client) error {
				s, closeSession, err := a.session(ctx, c, ttl)
				if err != nil {
					return err
				}
				defer closeSession()
				m, err := concurrency.NewMutex(s, args[0])
				if err != nil {
					return err
				}
				if err := m.Lock(ctx); err != nil {
					if ctx.Err() != nil {
						return nil // interrupted while waiting
					}
					if errors.Is(err, concurrency.ErrSessionExpired) {
						return lostErr(s)
					}
					return err
				}
				fmt.Fprintln(a.stdout, m.Key())
				if len(args) == 1 {
					select {
					case <-ctx.Done():
						return nil
					case <-s.Done():
						return lostErr(s)
					}
				}
				return a.runLocked(ctx, s, m, args[1:])
			})
		},
	}
	cmd.Flags().Int64Var(&ttl, "ttl", 10, "TTL in seconds of the lease that holds the lock")
	return cmd
}

// runLocked runs argv while the lock is held and returns with its exit code.
func (a *app) runLocked(ctx context.Context, s *concurrency.Session, m *concurrency.Mutex, argv []string) error {
	child := exec.Command(argv[0], argv[1:]...)
	child.Stdin, child.Stdout, child.Stderr = a.stdin, a.stdout, a.stderr
	child.Env = append(os.Environ(), "KVCTL_LOCK_KEY="+m.Key(), "KVCTL_LOCK_TOKEN="+strconv.FormatInt(m.Token(), 10))
	if err := child.Start(); err != nil {
		return usageErrorf("run %q: %v", argv[0], err)
	}
	done := make(chan error, 1)
	go func() { done <- child.Wait() }()
	var lost bool
	select {
	case err := <-done:
		return childExit(err)
	case <-ctx.Done():
		_ = child.Process.Signal(syscall.SIGTERM)
	case <-s.Done():
		lost = true
		_ = child.Process.Signal(syscall.SIGTERM)
	}
	err := <-done
	if lost {
		return lostErr(s)
	}
	return childExit(err)
}

func childExit(err error) error {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return &exitError{code: ee.ExitCode(), msg: fmt.Sprintf("command exited with code %d", ee.ExitCode())}
	}
	return err
}

func (a *app) electCmd() *cobra.Command {
	var (
		listen bool
		ttl    int64
	)
	cmd := &cobra.Command{
		Use:   "elect NAME [PROPOSAL] | elect NAME --listen",
		Short: "Campaign in, or observe, a leader election",
		Long: `With PROPOSAL, campaign in the election NAME: once elected, print the
leader's key and PROPOSAL, and lead until Ctrl-C (then resign, exit 0);
kvctl exits 1 if its lease is lost while leading. With --listen, print
the leader's value each time the leader (or its value) changes, until
Ctrl-C.`,
		Example: `  kvctl elect scheduler node-a
  kvctl elect scheduler --listen`,
		Args: func(cmd *cobra.Command, args []string) error {
			if listen && len(args) != 1 || !listen && len(args) != 2 {
				return usageErrorf("usage: %s", cmd.UseLine())
			}
			return nil
		},
		Annotations: map[string]string{outputsKey: "simple"},
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return a.withClient(func(c *client.Client) error {
				if listen {
					obs, err := concurrency.Observe(ctx, c, args[0])
					if err != nil {
						return err
					}
					for kv := range obs {
						fmt.Fprintf(a.stdout, "%s\n", kv.GetValue())
					}
					return nil
				}
				s, closeSession, err := a.session(ctx, c, ttl)
				if err != nil {
					return err
				}
				defer closeSession()
				e, err := concurrency.NewElection(s, args[0])
				if err != nil {
					return err
				}
				if err := e.Campaign(ctx, args[1]); err != nil {
					if ctx.Err() != nil {
						return nil
					}
					if errors.Is(err, concurrency.ErrSessionExpired) {
						return lostErr(s)
					}
					return err
				}
				fmt.Fprintf(a.stdout, "%s\n%s\n", e.Key(), args[1])
				select {
				case <-ctx.Done():
					rctx, cancel := a.ctx()
					defer cancel()
					return e.Resign(rctx)
				case <-s.Done():
					return lostErr(s)
				}
			})
		},
	}
	cmd.Flags().BoolVar(&listen, "listen", false, "print each new leader's value instead of campaigning")
	cmd.Flags().Int64Var(&ttl, "ttl", 10, "TTL in seconds of the lease that holds the candidacy")
	return cmd
}

// session starts a concurrency session of ttl seconds on c (within the
// request timeout) and returns it with the function that ends it.
func (a *app) session(ctx context.Context, c *client.Client, ttl int64) (*concurrency.Session, func(), error) {
	sctx, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	s, err := concurrency.NewSession(sctx, c, concurrency.WithTTL(time.Duration(ttl)*time.Second))
	if err != nil {
		return nil, nil, err
	}
	return s, func() {
		cctx, cancel := a.ctx()
		defer cancel()
		_ = s.Close(cctx)
	}, nil
}

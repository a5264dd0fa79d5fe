package storage

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// crashChildEnv, when set, makes the test binary run crashChild instead of
// the tests: it is the process that the crash test kills.
const crashChildEnv = "KVD_STORAGE_CRASH_CHILD"

// crashPartitionsEnv, when set to N, makes the child open a Store of N
// partitions in the directory of its path instead of one Engine.
const crashPartitionsEnv = "KVD_STORAGE_CRASH_PARTITIONS"

// shardStore is what the crash test needs of an Engine or a Store.
type shardStore interface {
	CreateShard(id uint64, cs *pb.ConfState) (*Shard, error)
	OpenShard(id uint64) (*Shard, error)
	Close() error
}

// openCrashed opens path as an Engine, or its directory as a Store of
// partitions when there are more than one.
func openCrashed(path string, partitions int) (shardStore, error) {
	if partitions > 1 {
		return OpenStore(filepath.Dir(path), partitions, Options{})
	}
	return Open(path, Options{})
}

// crashShards is how many shards the child writes to concurrently, so the
// kill lands in the middle of group-commit rounds that merge several.
const crashShards = 4

// crashChild opens the engine at $KVD_STORAGE_CRASH_CHILD and saves
// entries on every shard in a loop, each with a committed apply, printing
// "shard index" to stdout after each Save returns: those lines are the
// acknowledgements. It runs until killed.
func crashChild() {
	partitions, _ := strconv.Atoi(os.Getenv(crashPartitionsEnv))
	e, err := openCrashed(os.Getenv(crashChildEnv), partitions)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out := bufio.NewWriter(os.Stdout)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for s := uint64(1); s <= crashShards; s++ {
		sh, err := e.CreateShard(s, voters)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := uint64(2); ; i++ {
				en := putEntry(i, 1, fmt.Sprintf("k%d", i), fmt.Sprintf("shard%d-v%d", s, i))
				if err := sh.Save(&Update{
					HardState: &pb.HardState{Term: proto.Uint64(1), Commit: proto.Uint64(i)},
					Entries:   []*pb.Entry{en},
					Committed: []*pb.Entry{en},
					Apply:     applyPut,
					Sync:      true,
					// As raft does on even shards: the apply need not be
					// durable when Save returns (a restart re-applies).
					NoWait: s%2 == 0,
				}); err != nil {
					fmt.Fprintln(os.Stderr, err)
					os.Exit(1)
				}
				mu.Lock()
				fmt.Fprintf(out, "%d %d\n", s, i)
				out.Flush()
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
}

// TestCrashKeepsAcknowledgedWrites kills a writing process with SIGKILL in
// the middle of its group-commit rounds, reopens its file, and checks that
// every Save it had acknowledged is there: the entries and hard state,
// and, for saves without NoWait, the applied data and an applied index at
// least as high. On NoWait shards the applied index may be lower; the data
// matches it, and applying the rest (as raft would) completes it.
//
// With partitions, the shards spread over files that share one WAL file
// and its syncs, and the same must hold of each.
func TestCrashKeepsAcknowledgedWrites(t *testing.T) {
	for _, partitions := range []int{1, 3} {
		t.Run(fmt.Sprintf("partitions=%d", partitions), func(t *testing.T) { crashAndCheck(t, partitions) })
	}
}

func crashAndCheck(t *testing.T, partitions int) {
	for kill := 1; kill <= 2; kill++ {
		path := filepath.Join(t.TempDir(), "kvd.db") // each child creates its shards afresh
		acked := runAndKill(t, path, partitions, 300*kill)
		e, err := openCrashed(path, partitions)
		if err != nil {
			t.Fatalf("reopen after kill %d: %v", kill, err)
		}
		total := 0
		for s := uint64(1); s <= crashShards; s++ {
			sh, err := e.OpenShard(s)
			if err != nil {
				t.Fatal(err)
			}
			last := acked[s]
			total += int(last) - 1
			applied, _ := sh.Applied()
			if applied < last && s%2 == 1 {
				t.Fatalf("kill %d shard %d: applied index %d, but %d was acknowledged", kill, s, applied, last)
			}
			li, _ := sh.LastIndex()
			if li < last {
				t.Fatalf("kill %d shard %d: last index %d, but %d was acknowledged", kill, s, li, last)
			}
			if hs, _, _ := sh.InitialState(); hs.GetCommit() < last {
				t.Fatalf("kill %d shard %d: hard state commit %d, but %d was acknowledged", kill, s, hs.GetCommit(), last)
			}
			err = sh.View(func(r *Reader) error {
				if got := r.Get([]byte(fmt.Sprintf("k%d", applied+1))); got != nil {
					return fmt.Errorf("shard %d: k%d present beyond applied index %d", s, applied+1, applied)
				}
				return nil
			})
			if err != nil {
				t.Fatalf("kill %d: %v", kill, err)
			}
			es, err := sh.Entries(2, li+1, ^uint64(0))
			if err != nil {
				t.Fatal(err)
			}
			if applied < li {
				if err := sh.Save(&Update{Committed: es[applied-1:], Apply: applyPut}); err != nil {
					t.Fatal(err)
				}
				t.Logf("kill %d shard %d: re-applied %d..%d", kill, s, applied+1, li)
			}
			for _, en := range es {
				if want := fmt.Sprintf("k%d=shard%d-v%d", en.GetIndex(), s, en.GetIndex()); string(en.GetData()) != want {
					t.Fatalf("kill %d shard %d entry %d = %q, want %q", kill, s, en.GetIndex(), en.GetData(), want)
				}
			}
			err = sh.View(func(r *Reader) error {
				for i := uint64(2); i <= last; i++ {
					if got, want := string(r.Get([]byte(fmt.Sprintf("k%d", i)))), fmt.Sprintf("shard%d-v%d", s, i); got != want {
						return fmt.Errorf("shard %d key k%d = %q, want %q", s, i, got, want)
					}
				}
				return nil
			})
			if err != nil {
				t.Fatalf("kill %d: %v", kill, err)
			}
		}
		t.Logf("kill -9 %d: every acknowledged save of %d shards present (%d entries checked)", kill, crashShards, total)
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// runAndKill starts the child on path, waits for at least n
// acknowledgements, kills it with SIGKILL while it writes, and returns
// the highest acknowledged index per shard.
func runAndKill(t *testing.T, path string, partitions, n int) map[uint64]uint64 {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+path, crashPartitionsEnv+"="+strconv.Itoa(partitions))
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	killed := false
	t.Cleanup(func() {
		if !killed {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	acked := map[uint64]uint64{}
	sc := bufio.NewScanner(stdout)
	count := 0
	deadline := time.AfterFunc(60*time.Second, func() { _ = cmd.Process.Kill() })
	defer deadline.Stop()
	for sc.Scan() {
		var s, i uint64
		if _, err := fmt.Sscan(sc.Text(), &s, &i); err != nil {
			t.Fatalf("child said %q", sc.Text())
		}
		acked[s] = max(acked[s], i)
		if count++; count == n {
			// Kill while the child is mid-write: it never stops writing.
			_ = cmd.Process.Signal(syscall.SIGKILL)
		}
	}
	// Lines read after the kill signal were acknowledged before the
	// process died: they count too.
	_ = cmd.Wait()
	killed = true
	if count < n {
		t.Fatalf("child acknowledged only %d saves before dying (want %d)", count, n)
	}
	for s := uint64(1); s <= crashShards; s++ {
		if acked[s] == 0 {
			t.Fatalf("shard %d acknowledged nothing: %s", s, strconv.Itoa(count))
		}
	}
	return acked
}

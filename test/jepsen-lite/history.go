package jepsenlite

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"sync"
	"time"
)

// Op kinds.
const (
	kindGet = "get"
	kindPut = "put"
	kindCas = "cas" // compare value (or absence, when Expect is "") and put
	kindDel = "del" // delete: the register becomes absent ("")
)

// Op statuses, Jepsen's: ok completed, fail definitely had no effect, info
// indeterminate (timed out or unavailable: it may apply at any later time).
const (
	statusOK   = "ok"
	statusFail = "fail"
	statusInfo = "info"
)

// Op is one client operation of the history. Times are nanoseconds since
// the history started, on the monotonic clock; Return is -1 for an
// indeterminate operation.
type Op struct {
	Client int    `json:"client"`
	Key    string `json:"key"`
	Kind   string `json:"kind"`
	Value  string `json:"value,omitempty"`  // put/cas: the value written
	Expect string `json:"expect,omitempty"` // cas: the value compared ("" = absent)
	Call   int64  `json:"call"`
	Return int64  `json:"return"`
	Status string `json:"status"`
	// Read is what a get returned ("" when the key was absent); Swapped
	// says whether a completed cas applied.
	Read    string `json:"read,omitempty"`
	Swapped bool   `json:"swapped,omitempty"`
	Err     string `json:"err,omitempty"`
	// Rev is the shard's revision a completed write answered with: the
	// mod revision of the event it caused (a delete of an absent key
	// causes none, and says so with Deleted false).
	Rev     int64 `json:"rev,omitempty"`
	Deleted bool  `json:"deleted,omitempty"`
	// Counter marks an operation of the exactly-once counter workload.
	Counter bool `json:"counter,omitempty"`
	// Final marks the reads made after the final heal and restart.
	Final bool `json:"final,omitempty"`
	// Lock marks an operation of the lock workload (lock.go), checked by
	// checkLocks only; Holder names its worker, Token is the lock's
	// fencing token (a lock's answer, a fenced write's compare).
	Lock   bool   `json:"lock,omitempty"`
	Holder string `json:"holder,omitempty"`
	Token  int64  `json:"token,omitempty"`
}

// Event is a nemesis action.
type Event struct {
	Time  int64  `json:"time"`
	Event string `json:"nemesis"`
}

// History records operations and nemesis events; safe for concurrent use.
type History struct {
	start time.Time
	mu    struct {
		sync.Mutex
		ops    []Op
		events []Event
	}
}

func newHistory() *History { return &History{start: time.Now()} }

// now is the history's clock.
func (h *History) now() int64 { return int64(time.Since(h.start)) }

func (h *History) add(op Op) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.mu.ops = append(h.mu.ops, op)
}

func (h *History) event(format string, args ...any) {
	e := Event{Time: h.now(), Event: fmt.Sprintf(format, args...)}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.mu.events = append(h.mu.events, e)
}

// snapshot returns copies of the ops (sorted by call time) and events.
func (h *History) snapshot() ([]Op, []Event) {
	h.mu.Lock()
	defer h.mu.Unlock()
	ops := append([]Op(nil), h.mu.ops...)
	sort.SliceStable(ops, func(i, j int) bool { return ops[i].Call < ops[j].Call })
	return ops, append([]Event(nil), h.mu.events...)
}

// write stores the history as JSON lines, ops and nemesis events merged in
// time order.
func writeHistory(path string, ops []Op, events []Event) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	enc := json.NewEncoder(f)
	i := 0
	for _, op := range ops {
		for i < len(events) && events[i].Time <= op.Call {
			if err := enc.Encode(events[i]); err != nil {
				f.Close()
				return err
			}
			i++
		}
		if err := enc.Encode(op); err != nil {
			f.Close()
			return err
		}
	}
	for ; i < len(events); i++ {
		if err := enc.Encode(events[i]); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

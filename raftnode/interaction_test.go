package raftnode

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/datadriven"
	pb "go.etcd.io/raft/v3/raftpb"

	"github.com/kvd/kvd/storage"
)

// TestInteraction runs the scenarios of testdata/*.txt: hosts stepped by
// the test, over memory storage (memEngine) and a memory network (memNet),
// so that the order in which a node persists, sends and answers is the
// output, and it is the same on every run. No goroutine timing enters it:
// the test runs each loop pass itself (Host.iterate) and moves on only
// when the pass has ended or waits in a held save, and when every
// Node.ReadIndex call it made has returned or waits on something only the
// test moves (settle). The loop's inputs are taken in a fixed order
// (process), and messages are delivered in send order. Commands:
//
//	add-nodes N                 nodes 1..N, each one Host with a replica of shard 1, all voters
//	campaign ID                 the replica campaigns (Node.Campaign)
//	propose ID k=v              a proposal; its waiter is named pN
//	read-round ID               a linearizable read that takes raft's ReadIndex round; named rN
//	read-index ID               Node.ReadIndex on its own goroutine: the host's leadership check
//	                            first when it applies (readindex.go); named rN
//	tick ID [COUNT]             COUNT ticks (default 1) through the host's tick source, each processed
//	process [ID...]             run the hosts' loops until they idle or wait in a held save
//	hold ID / unhold ID         the node's saves wait for persist / proceed by themselves
//	persist ID                  the held save is durable: the loop goes on until idle or held again
//	deliver [from=ID] [to=ID]   deliver the messages in flight, in send order
//	stabilize                   process and deliver until nothing moves (held saves stay held)
//	partition ID / heal         drop, at delivery, every message to or from ID / stop dropping
//	crash ID                    the process dies: a held save never becomes durable
//	restart ID                  a new Host over the crashed node's durable state
//	stop ID                     Host.Stop
//	status                      each node's published leader, term, commit and applied index
//	waiters                     the waiters not answered yet
//	print-log ID                the node's events since its last print-log
//
// Every command prints the events it caused, in order: "persist" (a save
// performed), "save waits" (a held save), "apply", "send", "answer",
// and "VIOLATION" when a message left before what it promises was durable.
func TestInteraction(t *testing.T) {
	datadriven.Walk(t, "testdata", func(t *testing.T, path string) {
		c := newHarness(t)
		defer c.close()
		datadriven.RunTest(t, path, func(t *testing.T, d *datadriven.TestData) string {
			c.t = t
			return c.handle(d)
		})
	})
}

// recorder keeps the events of every node, in the order they happen.
type recorder struct {
	t testing.TB

	mu      sync.Mutex
	out     []string            // events of the running command
	log     map[uint64][]string // events since the node's last print-log
	muted   map[uint64]bool     // a crashing node: its last gasps are not events
	waiters []*waiter
}

// waiter is a proposal or a read the test made, until it is answered.
type waiter struct {
	name     string
	node     *Node
	prop     *proposal
	read     *readWaiter
	answered bool
}

func (r *recorder) event(node uint64, format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	// Answers given before this event are reported before it.
	r.scanLocked()
	r.addLocked(node, fmt.Sprintf(format, args...))
}

// eventInRun records line for node, placed in order among the trailing
// lines inRun accepts: events whose order the code leaves to chance.
func (r *recorder) eventInRun(node uint64, line string, inRun func(string) bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.scanLocked()
	if r.muted[node] {
		return
	}
	line = fmt.Sprintf("%d: %s", node, line)
	insert := func(lines []string) []string {
		i := len(lines)
		for i > 0 && inRun(lines[i-1]) && lines[i-1] > line {
			i--
		}
		return slices.Insert(lines, i, line)
	}
	r.out = insert(r.out)
	r.log[node] = insert(r.log[node])
}

func (r *recorder) violation(node uint64, err error) {
	r.t.Errorf("node %d: %v", node, err)
	r.event(node, "VIOLATION: %v", err)
}

func (r *recorder) addLocked(node uint64, s string) {
	if r.muted[node] {
		return
	}
	line := fmt.Sprintf("%d: %s", node, s)
	r.out = append(r.out, line)
	r.log[node] = append(r.log[node], line)
}

// scan reports the waiters answered since the last scan.
func (r *recorder) scan() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.scanLocked()
}

func (r *recorder) scanLocked() {
	for _, w := range r.waiters {
		if w.answered || r.muted[w.node.cfg.NodeID] {
			continue
		}
		var s string
		switch {
		case w.prop != nil:
			select {
			case res := <-w.prop.done:
				if res.err != nil {
					s = "error: " + res.err.Error()
				} else {
					s = fmt.Sprint(res.value)
				}
			default:
				continue
			}
		default:
			select {
			case err := <-w.read.done:
				if err != nil {
					s = "error: " + err.Error()
				} else {
					s = fmt.Sprintf("ok, applied %d", w.node.applied.Load())
				}
			default:
				continue
			}
		}
		w.answered = true
		r.addLocked(w.node.cfg.NodeID, fmt.Sprintf("answer %s: %s", w.name, s))
	}
}

func (r *recorder) take() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.scanLocked()
	s := strings.Join(r.out, "\n")
	r.out = nil
	if s == "" {
		return "ok"
	}
	return s
}

// harness is a cluster of hosts, one replica of shard 1 each, that the
// test steps.
type harness struct {
	t      *testing.T
	rec    *recorder
	net    *memNet
	nodes  map[uint64]*hnode
	voters []uint64
	props  int
	reads  int
	// calls are the Node.ReadIndex calls in flight, oldest first.
	calls []*readCall
}

// hnode is one node: its storage, which outlives crashes, and its Host.
type hnode struct {
	id    uint64
	eng   *memEngine
	h     *Host // nil while crashed
	ticks chan time.Time
	visit []*Node
	// heldPass, set while a loop pass waits in a held save, is closed when
	// the pass ends.
	heldPass chan struct{}
	stopped  bool
}

const testShard = 1

func newHarness(t *testing.T) *harness {
	rec := &recorder{t: t, log: make(map[uint64][]string), muted: make(map[uint64]bool)}
	c := &harness{t: t, rec: rec, net: newMemNet(rec), nodes: make(map[uint64]*hnode)}
	c.net.check = c.checkSend
	return c
}

// close lets every held pass end and every ReadIndex call return, so
// that no goroutine outlives the test.
func (c *harness) close() {
	for _, hn := range c.nodes {
		if hn.heldPass != nil {
			c.crash(hn)
		}
	}
	for _, rc := range c.calls {
		rc.cancel()
		<-rc.res
	}
}

func (c *harness) handle(d *datadriven.TestData) string {
	c.rec.t = c.t
	args := d.CmdArgs
	id := func(i int) uint64 {
		if i >= len(args) {
			d.Fatalf(c.t, "%s: missing node id", d.Cmd)
		}
		v, err := strconv.ParseUint(args[i].Key, 10, 64)
		if err != nil {
			d.Fatalf(c.t, "%s: %v", d.Cmd, err)
		}
		return v
	}
	node := func(i int) *hnode {
		hn := c.nodes[id(i)]
		if hn == nil {
			d.Fatalf(c.t, "%s: no node %d", d.Cmd, id(i))
		}
		return hn
	}
	running := func(i int) *hnode {
		hn := node(i)
		if hn.h == nil {
			d.Fatalf(c.t, "%s: node %d is down", d.Cmd, hn.id)
		}
		return hn
	}
	switch d.Cmd {
	case "add-nodes":
		n := id(0)
		for i := uint64(1); i <= n; i++ {
			c.voters = append(c.voters, i)
		}
		for i := uint64(1); i <= n; i++ {
			hn := &hnode{id: i, eng: newMemEngine(i, c.rec)}
			c.nodes[i] = hn
			c.start(hn)
		}
	case "campaign":
		hn := running(0)
		if err := hn.replica().Campaign(context.Background()); err != nil {
			d.Fatalf(c.t, "campaign: %v", err)
		}
	case "propose":
		hn := running(0)
		var cmd []string
		for _, a := range args[1:] {
			cmd = append(cmd, strings.Join(append([]string{a.Key}, a.Vals...), "="))
		}
		c.props++
		p := &proposal{data: []byte(strings.Join(cmd, " ")), done: make(chan result, 1)}
		c.rec.addWaiter(&waiter{name: fmt.Sprintf("p%d", c.props), node: hn.replica(), prop: p})
		// What Node.Propose does before it waits.
		if err := send(context.Background(), hn.replica(), hn.replica().propc, p); err != nil {
			d.Fatalf(c.t, "propose: %v", err)
		}
	case "read-index":
		c.readIndex(running(0))
	case "read-round":
		hn := running(0)
		c.reads++
		w := &readWaiter{done: make(chan error, 1)}
		c.rec.addWaiter(&waiter{name: fmt.Sprintf("r%d", c.reads), node: hn.replica(), read: w})
		// What Node.ReadIndex does when the read takes raft's round.
		if err := send(context.Background(), hn.replica(), hn.replica().readc, w); err != nil {
			d.Fatalf(c.t, "read: %v", err)
		}
	case "tick":
		hn := running(0)
		count := 1
		if len(args) > 1 {
			count = int(id(1))
		}
		for range count {
			hn.ticks <- time.Time{}
			c.process(hn)
		}
	case "process":
		if len(args) == 0 {
			for _, hn := range c.sorted() {
				c.process(hn)
			}
		}
		for i := range args {
			c.process(running(i))
		}
	case "hold":
		hn := node(0)
		hn.eng.hold = true
	case "unhold":
		hn := node(0)
		hn.eng.hold = false
	case "persist":
		hn := running(0)
		if hn.heldPass == nil {
			d.Fatalf(c.t, "persist: node %d has no save waiting", hn.id)
		}
		hn.finishHeld(false)
		c.process(hn)
	case "deliver":
		var from, to uint64
		for _, a := range args {
			v, err := strconv.ParseUint(a.Vals[0], 10, 64)
			if err != nil {
				d.Fatalf(c.t, "deliver: %v", err)
			}
			switch a.Key {
			case "from":
				from = v
			case "to":
				to = v
			}
		}
		c.deliver(func(e envelope) bool { return (from == 0 || e.from == from) && (to == 0 || e.to == to) }, true)
	case "stabilize":
		c.stabilize()
	case "partition":
		hn := node(0)
		c.net.mu.Lock()
		c.net.isolated[hn.id] = true
		c.net.mu.Unlock()
	case "heal":
		c.net.mu.Lock()
		clear(c.net.isolated)
		c.net.mu.Unlock()
	case "crash":
		c.crash(running(0))
	case "restart":
		hn := node(0)
		if hn.h != nil {
			d.Fatalf(c.t, "restart: node %d is running", hn.id)
		}
		s, err := hn.eng.OpenShard(testShard)
		if err != nil {
			d.Fatalf(c.t, "restart: %v", err)
		}
		c.rec.event(hn.id, "restart from %s", s.(*memShard).durable())
		c.start(hn)
	case "stop":
		hn := running(0)
		hn.h.Stop() // closes stopc; the test runs the loop, which lets the replicas go
		c.process(hn)
	case "status":
		for _, hn := range c.sorted() {
			if hn.h == nil {
				c.rec.event(hn.id, "down")
				continue
			}
			n := hn.replica()
			c.rec.event(hn.id, "leader %d, term %d, commit %d, applied %d", n.Leader(), n.Term(), n.Commit(), n.Applied())
		}
	case "waiters":
		c.rec.mu.Lock()
		c.rec.scanLocked()
		for _, w := range c.rec.waiters {
			if !w.answered {
				// Not an event: it goes to the output only.
				c.rec.out = append(c.rec.out, fmt.Sprintf("%d: %s waits", w.node.cfg.NodeID, w.name))
			}
		}
		for _, rc := range c.calls {
			c.rec.out = append(c.rec.out, fmt.Sprintf("%d: %s waits", rc.node.cfg.NodeID, rc.name))
		}
		c.rec.mu.Unlock()
	case "print-log":
		hn := node(0)
		c.rec.mu.Lock()
		lines := c.rec.log[hn.id]
		c.rec.log[hn.id] = nil
		c.rec.mu.Unlock()
		_ = c.rec.take() // the command prints the log instead
		return strings.Join(lines, "\n")
	default:
		d.Fatalf(c.t, "unknown command %q", d.Cmd)
	}
	c.settle()
	return c.rec.take()
}

func (r *recorder) addWaiter(w *waiter) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.waiters = append(r.waiters, w)
}

func (c *harness) sorted() []*hnode {
	var out []*hnode
	for _, hn := range c.nodes {
		out = append(out, hn)
	}
	slices.SortFunc(out, func(a, b *hnode) int { return int(a.id) - int(b.id) })
	return out
}

// fixedClock is the leadership checks' clock: time does not pass.
func fixedClock() time.Time { return time.Unix(0, 0) }

// start runs a Host over hn's engine, its loop stepped by the test.
func (c *harness) start(hn *hnode) {
	eng := hn.eng
	eng.appliedc = make(chan struct{}, 1)
	hn.ticks = make(chan time.Time, 1)
	hn.h = newHost(HostConfig{
		NodeID:       hn.id,
		Apply:        func(_ *storage.Txn, index uint64, cmd []byte) any { return eng.apply(index, cmd) },
		Ticks:        hn.ticks,
		TickInterval: time.Second,
		// Few ticks to an election timeout keep the scenarios short.
		// Followers are never ticked that far: raft randomizes their
		// timeouts, and they would campaign at a tick no test can know.
		ElectionTick:    3,
		HeartbeatTick:   1,
		SnapshotEntries: 10_000, SnapshotBytes: 64 << 20, MaxPendingProposals: 4096,
	}, eng)
	hn.h.setSender(c.net.sender(hn.id))
	hn.h.checks.now = fixedClock
	hn.stopped = false
	if _, err := hn.h.AddShard(testShard, c.voters); err != nil {
		c.t.Fatalf("node %d: add shard: %v", hn.id, err)
	}
}

func (hn *hnode) replica() *Node { return hn.h.Node(testShard) }

// process runs hn's loop, one pass at a time, until it has nothing to do
// or a pass waits in a held save. It takes the loop's inputs in a fixed
// order (stop, wake-ups, commits, ticks) where the loop's select picks
// among those ready at random, so that the output is the same every run.
func (c *harness) process(hn *hnode) {
	c.settle()
	if hn.h == nil || hn.heldPass != nil || hn.stopped {
		return
	}
	for {
		var tick, all bool
		select {
		case <-hn.h.stopc:
			hn.h.stopAll(hn.h.lanes[0])
			hn.stopped = true
			c.rec.scan()
			return
		default:
		}
		select {
		case <-hn.h.lanes[0].wakec:
		default:
			select {
			case <-hn.eng.appliedc:
				all = true
			default:
				select {
				case <-hn.ticks:
					tick, all = true, true
				default:
					return
				}
			}
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			hn.visit = hn.h.iterate(hn.h.lanes[0], hn.visit, tick, all)
		}()
		select {
		case <-done:
			c.rec.scan()
		case <-hn.eng.held:
			hn.heldPass = done
			return
		}
	}
}

// finishHeld answers the held save, durably or by a crash, and waits
// for the pass to end.
func (hn *hnode) finishHeld(crash bool) {
	hn.eng.release <- crash
	<-hn.heldPass
	hn.heldPass = nil
	hn.eng.rec.scan()
}

// crash kills hn's process: what its held save would have written is
// lost, and so are its waiters, with nothing to answer them.
func (c *harness) crash(hn *hnode) {
	c.rec.mu.Lock()
	c.rec.muted[hn.id] = true
	c.rec.mu.Unlock()
	if hn.heldPass != nil {
		hn.finishHeld(true)
	}
	// Its ReadIndex callers die with it.
	for _, rc := range c.calls {
		if rc.node.host == hn.h {
			rc.cancel()
			<-rc.res
			rc.lost = true
		}
	}
	c.rec.mu.Lock()
	c.rec.muted[hn.id] = false
	c.rec.addLocked(hn.id, "crash")
	for _, w := range c.rec.waiters {
		if w.node.host == hn.h && !w.answered {
			w.answered = true
			c.rec.addLocked(hn.id, w.name+" dies with the process")
		}
	}
	c.rec.mu.Unlock()
	c.calls = slices.DeleteFunc(c.calls, func(rc *readCall) bool {
		if rc.lost {
			c.rec.event(hn.id, "%s dies with the process", rc.name)
		}
		return rc.lost
	})
	hn.h = nil
}

// deliver hands the matching messages in flight to their nodes, in send
// order; print says whether each is an event.
func (c *harness) deliver(match func(envelope) bool, print bool) int {
	envs := c.net.take(match)
	for _, env := range envs {
		hn := c.nodes[env.to]
		switch {
		case c.net.cut(env):
			c.rec.event(env.to, "drop %s (partition)", env)
			continue
		case hn == nil || hn.h == nil:
			c.rec.event(env.to, "drop %s (node down)", env)
			continue
		case env.msg != nil && env.msg.GetType() == pb.MsgSnap:
			c.rec.event(env.to, "drop %s (snapshots not modelled)", env)
			continue
		}
		if print {
			c.rec.event(env.to, "receive %s", env)
		}
		if env.check != nil {
			hn.h.HandleLeaderCheck(env.from, env.check)
		} else {
			hn.h.HandleMessage(env.shard, env.msg)
		}
	}
	c.settle()
	return len(envs)
}

// stabilize processes every node and delivers every message until no
// message is in flight after a round.
func (c *harness) stabilize() {
	for range 100 {
		for _, hn := range c.sorted() {
			c.process(hn)
		}
		if c.deliver(func(envelope) bool { return true }, false) == 0 {
			return
		}
	}
	c.t.Fatal("stabilize: still busy after 100 rounds")
}

// checkSend judges a Raft message as node from sends it, against what
// its storage holds durably (rule: persist before send). A leader's
// appends may leave before its own save; a vote, an acknowledgement of
// entries, and anything in a term, may not leave before the vote, the
// entries or the term are durable.
func (c *harness) checkSend(from uint64, m *pb.Message) error {
	s, err := c.nodes[from].eng.OpenShard(testShard)
	if err != nil {
		return err
	}
	ms := s.(*memShard).ms
	hs, _, _ := ms.InitialState()
	last, _ := ms.LastIndex()
	switch m.GetType() {
	case pb.MsgPreVote, pb.MsgPreVoteResp:
		return nil // a pre-vote promises nothing
	}
	if m.GetTerm() > hs.GetTerm() {
		return fmt.Errorf("%v sent in term %d, but the durable term is %d", m.GetType(), m.GetTerm(), hs.GetTerm())
	}
	switch {
	case m.GetType() == pb.MsgVoteResp && !m.GetReject() && hs.GetVote() != m.GetTo():
		return fmt.Errorf("vote for %d sent, but the durable vote is for %d", m.GetTo(), hs.GetVote())
	case m.GetType() == pb.MsgAppResp && !m.GetReject() && m.GetIndex() > last:
		return fmt.Errorf("MsgAppResp acknowledges index %d, but the durable log ends at %d", m.GetIndex(), last)
	}
	return nil
}

// readCall is a Node.ReadIndex call the test made, on a goroutine of its
// own since the call blocks. Its context identifies its leadership-check
// waiter (checkWaiter.ctx).
type readCall struct {
	name   string
	node   *Node
	ctx    context.Context
	cancel context.CancelFunc
	res    chan error
	cw     *checkWaiter // once seen in the host's leaderChecks
	lost   bool
}

func (c *harness) readIndex(hn *hnode) {
	c.reads++
	ctx, cancel := context.WithCancel(context.Background())
	rc := &readCall{name: fmt.Sprintf("r%d", c.reads), node: hn.replica(), ctx: ctx, cancel: cancel, res: make(chan error, 1)}
	c.calls = append(c.calls, rc)
	go func() { rc.res <- rc.node.ReadIndex(rc.ctx) }()
	c.settle()
}

// settle waits until every ReadIndex call in flight has returned or
// waits on something only the test can move: a leadership check no quorum
// has answered, or a read queued on its replica, which only the loop
// serves. Then it reports the calls that returned, oldest first. It polls
// the state it reads with a deadline; time decides nothing.
func (c *harness) settle() {
	if len(c.calls) == 0 {
		return
	}
	deadline := time.Now().Add(10 * time.Second)
	for !c.callsParked() {
		if time.Now().After(deadline) {
			c.t.Fatal("ReadIndex calls did not settle")
		}
		time.Sleep(time.Millisecond) // poll interval, not synchronisation
	}
	c.calls = slices.DeleteFunc(c.calls, func(rc *readCall) bool {
		select {
		case err := <-rc.res:
			s := fmt.Sprintf("ok, applied %d", rc.node.applied.Load())
			if err != nil {
				s = "error: " + err.Error()
			}
			c.rec.event(rc.node.cfg.NodeID, "answer %s: %s", rc.name, s)
			rc.cancel()
			return true
		default:
			return false
		}
	})
}

// callsParked reports whether each call in flight has returned, waits in
// a leadership check unanswered, or waits on a read its replica holds.
// A call past its check cannot be told apart from the others on its
// replica, so per replica the calls past their checks are counted
// against the reads it holds that the test did not queue itself.
func (c *harness) callsParked() bool {
	past := map[*Node]int{}
	for _, rc := range c.calls {
		if len(rc.res) > 0 {
			continue
		}
		if c.inCheck(rc) {
			continue
		}
		past[rc.node]++
	}
	for n, k := range past {
		if n.st.done {
			return false // a stopped replica answers everything: the call returns
		}
		held := len(n.readc) + len(n.st.readsQueued) + len(n.st.readsWaiting)
		for _, ws := range n.st.readRounds {
			held += len(ws)
		}
		c.rec.mu.Lock()
		for _, w := range c.rec.waiters {
			if w.read != nil && w.node == n && !w.answered && len(w.read.done) == 0 {
				held--
			}
		}
		c.rec.mu.Unlock()
		if held != k {
			return false
		}
	}
	return true
}

// inCheck reports whether rc waits in its host's leadership check,
// unanswered.
func (c *harness) inCheck(rc *readCall) bool {
	lc := rc.node.host.checks
	lc.mu.Lock()
	defer lc.mu.Unlock()
	if rc.cw == nil {
		for _, w := range lc.queued {
			if w.ctx == rc.ctx {
				rc.cw = w
			}
		}
		for _, r := range lc.rounds {
			for _, ws := range r.byShard {
				for _, w := range ws {
					if w.ctx == rc.ctx {
						rc.cw = w
					}
				}
			}
		}
	}
	return rc.cw != nil && rc.cw.acks > 0
}

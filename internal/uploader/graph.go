package uploader

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/nixstore"
)

// The scheduler. Every path some job needs uploaded is one node, shared by
// all jobs that need it. A node's NAR is compressed and uploaded by one of a
// fixed number of workers as soon as one is free; its narinfo is written
// once its NAR is up and the narinfos of all its references are written
// (references that the cache already held count from the start). Nothing
// is a goroutine per path: a closure of 10,000 missing paths is 10,000
// small nodes in a map and a queue, worked by the same workers as
// everything else, so memory and requests in flight are bounded by design
// (workers, the in-memory NAR budget, large-NAR slots and the bucket's
// adaptive window), whatever the closure's shape.

// node is one path being uploaded.
type node struct {
	info   *nixstore.PathInfo
	ctx    context.Context
	cancel context.CancelFunc
	// interest counts the jobs waiting for this node; when it drops to zero
	// before the node is done, the node's work is cancelled.
	interest int
	// refsLeft counts references being uploaded whose narinfo is not yet
	// written.
	refsLeft   int
	dependents []*node
	// preexisting are the keys of objects the narinfo depends on that
	// existed before this upload (found present, not written by it):
	// narinfos of references, and the NAR if an identical one was already
	// there. Unlike dependencyKeys, it leaves out what this upload wrote.
	preexisting []string
	gen         uint64    // the cache generation the plan was made in
	planned     time.Time // when the job planned it
	// dependsSince is when the last object the narinfo depends on was
	// written or found present: its NAR, its references' narinfos (also
	// those this upload wrote). The narinfo is written only once the
	// cache's generation is confirmed by a question sent after it.
	dependsSince time.Time
	narDone      bool
	ni           *narinfo.NarInfo
	sent         uint64
	owner        *jobResult // the job that created the node counts its upload
	done         chan struct{}
	err          error
	// repair: a job found the path's narinfo in the cache naming a NAR
	// that is not there; a narinfo found at the write is checked, and
	// replaced if it is still broken (see replaceBrokenNarinfo).
	repair atomic.Bool
}

// jobResult accumulates what one Upload call uploaded.
type jobResult struct {
	mu  sync.Mutex
	res Result
}

func (j *jobResult) add(f func(*Result)) {
	j.mu.Lock()
	f(&j.res)
	j.mu.Unlock()
}

// graph holds the nodes in progress and the work queues: large NARs
// (compressed on both cores into a temp file) have workers of their own,
// as many as may run at once, so that they never hold the workers small
// paths and narinfos need.
type graph struct {
	tasks    graphTasks
	presence *presence
	mu       sync.Mutex
	nodes    map[string]*node
	work     *workQueue
	large    *workQueue
	running  sync.WaitGroup // the workers
}

// graphTasks are the work the graph schedules for a node.
type graphTasks struct {
	// nar uploads the node's NAR and reports to the graph (narUploaded
	// or fail); narinfo writes its narinfo once the NAR and its
	// references' narinfos are up (succeed or fail).
	nar, narinfo func(*node)
	// large reports whether a NAR goes to the large-NAR workers.
	large func(*nixstore.PathInfo) bool
}

func newGraph(tasks graphTasks, pr *presence, workers, largeWorkers int) *graph {
	g := &graph{tasks: tasks, presence: pr, nodes: map[string]*node{}, work: newWorkQueue(), large: newWorkQueue()}
	for i := 0; i < workers; i++ {
		g.running.Add(1)
		go func() { defer g.running.Done(); g.work.run() }()
	}
	for i := 0; i < largeWorkers; i++ {
		g.running.Add(1)
		go func() { defer g.running.Done(); g.large.run() }()
	}
	return g
}

// close stops the workers, once the tasks they are running end (cancel
// the uploads first for a quick stop).
func (g *graph) close() {
	g.mu.Lock()
	for _, n := range g.nodes {
		n.cancel()
	}
	g.mu.Unlock()
	g.work.close()
	g.large.close()
	g.running.Wait()
}

// errDependencyGone is the error of a node whose reference is neither in
// the cache nor being uploaded (its upload just failed).
type errDependencyGone struct{ path string }

func (e *errDependencyGone) Error() string {
	return fmt.Sprintf("dependency %s is not in the cache (its upload failed); will retry", e.path)
}

// plan registers the upload of missing (closure order: dependencies first)
// for one job, and returns the nodes the job is interested in and the
// node of top (nil if top needs no upload).
//
// repair names the paths whose narinfo in the cache is broken: their nodes,
// new or shared, check what they find at the narinfo write.
func (g *graph) plan(job *jobResult, closure []*nixstore.PathInfo, missing, repair map[string]bool, upstream func(*nixstore.PathInfo) bool, gen uint64) (interest []*node, top *node, anyPreexisting bool) {
	planned := time.Now()
	g.mu.Lock()
	var created []*node
	topPath := closure[len(closure)-1].Path
	isUpstream := map[string]bool{}
	for _, info := range closure {
		if upstream != nil && upstream(info) {
			isUpstream[info.Path] = true
		}
	}
	for _, info := range closure {
		p := info.Path
		if isUpstream[p] {
			continue
		}
		if n := g.nodes[p]; g.shareable(n, gen) {
			if repair[p] {
				n.repair.Store(true)
			}
			n.interest++
			interest = append(interest, n)
			continue
		}
		// A node nobody waited for any more was cancelled, and one planned
		// in an earlier generation may have written its narinfo before the
		// reset and still succeed: either is replaced (its own end leaves
		// the replacement in place).
		if !missing[p] || g.presence.seen(p) {
			continue
		}
		ctx, cancel := context.WithCancel(context.Background())
		n := &node{info: info, ctx: ctx, cancel: cancel, interest: 1, gen: gen, planned: planned, dependsSince: planned, owner: job, done: make(chan struct{})}
		n.repair.Store(repair[p])
		for _, r := range info.References {
			switch {
			case r == p || isUpstream[r]:
			case g.shareable(g.nodes[r], gen):
				n.refsLeft++
				g.nodes[r].dependents = append(g.nodes[r].dependents, n)
			case g.presence.seen(r):
				n.preexisting = append(n.preexisting, cachefmt.Keys.NarinfoOf(r))
			default:
				n.err = &errDependencyGone{path: r}
			}
		}
		g.nodes[p] = n
		interest = append(interest, n)
		created = append(created, n)
		anyPreexisting = anyPreexisting || len(n.preexisting) > 0
	}
	// The top only if this job counts on it: a node of the path left by
	// a given-up job or an earlier generation is not this job's.
	if n := g.nodes[topPath]; g.shareable(n, gen) {
		top = n
	}
	g.mu.Unlock()
	for _, n := range created {
		if n.err != nil {
			g.fail(n, n.err)
			continue
		}
		q := g.work
		if g.tasks.large(n.info) {
			q = g.large
		}
		q.push(false, func() { g.tasks.nar(n) })
	}
	return interest, top, anyPreexisting
}

// shareable reports whether a job planned in generation gen may count on
// node n (callers hold g.mu): it runs, and was planned in the same
// generation of the cache. A node of an earlier generation is no evidence
// for the cache now, even when it succeeds.
func (g *graph) shareable(n *node, gen uint64) bool {
	return n != nil && n.ctx.Err() == nil && n.gen == gen
}

// wanted reports whether a job waits for p's node.
func (g *graph) wanted(p string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := g.nodes[p]
	return n != nil && n.ctx.Err() == nil
}

// release ends a job's interest in nodes; nodes nobody waits for any more
// are cancelled.
func (g *graph) release(nodes []*node) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, n := range nodes {
		n.interest--
		if n.interest <= 0 {
			n.cancel()
		}
	}
}

// narUploaded records that n's NAR is up; its narinfo is due if its
// references are written.
func (g *graph) narUploaded(n *node, ni *narinfo.NarInfo, sent uint64, preexisting []string) {
	g.mu.Lock()
	n.ni, n.sent, n.narDone = ni, sent, true
	n.preexisting = append(n.preexisting, preexisting...)
	n.dependsSince = laterOf(n.dependsSince, time.Now())
	ready := n.refsLeft == 0 && n.err == nil
	g.mu.Unlock()
	if ready {
		g.work.push(true, func() { g.tasks.narinfo(n) })
	}
}

// succeed records that n's narinfo is written: it is present, and its
// dependents may be due.
//
// The write (or the finding that the narinfo is there) began at started
// and ended at written.
// ours says the narinfo is the one this upload wrote (not another
// writer's, kept).
func (g *graph) succeed(n *node, started, written time.Time, ours bool) {
	g.presence.markIn([]string{n.info.Path}, n.gen, started)
	if ours {
		g.presence.markVerified(n.info.Path, n.gen) // its NAR went up first
	}
	var due []*node
	g.mu.Lock()
	if g.nodes[n.info.Path] == n {
		delete(g.nodes, n.info.Path)
	}
	close(n.done)
	for _, d := range n.dependents {
		d.dependsSince = laterOf(d.dependsSince, written)
		d.refsLeft--
		if d.refsLeft == 0 && d.narDone && d.err == nil {
			due = append(due, d)
		}
	}
	g.mu.Unlock()
	n.cancel()
	for _, d := range due {
		g.work.push(true, func() { g.tasks.narinfo(d) })
	}
}

func laterOf(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// fail records that n cannot be uploaded now, and fails every node above it.
func (g *graph) fail(n *node, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	stack := []*node{n}
	errs := []error{err}
	for len(stack) > 0 {
		cur, cerr := stack[len(stack)-1], errs[len(errs)-1]
		stack, errs = stack[:len(stack)-1], errs[:len(errs)-1]
		select {
		case <-cur.done:
			continue
		default:
		}
		cur.err = cerr
		close(cur.done)
		cur.cancel()
		if g.nodes[cur.info.Path] == cur {
			delete(g.nodes, cur.info.Path)
		}
		for _, d := range cur.dependents {
			stack = append(stack, d)
			errs = append(errs, fmt.Errorf("dependency %s: %w", cur.info.Path, cerr))
		}
	}
}

// errStillWanted: a job still waits for the path.
var errStillWanted = errors.New("still wanted by a job")

// waitAbandoned waits until no work on p is left: its node, cancelled
// because no job waits for it any more, has stopped. It returns
// errStillWanted if a job does wait for p, or ctx's error.
func (g *graph) waitAbandoned(ctx context.Context, p string) error {
	for {
		g.mu.Lock()
		n := g.nodes[p]
		g.mu.Unlock()
		if n == nil {
			return nil
		}
		if n.ctx.Err() == nil {
			return errStillWanted
		}
		select {
		case <-n.done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// inProgress is how many paths are being uploaded.
func (g *graph) inProgress() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.nodes)
}

// workQueue is a FIFO of tasks with a priority lane (narinfo writes, which
// unblock other paths) worked by a fixed set of goroutines.
type workQueue struct {
	mu     sync.Mutex
	cond   *sync.Cond
	high   []func()
	low    []func()
	closed bool
}

func newWorkQueue() *workQueue {
	q := &workQueue{}
	q.cond = sync.NewCond(&q.mu)
	return q
}

func (q *workQueue) push(high bool, task func()) {
	q.mu.Lock()
	if high {
		q.high = append(q.high, task)
	} else {
		q.low = append(q.low, task)
	}
	q.mu.Unlock()
	q.cond.Signal()
}

func (q *workQueue) pop() func() {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.high) == 0 && len(q.low) == 0 && !q.closed {
		q.cond.Wait()
	}
	var t func()
	switch {
	case len(q.high) > 0:
		t, q.high[0] = q.high[0], nil
		q.high = q.high[1:]
	case len(q.low) > 0:
		t, q.low[0] = q.low[0], nil
		q.low = q.low[1:]
	}
	return t
}

func (q *workQueue) run() {
	for t := q.pop(); t != nil; t = q.pop() {
		t()
	}
}

func (q *workQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.cond.Broadcast()
}

package queue

import (
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"
)

const testDeadline = 20 * time.Second

// commitGate stops the committer in a test hook for each of the next n
// commits until the test lets it go: held receives once per stopped commit,
// and each value sent on release lets one go.
type commitGate struct {
	held    chan struct{}
	release chan struct{}
}

// gateCommits installs a gate on hook (one of the Queue's test hooks). It
// must be called while no commit is running.
func gateCommits(hook *func(), n int) *commitGate {
	g := &commitGate{held: make(chan struct{}, n), release: make(chan struct{}, n)}
	left := n // only the committer goroutine reads and writes it
	*hook = func() {
		if left > 0 {
			left--
			g.held <- struct{}{}
			<-g.release
		}
	}
	return g
}

// await returns the next value from ch, failing the test if none comes in
// time.
func await[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(testDeadline):
		t.Fatalf("%s: nothing within %v", what, testDeadline)
		panic("unreachable")
	}
}

// waitFor polls cond until it holds, failing the test if it does not in
// time.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testDeadline)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, testDeadline)
		}
		time.Sleep(time.Millisecond)
	}
}

// leaseEntries counts the queue's in-memory bookkeeping of leases.
func (q *Queue) leaseEntries() (leased, again, dropped int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.leased), len(q.again), len(q.dropped)
}

// wantReadyAgain checks that job id is ready with its attempts reset, as a
// request answered while it was leased promises.
func wantReadyAgain(t *testing.T, q *Queue, id uint64) {
	t.Helper()
	j, err := q.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	if j.State != StateReady || j.Attempts != 0 {
		t.Fatalf("job %d is %s with %d attempts; a request for it was answered while it was leased, so it must be ready with no attempts", id, j.State, j.Attempts)
	}
	if s := mustStats(t, q); s.Failed != 0 || s.Pending != 1 {
		t.Fatalf("stats = %+v, want one pending job and none failed", s)
	}
}

// TestRequestDuringFailCommit: a path is requested again while the commit
// that moves its leased job to the dead letter is running, and not yet
// visible to readers. The request must not be answered from the state
// before that commit: the job must end up ready.
func TestRequestDuringFailCommit(t *testing.T) {
	q, _ := openTest(t)
	if _, err := q.Enqueue([]string{"/nix/store/a"}, "", t0); err != nil {
		t.Fatal(err)
	}
	j, _ := q.Lease(t0)
	g := gateCommits(&q.inWrite, 1)
	failed := make(chan error, 1)
	go func() { failed <- q.Fail(j.ID, "access denied", t0) }()
	await(t, g.held, "Fail's commit")

	enqueued := make(chan error, 1)
	go func() {
		_, err := q.Enqueue([]string{"/nix/store/a"}, "", t0.Add(time.Second))
		enqueued <- err
	}()
	// The request answers at once, or it waits for a commit of its own.
	waitFor(t, "the request to answer or to wait for a commit", func() bool {
		return len(enqueued) > 0 || len(q.ops) > 0
	})
	g.release <- struct{}{}
	if err := await(t, enqueued, "Enqueue"); err != nil {
		t.Fatal(err)
	}
	if err := await(t, failed, "Fail"); err != nil && !errors.Is(err, ErrRequeued) {
		t.Fatal(err)
	}
	wantReadyAgain(t, q, j.ID)
}

// TestRequestBeforeFailCommit: a path is requested again after Fail was
// called for its leased job, while Fail's commit waits for the committer.
// The failure must then make the job ready again instead of failing it.
func TestRequestBeforeFailCommit(t *testing.T) {
	q, _ := openTest(t)
	if _, err := q.Enqueue([]string{"/nix/store/a"}, "", t0); err != nil {
		t.Fatal(err)
	}
	j, _ := q.Lease(t0)
	g := gateCommits(&q.inWrite, 1)
	saved := make(chan error, 1)
	go func() { saved <- q.SaveUpload("/nix/store/other", []byte("x")) }()
	await(t, g.held, "an unrelated commit")

	failed := make(chan error, 1)
	go func() { failed <- q.Fail(j.ID, "access denied", t0) }()
	waitFor(t, "Fail to wait for the committer", func() bool { return len(q.ops) > 0 })
	enqueued := make(chan error, 1)
	go func() {
		_, err := q.Enqueue([]string{"/nix/store/a"}, "", t0.Add(time.Second))
		enqueued <- err
	}()
	// The request answers at once (the job is ready on disk), or it waits
	// for a commit of its own.
	waitFor(t, "the request to answer or to wait for a commit", func() bool {
		return len(enqueued) > 0 || len(q.ops) > 1
	})
	g.release <- struct{}{}
	if err := await(t, saved, "SaveUpload"); err != nil {
		t.Fatal(err)
	}
	if err := await(t, enqueued, "Enqueue"); err != nil {
		t.Fatal(err)
	}
	err := await(t, failed, "Fail")
	wantReadyAgain(t, q, j.ID)
	if !errors.Is(err, ErrRequeued) {
		t.Fatalf("Fail = %v, want ErrRequeued", err)
	}
}

// TestCloseAnswersPendingOperations races Close with concurrent enqueues:
// every caller gets an answer (a result, or ErrClosed), and every enqueue
// that succeeded is in the file. In odd rounds every enqueue is waiting for
// the committer when Close is called, so every one must succeed.
func TestCloseAnswersPendingOperations(t *testing.T) {
	dir := t.TempDir()
	const rounds, callers = 30, 64
	for round := range rounds {
		path := filepath.Join(dir, fmt.Sprintf("q%d.db", round))
		q, err := Open(path)
		if err != nil {
			t.Fatal(err)
		}
		waiting := round%2 == 1
		var g *commitGate
		held := make(chan error, 1)
		if waiting {
			// Hold the committer in a first commit while the others queue
			// up behind it.
			g = gateCommits(&q.inWrite, 1)
			go func() {
				_, err := q.Enqueue([]string{"/nix/store/first"}, "", t0)
				held <- err
			}()
			await(t, g.held, "the first commit")
		}
		start := make(chan struct{})
		type answer struct {
			path string
			err  error
		}
		answers := make(chan answer, callers)
		for i := range callers {
			p := fmt.Sprintf("/nix/store/p-%d-%d", round, i)
			go func() {
				<-start
				_, err := q.Enqueue([]string{p}, "", t0)
				answers <- answer{p, err}
			}()
		}
		close(start)
		if waiting {
			waitFor(t, "every enqueue to wait for the committer", func() bool { return len(q.ops) == callers })
		}
		closed := make(chan error, 1)
		go func() { closed <- q.Close() }()
		if waiting {
			waitFor(t, "Close to stop the committer", func() bool {
				select {
				case <-q.stop:
					return true
				default:
					return false
				}
			})
			g.release <- struct{}{}
			if err := await(t, held, "the first enqueue"); err != nil {
				t.Fatalf("round %d: first enqueue: %v", round, err)
			}
		}
		var acked []string
		deadline := time.After(testDeadline)
		for i := range callers {
			select {
			case a := <-answers:
				switch {
				case a.err == nil:
					acked = append(acked, a.path)
				case waiting || !errors.Is(a.err, ErrClosed):
					t.Fatalf("round %d: enqueue of %s: %v", round, a.path, a.err)
				}
			case <-deadline:
				t.Fatalf("round %d: %d of %d enqueues still unanswered %v after Close", round, callers-i, callers, testDeadline)
			}
		}
		if err := await(t, closed, "Close"); err != nil {
			t.Fatalf("round %d: close: %v", round, err)
		}
		q, err = Open(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := q.Check(); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		jobs, err := q.List("", 2*callers)
		if err != nil {
			t.Fatal(err)
		}
		have := map[string]bool{}
		for _, j := range jobs {
			have[j.Path] = true
		}
		for _, p := range acked {
			if !have[p] {
				t.Fatalf("round %d: acknowledged enqueue of %s is not in the file", round, p)
			}
		}
		q.Close()
	}
}

// TestNoLeftoverLeaseEntries: the in-memory records of leases (requested
// again, dropped) go with the lease, whatever order a drop and the
// worker's outcome come in.
func TestNoLeftoverLeaseEntries(t *testing.T) {
	wantNone := func(t *testing.T, q *Queue) {
		t.Helper()
		if l, a, d := q.leaseEntries(); l+a+d != 0 {
			t.Fatalf("left over: %d leases, %d requested-again and %d dropped entries", l, a, d)
		}
	}

	t.Run("requested again, then dropped", func(t *testing.T) {
		q, _ := openTest(t)
		q.Enqueue([]string{"/nix/store/a"}, "", t0)
		j, _ := q.Lease(t0)
		if _, err := q.Enqueue([]string{"/nix/store/a"}, "", t0); err != nil {
			t.Fatal(err)
		}
		if _, err := q.Drop(j.ID); err != nil {
			t.Fatal(err)
		}
		if err := q.Release(j.ID); err != nil {
			t.Fatal(err)
		}
		wantNone(t, q)
	})

	// A drop that commits after the outcome has checked its lease, and
	// returns before the outcome has ended it.
	outcomes := []struct {
		name   string
		report func(q *Queue, id uint64, done chan<- error)
	}{
		{"ack", func(q *Queue, id uint64, done chan<- error) {
			q.AckAsync(id, Totals{Paths: 1}, func(err error) { done <- err })
		}},
		{"fail", func(q *Queue, id uint64, done chan<- error) {
			go func() { done <- q.Fail(id, "x", t0) }()
		}},
		{"retry later", func(q *Queue, id uint64, done chan<- error) {
			go func() { done <- q.RetryLater(id, t0, "x", t0) }()
		}},
	}
	for _, o := range outcomes {
		t.Run("dropped during "+o.name, func(t *testing.T) {
			q, _ := openTest(t)
			q.Enqueue([]string{"/nix/store/a"}, "", t0)
			j, _ := q.Lease(t0)
			g := gateCommits(&q.afterWrite, 2)
			dropped := make(chan error, 1)
			go func() {
				_, err := q.Drop(j.ID)
				dropped <- err
			}()
			await(t, g.held, "Drop's commit")
			reported := make(chan error, 1)
			o.report(q, j.ID, reported)
			waitFor(t, o.name+" to wait for the committer", func() bool { return len(q.ops) > 0 })
			g.release <- struct{}{}
			if err := await(t, dropped, "Drop"); err != nil {
				t.Fatal(err)
			}
			await(t, g.held, o.name+"'s commit")
			g.release <- struct{}{}
			err := await(t, reported, o.name)
			wantNone(t, q)
			if err != nil {
				t.Fatalf("%s of a job dropped meanwhile: %v", o.name, err)
			}
			if s := mustStats(t, q); s.Pending+s.Retrying+s.Failed+s.Leased != 0 || s.Uploaded != 0 {
				t.Fatalf("stats after the drop = %+v", s)
			}
		})
	}
}

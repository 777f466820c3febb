package queue

import (
	"errors"
	"testing"
	"time"
)

// TestEnqueueRequeuesFailed: a new request for a path whose job failed
// makes that job ready again with its attempts reset, also when every path
// of the request is already queued (the read-only shortcut must not answer
// for a failed job).
func TestEnqueueRequeuesFailed(t *testing.T) {
	q, _ := openTest(t)
	res, err := q.Enqueue([]string{"/nix/store/a", "/nix/store/b"}, "/nix/store/x.drv", t0)
	if err != nil {
		t.Fatal(err)
	}
	a := res[0].Job
	for i := 0; i < 2; i++ { // two attempts, then the dead letter
		j, _ := q.Lease(t0.Add(time.Hour))
		if j == nil || j.ID != a.ID {
			t.Fatalf("lease = %+v, want job %d", j, a.ID)
		}
		if i == 0 {
			q.RetryLater(j.ID, t0, "503", t0)
		} else {
			q.Fail(j.ID, "/nix/store/a is not valid", t0)
		}
	}
	if s := mustStats(t, q); s.Failed != 1 || s.Pending != 1 {
		t.Fatalf("stats before the new request = %+v", s)
	}

	later := t0.Add(time.Minute)
	again, err := q.Enqueue([]string{"/nix/store/a", "/nix/store/b"}, "/nix/store/y.drv", later)
	if err != nil {
		t.Fatal(err)
	}
	if len(again) != 2 || again[0].Job.ID != a.ID || again[0].New || !again[0].Requeued || again[1].Requeued {
		t.Fatalf("enqueue of a failed path = %+v", again)
	}
	j := again[0].Job
	if j.State != StateReady || j.Attempts != 0 || !j.NotBefore.Equal(later) || j.Drv != "/nix/store/y.drv" || j.LastError == "" {
		t.Fatalf("requeued job = %+v, want ready, no attempts, due now, new drv, last error kept", j)
	}
	if s := mustStats(t, q); s.Failed != 0 || s.Pending != 2 || s.Retrying != 0 {
		t.Fatalf("stats after the new request = %+v", s)
	}
	// b is due first (since t0), then the requeued a.
	if got, _ := q.Lease(later); got == nil || got.ID != res[1].Job.ID {
		t.Fatalf("first lease = %+v, want b", got)
	}
	if got, _ := q.Lease(later); got == nil || got.ID != a.ID {
		t.Fatalf("requeued job is not leasable: %+v", got)
	}
}

// TestAlreadyQueuedWaitsForDurableCommit holds a commit after bbolt has
// written it and before the committer has recorded it as durable (as
// readers see it, the window between the meta page write and its fsync).
// A second request for the same path sees the job in a read transaction;
// it must not be acknowledged before the commit is durable.
func TestAlreadyQueuedWaitsForDurableCommit(t *testing.T) {
	q, _ := openTest(t)
	held, release := make(chan struct{}), make(chan struct{})
	hold := true
	q.afterWrite = func() {
		if hold { // only the first commit; runs on the committer goroutine
			hold = false
			close(held)
			<-release
		}
	}
	waiting := make(chan struct{}, 1)
	q.waitingDurable = func() { waiting <- struct{}{} }

	type result struct {
		res []EnqueueResult
		err error
	}
	first, second := make(chan result, 1), make(chan result, 1)
	go func() {
		r, err := q.Enqueue([]string{"/nix/store/p"}, "", t0)
		first <- result{r, err}
	}()
	<-held
	go func() {
		r, err := q.Enqueue([]string{"/nix/store/p"}, "", t0)
		second <- result{r, err}
	}()
	select {
	case r := <-second:
		close(release)
		t.Fatalf("the second request was acknowledged (%+v, %v) while the commit holding its job was not durable", r.res, r.err)
	case r := <-first:
		close(release)
		t.Fatalf("the first request was acknowledged (%+v, %v) before its commit was durable", r.res, r.err)
	case <-waiting:
	}
	close(release)
	a, b := <-first, <-second
	if a.err != nil || b.err != nil {
		t.Fatalf("enqueue errors: %v, %v", a.err, b.err)
	}
	if !a.res[0].New || b.res[0].New || a.res[0].Job.ID != b.res[0].Job.ID {
		t.Fatalf("results = %+v and %+v, want one new job shared", a.res, b.res)
	}
	// Once durable, the shortcut answers at once.
	if r, err := q.Enqueue([]string{"/nix/store/p"}, "", t0); err != nil || r[0].Job.ID != a.res[0].Job.ID {
		t.Fatalf("third request = %+v, %v", r, err)
	}
}

// TestDropWhileLeased: the outcome a worker reports for a job that was
// dropped while it uploaded is accepted quietly and changes nothing.
func TestDropWhileLeased(t *testing.T) {
	q, _ := openTest(t)
	q.Enqueue([]string{"/p/1", "/p/2", "/p/3", "/p/4"}, "", t0)
	outcomes := []struct {
		name   string
		report func(id uint64) error
	}{
		{"ack", func(id uint64) error { return q.Ack(id, Totals{Paths: 1, NARBytes: 10}) }},
		{"retry later", func(id uint64) error { return q.RetryLater(id, t0, "x", t0) }},
		{"fail", func(id uint64) error { return q.Fail(id, "x", t0) }},
		{"release", func(id uint64) error { return q.Release(id) }},
	}
	for _, o := range outcomes {
		j, _ := q.Lease(t0)
		if j == nil {
			t.Fatal("nothing to lease")
		}
		d, err := q.Drop(j.ID)
		if err != nil || d.State != StateLeased {
			t.Fatalf("%s: drop = %+v, %v", o.name, d, err)
		}
		if q.IsLeased(j.ID) {
			t.Fatalf("%s: still leased after the drop", o.name)
		}
		if err := o.report(j.ID); err != nil {
			t.Fatalf("%s of a job dropped during its upload: %v", o.name, err)
		}
		// Only once: a second report is an error again.
		if err := q.Release(j.ID); !errors.Is(err, ErrState) {
			t.Fatalf("%s: second report = %v, want ErrState", o.name, err)
		}
	}
	s := mustStats(t, q)
	if s.Pending+s.Retrying+s.Failed+s.Leased != 0 || s.Uploaded != 0 {
		t.Fatalf("stats after dropping every job = %+v", s)
	}
}

// TestRequestedAgainDuringAFailingAttempt: a path requested again while its
// job is being uploaded is not swallowed if that attempt then fails for
// good: the job is ready again, attempts reset (the new request means
// "will be uploaded"). Without a new request, a failure parks the job.
func TestRequestedAgainDuringAFailingAttempt(t *testing.T) {
	q, _ := openTest(t)
	now := time.Now()
	if _, err := q.Enqueue([]string{"/nix/store/a", "/nix/store/b"}, "", now); err != nil {
		t.Fatal(err)
	}
	ja, _ := q.Lease(now)
	jb, _ := q.Lease(now)
	if _, err := q.Enqueue([]string{ja.Path}, "", now); err != nil { // the hook, again
		t.Fatal(err)
	}
	if err := q.Fail(ja.ID, "path gone", now); !errors.Is(err, ErrRequeued) {
		t.Fatalf("Fail of a job requested again = %v, want ErrRequeued", err)
	}
	if j, _ := q.Get(ja.ID); j.State != StateReady || j.Attempts != 0 {
		t.Fatalf("job requested again: %+v, want ready with no attempts", j)
	}
	if err := q.Fail(jb.ID, "path gone", now); err != nil {
		t.Fatal(err)
	}
	if j, _ := q.Get(jb.ID); j.State != StateFailed {
		t.Fatalf("job not requested again: %+v, want failed", j)
	}
}

package agent

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/nixroots"
	"github.com/nixspool/nixspool/internal/queue"
	"github.com/nixspool/nixspool/internal/spool"
)

// TestUnrootKeepsRequeuedPath: the GC root removal that follows an ack
// (it runs once the ack is durable) leaves the root alone when the path
// was queued again meanwhile: the new request found the old job's root in
// place and made none of its own.
func TestUnrootKeepsRequeuedPath(t *testing.T) {
	a := testAgent(t)
	p := "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-again"
	link := filepath.Join(a.roots.dir.Dir(), filepath.Base(p))
	if err := a.roots.dir.AddAll([]string{p}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.queue.Enqueue([]string{p}, "", time.Now()); err != nil {
		t.Fatal(err)
	}
	job, err := a.queue.Lease(time.Now())
	if err != nil || job == nil {
		t.Fatalf("lease: %v %v", job, err)
	}
	if err := a.queue.Ack(job.ID, queue.Totals{}); err != nil {
		t.Fatal(err)
	}
	// A new request for the path, before the ack's root removal runs.
	if err := a.roots.dir.AddAll([]string{p}); err != nil {
		t.Fatal(err)
	}
	res, err := a.queue.Enqueue([]string{p}, "", time.Now())
	if err != nil || !res[0].New {
		t.Fatalf("enqueue again: %+v %v", res, err)
	}
	if err := a.roots.unroot(p, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(link); err != nil {
		t.Fatalf("root of a queued path removed by the previous job's ack: %v", err)
	}

	// Once the path's last job is gone, its root goes too.
	job, _ = a.queue.Lease(time.Now())
	if err := a.queue.Ack(job.ID, queue.Totals{}); err != nil {
		t.Fatal(err)
	}
	if err := a.roots.unroot(p, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(link); !os.IsNotExist(err) {
		t.Fatalf("root of an uploaded path kept: %v", err)
	}
}

// TestUnrootKeepsSpooledPath: a hook that spools a request for a path
// whose job is being uploaded finds the job's root in place and makes none
// of its own; the root removal after the job's ack leaves it, and the
// derivation's, while the spool holds the request, also once the request is
// set aside (*.bad).
func TestUnrootKeepsSpooledPath(t *testing.T) {
	a := testAgent(t)
	p := "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-spooled-again"
	drv := "/nix/store/dddddddddddddddddddddddddddddddd-spooled-again.drv"
	link := filepath.Join(a.roots.dir.Dir(), filepath.Base(p))
	if err := a.roots.dir.AddAll([]string{p}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.queue.Enqueue([]string{p}, "", time.Now()); err != nil {
		t.Fatal(err)
	}
	job, err := a.queue.Lease(time.Now())
	if err != nil || job == nil {
		t.Fatalf("lease: %v %v", job, err)
	}
	// The hook, agentd out of reach: roots (the root is there) and spools.
	if err := a.roots.dir.AddAll([]string{p, drv}); err != nil {
		t.Fatal(err)
	}
	f, err := spool.Write(a.spoolDir(), spool.Entry{Paths: []string{p}, Drv: drv})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.queue.Ack(job.ID, queue.Totals{}); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{p, drv} {
		if err := a.roots.unroot(q, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Lstat(link); err != nil {
		t.Fatalf("root of a spooled path removed by the previous job's ack: %v", err)
	}
	if err := spool.Quarantine(f); err != nil {
		t.Fatal(err)
	}
	if err := a.roots.unroot(p, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(link); err != nil {
		t.Fatalf("root of a path of a request set aside removed: %v", err)
	}
	if err := os.Remove(f + ".bad"); err != nil {
		t.Fatal(err)
	}
	if err := a.roots.unroot(p, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(link); !os.IsNotExist(err) {
		t.Fatalf("root kept once nothing needs it: %v", err)
	}
}

// TestRecoverWaitsForSpoolingHook: the start-up reconciliation of GC roots
// runs while hooks may be spooling (the socket is open, requests are not
// served yet). A hook that finds an old root of its path in place (left
// by an upload that finished just before a crash) holds the roots lock
// until its spool file is written; the reconciliation waits for it and
// keeps the root.
func TestRecoverWaitsForSpoolingHook(t *testing.T) {
	a := testAgent(t)
	p := "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-old-root"
	if err := a.roots.dir.AddAll([]string{p}); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(a.roots.dir.Dir(), filepath.Base(p))
	age(t, link, time.Hour)

	// The hook: lock, root (present already), then spool.
	unlock, err := a.roots.dir.Lock(false, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.roots.dir.AddAll([]string{p}); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- a.roots.reconcile() }()
	select {
	case err := <-done:
		unlock()
		t.Fatalf("reconciliation ran while a hook held the roots lock (err %v)", err)
	case <-time.After(300 * time.Millisecond):
	}
	if _, err := spool.Write(a.spoolDir(), spool.Entry{Paths: []string{p}}); err != nil {
		t.Fatal(err)
	}
	unlock()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(rootsLockWait + 5*time.Second):
		t.Fatal("reconciliation did not finish once the hook released the lock")
	}
	if _, err := os.Lstat(link); err != nil {
		t.Fatalf("root of a path spooled during the reconciliation removed: %v", err)
	}
}

// TestRecoverKeepsRootsOfSetAsideRequests: the paths and derivations of
// spool files (waiting, or set aside as *.bad for an operator) keep their
// roots across a restart.
func TestRecoverKeepsRootsOfSetAsideRequests(t *testing.T) {
	a := testAgent(t)
	bad := "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-set-aside"
	badDrv := "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-set-aside.drv"
	waitingDrv := "/nix/store/cccccccccccccccccccccccccccccccc-waiting.drv"
	f, err := spool.Write(a.spoolDir(), spool.Entry{Paths: []string{bad}, Drv: badDrv, Floating: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := spool.Quarantine(f); err != nil {
		t.Fatal(err)
	}
	if _, err := spool.Write(a.spoolDir(), spool.Entry{Drv: waitingDrv, Floating: true}); err != nil {
		t.Fatal(err)
	}
	all := []string{bad, badDrv, waitingDrv}
	if err := a.roots.dir.AddAll(all); err != nil {
		t.Fatal(err)
	}
	for _, p := range all {
		age(t, filepath.Join(a.roots.dir.Dir(), filepath.Base(p)), time.Hour)
	}
	if err := a.roots.reconcile(); err != nil {
		t.Fatal(err)
	}
	for _, p := range all {
		if _, err := os.Lstat(filepath.Join(a.roots.dir.Dir(), filepath.Base(p))); err != nil {
			t.Errorf("root of %s removed at start: %v", p, err)
		}
	}
}

// TestDerivationRootsFollowJobs: a queued job keeps its derivation alive
// (agentd reads it for the realisations at upload, possibly after a store
// collection); each output's job holds a root of its own, so the first
// output uploaded does not release the derivation the other still needs.
func TestDerivationRootsFollowJobs(t *testing.T) {
	a := testAgent(t)
	out := "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-multi"
	dev := "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-multi-dev"
	drv := "/nix/store/dddddddddddddddddddddddddddddddd-multi.drv"
	a.intake.store = &fakeStore{valid: map[string]bool{out: true, dev: true}}
	if _, err := a.enqueue(context.Background(), []string{out, dev}, drv, queue.SourceHook); err != nil {
		t.Fatal(err)
	}
	drvRooted := func() int {
		n := 0
		ents, _ := os.ReadDir(a.roots.dir.Dir())
		for _, e := range ents {
			if target, err := os.Readlink(filepath.Join(a.roots.dir.Dir(), e.Name())); err == nil && target == drv {
				n++
			}
		}
		return n
	}
	if n := drvRooted(); n != 2 {
		t.Fatalf("%d roots of the derivation of two queued outputs, want 2", n)
	}
	for i := 2; i > 0; i-- {
		job, err := a.queue.Lease(time.Now())
		if err != nil || job == nil {
			t.Fatalf("lease: %v %v", job, err)
		}
		if err := a.queue.Ack(job.ID, queue.Totals{}); err != nil {
			t.Fatal(err)
		}
		if err := a.roots.unroot(job.Path, job.Derivations()); err != nil {
			t.Fatal(err)
		}
		if n := drvRooted(); n != i-1 {
			t.Fatalf("after an upload: %d roots of the derivation, want %d", n, i-1)
		}
	}
}

// rootNames lists the GC roots agentd holds.
func rootNames(t *testing.T, a *Agent) []string {
	t.Helper()
	ents, err := os.ReadDir(a.roots.dir.Dir())
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// uploadOnce leases the next job and acknowledges it as the worker does:
// the ack, then the removal of its roots.
func uploadOnce(t *testing.T, a *Agent) *queue.Job {
	t.Helper()
	job, err := a.queue.Lease(time.Now())
	if err != nil || job == nil {
		t.Fatalf("lease: %v %v", job, err)
	}
	if err := a.queue.Ack(job.ID, queue.Totals{}); err != nil {
		t.Fatal(err)
	}
	if err := a.roots.unroot(job.Path, job.Derivations()); err != nil {
		t.Fatal(err)
	}
	return job
}

// TestSecondDerivationDuringUploadKeepsJobAndRoots: the second derivation
// of a path (the CA flow: resolved .drv, then the .drv clients know) is
// requested while the path's job is leased. The ack keeps the job for it,
// with the roots it needs and without the first derivation's; once that
// job is done, no root of the path is left.
func TestSecondDerivationDuringUploadKeepsJobAndRoots(t *testing.T) {
	a := testAgent(t)
	out := "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-ca"
	drv1 := "/nix/store/cccccccccccccccccccccccccccccccc-ca-resolved.drv"
	drv2 := "/nix/store/dddddddddddddddddddddddddddddddd-ca.drv"
	a.intake.store = &fakeStore{valid: map[string]bool{out: true}}
	if _, err := a.enqueue(context.Background(), []string{out}, drv1, queue.SourceHook); err != nil {
		t.Fatal(err)
	}
	job, err := a.queue.Lease(time.Now())
	if err != nil || job == nil {
		t.Fatalf("lease: %v %v", job, err)
	}
	if _, err := a.enqueue(context.Background(), []string{out}, drv2, queue.SourceHook); err != nil {
		t.Fatal(err)
	}
	if err := a.queue.Ack(job.ID, queue.Totals{}); err != nil {
		t.Fatal(err)
	}
	if err := a.roots.unroot(job.Path, job.Derivations()); err != nil {
		t.Fatal(err)
	}
	want := []string{filepath.Base(out), nixroots.DerivationRoot(drv2, out)} // sorted
	if got := rootNames(t, a); !slices.Equal(got, want) {
		t.Fatalf("roots after the first ack: %v, want %v", got, want)
	}
	if j := uploadOnce(t, a); !slices.Equal(j.Derivations(), []string{drv2}) {
		t.Fatalf("kept job is for %v, want [%s]", j.Derivations(), drv2)
	}
	if got := rootNames(t, a); len(got) > 0 {
		t.Errorf("roots left after the path's jobs were acknowledged: %v", got)
	}
}

// TestUnrootAfterRequeueForAnotherDerivation: the path is queued again for
// another derivation between the ack and the removal of its roots: the new
// job keeps the path's root and its derivation's, not the old job's.
func TestUnrootAfterRequeueForAnotherDerivation(t *testing.T) {
	a := testAgent(t)
	out := "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-ca"
	drv1 := "/nix/store/cccccccccccccccccccccccccccccccc-ca-resolved.drv"
	drv2 := "/nix/store/dddddddddddddddddddddddddddddddd-ca.drv"
	a.intake.store = &fakeStore{valid: map[string]bool{out: true}}
	if _, err := a.enqueue(context.Background(), []string{out}, drv1, queue.SourceHook); err != nil {
		t.Fatal(err)
	}
	job, err := a.queue.Lease(time.Now())
	if err != nil || job == nil {
		t.Fatalf("lease: %v %v", job, err)
	}
	if err := a.queue.Ack(job.ID, queue.Totals{}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.enqueue(context.Background(), []string{out}, drv2, queue.SourceHook); err != nil {
		t.Fatal(err)
	}
	if err := a.roots.unroot(job.Path, job.Derivations()); err != nil {
		t.Fatal(err)
	}
	want := []string{filepath.Base(out), nixroots.DerivationRoot(drv2, out)} // sorted
	if got := rootNames(t, a); !slices.Equal(got, want) {
		t.Fatalf("roots: %v, want %v", got, want)
	}
	uploadOnce(t, a)
	if got := rootNames(t, a); len(got) > 0 {
		t.Errorf("roots left after the path's jobs were acknowledged: %v", got)
	}
}

// TestUnrootWaitingForHooksDoesNotBlockEnqueues: a removal of GC roots
// that waits for the roots directory's lock (spooling hooks hold it) does
// not hold up enqueues meanwhile; when it gives up, the removal is tried
// again later and then done.
func TestUnrootWaitingForHooksDoesNotBlockEnqueues(t *testing.T) {
	a := testAgent(t)
	a.roots.wait = 2 * time.Second
	done := "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-done"
	other := "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-other"
	a.intake.store = &fakeStore{valid: map[string]bool{done: true, other: true}}
	if err := a.roots.dir.AddAll([]string{done}); err != nil {
		t.Fatal(err)
	}
	// A spooling hook holds the lock.
	unlock, err := a.roots.dir.Lock(false, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { unlock() }()
	removed := make(chan error, 1)
	go func() { removed <- a.roots.unroot(done, nil) }()
	time.Sleep(100 * time.Millisecond) // let the removal start waiting
	enqueued := make(chan error, 1)
	go func() {
		_, err := a.enqueue(context.Background(), []string{other}, "", queue.SourceHook)
		enqueued <- err
	}()
	select {
	case err := <-enqueued:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Second):
		t.Fatal("an enqueue waited for a removal of GC roots that waits for the roots lock")
	}
	if err := <-removed; err == nil {
		t.Fatal("removal succeeded while a hook held the roots lock")
	}
	link := filepath.Join(a.roots.dir.Dir(), filepath.Base(done))
	if _, err := os.Lstat(link); err != nil {
		t.Fatalf("root removed without the lock: %v", err)
	}
	unlock()
	unlock = func() {}
	a.roots.retry()
	if _, err := os.Lstat(link); !os.IsNotExist(err) {
		t.Fatalf("root still there after the removal was tried again: %v", err)
	}
	if n := a.roots.later.len(); n != 0 {
		t.Errorf("%d removals left to try again", n)
	}
	if _, err := os.Lstat(filepath.Join(a.roots.dir.Dir(), filepath.Base(other))); err != nil {
		t.Errorf("root of the queued path: %v", err)
	}
}

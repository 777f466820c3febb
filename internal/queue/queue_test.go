package queue

import (
	"bufio"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func openTest(t *testing.T) (*Queue, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "queue.db")
	q, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := q.Check(); err != nil {
			t.Errorf("final check: %v", err)
		}
		q.Close()
	})
	return q, path
}

func mustStats(t *testing.T, q *Queue) Stats {
	t.Helper()
	s, err := q.Stats()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func TestLifecycle(t *testing.T) {
	q, _ := openTest(t)
	res, err := q.Enqueue([]string{"/nix/store/a", "/nix/store/b"}, "/nix/store/x.drv", t0)
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 2 || !res[0].New || !res[1].New || res[0].Job.ID == res[1].Job.ID {
		t.Fatalf("enqueue results = %+v", res)
	}
	// Deduplication: same path returns the existing job.
	again, err := q.Enqueue([]string{"/nix/store/a"}, "", t0.Add(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if again[0].New || again[0].Job.ID != res[0].Job.ID {
		t.Fatalf("re-enqueue = %+v, want existing job %d", again[0], res[0].Job.ID)
	}
	if s := mustStats(t, q); s.Pending != 2 || !s.OldestActive.Equal(t0) {
		t.Fatalf("stats = %+v", s)
	}

	j, err := q.Lease(t0)
	if err != nil || j == nil || j.Path != "/nix/store/a" || j.State != StateLeased {
		t.Fatalf("lease = %+v, %v", j, err)
	}
	if s := mustStats(t, q); s.Leased != 1 || s.Pending != 1 {
		t.Fatalf("stats with one lease = %+v", s)
	}
	if got, _ := q.List(StateLeased, 10); len(got) != 1 || got[0].ID != j.ID {
		t.Fatalf("List(leased) = %+v", got)
	}
	// Transient failure: back to ready, due later; the other job is leased first.
	if err := q.RetryLater(j.ID, t0.Add(time.Minute), "503 Service Unavailable", t0); err != nil {
		t.Fatal(err)
	}
	if s := mustStats(t, q); s.Retrying != 1 || s.Pending != 1 || s.LastError != "503 Service Unavailable" {
		t.Fatalf("stats after retry = %+v", s)
	}
	j2, _ := q.Lease(t0)
	if j2 == nil || j2.Path != "/nix/store/b" {
		t.Fatalf("second lease = %+v, want /nix/store/b", j2)
	}
	if j3, _ := q.Lease(t0.Add(30 * time.Second)); j3 != nil {
		t.Fatalf("lease before not-before returned %+v", j3)
	}
	due, ok, _ := q.NextDue()
	if !ok || !due.Equal(t0.Add(time.Minute)) {
		t.Fatalf("NextDue = %v %v", due, ok)
	}
	if err := q.Ack(j2.ID, Totals{Paths: 1, NARBytes: 100, FileBytes: 40}); err != nil {
		t.Fatal(err)
	}
	j, _ = q.Lease(t0.Add(time.Minute))
	if j == nil || j.Attempts != 1 {
		t.Fatalf("lease after backoff = %+v", j)
	}
	if err := q.Fail(j.ID, "access denied", t0); err != nil {
		t.Fatal(err)
	}
	s := mustStats(t, q)
	if s.Failed != 1 || s.Uploaded != 1 || s.NARBytes != 100 || s.FileBytes != 40 || !s.OldestActive.IsZero() {
		t.Fatalf("stats = %+v", s)
	}
	failed, _ := q.List(StateFailed, 10)
	if len(failed) != 1 || failed[0].LastError != "access denied" || failed[0].Attempts != 2 {
		t.Fatalf("failed = %+v", failed)
	}
	if err := q.Ack(j.ID, Totals{Paths: 1, NARBytes: 1, FileBytes: 1}); !errors.Is(err, ErrState) {
		t.Fatalf("ack of a failed job = %v, want ErrState", err)
	}
	if err := q.Retry(j.ID, t0); err != nil {
		t.Fatal(err)
	}
	if s := mustStats(t, q); s.Failed != 0 || s.Pending != 1 {
		t.Fatalf("after retry stats = %+v", s)
	}
	if _, err := q.Drop(j.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := q.Drop(j.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second drop = %v, want ErrNotFound", err)
	}
	if err := q.RetryLater(12345, t0, "x", t0); !errors.Is(err, ErrState) {
		t.Fatalf("RetryLater of a job that is not leased = %v, want ErrState", err)
	}
}

func TestRecoverLeased(t *testing.T) {
	path := filepath.Join(t.TempDir(), "q.db")
	q, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := q.Enqueue([]string{"/p/1", "/p/2"}, "", t0); err != nil {
		t.Fatal(err)
	}
	if j, _ := q.Lease(t0); j == nil {
		t.Fatal("no lease")
	}
	q.Close()
	q, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if err := q.Check(); err != nil {
		t.Fatal(err)
	}
	if s := mustStats(t, q); s.Leased != 0 || s.Pending != 2 {
		t.Fatalf("after reopen: %+v", s)
	}
}

// TestLeaseIsExclusiveAndReleasable: a leased job is not handed out again
// until released, and release needs no commit.
func TestLeaseIsExclusiveAndReleasable(t *testing.T) {
	q, _ := openTest(t)
	q.Enqueue([]string{"/p/1"}, "", t0)
	j, _ := q.Lease(t0)
	if again, _ := q.Lease(t0); again != nil {
		t.Fatalf("job leased twice: %+v", again)
	}
	if _, ok, _ := q.NextDue(); ok {
		t.Fatal("NextDue reports a leased job as due")
	}
	if err := q.Release(j.ID); err != nil {
		t.Fatal(err)
	}
	if again, _ := q.Lease(t0); again == nil || again.ID != j.ID {
		t.Fatalf("released job not leasable: %+v", again)
	}
	if err := q.Release(999); !errors.Is(err, ErrState) {
		t.Fatalf("Release of an unknown job = %v", err)
	}
}

func TestRetryAll(t *testing.T) {
	q, _ := openTest(t)
	q.Enqueue([]string{"/p/1", "/p/2", "/p/3"}, "", t0)
	for i := 0; i < 3; i++ {
		j, _ := q.Lease(t0)
		q.Fail(j.ID, "bad", t0)
	}
	n, err := q.RetryAll(t0)
	if err != nil || n != 3 {
		t.Fatalf("RetryAll = %d, %v", n, err)
	}
	if s := mustStats(t, q); s.Pending != 3 || s.Failed != 0 {
		t.Fatalf("stats = %+v", s)
	}
}

func TestGroupCommitConcurrent(t *testing.T) {
	q, _ := openTest(t)
	var wg sync.WaitGroup
	ids := make([]uint64, 64)
	for i := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := q.Enqueue([]string{fmt.Sprintf("/p/%d", i%32)}, "", t0)
			if err != nil {
				t.Error(err)
				return
			}
			ids[i] = res[0].Job.ID
		}()
	}
	wg.Wait()
	for i := 0; i < 32; i++ {
		if ids[i] != ids[i+32] {
			t.Errorf("path %d got two jobs: %d and %d", i, ids[i], ids[i+32])
		}
	}
	if s := mustStats(t, q); s.Pending != 32 {
		t.Fatalf("pending = %d, want 32", s.Pending)
	}
}

func TestRejectsUnknownRecordVersion(t *testing.T) {
	if _, err := decodeJob([]byte{9, '{', '}'}); err == nil {
		t.Fatal("decodeJob accepted record version 9")
	}
}

// TestCrashDurability runs a child that enqueues in a loop and prints every
// acknowledged id, SIGKILLs it at random moments, and checks after each kill
// that every acknowledged id survived and the database is consistent.
func TestCrashDurability(t *testing.T) {
	if os.Getenv("QUEUE_CRASH_CHILD") != "" {
		crashChild(os.Getenv("QUEUE_CRASH_CHILD"))
		return
	}
	path := filepath.Join(t.TempDir(), "crash.db")
	acked := map[uint64]string{}
	const rounds = 25
	for round := 0; round < rounds; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrashDurability$")
		cmd.Env = append(os.Environ(), "QUEUE_CRASH_CHILD="+path)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(out)
		killAfter := 5 + rand.IntN(200)
		n := 0
		for sc.Scan() {
			var id uint64
			var p string
			if _, err := fmt.Sscanf(sc.Text(), "%d %s", &id, &p); err != nil {
				continue
			}
			acked[id] = p
			n++
			if n == killAfter {
				cmd.Process.Signal(syscall.SIGKILL)
			}
		}
		cmd.Wait()
		q, err := Open(path)
		if err != nil {
			t.Fatalf("round %d: reopen: %v", round, err)
		}
		if err := q.Check(); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		jobs, err := q.List("", 1<<30)
		if err != nil {
			t.Fatal(err)
		}
		have := map[uint64]string{}
		for _, j := range jobs {
			have[j.ID] = j.Path
		}
		for id, p := range acked {
			if have[id] != p {
				t.Fatalf("round %d: acknowledged job %d (%s) lost after SIGKILL", round, id, p)
			}
		}
		q.Close()
	}
	t.Logf("%d rounds, %d acknowledged jobs all present", rounds, len(acked))
}

func crashChild(path string) {
	q, err := Open(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	w := bufio.NewWriter(os.Stdout)
	var mu sync.Mutex
	var wg sync.WaitGroup
	base := time.Now().UnixNano()
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				p := "/nix/store/p-" + strconv.FormatInt(base, 36) + "-" + strconv.Itoa(g) + "-" + strconv.Itoa(i)
				res, err := q.Enqueue([]string{p}, "", time.Now())
				if err != nil {
					os.Exit(1)
				}
				// Exercise the other transitions while being killed.
				if i%3 == 0 {
					if j, _ := q.Lease(time.Now()); j != nil {
						if i%2 == 0 {
							q.RetryLater(j.ID, time.Now().Add(time.Hour), "x", time.Now())
						} else {
							q.Fail(j.ID, "y", time.Now())
						}
					}
				}
				mu.Lock()
				fmt.Fprintf(w, "%d %s\n", res[0].Job.ID, p)
				w.Flush()
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
}

// BenchmarkEnqueueSequential is one durable (fsynced) enqueue at a time:
// the hook's path when builds finish one by one.
func BenchmarkEnqueueSequential(b *testing.B) {
	q, err := Open(filepath.Join(b.TempDir(), "q.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	for i := 0; b.Loop(); i++ {
		if _, err := q.Enqueue([]string{"/p/" + strconv.Itoa(i)}, "", time.Now()); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkEnqueueConcurrent32 has 32 concurrent enqueuers sharing commits.
func BenchmarkEnqueueConcurrent32(b *testing.B) {
	q, err := Open(filepath.Join(b.TempDir(), "q.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	b.SetParallelism(16) // × GOMAXPROCS(2) = 32 goroutines
	var n atomic.Int64
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := q.Enqueue([]string{"/p/" + strconv.FormatInt(n.Add(1), 10)}, "", time.Now()); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

func TestPresence(t *testing.T) {
	q, _ := openTest(t)
	q.AddPresent("s3://a/b/", []string{"/nix/store/x", "/nix/store/y"}, t0)
	q.AddPresent("s3://other/", []string{"/nix/store/z"}, t0.Add(-30*24*time.Hour))
	// Lazy records are committed by the next commit.
	if _, err := q.Enqueue([]string{"/p/flush"}, "", t0); err != nil {
		t.Fatal(err)
	}
	got, err := q.Present("s3://a/b/", t0.Add(-time.Hour))
	if err != nil || len(got) != 2 || !got["/nix/store/x"].Equal(t0.Truncate(time.Second)) {
		t.Fatalf("Present = %v, %v; want both, recorded at %v", got, err, t0)
	}
	if old, _ := q.Present("s3://other/", t0.Add(-7*24*time.Hour)); len(old) != 0 {
		t.Fatalf("expired records returned: %v", old)
	}
	if err := q.ForgetPresent("s3://a/b/"); err != nil {
		t.Fatal(err)
	}
	if got, _ := q.Present("s3://a/b/", time.Time{}); len(got) != 0 {
		t.Fatalf("after forget: %v", got)
	}
	// Pruning: old records go, and so do other generations of a cache.
	q.AddPresent("s3://c/#gen1", []string{"h1"}, t0)
	q.AddPresent("s3://c/#gen2", []string{"h2", "h3"}, t0)
	q.AddPresent("s3://c/#gen2", []string{"h4"}, t0.Add(-48*time.Hour))
	n, err := q.PrunePresent("s3://c/#", "s3://c/#gen2", t0.Add(-24*time.Hour))
	if err != nil || n != 2 {
		t.Fatalf("PrunePresent = %d, %v; want 2 (gen1's record and the old one)", n, err)
	}
	if got, _ := q.Present("s3://c/#gen2", time.Time{}); len(got) != 2 {
		t.Fatalf("after pruning: %v", got)
	}
	if got, _ := q.Present("s3://c/#gen1", time.Time{}); len(got) != 0 {
		t.Fatalf("an old generation survived: %v", got)
	}
}

// TestNoDeadlockWhileGrowing runs status reads, leases and enqueues that
// grow the file (bbolt remaps it, waiting for readers) at the same time.
// Taking the lease lock inside a read transaction deadlocked here.
func TestNoDeadlockWhileGrowing(t *testing.T) {
	q, _ := openTest(t)
	done := make(chan struct{})
	var progress atomic.Int64
	go func() {
		defer close(done)
		var wg sync.WaitGroup
		stop := make(chan struct{})
		wg.Add(2)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := q.Stats(); err != nil {
					t.Error(err)
					return
				}
			}
		}()
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if j, _ := q.Lease(time.Now()); j != nil {
					q.Release(j.ID)
				}
			}
		}()
		long := strings.Repeat("x", 2000)
		for i := 0; i < 3000; i++ {
			if _, err := q.Enqueue([]string{fmt.Sprintf("/nix/store/%d-%s", i, long)}, "", time.Now()); err != nil {
				t.Error(err)
				break
			}
			progress.Add(1)
		}
		close(stop)
		wg.Wait()
	}()
	// A deadlock is no progress at all for a long while; a slow machine
	// (other tests loading both cores) only makes progress slow.
	last, lastAt := int64(-1), time.Now()
	for {
		select {
		case <-done:
			return
		case <-time.After(time.Second):
		}
		if n := progress.Load(); n != last {
			last, lastAt = n, time.Now()
		} else if time.Since(lastAt) > time.Minute {
			// Not t.Fatal: the cleanup would block on the deadlocked database.
			// A panic prints every goroutine's stack and ends the test binary.
			panic(fmt.Sprintf("deadlock: no enqueue finished for a minute (after %d); enqueues, leases and status reads stopped making progress", n))
		}
	}
}

// TestSecondDerivationIsDurable: a path requested for a second derivation
// (a resolved content-addressed build, then the derivation clients know)
// keeps both with its job, durably once the second request is answered,
// also while the job is being uploaded.
func TestSecondDerivationIsDurable(t *testing.T) {
	path := filepath.Join(t.TempDir(), "queue.db")
	q, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	const p, drvA, drvB, drvC = "/nix/store/a", "/nix/store/resolved.drv", "/nix/store/known.drv", "/nix/store/third.drv"
	if _, err := q.Enqueue([]string{p}, drvA, t0); err != nil {
		t.Fatal(err)
	}
	res, err := q.Enqueue([]string{p}, drvB, t0)
	if err != nil {
		t.Fatal(err)
	}
	if got := res[0].Job.Derivations(); !slices.Equal(got, []string{drvA, drvB}) || res[0].New {
		t.Fatalf("second request answered with %+v (derivations %v)", res[0], got)
	}
	// The same request again changes nothing.
	if res, err = q.Enqueue([]string{p}, drvB, t0); err != nil || len(res[0].Job.Drvs) != 1 {
		t.Fatalf("repeated request: %+v, %v", res, err)
	}
	// A third one while the job is being uploaded.
	if j, err := q.Lease(t0); err != nil || j == nil {
		t.Fatalf("lease: %v, %v", j, err)
	}
	if _, err := q.Enqueue([]string{p}, drvC, t0); err != nil {
		t.Fatal(err)
	}
	// A crash: nothing but what is in the file is left.
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if q, err = Open(path); err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	jobs, err := q.List("", 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(jobs) != 1 || !slices.Equal(jobs[0].Derivations(), []string{drvA, drvB, drvC}) || jobs[0].State != StateReady {
		t.Fatalf("jobs after reopening = %+v", jobs)
	}
	if err := q.Check(); err != nil {
		t.Fatal(err)
	}
}

// TestListDoesNotBlockLeases: List reads every job; while it does,
// workers still lease jobs (it used to hold the lock leases take for the
// whole scan).
func TestListDoesNotBlockLeases(t *testing.T) {
	q, _ := openTest(t)
	now := time.Now()
	for _, p := range []string{"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a", "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b", "/nix/store/cccccccccccccccccccccccccccccccc-c"} {
		if _, err := q.Enqueue([]string{p}, "", now); err != nil {
			t.Fatal(err)
		}
	}
	inScan, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	q.listing = func() {
		once.Do(func() {
			close(inScan)
			<-release
		})
	}
	var released sync.Once
	unblock := func() { released.Do(func() { close(release) }) }
	t.Cleanup(unblock)
	listed := make(chan []Job, 1)
	go func() {
		jobs, err := q.List("", 100)
		if err != nil {
			t.Error(err)
		}
		listed <- jobs
	}()
	<-inScan

	done := make(chan error, 1)
	go func() {
		j, err := q.Lease(now)
		if err == nil && j == nil {
			err = errors.New("nothing to lease")
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		unblock()
		<-done
		t.Fatal("a lease waited for a listing of the queue")
	}
	unblock()
	if jobs := <-listed; len(jobs) != 3 {
		t.Fatalf("listed %d jobs, want the 3 queued when it began", len(jobs))
	}
}

// TestGroupCommitSharesFsyncs: enqueues that wait while a commit is being
// written share the next commit (and its fsyncs) instead of one each.
func TestGroupCommitSharesFsyncs(t *testing.T) {
	q, _ := openTest(t)
	const n = 32
	before := q.Commits()
	g := gateCommits(&q.inWrite, 1)
	errs := make(chan error, n)
	enqueue := func(i int) {
		_, err := q.Enqueue([]string{fmt.Sprintf("/p/shared-%d", i)}, "", t0)
		errs <- err
	}
	go enqueue(0)
	await(t, g.held, "first commit")
	for i := 1; i < n; i++ {
		go enqueue(i)
	}
	// Every other enqueue is waiting for the committer.
	waitFor(t, "enqueues waiting", func() bool { return len(q.ops) == n-1 })
	g.release <- struct{}{}
	for i := 0; i < n; i++ {
		if err := await(t, errs, "enqueue"); err != nil {
			t.Fatal(err)
		}
	}
	if got := q.Commits() - before; got != 2 {
		t.Errorf("%d concurrent enqueues cost %d commits, want 2 (the first alone, the rest together)", n, got)
	}
	if s := mustStats(t, q); s.Pending != n {
		t.Fatalf("pending = %d, want %d", s.Pending, n)
	}
}

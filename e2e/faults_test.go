package e2e

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/testenv"
)

// checkBucketConsistent audits the whole bucket (every narinfo's NAR exists
// with its size and compression, every reference has a narinfo, every NAR
// hashes right) and returns how many narinfos it holds.
func checkBucketConsistent(t *testing.T, m *testenv.MinIO) int {
	t.Helper()
	return auditCache(t, m.CacheURL(""), append(testenv.NixEnv(""), m.Env()...)).Narinfos
}

// TestKillLoop builds 55 paths (some of 1 MiB) through the hook while
// agentd is SIGKILLed at random moments and restarted, at least 8 times.
// Nothing acknowledged may be lost and the bucket must stay consistent.
func TestKillLoop(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	// Every PUT takes 150 ms longer, so the kills land while uploads run.
	p := testenv.StartFaultProxy(t, m.Endpoint)
	p.DelayPuts(150*time.Millisecond, "")
	sk, pk := keyPair(t, "e2e-kill-1")
	a := newAgent(t, m.CacheURLVia(p), sk, m.Env(), "--jobs", "4")
	a.Start()
	dir := t.TempDir()
	var files []string
	for i := 0; i < 5; i++ {
		files = append(files, testenv.WriteGraph(t, dir, true).File)
	}
	env := testenv.NixEnv(hookConfig(), a.HookEnv()...)
	build := exec.Command("nix-build", append([]string{"--no-out-link", "-j", "2"}, files...)...)
	build.Env = env
	var out strings.Builder
	build.Stdout, build.Stderr = &out, &out
	if err := build.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- build.Wait() }()

	// Kill at random moments until the build is done and 10 kills have
	// hit an upload in progress (or the queue drained first).
	kills, busyKills := 0, 0
	var buildErr error
	building := true
	for building || busyKills < 10 {
		time.Sleep(time.Duration(100+rand.IntN(500)) * time.Millisecond)
		s := a.Status()
		if !building && s.Pending+s.Uploading+s.Retrying == 0 {
			break
		}
		if s.Uploading > 0 {
			busyKills++
		}
		a.Kill()
		kills++
		a.Start()
		select {
		case buildErr = <-done:
			building = false
		default:
		}
		if kills > 300 {
			t.Fatal("the queue never drained")
		}
	}
	if buildErr != nil {
		t.Fatalf("nix-build failed (the hook must never fail a build): %v\n%s", buildErr, out.String())
	}
	tops := strings.Fields(out.String())
	var topPaths []string
	for _, f := range tops {
		if strings.HasPrefix(f, "/nix/store/") && strings.HasSuffix(f, "-top") {
			topPaths = append(topPaths, f)
		}
	}
	if len(topPaths) != 5 {
		t.Fatalf("want 5 top paths in the output, got %v", topPaths)
	}
	s := a.WaitDrained(3 * time.Minute)
	if s.Failed != 0 {
		t.Fatalf("jobs failed: %+v", s)
	}
	// Every output of every graph is in the bucket and verifies.
	for _, top := range topPaths {
		verifyCache(t, m.HTTPURL(), pk, top)
	}
	n := checkBucketConsistent(t, m)
	if n < 5*testenv.GraphPaths {
		t.Fatalf("bucket has %d narinfos, want at least %d", n, 5*testenv.GraphPaths)
	}
	if busyKills < 8 {
		t.Fatalf("only %d of %d kills hit agentd while it was uploading", busyKills, kills)
	}
	t.Logf("%d SIGKILLs (%d while uploading); %d narinfos, all consistent and verified by stock Nix", kills, busyKills, n)
}

// TestOutage stops MinIO while jobs are queued and restarts it 5 seconds
// later: every path uploads, none fails, and agentd does not spin.
func TestOutage(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, pk := keyPair(t, "e2e-outage-1")
	a := newAgent(t, m.CacheURL(""), sk, m.Env(), "--jobs", "4")
	a.Start()
	m.Stop()
	g := testenv.WriteGraph(t, t.TempDir(), false)
	top := build(t, testenv.NixEnv(hookConfig(), a.HookEnv()...), g)
	testenv.Poll(t, 30*time.Second, "agentd to notice the outage", func() bool {
		s := a.Status()
		return s.CacheReachable != nil && !*s.CacheReachable && s.Pending+s.Retrying == testenv.GraphPaths
	})
	time.Sleep(5 * time.Second) // the outage itself: part of the scenario, not synchronisation
	failedAttempts := strings.Count(a.log.String(), "upload failed")
	probes := strings.Count(a.log.String(), "cache still unreachable")
	m.Start()
	s := a.WaitDrained(2 * time.Minute)
	if s.Failed != 0 || s.Uploaded != testenv.GraphPaths {
		t.Fatalf("after the outage: %+v", s)
	}
	// During 5 s of outage with backoff starting at 1 s: a few probes at
	// most, and no more failed uploads than the 4 workers had in flight
	// when the outage was noticed.
	if probes > 6 || failedAttempts > 4 {
		t.Fatalf("agentd spun during the outage: %d probes, %d failed uploads", probes, failedAttempts)
	}
	verifyCache(t, m.HTTPURL(), pk, top)
	t.Logf("outage: %d failed upload attempts, %d probes, then %d paths uploaded", failedAttempts, probes, s.Uploaded)
}

// TestFaultProxy puts a proxy that injects 429 (with Retry-After), 503,
// connection resets and truncated bodies in front of MinIO.
func TestFaultProxy(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	p := testenv.StartFaultProxy(t, m.Endpoint)
	puts := 0 // Decide is called under the proxy's lock
	p.Decide = func(r *http.Request, n int) testenv.Fault {
		if r.Method == http.MethodPut && r.ContentLength > 0 {
			puts++
			if puts%5 == 1 && puts < 40 {
				return testenv.Truncate
			}
		}
		if n > 120 {
			return testenv.Pass
		}
		switch n % 7 {
		case 1:
			return testenv.Throttle
		case 2:
			return testenv.Unavailable
		case 3:
			return testenv.Reset
		}
		return testenv.Pass
	}
	sk, pk := keyPair(t, "e2e-faults-1")
	cache := m.CacheURLVia(p)
	a := newAgent(t, cache, sk, m.Env(), "--backoff-max", "1s")
	a.Start()
	g := testenv.WriteGraph(t, t.TempDir(), true)
	top := build(t, testenv.NixEnv(hookConfig(), a.HookEnv()...), g)
	s := a.WaitDrained(3 * time.Minute)
	if s.Failed != 0 || s.Uploaded != testenv.GraphPaths {
		t.Fatalf("status = %+v", s)
	}
	for _, f := range []testenv.Fault{testenv.Throttle, testenv.Unavailable, testenv.Reset, testenv.Truncate} {
		if p.Count(f) == 0 {
			t.Errorf("fault %d was never injected", f)
		}
	}
	verifyCache(t, m.HTTPURL(), pk, top) // read directly from MinIO, not through the proxy
	checkBucketConsistent(t, m)
	t.Logf("injected: %d throttles, %d 503s, %d resets, %d truncated bodies; all %d paths verified",
		p.Count(testenv.Throttle), p.Count(testenv.Unavailable), p.Count(testenv.Reset), p.Count(testenv.Truncate), s.Uploaded)
}

// TestShutdownDuringUpload: SIGTERM while an upload hangs ends agentd
// cleanly after the grace period; the job is uploaded after a restart.
func TestShutdownDuringUpload(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	p := testenv.StartFaultProxy(t, m.Endpoint)
	slow := p.DelayWhile(20*time.Second, testenv.IsNARPut)
	sk, pk := keyPair(t, "e2e-term-1")
	cache := m.CacheURLVia(p)
	a := newAgent(t, cache, sk, m.Env(), "--shutdown-grace", "1s")
	a.Start()
	path := testenv.AddTextPath(t, "term", "shutdown test\n")
	if out, err := a.Ctl("push", path); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	testenv.Poll(t, 10*time.Second, "the upload to start", func() bool { return p.Count(testenv.Delay) > 0 })
	start := time.Now()
	a.Stop() // SIGTERM; fails the test unless agentd exits 0
	if el := time.Since(start); el > 10*time.Second {
		t.Fatalf("agentd took %v to stop with a 1s grace", el)
	}
	if !strings.Contains(a.log.String(), "job is ready again") {
		t.Errorf("interrupted job not released:\n%s", a.log.String())
	}
	slow.Store(false)
	a.Start()
	if s := a.WaitDrained(time.Minute); s.Uploaded != 1 || s.Failed != 0 {
		t.Fatalf("after restart: %+v", s)
	}
	verifyCache(t, m.HTTPURL(), pk, path)
}

// TestGCRoots: a queued path (S3 down) is a GC root, so the collector
// refuses to delete it; without roots a collected path fails permanently
// with the reason, and the rest of the queue drains.
func TestGCRoots(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, _ := keyPair(t, "e2e-gc-1")
	env := testenv.NixEnv("")
	add := func(name string) string { return testenv.AddTextPath(t, name, name+"\n") }
	roots := filepath.Join("/nix/var/nix/gcroots", "nixspool-test-"+testenv.Unique())
	t.Cleanup(func() { os.RemoveAll(roots) })
	a := newAgent(t, m.CacheURL(""), sk, m.Env(), "--gc-roots", roots)
	a.Start()
	m.Stop()
	kept := add("kept")
	if out, err := a.Ctl("push", kept); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	// The collector (restricted to this path, so the test cannot collect
	// other tests' garbage) must refuse: the path is rooted.
	if out, err := testenv.Output(env, "nix-store", "--delete", kept); err == nil || !strings.Contains(out, "alive") {
		t.Fatalf("nix-store --delete of a queued path: err=%v\n%s", err, out)
	}
	a.Kill()

	b := newAgent(t, m.CacheURL(""), sk, m.Env(), "--gc-roots", "off")
	b.Start()
	gone, other := add("gone"), add("other")
	if out, err := b.Ctl("push", gone, other); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	testenv.Run(t, env, "nix-store", "--delete", gone)
	m.Start()
	testenv.Poll(t, time.Minute, "the queue to settle", func() bool {
		s := b.Status()
		return s.Failed == 1 && s.Uploaded == 1 && s.Pending+s.Retrying+s.Uploading == 0
	})
	out, _ := b.Ctl("list", "--state", "failed")
	if !strings.Contains(out, gone) || !strings.Contains(out, "not valid") {
		t.Fatalf("failed list does not give the collected path and the reason:\n%s", out)
	}
	// The first agent's root for kept is still there; drop it properly.
	if _, err := os.Lstat(filepath.Join(roots, filepath.Base(kept))); err != nil {
		t.Fatalf("root for the queued path is missing: %v", err)
	}
}

// TestStateDirFull: with the state directory's file system full, agentd
// refuses what it cannot store durably with a clear error, reports it in
// status and keeps serving; builds still succeed; it recovers when space is
// freed. With agentd down too, the hook cannot spool, says so, and still
// exits 0.
func TestStateDirFull(t *testing.T) {
	testenv.RequireNix(t)
	sk, _ := keyPair(t, "e2e-full-1")
	a := newAgent(t, "file://"+filepath.Join(t.TempDir(), "cache"), sk, nil)
	if err := os.MkdirAll(a.StateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", a.StateDir).CombinedOutput(); err != nil {
		testenv.Missing(t, fmt.Sprintf("a tmpfs mount (%v: %s)", err, out))
	}
	t.Cleanup(func() { a.Kill(); exec.Command("umount", "-l", a.StateDir).Run() })
	a.Start()
	env := testenv.NixEnv(hookConfig(), a.HookEnv()...)

	// 600 paths need more queue pages than a fresh database has free.
	dir := t.TempDir()
	var files []string
	for i := 0; i < 600; i++ {
		f := filepath.Join(dir, fmt.Sprintf("full-%s-%d", testenv.Unique(), i))
		os.WriteFile(f, []byte(f), 0o644)
		files = append(files, f)
	}
	paths := strings.Fields(testenv.Run(t, testenv.NixEnv(""), "nix-store", append([]string{"--add"}, files...)...))
	filler := filepath.Join(a.StateDir, "filler")
	exec.Command("dd", "if=/dev/zero", "of="+filler, "bs=64k").Run() // fills the file system

	out, err := a.Ctl(append([]string{"push"}, paths...)...)
	if err == nil || !strings.Contains(out, "no space left") {
		t.Fatalf("push with a full state dir: err=%v, %s", err, out)
	}
	if s := a.Status(); !strings.Contains(s.StateDirError, "no space left") || s.Pending != 0 {
		t.Fatalf("status does not report the full state dir (or queued half a request): %+v", s)
	}
	// Builds go on regardless.
	if out, err := testenv.Output(env, "nix-build", testenv.WriteGraph(t, t.TempDir(), false).File, "--no-out-link"); err != nil {
		t.Fatalf("build failed with a full state dir: %v\n%s", err, out)
	}

	os.Remove(filler)
	if out, err := a.Ctl(append([]string{"push"}, paths...)...); err != nil {
		t.Fatalf("push after freeing space: %v\n%s", err, out)
	}
	testenv.Poll(t, 2*time.Minute, "the queue to drain", func() bool {
		s := a.Status()
		return s.Uploaded >= 600 && s.Pending+s.Retrying+s.Uploading == 0 && s.StateDirError == ""
	})

	a.Kill()
	exec.Command("dd", "if=/dev/zero", "of="+filler, "bs=64k").Run()
	out, err = testenv.Output(env, "nix-build", testenv.WriteGraph(t, t.TempDir(), false).File, "--no-out-link")
	if err != nil || !strings.Contains(out, "spooling failed") {
		t.Fatalf("with a full disk and agentd down: err=%v\n%s", err, out)
	}
	t.Logf("full disk, agentd down: hook said %q", firstLine(out, "spooling failed"))
}

func firstLine(s, sub string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			return l
		}
	}
	return ""
}

// TestResumeLargeUpload: a large NAR's multipart upload interrupted by
// SIGKILL after some parts resumes after the restart from the parts the
// server holds, instead of starting over.
func TestResumeLargeUpload(t *testing.T) {
	testenv.RequireNix(t)
	resumeLargeUploadTo(t, testenv.StartMinIO(t))
}

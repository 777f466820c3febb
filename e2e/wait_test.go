package e2e

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/testenv"
)

// ctlExit runs agentctl and returns its output and exit status.
func ctlExit(t *testing.T, a *Agent, args ...string) (string, int) {
	t.Helper()
	out, err := a.Ctl(args...)
	var ee *exec.ExitError
	switch {
	case err == nil:
		return out, 0
	case errors.As(err, &ee):
		return out, ee.ExitCode()
	}
	t.Fatalf("agentctl %v: %v\n%s", args, err, out)
	return "", 0
}

// TestWaitForPaths: `agentctl wait PATH` waits for those paths' closures
// only, and their jobs are uploaded before a long queue of others; a path
// that fails for good ends the wait with status 1 and its reason, a path
// that is neither queued nor in the cache with status 1 and a message
// saying so, a timeout with status 3 naming what is still missing.
func TestWaitForPaths(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	p := testenv.StartFaultProxy(t, m.Endpoint)
	p.DelayPuts(200*time.Millisecond, "/nar/") // every NAR takes a while: one at a time
	sk, pk := keyPair(t, "e2e-waitpaths-1")
	a := newAgent(t, m.CacheURLVia(p), sk, m.Env(), "--jobs", "1")
	a.Start()
	env := testenv.NixEnv("")

	// A long queue: 80 paths, at least 16s of uploads.
	dir := t.TempDir()
	var srcs []string
	for i := range 80 {
		src := filepath.Join(dir, fmt.Sprintf("filler-%d-%s", i, testenv.Unique()))
		if err := os.WriteFile(src, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
		srcs = append(srcs, src)
	}
	fillers := strings.Fields(testenv.Run(t, env, "nix-store", append([]string{"--add"}, srcs...)...))
	t.Cleanup(func() { testenv.Output(env, "nix-store", append([]string{"--delete"}, fillers...)...) })
	if out, err := a.Ctl(append([]string{"push"}, fillers...)...); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}

	// A path whose contents no longer match the store's record fails for
	// good: wait says so at once (its job jumps the queue), status 1.
	bad := testenv.AddTextPath(t, "tampered", "original contents\n")
	t.Cleanup(func() { testenv.Output(env, "nix-store", "--delete", bad) })
	os.Chmod(bad, 0o644)
	if err := os.WriteFile(bad, []byte("tampered contents!\n"), 0o444); err != nil {
		t.Fatal(err)
	}
	if out, err := a.Ctl("push", bad); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	out, code := ctlExit(t, a, "wait", "--timeout", "1m", bad)
	if code != 1 || !strings.Contains(out, "failed: "+bad) || !strings.Contains(out, "does not match") {
		t.Fatalf("wait for a path that fails: status %d\n%s", code, out)
	}

	// A path nobody queued: status 1, and a message naming it.
	never := testenv.AddTextPath(t, "never-queued", "nobody pushes this\n")
	out, code = ctlExit(t, a, "wait", "--timeout", "1m", never)
	if code != 1 || !strings.Contains(out, never) || !strings.Contains(out, "neither queued nor in the cache") {
		t.Fatalf("wait for a path never queued: status %d\n%s", code, out)
	}

	// A build whose outputs the hook queues behind the long queue: waiting
	// for its top output returns once the whole closure is in the cache,
	// while most of the queue is still waiting.
	top := build(t, testenv.NixEnv(hookConfig(), a.HookEnv()...), testenv.WriteGraph(t, t.TempDir(), false))
	start := time.Now()
	out, code = ctlExit(t, a, "wait", "--timeout", "2m", top)
	took := time.Since(start)
	if code != 0 || !strings.Contains(out, "in the cache") {
		t.Fatalf("wait for the build's output: status %d\n%s", code, out)
	}
	s := a.Status()
	if s.Pending < 20 {
		t.Fatalf("wait for one closure returned after %s with only %d jobs left of a queue of 80+11: it waited for the queue", took, s.Pending)
	}
	t.Logf("wait for a closure of %d paths: %s, with %d jobs still queued", testenv.GraphPaths, took.Round(time.Millisecond), s.Pending)
	verifyCache(t, m.HTTPURL(), pk, top)

	// A timeout names what is still missing, status 3.
	late := testenv.AddTextPath(t, "late", "pushed last\n")
	if out, err := a.Ctl("push", late); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	out, code = ctlExit(t, a, "wait", "--timeout", "1ms", late)
	if code != 3 || !strings.Contains(out, late) || !strings.Contains(out, "still missing") {
		t.Fatalf("wait that times out: status %d\n%s", code, out)
	}

	if s := a.WaitDrained(2 * time.Minute); s.Failed != 1 {
		t.Fatalf("status after the queue drained: %+v", s)
	}
	if s := a.Status(); s.TimeToCache.Paths == 0 || s.TimeToCache.P99Seconds < s.TimeToCache.P50Seconds {
		t.Fatalf("time to cache after the uploads: %+v", s.TimeToCache)
	}
}

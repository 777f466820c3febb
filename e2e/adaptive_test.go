package e2e

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/testenv"
)

// addPaths adds n small store paths (one nix-store call) and returns them.
func addPaths(t *testing.T, n int, name string) []string {
	t.Helper()
	dir := t.TempDir()
	var files []string
	for i := 0; i < n; i++ {
		f := filepath.Join(dir, fmt.Sprintf("%s-%s-%d", name, testenv.Unique(), i))
		if err := os.WriteFile(f, []byte(f+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	paths := strings.Fields(testenv.Run(t, testenv.NixEnv(""), "nix-store", append([]string{"--add"}, files...)...))
	if len(paths) != n {
		t.Fatalf("nix-store --add gave %d paths, want %d", len(paths), n)
	}
	return paths
}

// TestThrottlingShrinksTheWindow: a store that answers 429 SlowDown as soon
// as more than 4 requests are in flight. agentd's window shrinks to what
// the store accepts, every path goes up, none fails, and the uploads are
// not paused as if the bucket were down.
func TestThrottlingShrinksTheWindow(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	p := testenv.StartFaultProxy(t, m.Endpoint)
	var requests atomic.Int64
	p.Decide = func(r *http.Request, n int) testenv.Fault {
		requests.Add(1)
		if p.InFlight.Load() > 4 {
			return testenv.Throttle
		}
		return testenv.Pass
	}
	sk, pk := keyPair(t, "e2e-throttle-1")
	a := newAgent(t, m.CacheURLVia(p), sk, m.Env(), "--max-requests", "32")
	a.Start()
	paths := addPaths(t, 80, "throttled")
	if out, err := a.Ctl(append([]string{"push"}, paths...)...); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	minWindow := 1 << 30
	testenv.Poll(t, 3*time.Minute, "the queue to drain", func() bool {
		s := a.Status()
		if s.RequestWindow > 0 {
			minWindow = min(minWindow, s.RequestWindow)
		}
		return s.Pending+s.Uploading+s.Retrying == 0
	})
	s := a.Status()
	if s.Failed != 0 || s.Uploaded != 80 {
		t.Fatalf("status %+v", s)
	}
	throttles := p.Count(testenv.Throttle)
	if throttles == 0 {
		t.Fatal("the store never throttled: the test proves nothing")
	}
	if minWindow > 8 {
		t.Fatalf("the window never shrank below %d while the store throttled %d times", minWindow, throttles)
	}
	// Throttling is not an outage.
	if strings.Contains(a.log.String(), "cache still unreachable") {
		t.Errorf("throttling paused uploads like an outage:\n%s", a.log.String())
	}
	verifyCache(t, m.HTTPURL(), pk, paths[0])
	t.Logf("%d requests, %d throttled; window went down to %d", requests.Load(), throttles, minWindow)
}

// TestPoisonObjectKeepsItsOwnBackoff: one object that the store keeps
// failing (connection resets on its PUT) fails only its job, which retries
// with its own backoff; the other uploads go on and the cache is not
// declared unreachable. When the fault clears, the job goes up.
func TestPoisonObjectKeepsItsOwnBackoff(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	p := testenv.StartFaultProxy(t, m.Endpoint)
	poison := addPaths(t, 1, "poison")[0]
	poisonKey := "/" + filepath.Base(poison)[:32] + ".narinfo"
	var healed atomic.Bool
	p.Decide = func(r *http.Request, n int) testenv.Fault {
		if !healed.Load() && r.Method == http.MethodPut && strings.HasSuffix(r.URL.Path, poisonKey) {
			return testenv.Reset
		}
		return testenv.Pass
	}
	sk, pk := keyPair(t, "e2e-poison-1")
	a := newAgent(t, m.CacheURLVia(p), sk, m.Env(), "--backoff-max", "1s")
	a.Start()
	if out, err := a.Ctl("push", poison); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	testenv.Poll(t, time.Minute, "the poisoned job to fail once", func() bool { return a.Status().Retrying == 1 })
	others := addPaths(t, 20, "healthy")
	if out, err := a.Ctl(append([]string{"push"}, others...)...); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	testenv.Poll(t, time.Minute, "the other uploads", func() bool { return a.Status().Uploaded == 20 })
	s := a.Status()
	if s.CacheReachable == nil || !*s.CacheReachable || s.Pending+s.Retrying+s.Uploading != 1 || s.Failed != 0 {
		t.Fatalf("one poisoned object: status %+v; want the cache reachable and only that job left, retrying", s)
	}
	if strings.Contains(a.log.String(), "cache still unreachable") {
		t.Errorf("a poisoned object paused the bucket:\n%s", a.log.String())
	}
	healed.Store(true)
	if s := a.WaitDrained(time.Minute); s.Uploaded != 21 || s.Failed != 0 {
		t.Fatalf("after the fault cleared: %+v", s)
	}
	verifyCache(t, m.HTTPURL(), pk, poison)
	t.Logf("%d resets injected on the poisoned narinfo", p.Count(testenv.Reset))
}

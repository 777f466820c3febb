package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/spool"
	"github.com/nixspool/nixspool/protocol"
)

func waitsByPath(t *testing.T, a *Agent, paths ...string) map[string]protocol.PathWait {
	t.Helper()
	resp := a.dispatch(context.Background(), &protocol.Request{V: protocol.Version, Op: protocol.OpWait, Paths: paths}, peer{uid: 0, known: true}, nil) // root: wait is for pushers
	if resp.Error != "" {
		t.Fatalf("wait: %s", resp.Error)
	}
	if len(resp.Waits) != len(paths) {
		t.Fatalf("wait answered %d entries for %d paths", len(resp.Waits), len(paths))
	}
	out := map[string]protocol.PathWait{}
	for i, w := range resp.Waits {
		if w.Path != paths[i] {
			t.Fatalf("entry %d is for %s, want %s", i, w.Path, paths[i])
		}
		out[w.Path] = w
	}
	return out
}

// TestWaitStates: the wait operation tells, per path, whether it is in the
// cache, queued, failed (with the reason), spooled, or neither queued nor
// in the cache; the paths a waiter asks about are the ones settled.
func TestWaitStates(t *testing.T) {
	const (
		cached  = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-cached"
		queued  = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-queued"
		broken  = "/nix/store/cccccccccccccccccccccccccccccccc-broken" // neither in the store nor in the cache
		never   = "/nix/store/dddddddddddddddddddddddddddddddd-never"
		spooled = "/nix/store/ffffffffffffffffffffffffffffffff-spooled"
	)
	a := cachedAgent(t, cached)
	if _, err := a.queue.Enqueue([]string{broken}, "", time.Now()); err != nil {
		t.Fatal(err)
	}
	job, _ := a.queue.Lease(time.Now())
	a.process(job) // fails for good: the path is gone from the store
	if _, err := a.queue.Enqueue([]string{queued}, "", time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := spool.Write(a.spoolDir(), spool.Entry{Paths: []string{spooled}}); err != nil {
		t.Fatal(err)
	}

	w := waitsByPath(t, a, cached, queued, broken, never, spooled)
	want := map[string]string{cached: protocol.WaitCached, queued: protocol.WaitReady, broken: protocol.WaitFailed, never: protocol.WaitUnknown, spooled: protocol.WaitSpooled}
	for p, s := range want {
		if w[p].State != s {
			t.Errorf("%s: state %q, want %q (%+v)", p, w[p].State, s, w[p])
		}
	}
	if w[broken].Error == "" || w[broken].Job == 0 {
		t.Errorf("a failed path comes without its job and reason: %+v", w[broken])
	}
	if n := a.queue.Wanted(time.Now()); n != 1 {
		t.Errorf("%d jobs waited for, want 1 (the queued path's)", n)
	}

	// Once the queued path's job is done, it is in the cache.
	job, _ = a.queue.Lease(time.Now())
	writeNarinfo(t, a, queued)
	a.process(job)
	waitFor(t, "the queued path to be in the cache", func() bool {
		return waitsByPath(t, a, queued)[queued].State == protocol.WaitCached
	})

	// Not a store path: refused.
	resp := a.dispatch(context.Background(), &protocol.Request{V: protocol.Version, Op: protocol.OpWait, Paths: []string{"/etc/shadow"}}, peer{uid: 0, known: true}, nil) // root: wait is for pushers
	if resp.Error == "" {
		t.Errorf("wait for /etc/shadow answered %+v", resp.Waits)
	}
}

// TestWaitedForPathJumpsTheQueue: the job of a path someone waits for is
// the next one a worker takes, ahead of a long queue.
func TestWaitedForPathJumpsTheQueue(t *testing.T) {
	a := cachedAgent(t)
	var paths []string
	for i := range 500 {
		paths = append(paths, fmt.Sprintf("/nix/store/%032d-p", i))
	}
	if _, err := a.queue.Enqueue(paths, "", time.Now()); err != nil {
		t.Fatal(err)
	}
	last := paths[len(paths)-1]
	if w := waitsByPath(t, a, last); w[last].State != protocol.WaitReady {
		t.Fatalf("state of the last path: %+v", w[last])
	}
	job, err := a.queue.Lease(time.Now())
	if err != nil || job == nil || job.Path != last {
		t.Fatalf("next lease = %+v, %v; want the waited-for %s", job, err, last)
	}
}

// TestWaitCachedConfirmsGeneration: "cached" (agentctl wait exits 0) holds
// for the cache as it is when the request arrives: after the bucket is
// emptied, a path agentd saw there before is no longer answered cached.
func TestWaitCachedConfirmsGeneration(t *testing.T) {
	const p = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-cached"
	a := cachedAgent(t, p)
	if err := a.uploader.EnsureCacheInfo(context.Background()); err != nil {
		t.Fatal(err)
	}
	if s := waitsByPath(t, a, p)[p].State; s != protocol.WaitCached {
		t.Fatalf("before the reset: %s", s)
	}
	// An operator empties the bucket.
	ents, err := os.ReadDir(a.cache.Dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if err := os.RemoveAll(filepath.Join(a.cache.Dir, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
	if s := waitsByPath(t, a, p)[p].State; s != protocol.WaitUnknown {
		t.Fatalf("after the bucket was emptied, wait says %s, want %s", s, protocol.WaitUnknown)
	}
}

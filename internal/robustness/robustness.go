// Package robustness drives agents, a garbage collector and an
// adversarial object store through random schedules of faults, and checks
// the cache's invariants all along: in the spirit of etcd's robustness
// tests and Jepsen's nemeses.
//
// A schedule is drawn from a seed: the store's semantics (when
// LastModified is stamped, how far listings lag, which conditional writes
// it honours, clock skew, latency, injected errors), the store paths (a
// random graph of small and large paths), and the nemeses in random order
// (empty the bucket, crash and restart an agent with its state directory,
// a collector started and killed mid-sweep, an agent paused past the time
// its checks allowed, two agents pushing the same paths, a path that
// grows after Nix registered it and is built again). Go's scheduler is not
// seeded, so a seed replays the schedule and the store's behaviour, not
// every interleaving of goroutines; a failing seed is kept as a regression
// case and run again every time.
//
// The invariants (docs/robustness.md):
//   - every visible narinfo has its NAR, of the size and compression it
//     claims, and narinfos for all its references; a bucket with narinfos
//     has nix-cache-info. A violation a write in flight during a reset can
//     cause must be repaired within RepairWithin; any other counts at once;
//   - no narinfo, realisation or nix-cache-info is replaced with other
//     content (a store that ignores If-None-Match is exempt: nothing a
//     client does can prevent it there), except a narinfo whose NAR is
//     not there, which no reader can use;
//   - a path acknowledged as uploaded is in the bucket, with its closure,
//     at the moment of the acknowledgement, unless the bucket was emptied
//     after the agent's last confirmation of the cache's generation;
//   - goroutines and heap stay under fixed bounds;
//   - at the end, with the nemeses stopped and every path pushed again,
//     the bucket is complete and consistent.
package robustness

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/cachegc"
)

// Config is one schedule.
type Config struct {
	Seed     uint64
	Duration time.Duration // how long nemeses run
	Paths    int           // store paths (default 120)
	Agents   int           // default 2
	Dir      string        // scratch directory
	// RepairWithin is how long a problem a reset can cause may last.
	RepairWithin time.Duration
	// Drain bounds the final phase (everything pushed again).
	Drain time.Duration
	Log   io.Writer // agents' logs (nil: discarded)
}

// Report is what a schedule did and found.
type Report struct {
	Seed       uint64
	Semantics  Semantics
	Nemeses    map[string]int
	Faults     map[string]int
	Acks       int
	Failures   int
	Samples    int
	Requests   int64
	Collected  int // objects collectors deleted
	Goroutines int
	HeapMiB    uint64
	Violations []string
}

func (r *Report) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "seed %d: %s\n", r.Seed, r.Semantics)
	fmt.Fprintf(&b, "  nemeses %v\n  faults %v\n", sorted(r.Nemeses), sorted(r.Faults))
	fmt.Fprintf(&b, "  acks %d, permanent failures %d, invariant samples %d, requests %d, objects collected %d, peak goroutines %d, peak heap %d MiB\n",
		r.Acks, r.Failures, r.Samples, r.Requests, r.Collected, r.Goroutines, r.HeapMiB)
	for _, v := range r.Violations {
		fmt.Fprintf(&b, "  VIOLATION: %s\n", v)
	}
	return b.String()
}

func sorted(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%d", k, m[k])
	}
	return strings.Join(parts, " ")
}

type run struct {
	cfg    Config
	rng    *rand.Rand
	store  *ObjectStore
	nix    *nixStore
	agents []*agent
	mon    *monitor
	log    *slog.Logger

	mu       sync.Mutex
	nemeses  map[string]int
	acks     int
	failures int
	pushed   map[string]bool
}

// Run runs one schedule.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if cfg.Paths <= 0 {
		cfg.Paths = 120
	}
	if cfg.Agents <= 0 {
		cfg.Agents = 2
	}
	if cfg.RepairWithin <= 0 {
		cfg.RepairWithin = 20 * time.Second
	}
	if cfg.Drain <= 0 {
		cfg.Drain = 90 * time.Second
	}
	out := cfg.Log
	if out == nil {
		out = io.Discard
	}
	r := &run{cfg: cfg, rng: rand.New(rand.NewPCG(cfg.Seed, 0x5eed)), nemeses: map[string]int{}, pushed: map[string]bool{}}
	r.log = slog.New(slog.NewTextHandler(out, &slog.HandlerOptions{Level: slog.LevelInfo}))
	sem := drawSemantics(r.rng)
	r.store = newObjectStore(sem, cfg.Seed)
	var err error
	if r.nix, err = newNixStore(filepath.Join(cfg.Dir, "store"), cfg.Paths, r.rng); err != nil {
		return nil, err
	}
	key, _, err := signature.GenerateKeypair("robustness-1", nil)
	if err != nil {
		return nil, err
	}
	baseGoroutines := runtime.NumGoroutine()
	for i := 0; i < cfg.Agents; i++ {
		name := fmt.Sprintf("agent%d", i)
		a := &agent{name: name, dir: filepath.Join(cfg.Dir, name), client: r.store.client(name), store: r.nix, key: key,
			log: r.log.With("agent", name), onAck: r.acked, onFail: r.failed}
		if err := os.MkdirAll(a.dir, 0o700); err != nil {
			return nil, err
		}
		if err := a.start(); err != nil {
			return nil, err
		}
		r.agents = append(r.agents, a)
	}
	defer func() {
		for _, a := range r.agents {
			a.client.Resume()
			a.crash()
		}
	}()
	r.mon = newMonitor(r.store, cfg.RepairWithin, baseGoroutines)
	sampleCtx, stopSampling := context.WithCancel(ctx)
	var sampling sync.WaitGroup
	sampling.Add(1)
	go func() {
		defer sampling.Done()
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-sampleCtx.Done():
				return
			case <-t.C:
				r.mon.sample()
			}
		}
	}()

	r.nemesisPhase(ctx)
	r.drain(ctx)
	stopSampling()
	sampling.Wait()
	r.mon.sample()

	rep := &Report{Seed: cfg.Seed, Semantics: sem, Nemeses: r.nemeses, Acks: r.acks, Failures: r.failures}
	r.store.mu.Lock()
	rep.Faults = map[string]int{}
	for k, v := range r.store.faults {
		rep.Faults[k] = v
	}
	rep.Violations = append(rep.Violations, r.store.violations...)
	rep.Collected = r.store.collected
	r.store.mu.Unlock()
	rep.Requests = r.store.requests.Load()
	r.mon.mu.Lock()
	rep.Samples, rep.Goroutines, rep.HeapMiB = r.mon.samples, r.mon.goroutines, r.mon.heap>>20
	r.mon.mu.Unlock()
	return rep, nil
}

func (r *run) count(nemesis string) {
	r.mu.Lock()
	r.nemeses[nemesis]++
	r.mu.Unlock()
}

// acked checks the acknowledgement invariant at the moment it is given.
func (r *run) acked(a *agent, p string, started time.Time) {
	snap := r.store.Snapshot()
	missing := closureProblems(snap, r.nix.closure(p))
	r.mu.Lock()
	r.acks++
	r.mu.Unlock()
	if len(missing) == 0 {
		return
	}
	confirmed := time.Unix(0, a.client.lastGenCheck.Load())
	if r.store.lastReset().After(confirmed) {
		return // emptied after the agent last confirmed the cache: allowed
	}
	r.store.violate("%s acknowledged %s (upload began %s ago) but the bucket lacks %d paths of its closure, e.g. %s; last reset %s, last generation check %s; history: %s",
		a.name, p, time.Since(started).Round(time.Millisecond), len(missing), missing[0], ago(r.store.lastReset()), ago(confirmed),
		strings.Join(r.store.History(cachefmt.Keys.NarinfoOf(missing[0])), "; "))
}

// explain gives the recorded history of a narinfo key and of its NAR.
func (r *run) explain(snap map[string][]byte, key string) string {
	h := r.store.History(key)
	if ni, err := cachefmt.ParseNarInfo(snap[key]); err == nil {
		h = append(h, r.store.History(ni.URL)...)
	}
	return strings.Join(h, "; ")
}

func ago(t time.Time) string {
	if t.IsZero() || t.Unix() <= 0 {
		return "never"
	}
	return time.Since(t).Round(time.Millisecond).String() + " ago"
}

func (r *run) failed(a *agent, p string, err error) {
	r.mu.Lock()
	r.failures++
	r.mu.Unlock()
	r.log.Info("permanent failure", "agent", a.name, "path", p, "err", err)
}

func (r *run) push(a *agent, paths ...string) {
	r.mu.Lock()
	for _, p := range paths {
		r.pushed[p] = true
	}
	r.mu.Unlock()
	for _, p := range paths {
		a.submit(p)
	}
}

func (r *run) randomPaths(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = r.nix.paths[r.rng.IntN(len(r.nix.paths))]
	}
	return out
}

func (r *run) sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// nemesisPhase pushes paths and injects faults in random order.
func (r *run) nemesisPhase(ctx context.Context) {
	deadline := time.Now().Add(r.cfg.Duration)
	var bg sync.WaitGroup
	defer bg.Wait()
	gcCtx, stopGC := context.WithCancel(ctx)
	defer stopGC()
	for time.Now().Before(deadline) && ctx.Err() == nil {
		a := r.agents[r.rng.IntN(len(r.agents))]
		switch n := r.rng.IntN(100); {
		case n < 40:
			r.count("push")
			r.push(a, r.randomPaths(1+r.rng.IntN(8))...)
		case n < 48:
			r.count("push-same-to-all")
			ps := r.randomPaths(1 + r.rng.IntN(6))
			for _, b := range r.agents {
				r.push(b, ps...)
			}
		case n < 54:
			r.count("reset-bucket")
			r.store.Reset()
		case n < 62:
			r.count("crash-restart")
			a.crash()
			r.sleep(ctx, time.Duration(r.rng.IntN(300))*time.Millisecond)
			if err := a.start(); err != nil {
				r.store.violate("restart %s: %v", a.name, err)
			}
		case n < 68:
			r.count("pause")
			a.client.Pause()
			d := time.Duration(500+r.rng.IntN(4000)) * time.Millisecond
			bg.Add(1)
			go func() {
				defer bg.Done()
				r.sleep(ctx, d)
				a.client.Resume()
			}()
		case n < 74:
			r.count("collector")
			kill := time.Duration(2000+r.rng.IntN(16000)) * time.Millisecond // often mid-sweep, sometimes after it
			c := r.store.client(fmt.Sprintf("collector-%d", r.rng.IntN(1000)))
			bg.Add(1)
			go func() {
				defer bg.Done()
				cctx, cancel := context.WithTimeout(gcCtx, kill)
				defer cancel()
				_, err := cachegc.Run(cctx, c, cachegc.Options{
					KeepSince: time.Duration(1+r.rng.IntN(4)) * time.Second,
					Grace:     cachegc.MinGraceFor(400 * time.Millisecond), LeaseTTL: 5 * time.Second,
					Concurrency: 8, Agent: "collector", Host: "robustness", Logger: r.log.With("part", "collector"),
				})
				if err != nil && cctx.Err() == nil {
					r.log.Info("collector", "err", err)
				}
			}()
		case n < 78:
			r.count("grow-path")
			p := r.nix.paths[r.rng.IntN(len(r.nix.paths))]
			if !r.nix.isGrown(p) {
				if err := r.nix.grow(p, 2<<20); err != nil {
					r.store.violate("grow %s: %v", p, err)
				}
				r.push(a, p)
			}
		case n < 86:
			r.count("drop")
			a.mu.Lock()
			var victim string
			for p := range a.pending {
				victim = p
				break
			}
			a.mu.Unlock()
			if victim != "" && a.drop(victim) && r.rng.IntN(2) == 0 {
				r.sleep(ctx, time.Duration(r.rng.IntN(300))*time.Millisecond)
				r.count("re-request")
				r.push(a, victim)
			}
		case n < 90:
			r.count("push-closure")
			top := r.nix.paths[len(r.nix.paths)/2+r.rng.IntN(len(r.nix.paths)/2)]
			cl := r.nix.closure(top)
			r.mu.Lock()
			for _, p := range cl {
				r.pushed[p] = true
			}
			r.mu.Unlock()
			a.pushClosure(cl)
		case n < 93:
			r.count("rebuild-grown")
			for _, p := range r.nix.paths {
				if r.nix.isGrown(p) {
					if err := r.nix.rebuild(p); err == nil {
						r.push(a, p)
					}
					break
				}
			}
		default:
			r.sleep(ctx, time.Duration(r.rng.IntN(400))*time.Millisecond)
		}
		r.sleep(ctx, time.Duration(r.rng.IntN(150))*time.Millisecond)
	}
	stopGC()
}

// drain stops the nemeses, brings every agent up, rebuilds grown paths,
// pushes every path once more and waits for the agents to finish; then
// the bucket must be complete.
func (r *run) drain(ctx context.Context) {
	r.store.mu.Lock()
	r.store.sem.FaultRate = 0
	r.store.mu.Unlock()
	for _, p := range r.nix.paths {
		if r.nix.isGrown(p) {
			r.nix.rebuild(p)
		}
	}
	for _, a := range r.agents {
		a.client.Resume()
		if err := a.start(); err != nil {
			r.store.violate("restart %s: %v", a.name, err)
		}
	}
	r.mu.Lock()
	var all []string
	for p := range r.pushed {
		all = append(all, p)
	}
	r.mu.Unlock()
	sort.Strings(all)
	r.push(r.agents[0], all...)
	deadline := time.Now().Add(r.cfg.Drain)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		busy := 0
		for _, a := range r.agents {
			busy += a.pendingCount()
		}
		if busy == 0 {
			break
		}
		r.sleep(ctx, 100*time.Millisecond)
	}
	for _, a := range r.agents {
		if n := a.pendingCount(); n > 0 {
			r.store.violate("%s still has %d paths unacknowledged %s after the nemeses stopped", a.name, n, r.cfg.Drain)
		}
	}
	for _, a := range r.agents {
		a.mu.Lock()
		q := a.q
		a.mu.Unlock()
		if recs, err := q.Uploads(); err == nil && len(recs) > 0 {
			var paths []string
			for p := range recs {
				paths = append(paths, filepath.Base(p))
			}
			sort.Strings(paths)
			r.store.violate("%s keeps %d resume records after every job ended: %v", a.name, len(recs), paths)
		}
	}
	// A crash between starting a multipart upload and recording it leaves
	// an upload no record names; agentd aborts those at start once they
	// are a day old (AbortStaleUploads), as every agent does here now.
	for _, a := range r.agents {
		a.mu.Lock()
		up := a.up
		a.mu.Unlock()
		if n, err := up.AbortStaleUploads(ctx, 0); err == nil && n > 0 {
			r.count("orphaned-multipart-aborted")
		}
	}
	if n := r.store.openUploads(); n > 0 {
		r.store.violate("%d multipart uploads left open after every job ended", n)
	}
	snap := r.store.Snapshot()
	for _, p := range structure(snap) {
		r.store.violate("final bucket: %s; history: %s", p, r.explain(snap, p.key))
	}
	for _, p := range all {
		if missing := closureProblems(snap, r.nix.closure(p)); len(missing) > 0 {
			r.store.violate("final bucket: %s was pushed again and acknowledged, but %d paths of its closure are missing, e.g. %s", p, len(missing), missing[0])
		}
	}
}

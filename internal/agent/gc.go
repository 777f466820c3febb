package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/nixspool/nixspool/internal/atomicfile"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/cachegc"
	"github.com/nixspool/nixspool/internal/metrics"
	"github.com/nixspool/nixspool/internal/statedir"
)

// gcAgent is agentd's part in garbage collection (package cachegc): the
// watcher every agent runs so its uploads never rely on what a collector
// is about to delete, the collector itself (agentctl gc and the optional
// schedule), and pins.
type gcAgent struct {
	gcDeps
	// forget and metrics are given by connect once the uploader and the
	// metrics exist, before start.
	forget  func(paths []string) // the uploader's ForgetPaths
	metrics *metrics.Metrics     // nil when off
	id      string
	host    string
	watcher *cachegc.Watcher
	running sync.Mutex
	since   time.Time // when the running cycle began
}

// gcDeps is what garbage collection needs of agentd.
type gcDeps struct {
	bucket   bucket.Bucket // the cache, through the request window
	cacheID  string        // the cache's identity, for the reference cache
	stateDir string        // holds the agent's identity and gc.db
	settings gcSettings
	log      *slog.Logger
}

// gcSettings are the collection's settings from the Config.
type gcSettings struct {
	poll      time.Duration // how often the watcher reads announcements
	interval  time.Duration // scheduled cycles (0: none)
	keepSince time.Duration // scheduled cycles keep what was used since
	grace     time.Duration // scheduled cycles' grace
}

func newGCAgent(d gcDeps) (*gcAgent, error) {
	id, err := agentID(d.stateDir)
	if err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	g := &gcAgent{gcDeps: d, id: id, host: host}
	g.watcher = cachegc.NewWatcher(cachegc.WatcherOptions{
		Bucket:   d.bucket,
		Poll:     d.settings.poll,
		ID:       id,
		Host:     host,
		Version:  Version,
		Logger:   d.log,
		Forget:   func(paths []string) { g.forget(paths) },
		OnRefuse: func() { g.metrics.GCRefusal() },
	})
	return g, nil
}

// connect gives the collector the uploader's ForgetPaths and the metrics
// (nil when off): the watcher's announcements reach the presence cache.
func (g *gcAgent) connect(forget func(paths []string), m *metrics.Metrics) {
	g.forget, g.metrics = forget, m
}

// agentID reads this agent's identity from the state directory, creating
// it on first use: random, so that agents sharing a host name differ.
func agentID(stateDir string) (string, error) {
	f := statedir.Dir(stateDir).AgentID()
	if data, err := os.ReadFile(f); err == nil && len(strings.TrimSpace(string(data))) > 0 {
		return strings.TrimSpace(string(data)), nil
	}
	var rnd [8]byte
	rand.Read(rnd[:])
	id := hex.EncodeToString(rnd[:])
	if err := atomicfile.Write(f, strings.NewReader(id+"\n"), int64(len(id)+1), 0o600); err != nil {
		return "", fmt.Errorf("agent id: %w", err)
	}
	return id, nil
}

// start reads the announcements once before uploads begin (so paths the
// presence cache remembers from before a restart are forgotten if a cycle
// deleted them), then keeps watching, and runs the schedule if any.
func (g *gcAgent) start(ctx context.Context) {
	pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	// A cache that cannot be listed: the watcher has said what that means.
	if err := g.watcher.Poll(pctx); err != nil && !errors.Is(err, bucket.ErrNoListing) {
		g.log.Warn("gc watcher: cannot read announcements yet; narinfo writes wait until it can", "err", err)
	}
	cancel()
	go g.watcher.Run(ctx)
	if g.settings.interval > 0 {
		go g.schedule(ctx)
	}
}

// schedule runs a cycle every GCInterval.
func (g *gcAgent) schedule(ctx context.Context) {
	t := time.NewTicker(g.settings.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			g.cycle(ctx, g.settings.keepSince, g.settings.grace, false, nil)
		}
	}
}

// wait gives a cycle that shutdown interrupted up to d to retire its
// announcement and release the lease (otherwise agents wait for the
// announcement to lapse, and other collectors for the lease to expire).
func (g *gcAgent) wait(d time.Duration) {
	deadline := time.Now().Add(d)
	for !g.running.TryLock() {
		if time.Now().After(deadline) {
			g.log.Warn("gc cycle still running at shutdown; its announcement lapses on its own")
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	g.running.Unlock()
}

// cycle runs one collection cycle on the agent's cache.
func (g *gcAgent) cycle(ctx context.Context, keepSince, grace time.Duration, dryRun bool, progress func(cachegc.Progress)) (*cachegc.Report, error) {
	if !g.running.TryLock() {
		return nil, fmt.Errorf("a garbage collection cycle is already running in this agentd (since %s)", g.since.Format(time.RFC3339))
	}
	defer g.running.Unlock()
	g.since = time.Now()
	log := g.log.With("dry_run", dryRun, "keep_since", keepSince, "grace", grace)
	cache, err := cachegc.OpenRefCache(statedir.Dir(g.stateDir).RefCache(), g.cacheID)
	if err != nil {
		return nil, err
	}
	defer cache.Close()
	log.Info("gc cycle started")
	rep, err := cachegc.Run(ctx, g.bucket, cachegc.Options{
		KeepSince: keepSince, Grace: grace, DryRun: dryRun,
		Agent: g.id, Host: g.host, Cache: cache, Logger: g.log, Progress: progress,
	})
	result := "complete"
	switch {
	case errors.Is(err, cachegc.ErrLeaseHeld):
		result = "refused"
		g.metrics.GCLeaseConflict()
	case errors.Is(err, cachegc.ErrGraceTooShort):
		result = "refused"
	case err != nil && rep.Cycle != "":
		result = "incomplete"
	case err != nil:
		result = "failed"
	case dryRun:
		result = "dry_run"
	}
	q := rep.Requests
	g.metrics.GCRun(result, time.Now(), rep.Duration,
		map[string]int{"narinfo": rep.Deleted.Narinfos, "nar": rep.Deleted.NARs, "other": rep.Deleted.Others, "upload": rep.Deleted.Uploads},
		rep.Deleted.Bytes, map[string]int64{"list": q.List, "get": q.Get, "head": q.Head, "put": q.Put, "delete": q.Delete})
	if err != nil {
		log.Warn("gc cycle failed", "result", result, "err", err, "summary", rep.Summary())
	} else {
		log.Info("gc cycle done", "summary", rep.Summary())
	}
	return rep, err
}

package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/nixspool/nixspool/atomicfile"
	"github.com/nixspool/nixspool/bucket"
	"github.com/nixspool/nixspool/gc"
	"github.com/nixspool/nixspool/protocol"
	"github.com/nixspool/nixspool/storepath"
	"github.com/nixspool/nixspool/uploader"
)

// gcAgent is agentd's part in garbage collection (package gc): the
// watcher every agent runs so its uploads never rely on what a collector
// is about to delete, the collector itself (agentctl gc and the optional
// schedule), and pins.
type gcAgent struct {
	a       *Agent
	id      string
	host    string
	watcher *gc.Watcher
	running sync.Mutex
	since   time.Time // when the running cycle began
}

// gcIDFile holds this agent's identity as a watcher and lease holder.
const gcIDFile = "gc-agent-id"

func newGCAgent(a *Agent) (*gcAgent, error) {
	id, err := agentID(a.cfg.StateDir)
	if err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	g := &gcAgent{a: a, id: id, host: host}
	g.watcher = gc.NewWatcher(gc.WatcherOptions{
		Bucket:  a.limited,
		Poll:    a.cfg.GCPollInterval,
		ID:      id,
		Host:    host,
		Version: Version,
		Logger:  a.log,
		// The uploader exists by the time anything is announced.
		Forget:   func(paths []string) { a.uploader.ForgetPaths(paths) },
		OnRefuse: func() { a.metrics.GCRefusal() },
	})
	return g, nil
}

// agentID reads this agent's identity from the state directory, creating
// it on first use: random, so that agents sharing a host name differ.
func agentID(stateDir string) (string, error) {
	f := filepath.Join(stateDir, gcIDFile)
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
		g.a.log.Warn("gc watcher: cannot read announcements yet; narinfo writes wait until it can", "err", err)
	}
	cancel()
	go g.watcher.Run(ctx)
	if g.a.cfg.GCInterval > 0 {
		go g.schedule(ctx)
	}
}

// schedule runs a cycle every GCInterval.
func (g *gcAgent) schedule(ctx context.Context) {
	t := time.NewTicker(g.a.cfg.GCInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			g.cycle(ctx, g.a.cfg.GCKeepSince, g.a.cfg.GCGrace, false, nil)
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
			g.a.log.Warn("gc cycle still running at shutdown; its announcement lapses on its own")
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	g.running.Unlock()
}

// cycle runs one collection cycle on the agent's cache.
func (g *gcAgent) cycle(ctx context.Context, keepSince, grace time.Duration, dryRun bool, progress func(gc.Progress)) (*gc.Report, error) {
	if !g.running.TryLock() {
		return nil, fmt.Errorf("a garbage collection cycle is already running in this agentd (since %s)", g.since.Format(time.RFC3339))
	}
	defer g.running.Unlock()
	g.since = time.Now()
	log := g.a.log.With("dry_run", dryRun, "keep_since", keepSince, "grace", grace)
	cache, err := gc.OpenRefCache(filepath.Join(g.a.cfg.StateDir, "gc.db"), g.a.cache.Identity())
	if err != nil {
		return nil, err
	}
	defer cache.Close()
	log.Info("gc cycle started")
	rep, err := gc.Run(ctx, g.a.limited, gc.Options{
		KeepSince: keepSince, Grace: grace, DryRun: dryRun,
		Agent: g.id, Host: g.host, Cache: cache, Logger: g.a.log, Progress: progress,
	})
	result := "complete"
	switch {
	case errors.Is(err, gc.ErrLeaseHeld):
		result = "refused"
		g.a.metrics.GCLeaseConflict()
	case errors.Is(err, gc.ErrGraceTooShort):
		result = "refused"
	case err != nil && rep.Cycle != "":
		result = "incomplete"
	case err != nil:
		result = "failed"
	case dryRun:
		result = "dry_run"
	}
	q := rep.Requests
	g.a.metrics.GCRun(result, time.Now(), rep.Duration,
		map[string]int{"narinfo": rep.Deleted.Narinfos, "nar": rep.Deleted.NARs, "other": rep.Deleted.Others, "upload": rep.Deleted.Uploads},
		rep.Deleted.Bytes, map[string]int64{"list": q.List, "get": q.Get, "head": q.Head, "put": q.Put, "delete": q.Delete})
	if err != nil {
		log.Warn("gc cycle failed", "result", result, "err", err, "summary", rep.Summary())
	} else {
		log.Info("gc cycle done", "summary", rep.Summary())
	}
	return rep, err
}

// handleGC answers gc, pin, unpin and pins requests.
func (a *Agent) handleGC(ctx context.Context, req *protocol.Request, progress func(*protocol.Progress) error) *protocol.Response {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	send, stop := a.keepAlive(progress, cancel)
	defer stop()
	switch req.Op {
	case protocol.OpGC:
		rep, err := a.gc.cycle(ctx, req.KeepSince, req.Grace, req.DryRun, func(p gc.Progress) {
			send(&protocol.Progress{Stage: p.Stage, Done: p.Done, Total: p.Total})
		})
		if rep == nil {
			return &protocol.Response{Error: err.Error()}
		}
		data, jerr := json.Marshal(rep)
		if jerr != nil {
			return &protocol.Response{Error: jerr.Error()}
		}
		if err != nil {
			return &protocol.Response{Error: err.Error(), Result: data}
		}
		return &protocol.Response{Result: data, Count: rep.Deleted.Objects()}
	case protocol.OpPin:
		pin, err := a.pin(ctx, req.Name, req.Paths[0], send)
		if err != nil {
			a.log.Warn("pin refused", "name", req.Name, "path", req.Paths[0], "err", err)
			return &protocol.Response{Error: err.Error()}
		}
		a.log.Info("pinned", "name", pin.Name, "path", pin.Path)
		data, _ := json.Marshal(pin)
		return &protocol.Response{Result: data, Count: 1}
	case protocol.OpUnpin:
		path, err := gc.RemovePin(ctx, a.limited, req.Name)
		if err != nil {
			return &protocol.Response{Error: err.Error()}
		}
		a.log.Info("unpinned", "name", req.Name, "path", path)
		data, _ := json.Marshal(gc.Pin{Name: req.Name, Path: path})
		return &protocol.Response{Result: data, Count: 1}
	case protocol.OpPins:
		pins, err := gc.ListPins(ctx, a.limited)
		if err != nil {
			return &protocol.Response{Error: err.Error()}
		}
		data, _ := json.Marshal(pins)
		return &protocol.Response{Result: data, Count: len(pins)}
	}
	return &protocol.Response{Error: "unknown operation " + req.Op}
}

// keepAlive returns a function that passes progress to the client (at most
// every 200 ms unless the stage changes) and repeats the last report every
// 5 s, so a client's per-line timeout does not fire during long listings
// or waits. A client that went away cancels the operation.
func (a *Agent) keepAlive(progress func(*protocol.Progress) error, cancel func()) (send func(*protocol.Progress), stop func()) {
	var mu sync.Mutex
	last := &protocol.Progress{Stage: "start"}
	var sent time.Time
	emit := func(p *protocol.Progress) {
		if progress(p) != nil {
			cancel()
		}
		sent = time.Now()
	}
	send = func(p *protocol.Progress) {
		mu.Lock()
		defer mu.Unlock()
		changed := p.Stage != last.Stage
		last = p
		if changed || time.Since(sent) > 200*time.Millisecond {
			emit(p)
		}
	}
	quit := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(5 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-quit:
				return
			case <-t.C:
				mu.Lock()
				if time.Since(sent) > 4*time.Second {
					emit(last)
				}
				mu.Unlock()
			}
		}
	}()
	return send, func() { close(quit); <-done }
}

// pinWait bounds how long a pin waits for a sweep that holds its path.
const pinWait = 30 * time.Minute

// pin points the pin name at path. The path must be in the cache, or
// valid in the local store (then it is uploaded first, with its closure).
// Like a narinfo, the pin relies on the path's narinfo: it is written only
// when the watcher allows it, waiting out a sweep that holds the path.
func (a *Agent) pin(ctx context.Context, name, path string, send func(*protocol.Progress)) (*gc.Pin, error) {
	if _, err := gc.PinKey(name); err != nil {
		return nil, err
	}
	if err := storepath.Check(a.cfg.StoreDir, path); err != nil {
		return nil, &RefusedError{err}
	}
	key := storepath.HashPart(path) + ".narinfo"
	deadline := time.Now().Add(pinWait)
	for {
		var within time.Duration
		_, err := a.limited.Stat(ctx, key)
		switch {
		case bucket.IsNotExist(err):
			if verr := a.intake.checkValid(ctx, storePaths{path}); verr != nil {
				return nil, fmt.Errorf("%s is not in the cache, and cannot be uploaded: %w", path, verr)
			}
			send(&protocol.Progress{Stage: "upload"})
			var res uploader.Result
			if res, err = a.uploader.Upload(ctx, path); err == nil && res.SelfSkipped {
				return nil, &RefusedError{fmt.Errorf("%s is not in the cache and the filters keep it out (--exclude, --max-nar-size or --skip-signed-by); not pinned", path)}
			}
			if err == nil {
				within, err = a.gc.watcher.Check(ctx, []string{key})
			}
		case err == nil:
			within, err = a.gc.watcher.Check(ctx, []string{key})
		}
		if err == nil {
			// Straight to the bucket, given up when the check's time is
			// over, like a narinfo (docs/gc.md, A2).
			wctx, cancel := context.WithTimeout(ctx, within)
			err = gc.WritePin(wctx, a.bucket, name, path)
			cancel()
			if err != nil {
				return nil, err
			}
			return &gc.Pin{Name: name, Path: path, Written: time.Now()}, nil
		}
		if !errors.Is(err, gc.ErrCollecting) || time.Now().After(deadline) {
			return nil, err
		}
		send(&protocol.Progress{Stage: "waiting for a garbage collection sweep"})
		t := time.NewTimer(a.cfg.GCPollInterval)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

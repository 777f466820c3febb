package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/cachegc"
	"github.com/nixspool/nixspool/internal/uploader"
	"github.com/nixspool/nixspool/protocol"
	"github.com/nixspool/nixspool/storepath"
)

// withKeepAlive runs h with progress passed on through keepAlive: the
// client hears from a long operation at least every 5 s, and one that went
// away cancels it.
func withKeepAlive(h func(a *Agent, ctx context.Context, c call, send func(*protocol.Progress)) *protocol.Response) opHandler {
	return func(a *Agent, ctx context.Context, c call) *protocol.Response {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		send, stop := a.keepAlive(c.progress, cancel)
		defer stop()
		return h(a, ctx, c, send)
	}
}

// opGC runs a collection cycle and answers with its report.
func (a *Agent) opGC(ctx context.Context, c call, send func(*protocol.Progress)) *protocol.Response {
	req := c.req
	rep, err := a.gc.cycle(ctx, req.KeepSince, req.Grace, req.DryRun, func(p cachegc.Progress) {
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
}

func (a *Agent) opPin(ctx context.Context, c call, send func(*protocol.Progress)) *protocol.Response {
	pin, err := a.pin(ctx, c.req.Name, c.req.Paths[0], send)
	if err != nil {
		a.log.Warn("pin refused", "name", c.req.Name, "path", c.req.Paths[0], "err", err)
		return &protocol.Response{Error: err.Error()}
	}
	a.log.Info("pinned", "name", pin.Name, "path", pin.Path)
	data, _ := json.Marshal(pin)
	return &protocol.Response{Result: data, Count: 1}
}

func (a *Agent) opUnpin(ctx context.Context, c call, _ func(*protocol.Progress)) *protocol.Response {
	path, err := cachegc.RemovePin(ctx, a.limited, c.req.Name)
	if err != nil {
		return &protocol.Response{Error: err.Error()}
	}
	a.log.Info("unpinned", "name", c.req.Name, "path", path)
	data, _ := json.Marshal(cachegc.Pin{Name: c.req.Name, Path: path})
	return &protocol.Response{Result: data, Count: 1}
}

func (a *Agent) opPins(ctx context.Context, _ call, _ func(*protocol.Progress)) *protocol.Response {
	pins, err := cachegc.ListPins(ctx, a.limited)
	if err != nil {
		return &protocol.Response{Error: err.Error()}
	}
	data, _ := json.Marshal(pins)
	return &protocol.Response{Result: data, Count: len(pins)}
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
func (a *Agent) pin(ctx context.Context, name, path string, send func(*protocol.Progress)) (*cachegc.Pin, error) {
	if _, err := cachegc.PinKey(name); err != nil {
		return nil, err
	}
	if err := storepath.Check(a.cfg.StoreDir, path); err != nil {
		return nil, &RefusedError{err}
	}
	key := cachefmt.Keys.NarinfoOf(path)
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
			err = cachegc.WritePin(wctx, a.bucket, name, path)
			cancel()
			if err != nil {
				return nil, err
			}
			return &cachegc.Pin{Name: name, Path: path, Written: time.Now()}, nil
		}
		if !errors.Is(err, cachegc.ErrCollecting) || time.Now().After(deadline) {
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

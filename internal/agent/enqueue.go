package agent

import (
	"context"
	"time"

	"github.com/nixspool/nixspool/internal/queue"
	"github.com/nixspool/nixspool/protocol"
)

// prefetchAbove is the number of paths in one request above which their
// presence in the cache is asked about in bulk right away.
const prefetchAbove = 64

// serveEnqueue answers enqueue (the hook's) and push requests: their paths
// are parsed, expanded (push --closure, --build-closure) and handed to
// admit.
func (a *Agent) serveEnqueue(ctx context.Context, req *protocol.Request, p peer) *protocol.Response {
	if req.Op == protocol.OpEnqueue {
		// A hook waits seconds, then spools; a hung Nix daemon must not
		// keep a handler (and its connection) forever.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, connDeadline)
		defer cancel()
	}
	start := time.Now()
	refused := func(err error) *protocol.Response {
		a.log.Warn("enqueue refused", "op", req.Op, "err", err, "peer_uid", p.uid, "peer_pid", p.pid)
		return &protocol.Response{Error: err.Error()}
	}
	paths, drv, err := parseRequest(a.cfg.StoreDir, req.Paths, req.Drv)
	if err != nil {
		return refused(err)
	}
	in := intake{paths: paths, drv: drv, floating: req.Floating, source: queue.SourceHook}
	if req.Op == protocol.OpPush {
		in.source = queue.SourcePush
	}
	var skipped []string
	switch {
	case req.Op == protocol.OpPush && req.BuildClosure:
		if in.paths, skipped, err = a.buildClosure(ctx, paths); err != nil {
			a.log.Warn("push refused", "err", err, "peer_uid", p.uid)
			return &protocol.Response{Error: err.Error()}
		}
		if len(in.paths) == 0 {
			return &protocol.Response{Skipped: skipped}
		}
		in.source = queue.SourceBuildClosure
	case req.Closure:
		if in.paths, err = a.closureOf(ctx, paths); err != nil {
			a.log.Warn("push refused", "err", err, "peer_uid", p.uid)
			return &protocol.Response{Error: err.Error()}
		}
	}
	res, err := a.intake.request(ctx, in)
	if err != nil {
		return refused(err)
	}
	a.metrics.Enqueued(time.Since(start))
	a.metrics.Queued(in.source.String(), len(res))
	a.log.Info("enqueued", "op", req.Op, "source", in.source.String(), "paths", len(res), "drv", req.Drv, "peer_uid", p.uid, "peer_pid", p.pid, "duration", time.Since(start))
	if a.cfg.BuildClosures && req.Op == protocol.OpEnqueue && drv != "" {
		if !a.buildClosures.add(string(drv)) {
			a.log.Warn("build closure not queued: too many derivations wait for theirs (agentctl push --build-closure queues it)", "drv", drv, "waiting", maxPendingBuildClosures)
		}
	}
	return &protocol.Response{Jobs: jobViews(res), Count: len(res), Skipped: skipped}
}

// closureOf returns paths and everything they reference.
func (a *Agent) closureOf(ctx context.Context, paths storePaths) (storePaths, error) {
	seen := map[string]bool{}
	var out []string
	for _, p := range paths {
		infos, err := a.store.Closure(ctx, p)
		if err != nil {
			return nil, &RefusedError{err}
		}
		for _, info := range infos {
			if !seen[info.Path] {
				seen[info.Path] = true
				out = append(out, info.Path)
			}
		}
	}
	return parsePaths(a.cfg.StoreDir, out)
}

func jobViews(res []queue.EnqueueResult) []protocol.Job {
	jobs := make([]protocol.Job, 0, len(res))
	for _, r := range res {
		jobs = append(jobs, jobView(r.Job))
	}
	return jobs
}

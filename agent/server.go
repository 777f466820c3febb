package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime/debug"
	"sync"
	"time"

	"github.com/nixspool/nixspool/protocol"
	"github.com/nixspool/nixspool/queue"
	"github.com/nixspool/nixspool/spool"
	"github.com/nixspool/nixspool/statedir"
	"github.com/nixspool/nixspool/storepath"
)

// prefetchAbove is the number of paths in one request above which their
// presence in the cache is asked about in bulk right away.
const prefetchAbove = 64

// connDeadline bounds one connection: a client that sends nothing (or
// sends slowly) cannot hold a handler for longer.
const connDeadline = 10 * time.Second

// serve accepts connections until the listener closes, within the
// connection limits (a connection over them gets a one-line refusal), and
// returns once every request it took has been handled: they use the queue,
// which is closed after serve returns.
func (a *Agent) serve(ctx context.Context) {
	if a.conns == nil {
		a.conns = newConnLimits(maxConns, maxConnsPerUID, largeRequests)
	}
	var handlers sync.WaitGroup
	defer handlers.Wait()
	for {
		c, err := a.listener.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			a.log.Error("accept", "err", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		p, err := peerOf(c)
		switch {
		case err == nil:
		case errors.Is(err, errNoPeerGroups):
			if !a.groupsWarned.Swap(true) { // once: the kernel will not change
				a.log.Warn("peer groups unknown", "err", err)
			}
		default:
			a.log.Warn("peer credentials unknown; the connection may only read", "err", err)
		}
		release, refusal := a.conns.admit(p)
		if refusal != "" {
			a.log.Warn("connection refused", "reason", refusal, "peer_uid", p.uid, "peer_pid", p.pid)
			refuse(c, refusal)
			continue
		}
		handlers.Add(1)
		go func() {
			defer handlers.Done()
			defer release()
			a.handle(ctx, c, p)
		}()
	}
}

// refuse answers a connection over the limits with reason and closes it,
// without reading its request. The write goes to an empty socket buffer;
// its short deadline only guards the accept loop against the unexpected.
func refuse(c net.Conn, reason string) {
	defer c.Close()
	b, err := protocol.Encode(&protocol.Response{V: protocol.Version, Error: reason})
	if err != nil {
		return
	}
	c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	c.Write(b)
}

func (a *Agent) handle(ctx context.Context, c net.Conn, p peer) {
	defer c.Close()
	defer func() {
		// A bug in one request's handling must not take agentd down: the
		// request fails, the stack goes to the log, agentd keeps serving.
		if r := recover(); r != nil {
			a.log.Error("request handler panicked; agentd keeps serving", "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
			c.SetWriteDeadline(time.Now().Add(connDeadline))
			if b, err := protocol.Encode(&protocol.Response{V: protocol.Version, Error: "internal error (logged by agentd)"}); err == nil {
				c.Write(b)
			}
		}
	}()
	req, release, err := a.readRequest(ctx, c)
	defer release()
	var resp *protocol.Response
	if err != nil {
		a.log.Warn("bad request", "err", err, "peer_uid", p.uid, "peer_pid", p.pid)
		resp = &protocol.Response{Error: "bad request: " + err.Error()}
	} else {
		resp = a.dispatch(ctx, req, p, a.progressWriter(c))
	}
	resp.V = protocol.Version
	resp.OK = resp.Error == ""
	c.SetWriteDeadline(time.Now().Add(connDeadline))
	b, err := protocol.Encode(resp)
	if err == nil {
		_, err = c.Write(b)
	}
	if err != nil {
		a.log.Debug("write reply", "err", err)
	}
}

// readRequest reads the connection's request within connDeadline. A
// request over protocol.SmallRequestSize waits (within the same deadline)
// for one of the slots for large requests; the slot is held until the
// connection is done (the caller calls release), as the decoded request is
// about as large. Shutdown ends a read that waits on the client.
func (a *Agent) readRequest(ctx context.Context, c net.Conn) (req *protocol.Request, release func(), err error) {
	deadline := time.Now().Add(connDeadline)
	c.SetDeadline(deadline)
	rctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { c.SetReadDeadline(time.Now()) })
	defer stop()
	grow, release := a.conns.growRequest(rctx)
	req, err = protocol.ReadRequestGrowing(c, grow)
	return req, release, err
}

// progressWriter returns the function long operations report progress
// with: it lifts the connection's overall deadline (the operation may take
// minutes) and writes each report as a line, failing once the client has
// gone away.
func (a *Agent) progressWriter(c net.Conn) func(*protocol.Progress) error {
	lifted := false
	return func(pr *protocol.Progress) error {
		if !lifted {
			c.SetDeadline(time.Time{})
			lifted = true
		}
		b, err := protocol.Encode(&protocol.Response{V: protocol.Version, Progress: pr})
		if err != nil {
			return err
		}
		c.SetWriteDeadline(time.Now().Add(connDeadline))
		_, err = c.Write(b)
		return err
	}
}

// dispatch answers a request the peer may make (see access): a refused one
// gets the one line that says what it needs, and an operator's request is
// logged and counted once answered.
func (a *Agent) dispatch(ctx context.Context, req *protocol.Request, p peer, progress func(*protocol.Progress) error) *protocol.Response {
	operator := tiers[req.Op] == tierOperate
	if refusal := a.access.refusal(p, req.Op); refusal != "" {
		a.log.Warn("request refused", "op", req.Op, "reason", refusal, "peer_uid", p.uid, "peer_pid", p.pid)
		if operator {
			a.metrics.OperatorAction(req.Op, "refused")
		}
		return &protocol.Response{Error: refusal}
	}
	if !operator {
		return a.serveRequest(ctx, req, p, progress)
	}
	start := time.Now()
	resp := a.serveRequest(ctx, req, p, progress)
	a.logOperatorAction(ctx, req, p, resp, time.Since(start))
	return resp
}

// serveRequest carries out a request that dispatch allowed.
func (a *Agent) serveRequest(ctx context.Context, req *protocol.Request, p peer, progress func(*protocol.Progress) error) *protocol.Response {
	switch req.Op {
	case protocol.OpEnqueue, protocol.OpPush:
		if req.Op == protocol.OpEnqueue {
			// A hook waits seconds, then spools; a hung Nix daemon must not
			// keep a handler (and its connection) forever.
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, connDeadline)
			defer cancel()
		}
		start := time.Now()
		paths := req.Paths
		source := queue.SourceHook
		if req.Op == protocol.OpPush {
			source = queue.SourcePush
		}
		var skipped []string
		if req.BuildClosure && req.Op == protocol.OpPush {
			var err error
			if paths, skipped, err = a.buildClosure(ctx, req.Paths); err != nil {
				a.log.Warn("push refused", "err", err, "peer_uid", p.uid)
				return &protocol.Response{Error: err.Error()}
			}
			if len(paths) == 0 {
				return &protocol.Response{Skipped: skipped}
			}
			source = queue.SourceBuildClosure
		} else if req.Closure {
			var err error
			if paths, err = a.closureOf(ctx, req.Paths); err != nil {
				a.log.Warn("push refused", "err", err, "peer_uid", p.uid)
				return &protocol.Response{Error: err.Error()}
			}
		}
		if req.Floating {
			var err error
			if paths, err = a.withFloatingOutputs(ctx, paths, req.Drv); err != nil {
				a.log.Warn("enqueue refused", "op", req.Op, "err", err, "peer_uid", p.uid, "peer_pid", p.pid)
				return &protocol.Response{Error: err.Error()}
			}
		}
		// Nothing unchecked reaches the notes or the presence check: the
		// full check (registered in the store) follows in enqueue.
		if err := checkSyntax(a.cfg.StoreDir, paths, req.Drv); err != nil {
			a.log.Warn("enqueue refused", "op", req.Op, "err", err, "peer_uid", p.uid, "peer_pid", p.pid)
			return &protocol.Response{Error: err.Error()}
		}
		// Before the commit: a job that finishes meanwhile sees the note
		// (see realiseLate).
		a.realiser.Note(req.Drv, paths...)
		if len(paths) > prefetchAbove {
			// Many paths at once (push --closure): learn which the cache
			// holds with a few listings, starting before the jobs do, so
			// that they need not ask one by one.
			a.uploader.Prefetch(a.uploadCtx, paths)
		}
		jobs, err := a.enqueue(ctx, paths, req.Drv, source)
		if err != nil {
			a.log.Warn("enqueue refused", "op", req.Op, "err", err, "peer_uid", p.uid, "peer_pid", p.pid)
			return &protocol.Response{Error: err.Error()}
		}
		a.metrics.Enqueued(time.Since(start))
		a.metrics.Queued(source.String(), len(paths))
		a.log.Info("enqueued", "op", req.Op, "source", source.String(), "paths", len(paths), "drv", req.Drv, "peer_uid", p.uid, "peer_pid", p.pid, "duration", time.Since(start))
		if a.cfg.BuildClosures && req.Op == protocol.OpEnqueue && req.Drv != "" {
			if !a.buildClosures.add(req.Drv) {
				a.log.Warn("build closure not queued: too many derivations wait for theirs (agentctl push --build-closure queues it)", "drv", req.Drv, "waiting", maxPendingBuildClosures)
			}
		}
		return &protocol.Response{Jobs: jobs, Count: len(jobs), Skipped: skipped}
	case protocol.OpDoctor:
		return &protocol.Response{Checks: a.doctor(ctx, a.access.operator(p))}
	case protocol.OpAudit:
		return a.audit(ctx, req, progress)
	case protocol.OpForget:
		n := a.uploader.Stats().KnownPresent
		if err := a.uploader.Forget(); err != nil {
			return &protocol.Response{Error: "forget: " + err.Error()}
		}
		a.log.Info("presence cache cleared by request", "paths", n, "peer_uid", p.uid)
		return &protocol.Response{Count: n}
	case protocol.OpGC, protocol.OpPin, protocol.OpUnpin, protocol.OpPins:
		return a.handleGC(ctx, req, progress)
	case protocol.OpStatus:
		st, err := a.status()
		if err != nil {
			return &protocol.Response{Error: err.Error()}
		}
		return &protocol.Response{Status: st}
	case protocol.OpWait:
		waits, err := a.pathWaits(ctx, req.Paths)
		if err != nil {
			return &protocol.Response{Error: err.Error()}
		}
		return &protocol.Response{Waits: waits}
	case protocol.OpList:
		var source *queue.Source
		if req.Source != "" {
			s, err := queue.ParseSource(req.Source)
			if err != nil {
				return &protocol.Response{Error: err.Error()}
			}
			source = &s
		}
		jobs, err := a.queue.ListBy(queue.State(req.State), source, 10000)
		if err != nil {
			return &protocol.Response{Error: err.Error()}
		}
		out := make([]protocol.Job, 0, len(jobs))
		for _, j := range jobs {
			out = append(out, jobView(j))
		}
		return &protocol.Response{Jobs: out}
	case protocol.OpRetry:
		if req.All {
			n, err := a.queue.RetryAll(a.now())
			if err != nil {
				return &protocol.Response{Error: err.Error()}
			}
			a.log.Info("retry requested", "jobs", n, "peer_uid", p.uid)
			return &protocol.Response{Count: n}
		}
		if err := a.queue.Retry(req.ID, a.now()); err != nil {
			return &protocol.Response{Error: err.Error()}
		}
		a.log.Info("retry requested", "job", req.ID, "peer_uid", p.uid)
		return &protocol.Response{Count: 1}
	case protocol.OpDrop:
		j, err := a.queue.Drop(req.ID)
		if err != nil {
			return &protocol.Response{Error: err.Error()}
		}
		if err := a.unroot(j.Path, j.Derivations()); err != nil {
			a.log.Warn("remove gc root", "path", j.Path, "err", err)
		}
		// A job being uploaded is stopped; its worker discards the
		// resumable upload state once it no longer reads it.
		uploading := a.stopDropped(j.ID)
		if !uploading {
			a.uploader.Discard(ctx, j.Path)
		}
		a.log.Info("job dropped", "job", j.ID, "path", j.Path, "was_uploading", uploading, "peer_uid", p.uid)
		return &protocol.Response{Count: 1, Jobs: []protocol.Job{jobView(*j)}}
	}
	return &protocol.Response{Error: "unknown operation " + req.Op}
}

func jobView(j queue.Job) protocol.Job {
	v := protocol.Job{ID: j.ID, Path: j.Path, Drv: j.Drv, State: string(j.State), Attempts: j.Attempts,
		EnqueuedAt: j.EnqueuedAt.Unix(), LastError: j.LastError, Source: j.Source.String()}
	if j.State == queue.StateReady && j.Attempts > 0 {
		v.State = "retrying"
		v.NotBefore = j.NotBefore.Unix()
	}
	return v
}

// closureOf returns paths and everything they reference, after checking
// that each given path is a store path.
func (a *Agent) closureOf(ctx context.Context, paths []string) ([]string, error) {
	seen := map[string]bool{}
	var out []string
	for _, p := range paths {
		if err := storepath.Check(a.cfg.StoreDir, p); err != nil {
			return nil, &RefusedError{err}
		}
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
	return out, nil
}

// withFloatingOutputs adds the realised floating content-addressed outputs
// of drv (which have no path in the .drv) to paths.
func (a *Agent) withFloatingOutputs(ctx context.Context, paths []string, drv string) ([]string, error) {
	if err := storepath.Check(a.cfg.StoreDir, drv); err != nil {
		return nil, &RefusedError{err}
	}
	outs, err := a.checkStore.QueryDerivationOutputMap(ctx, drv)
	if err != nil {
		return nil, err
	}
	have := map[string]bool{}
	for _, p := range paths {
		have[p] = true
	}
	for _, p := range outs {
		if p != "" && !have[p] {
			have[p] = true
			paths = append(paths, p)
		}
	}
	if len(paths) == 0 {
		return nil, &RefusedError{fmt.Errorf("derivation %s has no realised outputs", drv)}
	}
	return paths, nil
}

// RefusedError is a path refused for what it is (not a store path, not
// valid in the store), as opposed to a failure to check it.
type RefusedError struct{ Err error }

func (e *RefusedError) Error() string { return "refused: " + e.Err.Error() }
func (e *RefusedError) Unwrap() error { return e.Err }

// checkSyntax refuses paths (and a derivation) that are not store paths,
// before anything looks at them.
func checkSyntax(storeDir string, paths []string, drv string) error {
	if len(paths) > 100000 {
		return &RefusedError{fmt.Errorf("too many paths in one request (%d > 100000)", len(paths))}
	}
	for _, p := range paths {
		if err := storepath.Check(storeDir, p); err != nil {
			return &RefusedError{err}
		}
	}
	if drv != "" && storepath.Check(storeDir, drv) != nil {
		return &RefusedError{fmt.Errorf("drv %q is not a store path", drv)}
	}
	return nil
}

// checkPaths refuses anything that is not a valid, registered store path.
func (a *Agent) checkPaths(ctx context.Context, paths []string) error {
	if len(paths) > 100000 {
		return &RefusedError{fmt.Errorf("too many paths in one request (%d > 100000)", len(paths))}
	}
	for _, p := range paths {
		if err := storepath.Check(a.cfg.StoreDir, p); err != nil {
			return &RefusedError{err}
		}
	}
	valid, err := a.checkStore.QueryValidPaths(ctx, paths)
	if err != nil {
		return err
	}
	ok := make(map[string]bool, len(valid))
	for _, v := range valid {
		ok[v] = true
	}
	for _, p := range paths {
		if !ok[p] {
			return &RefusedError{fmt.Errorf("%s is not a valid path in the Nix store", p)}
		}
	}
	return nil
}

// enqueue validates paths, roots them against garbage collection, and
// commits them to the queue. It returns only after the commit and the roots
// are durable. The roots are made while the queue commits: each costs an
// fsync, and done one after the other they nearly doubled the time a hook
// waits (a root that a crash loses before the commit is durable is made
// again at the next start, for every queued path).
func (a *Agent) enqueue(ctx context.Context, paths []string, drv string, source queue.Source) ([]protocol.Job, error) {
	if drv != "" && storepath.Check(a.cfg.StoreDir, drv) != nil {
		return nil, &RefusedError{fmt.Errorf("drv %q is not a store path", drv)}
	}
	if err := a.checkPaths(ctx, paths); err != nil {
		return nil, err
	}
	res, err := a.commitJobs(paths, drv, queue.EnqueueOptions{Source: source})
	if err != nil {
		return nil, err
	}
	jobs := make([]protocol.Job, 0, len(res))
	for _, r := range res {
		jobs = append(jobs, jobView(r.Job))
	}
	return jobs, nil
}

// commitJobs roots paths (checked already) and commits their jobs.
func (a *Agent) commitJobs(paths []string, drv string, opt queue.EnqueueOptions) ([]queue.EnqueueResult, error) {
	a.rootsMu.RLock() // see unroot
	rooted := make(chan error, 1)
	roots := map[string]string{}
	for _, p := range paths {
		jobRoots(roots, p, drv)
	}
	go func() { rooted <- a.roots.AddNamed(roots) }()
	res, err := a.queue.EnqueueWith(paths, drv, a.now(), opt)
	rerr := <-rooted
	a.rootsMu.RUnlock()
	if err == nil && rerr != nil {
		err = fmt.Errorf("queued, but not protected from garbage collection: %w", rerr)
	}
	if err != nil {
		a.setStateErr(err)
		return nil, err
	}
	a.setStateErr(nil)
	a.logRequeued(res)
	return res, nil
}

// logRequeued logs the failed jobs a new request made ready again.
func (a *Agent) logRequeued(res []queue.EnqueueResult) {
	for _, r := range res {
		if r.Requeued {
			a.log.Info("failed job queued again by a new request", "job", r.Job.ID, "path", r.Job.Path, "last_error", r.Job.LastError)
		}
	}
}

// importSpool queues the requests the hook spooled while agentd was away,
// file by file, oldest first. A file is removed only after its paths are
// committed; paths that are not valid store paths are logged and dropped; a
// file that cannot be parsed is renamed *.bad and kept for inspection. A
// file the Nix daemon answers with an error is tried again at the next
// imports, and renamed *.bad after maxSpoolAttempts of them; the files
// behind it are imported meanwhile. When the daemon cannot be reached or
// the queue cannot commit, no file can be imported: the import stops until
// the next one, and no file is charged an attempt.
func (a *Agent) importSpool(ctx context.Context) {
	dir := a.spoolDir()
	spool.RemoveStaleTemps(dir, time.Hour)
	l, err := spool.Scan(dir)
	if err != nil {
		a.log.Error("list spool", "dir", dir, "err", err)
		return
	}
	a.noteOdd(l.Odd)
	files := l.Files
	defer a.spoolTries.keepOnly(files)
	for _, f := range files {
		a.spoolBeat.Store(time.Now().UnixNano())
		if ctx.Err() != nil {
			return
		}
		err := a.importSpoolFile(ctx, f)
		if err == nil {
			a.spoolTries.forget(f)
			continue
		}
		if !fileAtFault(err) {
			a.log.Warn("spool import postponed", "file", f, "err", err)
			return
		}
		n := a.spoolTries.failed(f)
		if n < maxSpoolAttempts {
			a.log.Warn("spool file not imported; tried again later, the files behind it now", "file", f, "attempt", n, "max_attempts", maxSpoolAttempts, "err", err)
			continue
		}
		if qerr := spool.Quarantine(f); qerr != nil {
			a.log.Error("spool file not imported after repeated attempts, and it could not be renamed to .bad; tried again at the next import", "file", f, "attempts", n, "reason", err, "err", qerr)
			continue
		}
		a.spoolTries.forget(f)
		a.log.Error("spool file not imported after repeated attempts; renamed to .bad", "file", f, "attempts", n, "reason", err)
	}
}

// importSpoolFile imports one spool file. It returns nil once the file is
// dealt with: imported and removed, or renamed *.bad if unreadable.
func (a *Agent) importSpoolFile(ctx context.Context, f string) error {
	ctx, cancel := context.WithTimeout(ctx, a.spoolFileTimeout())
	defer cancel()
	e, err := spool.Read(f)
	if err != nil {
		if qerr := spool.Quarantine(f); qerr != nil {
			a.log.Error("unreadable spool file, and it could not be renamed to .bad; tried again at the next import", "file", f, "err", err, "rename_err", qerr)
			return nil
		}
		a.log.Error("unreadable spool file; renamed to .bad", "file", f, "err", err)
		return nil
	}
	if e.Floating && e.Drv != "" {
		paths, err := a.withFloatingOutputs(ctx, e.Paths, e.Drv)
		var refused *RefusedError
		switch {
		case err == nil:
			e.Paths = paths
		case errors.As(err, &refused):
			a.log.Warn("spooled derivation refused", "file", f, "drv", e.Drv, "err", err)
		default:
			return fmt.Errorf("outputs of %s: %w", e.Drv, err)
		}
	}
	good, err := a.validSpooled(ctx, f, e.Paths)
	if err != nil {
		return err
	}
	drv := e.Drv
	if drv != "" && storepath.Check(a.cfg.StoreDir, drv) != nil {
		drv = ""
	}
	if len(good) > 0 {
		a.realiser.Note(drv, good...)
		a.rootsMu.RLock() // see unroot
		roots := map[string]string{}
		for _, p := range good {
			jobRoots(roots, p, drv)
		}
		if err := a.roots.AddNamed(roots); err != nil {
			a.log.Warn("gc root", "file", f, "err", err)
		}
		res, err := a.queue.Enqueue(good, drv, a.now())
		a.rootsMu.RUnlock()
		if err != nil {
			a.setStateErr(err)
			return err
		}
		a.logRequeued(res)
	}
	if err := spool.Remove(f); err != nil {
		a.log.Error("remove imported spool file", "file", f, "err", err)
		return nil // committed: importing it again changes nothing
	}
	a.log.Info("imported spool file", "file", f, "paths", len(good))
	if e.Drv != "" {
		// The hook rooted the derivation while the request was spooled;
		// queued requests keep their derivations as hooks that reach
		// agentd do.
		if err := a.unrootSpooled(e.Drv); err != nil {
			a.log.Warn("remove gc root", "path", e.Drv, "err", err)
		}
	}
	return nil
}

// validSpooled returns the paths of spool file f that are store paths
// valid in the Nix store, asking the daemon once for all of them; the
// others are logged and dropped.
func (a *Agent) validSpooled(ctx context.Context, f string, paths []string) ([]string, error) {
	var syntactic []string
	for _, p := range paths {
		if err := storepath.Check(a.cfg.StoreDir, p); err != nil {
			a.log.Warn("spooled path refused", "file", f, "path", p, "err", err)
			continue
		}
		syntactic = append(syntactic, p)
	}
	if len(syntactic) == 0 {
		return nil, nil
	}
	valid, err := a.checkStore.QueryValidPaths(ctx, syntactic)
	if err != nil {
		return nil, fmt.Errorf("check the paths of %s: %w", f, err)
	}
	ok := make(map[string]bool, len(valid))
	for _, v := range valid {
		ok[v] = true
	}
	good := syntactic[:0]
	for _, p := range syntactic {
		if !ok[p] {
			a.log.Warn("spooled path refused", "file", f, "path", p, "err", "not a valid path in the Nix store")
			continue
		}
		good = append(good, p)
	}
	return good, nil
}

// spoolFileTimeout bounds the import of one spool file: a Nix daemon that
// stops answering postpones the import instead of holding it.
func (a *Agent) spoolFileTimeout() time.Duration {
	if a.spoolFileBound > 0 {
		return a.spoolFileBound
	}
	return defaultSpoolFileTimeout
}

func (a *Agent) spoolDir() string { return statedir.Dir(a.cfg.StateDir).Spool() }

// status assembles the status view.
func (a *Agent) status() (*protocol.Status, error) {
	// The spool before the queue: an import commits its jobs before it
	// removes the file, so a request is always counted in one of them.
	spooled, _ := a.spooled()
	st, err := a.queue.Stats()
	if err != nil {
		return nil, err
	}
	now := a.now()
	s := &protocol.Status{
		Version:           Version,
		UptimeSeconds:     int64(time.Since(a.started).Seconds()),
		Cache:             a.cache.String(),
		Pending:           st.Pending,
		Uploading:         st.Leased,
		Retrying:          st.Retrying,
		Failed:            st.Failed,
		Uploaded:          st.Uploaded,
		UploadedNARBytes:  st.NARBytes,
		UploadedFileBytes: st.FileBytes,
		UploadedPaths:     st.Paths,
		OldestPendingJob:  st.OldestActiveID,
		NewestJob:         st.NewestID,
		Skipped:           st.Skipped,
		LastError:         st.LastError,
		InProgress:        []protocol.Upload{},
	}
	s.UploadedRealisations = st.Realisations
	s.RatePathsPerSecond, s.RateNARBytesPerSec = a.rate.rates(now, a.started)
	if r := a.reachable.Load(); r != 0 {
		ok := r == 1
		s.CacheReachable = &ok
	}
	if !st.OldestActive.IsZero() {
		s.OldestPendingSeconds = int64(now.Sub(st.OldestActive).Seconds())
	}
	if !st.LastErrorAt.IsZero() {
		s.LastErrorAt = st.LastErrorAt.Unix()
	}
	if !st.NextRetry.IsZero() {
		s.NextRetryAt = st.NextRetry.Unix()
	}
	if probe, paused := a.breaker.pausedUntil(); paused && probe.Unix() > s.NextRetryAt {
		// Uploads wait for the next probe of the cache.
		s.NextRetryAt = probe.Unix()
	}
	for _, p := range a.uploader.InProgress() {
		s.InProgress = append(s.InProgress, protocol.Upload{Path: p.Path, BytesDone: p.Done(), BytesSize: p.Total})
	}
	a.stateErrMu.Lock()
	s.StateDirError = a.stateErr
	a.stateErrMu.Unlock()
	if a.uploader != nil {
		s.KnownPresent = a.uploader.Stats().KnownPresent
	}
	if a.window != nil {
		ws := a.window.Stats()
		s.RequestWindow, s.RequestsInFlight = ws.Limit, ws.InFlight
	}
	s.Spooled = spooled
	s.QueuedBySource = map[string]int{}
	for src, n := range st.BySource {
		s.QueuedBySource[src.String()] = n
	}
	s.Capture = a.captureStatus()
	if t := a.timeToCache.stats(now); t.N > 0 {
		s.TimeToCache = protocol.TimeToCache{Paths: t.N, P50Seconds: t.P50.Seconds(), P99Seconds: t.P99.Seconds()}
	}
	return s, nil
}

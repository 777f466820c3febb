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
)

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
		return a.serveEnqueue(ctx, req, p)
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
		paths, _, err := parseRequest(a.cfg.StoreDir, req.Paths, "")
		if err != nil {
			return &protocol.Response{Error: err.Error()}
		}
		waits, err := a.pathWaits(ctx, paths)
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
		if err := a.roots.unroot(j.Path, j.Derivations()); err != nil {
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
	a.spool.noteOdd(l.Odd)
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
	n, err := a.intake.spooled(ctx, f, e.Paths, e.Drv, e.Floating)
	if err != nil {
		return err
	}
	if err := spool.Remove(f); err != nil {
		a.log.Error("remove imported spool file", "file", f, "err", err)
		return nil // committed: importing it again changes nothing
	}
	a.log.Info("imported spool file", "file", f, "paths", n)
	if e.Drv != "" {
		// The hook rooted the derivation while the request was spooled;
		// queued requests keep their derivations as hooks that reach
		// agentd do.
		if err := a.roots.unrootSpooled(e.Drv); err != nil {
			a.log.Warn("remove gc root", "path", e.Drv, "err", err)
		}
	}
	return nil
}

// spoolFileTimeout bounds the import of one spool file: a Nix daemon that
// stops answering postpones the import instead of holding it.
func (a *Agent) spoolFileTimeout() time.Duration {
	if a.spoolFileBound > 0 {
		return a.spoolFileBound
	}
	return defaultSpoolFileTimeout
}

func (a *Agent) spoolDir() string { return a.cfg.StateDir + "/spool" }

// status assembles the status view.
func (a *Agent) status() (*protocol.Status, error) {
	// The spool before the queue: an import commits its jobs before it
	// removes the file, so a request is always counted in one of them.
	spooled, _ := a.spool.list()
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
	s.StateDirError = a.stateErr.get()
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
